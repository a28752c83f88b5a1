//! Contiguous vector storage shared by both index kinds, plus top-k selection.

use std::collections::{BinaryHeap, HashMap};

use crate::kernels::scores_into;
use crate::{normalize, DocKey, Hit, IndexError, Result, RESERVED_KEY};

/// Rows scored per block: 256 x 576-d f32 is about 590 KB, which stays in a 1 MB L2 while a
/// block of queries is scored against it.
const BLOCK_ROWS: usize = 256;
/// Queries scored against each block in a batched scan.
const QUERY_BLOCK: usize = 32;
/// Below this many multiply-adds a single query is not worth spreading over threads.
const PARALLEL_MIN_WORK: usize = 4 << 20;

/// Vectors in one dense row-major buffer (so scans and saves are straight memory walks), with
/// a key per row and a key-to-row map. Removal moves the last row into the hole.
#[derive(Clone)]
pub(crate) struct VectorStore {
    dim: usize,
    data: Vec<f32>,
    keys: Vec<DocKey>,
    rows: HashMap<DocKey, usize>,
}

impl VectorStore {
    pub(crate) fn new(dim: usize) -> Result<VectorStore> {
        if dim == 0 {
            return Err(IndexError::InvalidParams("dimension must be > 0".into()));
        }
        Ok(VectorStore {
            dim,
            data: Vec::new(),
            keys: Vec::new(),
            rows: HashMap::new(),
        })
    }

    pub(crate) fn dim(&self) -> usize {
        self.dim
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        self.data.reserve(n * self.dim);
        self.keys.reserve(n);
        self.rows.reserve(n);
    }

    /// Checks and normalises a vector meant for this store.
    pub(crate) fn prepare(&self, v: &[f32]) -> Result<Vec<f32>> {
        if v.len() != self.dim {
            return Err(IndexError::DimMismatch {
                expected: self.dim,
                got: v.len(),
            });
        }
        normalize(v)
    }

    pub(crate) fn check_key(key: DocKey) -> Result<()> {
        if key == RESERVED_KEY {
            return Err(IndexError::ReservedKey(key));
        }
        Ok(())
    }

    /// Stores an already prepared (normalised) vector; returns whether the key existed.
    pub(crate) fn put(&mut self, key: DocKey, v: &[f32]) -> bool {
        debug_assert_eq!(v.len(), self.dim);
        match self.rows.get(&key) {
            Some(&row) => {
                self.data[row * self.dim..(row + 1) * self.dim].copy_from_slice(v);
                true
            }
            None => {
                self.rows.insert(key, self.keys.len());
                self.keys.push(key);
                self.data.extend_from_slice(v);
                false
            }
        }
    }

    pub(crate) fn delete(&mut self, key: DocKey) -> bool {
        let Some(row) = self.rows.remove(&key) else {
            return false;
        };
        let last = self.keys.len() - 1;
        if row != last {
            let moved = self.keys[last];
            self.keys[row] = moved;
            self.rows.insert(moved, row);
            let dim = self.dim;
            self.data
                .copy_within(last * dim..(last + 1) * dim, row * dim);
        }
        self.keys.pop();
        self.data.truncate(last * self.dim);
        true
    }

    pub(crate) fn contains(&self, key: DocKey) -> bool {
        self.rows.contains_key(&key)
    }

    pub(crate) fn vector(&self, key: DocKey) -> Option<&[f32]> {
        let row = *self.rows.get(&key)?;
        Some(&self.data[row * self.dim..(row + 1) * self.dim])
    }

    pub(crate) fn sorted_keys(&self) -> Vec<DocKey> {
        let mut keys = self.keys.clone();
        keys.sort_unstable();
        keys
    }

    /// Score of a stored key against a prepared query.
    pub(crate) fn score(&self, q: &[f32], key: DocKey) -> Option<f32> {
        self.vector(key).map(|v| crate::dot(q, v))
    }

    /// Exact top-k of a prepared query over every stored row, skipping `exclude`.
    pub(crate) fn scan(&self, q: &[f32], k: usize, exclude: Option<DocKey>) -> Vec<Hit> {
        let n = self.len();
        if k == 0 || n == 0 {
            return Vec::new();
        }
        let threads = worker_threads();
        if threads <= 1 || n * self.dim < PARALLEL_MIN_WORK {
            let mut top = TopK::new(k);
            self.scan_rows(q, 0..n, exclude, &mut top);
            return top.into_sorted();
        }
        let chunk = n.div_ceil(threads);
        let parts: Vec<TopK> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
                    s.spawn(move || {
                        let mut top = TopK::new(k);
                        self.scan_rows(q, range, exclude, &mut top);
                        top
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("scan worker panicked"))
                .collect()
        });
        let mut top = TopK::new(k);
        for part in parts {
            for hit in part.heap {
                top.push(hit.0.score, hit.0.key);
            }
        }
        top.into_sorted()
    }

    fn scan_rows(
        &self,
        q: &[f32],
        range: std::ops::Range<usize>,
        exclude: Option<DocKey>,
        top: &mut TopK,
    ) {
        let mut scores = vec![0f32; BLOCK_ROWS];
        let mut start = range.start;
        while start < range.end {
            let end = (start + BLOCK_ROWS).min(range.end);
            let out = &mut scores[..end - start];
            scores_into(q, &self.data[start * self.dim..end * self.dim], out);
            for (i, &s) in out.iter().enumerate() {
                let key = self.keys[start + i];
                if Some(key) != exclude {
                    top.push(s, key);
                }
            }
            start = end;
        }
    }

    /// Exact top-k of many prepared queries (row-major). Blocks of rows are scored against
    /// blocks of queries so each row block is read from memory once per query block instead of
    /// once per query; queries are spread over threads.
    pub(crate) fn scan_batch(&self, queries: &[f32], k: usize) -> Vec<Vec<Hit>> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        if nq == 0 {
            return Vec::new();
        }
        let threads = worker_threads().min(nq.div_ceil(QUERY_BLOCK)).max(1);
        let per_thread = nq.div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let lo = (t * per_thread).min(nq);
                    let hi = ((t + 1) * per_thread).min(nq);
                    s.spawn(move || self.scan_queries(&queries[lo * dim..hi * dim], k))
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("scan worker panicked"))
                .collect()
        })
    }

    fn scan_queries(&self, queries: &[f32], k: usize) -> Vec<Vec<Hit>> {
        let dim = self.dim;
        let n = self.len();
        let mut results = Vec::new();
        let mut scores = vec![0f32; BLOCK_ROWS];
        for qblock in queries.chunks(QUERY_BLOCK * dim) {
            let mut tops: Vec<TopK> = (0..qblock.len() / dim).map(|_| TopK::new(k)).collect();
            if k > 0 {
                let mut start = 0;
                while start < n {
                    let end = (start + BLOCK_ROWS).min(n);
                    let rows = &self.data[start * dim..end * dim];
                    for (q, top) in qblock.chunks_exact(dim).zip(tops.iter_mut()) {
                        let out = &mut scores[..end - start];
                        scores_into(q, rows, out);
                        for (i, &s) in out.iter().enumerate() {
                            top.push(s, self.keys[start + i]);
                        }
                    }
                    start = end;
                }
            }
            results.extend(tops.into_iter().map(TopK::into_sorted));
        }
        results
    }

    /// Row numbers in ascending key order, so that saving the same content always produces
    /// the same bytes (and checksums).
    pub(crate) fn sorted_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_unstable_by_key(|&r| self.keys[r]);
        order
    }

    pub(crate) fn key_at(&self, row: usize) -> DocKey {
        self.keys[row]
    }

    pub(crate) fn row_at(&self, row: usize) -> &[f32] {
        &self.data[row * self.dim..(row + 1) * self.dim]
    }

    /// Rebuilds a store from saved rows (already validated and normalised at save time).
    pub(crate) fn from_rows(dim: usize, keys: Vec<DocKey>, data: Vec<f32>) -> Result<VectorStore> {
        let mut store = VectorStore::new(dim)?;
        debug_assert_eq!(keys.len() * dim, data.len());
        store.rows.reserve(keys.len());
        for (i, &k) in keys.iter().enumerate() {
            store.rows.insert(k, i);
        }
        store.keys = keys;
        store.data = data;
        Ok(store)
    }
}

/// Threads used for scans: all the cores the process may use.
pub(crate) fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A hit ordered so that the worst hit is the greatest, making `BinaryHeap` evict the worst.
#[derive(Clone, Copy)]
pub(crate) struct Worst(pub Hit);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.rank_cmp(&other.0)
    }
}

/// Bounded selection of the best `k` hits under [`Hit::rank_cmp`].
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> TopK {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1),
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, score: f32, key: DocKey) {
        if self.k == 0 {
            return;
        }
        let hit = Hit { key, score };
        if self.heap.len() < self.k {
            self.heap.push(Worst(hit));
            return;
        }
        let worst = self.heap.peek().expect("heap is full").0;
        // Cheap reject first: most rows of a scan score below the current k-th best.
        if score < worst.score {
            return;
        }
        if hit.rank_cmp(&worst) == std::cmp::Ordering::Less {
            self.heap.pop();
            self.heap.push(Worst(hit));
        }
    }

    pub(crate) fn into_sorted(self) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self.heap.into_iter().map(|w| w.0).collect();
        hits.sort_by(Hit::rank_cmp);
        hits
    }
}
