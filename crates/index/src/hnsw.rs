//! HNSW graph index on top of usearch.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};

use serde::{Deserialize, Serialize};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::store::{worker_threads, VectorStore};
use crate::{check_batch, DocKey, Hit, IndexError, Result, VectorIndex, RESERVED_KEY};

/// Construction and search parameters of the HNSW graph.
///
/// Defaults, measured at 100K x 576 on 2 cores ([`crate::bench_recall_on`]): on clustered
/// vectors of low intrinsic dimension (the shape of real embeddings) recall@10 is 1.000 at a
/// 240 us median query (the exact scan takes 5 ms); with `expansion_search: 64` it drops to
/// 0.993. `expansion_search` defaults to 128 rather than 64 because the query embedding
/// itself takes far longer than either. On uniformly random unit vectors no setting is good:
/// the defaults get recall 0.10, and 0.99 needs `expansion_search` in the tens of thousands,
/// which is slower than the exact scan (see `tests/scale.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Links per node on the upper levels (level 0 keeps twice as many). More links: better
    /// recall, more memory, slower build.
    pub connectivity: usize,
    /// Beam width while inserting. Larger builds a better graph, more slowly.
    pub expansion_add: usize,
    /// Beam width while searching (at least `k` is used). The main recall/latency knob; it can
    /// be changed after building with [`HnswIndex::set_expansion_search`].
    pub expansion_search: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 128,
        }
    }
}

impl HnswParams {
    fn validate(&self) -> Result<()> {
        if self.connectivity < 2 || self.expansion_add == 0 || self.expansion_search == 0 {
            return Err(IndexError::InvalidParams(format!(
                "connectivity must be >= 2 and expansions > 0, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// Limits concurrent calls into usearch to the number of per-thread contexts it reserved:
/// beyond that usearch fails the call ("Reserve capacity ahead of searches") instead of
/// waiting, and `search` takes `&self`, so any number of threads may call it at once.
struct Gate {
    free: Mutex<usize>,
    cv: Condvar,
}

struct GateGuard<'a>(&'a Gate);

impl Gate {
    fn new(n: usize) -> Gate {
        Gate {
            free: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    fn enter(&self) -> GateGuard<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        GateGuard(self)
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|e| e.into_inner());
        *free += 1;
        self.0.cv.notify_one();
    }
}

fn backend(e: impl std::fmt::Display) -> IndexError {
    IndexError::Backend(e.to_string())
}

/// Marks a label whose node is dead (replaced or removed) in [`HnswIndex::label_key`].
const DEAD: DocKey = RESERVED_KEY;

/// Approximate nearest-neighbour index: a usearch HNSW graph over inner product (the vectors
/// are normalised, so this is cosine), plus a copy of every vector.
///
/// The copy costs `len * dim * 4` bytes more memory, and buys: scores recomputed with the same
/// kernel as [`crate::ExactIndex`] (so the two kinds rank equal candidates identically and
/// ties break the same way), `get` without a round trip through C++, and a graph that can be
/// rebuilt from the vectors alone.
///
/// # Updates
///
/// Graph nodes are named by internal *labels*, not by document keys: every upsert inserts a
/// fresh node under a new label, and the node of the previous version (or of a removed key)
/// is only marked dead. Dead nodes keep routing searches (as HNSW tombstones do) but are
/// filtered out of results and neighbour lists. We do not use usearch's own `remove`, because
/// usearch then reuses the freed slot for the next insert through an in-place update path that
/// links the moved node poorly: measured on clustered data, replacing 10% of the vectors that
/// way dropped recall@10 from 0.999 to 0.975 (and widening the search beam did not recover it),
/// while inserting fresh nodes and tombstoning the old ones kept 0.999. Once dead nodes exceed
/// a fraction of the live ones (see [`HnswIndex::set_max_dead_fraction`]) the graph is rebuilt
/// from the stored vectors, which bounds the memory they take.
pub struct HnswIndex {
    params: HnswParams,
    store: VectorStore,
    graph: Index,
    /// Document key of each label issued so far, `DEAD` for dead nodes.
    label_key: Vec<DocKey>,
    /// Current label of each stored key.
    key_label: HashMap<DocKey, u64>,
    dead: usize,
    max_dead_fraction: f64,
    threads: usize,
    gate: Gate,
}

/// Dead nodes tolerated regardless of the fraction, so small indexes are not rebuilt for a
/// handful of updates.
const MIN_DEAD_BEFORE_COMPACT: usize = 1024;

impl HnswIndex {
    /// An empty index of dimension `dim`.
    pub fn new(dim: usize, params: HnswParams) -> Result<HnswIndex> {
        params.validate()?;
        let store = VectorStore::new(dim)?;
        let graph = Self::new_graph(dim, &params)?;
        // Contexts for every core plus headroom for callers that search from more threads
        // than there are cores (a server); each costs only a few small buffers.
        let threads = (worker_threads() * 4).max(16);
        let index = HnswIndex {
            params,
            store,
            graph,
            label_key: Vec::new(),
            key_label: HashMap::new(),
            dead: 0,
            max_dead_fraction: 0.5,
            threads,
            gate: Gate::new(threads),
        };
        index.reserve_graph(&index.graph, 1024)?;
        Ok(index)
    }

    fn new_graph(dim: usize, params: &HnswParams) -> Result<Index> {
        let options = IndexOptions {
            dimensions: dim,
            metric: MetricKind::IP,
            quantization: ScalarKind::F32,
            connectivity: params.connectivity,
            expansion_add: params.expansion_add,
            expansion_search: params.expansion_search,
            multi: false,
        };
        Index::new(&options).map_err(backend)
    }

    /// Builds an index from `keys.len()` row-major vectors, inserting on all cores.
    pub fn build(
        dim: usize,
        params: HnswParams,
        keys: &[DocKey],
        vectors: &[f32],
    ) -> Result<HnswIndex> {
        let mut index = HnswIndex::new(dim, params)?;
        index.upsert_batch(keys, vectors)?;
        Ok(index)
    }

    /// The parameters the graph was built with (and the current search expansion).
    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// Changes the search beam width; larger is slower and more accurate.
    pub fn set_expansion_search(&mut self, expansion: usize) -> Result<()> {
        if expansion == 0 {
            return Err(IndexError::InvalidParams(
                "expansion_search must be > 0".into(),
            ));
        }
        self.graph.change_expansion_search(expansion);
        self.params.expansion_search = expansion;
        Ok(())
    }

    /// Dead nodes (old versions of replaced vectors, removed keys) still in the graph.
    pub fn dead_count(&self) -> usize {
        self.dead
    }

    /// Sets when updates trigger a rebuild: once dead nodes exceed `fraction` x live nodes
    /// (and at least 1024). `f64::INFINITY` never rebuilds automatically; default 0.5.
    pub fn set_max_dead_fraction(&mut self, fraction: f64) {
        self.max_dead_fraction = fraction.max(0.0);
    }

    /// Rebuilds the graph from the stored vectors, dropping dead nodes. Costs a full build
    /// (all cores).
    pub fn compact(&mut self) -> Result<()> {
        let graph = Self::new_graph(self.dim(), &self.params)?;
        let order = self.store.sorted_order();
        let keys: Vec<DocKey> = order.iter().map(|&r| self.store.key_at(r)).collect();
        self.reserve_graph(&graph, keys.len().max(1024))?;
        let labels: Vec<u64> = (0..keys.len() as u64).collect();
        let failures = self.add_parallel(&graph, &labels, |i| self.store.row_at(order[i]));
        if let Some((label, e)) = failures.into_iter().next() {
            return Err(IndexError::Backend(format!(
                "rebuilding, key {}: {e}",
                keys[label as usize]
            )));
        }
        self.graph = graph;
        self.key_label = keys
            .iter()
            .enumerate()
            .map(|(i, &k)| (k, i as u64))
            .collect();
        self.label_key = keys;
        self.dead = 0;
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<()> {
        let live = self.store.len() as f64;
        if self.dead > MIN_DEAD_BEFORE_COMPACT && self.dead as f64 > self.max_dead_fraction * live {
            tracing::debug!(
                dead = self.dead,
                live = self.store.len(),
                "rebuilding HNSW graph"
            );
            self.compact()?;
        }
        Ok(())
    }

    /// The SIMD kernel usearch picked for distances on this CPU (for benchmark reports).
    pub fn hardware_acceleration(&self) -> String {
        self.graph.hardware_acceleration()
    }

    /// Bytes of the serialised usearch graph (vectors included, as usearch stores them).
    pub fn graph_serialized_len(&self) -> usize {
        self.graph.serialized_length()
    }

    fn reserve_graph(&self, graph: &Index, capacity: usize) -> Result<()> {
        graph
            .reserve_capacity_and_threads(capacity, self.threads)
            .map_err(backend)
    }

    /// Makes room in the graph for `extra` more nodes (nodes are never freed, see the type
    /// docs, so every insert takes a new one).
    fn ensure_capacity(&self, extra: usize) -> Result<()> {
        let need = self.graph.size() + extra;
        let cap = self.graph.capacity();
        if need > cap {
            self.reserve_graph(&self.graph, need.max(cap * 2).max(1024))?;
        }
        Ok(())
    }

    pub(crate) fn store(&self) -> &VectorStore {
        &self.store
    }

    /// Label issued next; persisted so labels are never reused after a reload.
    pub(crate) fn next_label(&self) -> u64 {
        self.label_key.len() as u64
    }

    /// The graph label of a stored key.
    pub(crate) fn label_of(&self, key: DocKey) -> Option<u64> {
        self.key_label.get(&key).copied()
    }

    /// Writes usearch's serialisation of the graph to `path` (straight to the file, so a
    /// large graph is never held twice in memory).
    pub(crate) fn save_graph(&self, path: &std::path::Path) -> Result<()> {
        let io = |e: std::io::Error| IndexError::Io {
            op: "write",
            path: path.to_path_buf(),
            source: e,
        };
        match path.to_str() {
            Some(p) => self.graph.save(p).map_err(|e| {
                io(std::io::Error::other(format!(
                    "usearch could not save the graph: {e}"
                )))
            }),
            None => {
                let mut buf = vec![0u8; self.graph.serialized_length()];
                self.graph.save_to_buffer(&mut buf).map_err(backend)?;
                std::fs::write(path, buf).map_err(io)
            }
        }
    }

    /// Reassembles an index from persisted parts: the vectors, the label of each key (in the
    /// store's row order), the next label to issue and the usearch graph. Checks that the
    /// graph holds every live label, so a mix-up of files cannot go unnoticed.
    pub(crate) fn from_parts(
        params: HnswParams,
        store: VectorStore,
        labels: &[u64],
        next_label: u64,
        graph_bytes: &[u8],
        graph_file: &std::path::Path,
    ) -> Result<HnswIndex> {
        let corrupt = |problem: String| IndexError::Corrupt {
            file: graph_file.to_path_buf(),
            problem,
        };
        let mut index = HnswIndex::new(store.dim(), params)?;
        index
            .graph
            .load_from_buffer(graph_bytes)
            .map_err(|e| corrupt(format!("usearch could not load it: {e}")))?;
        if index.graph.dimensions() != store.dim() {
            return Err(corrupt(format!(
                "graph has dimension {}, vectors have {}",
                index.graph.dimensions(),
                store.dim()
            )));
        }
        if (index.graph.size() as u64) > next_label {
            return Err(corrupt(format!(
                "graph has {} nodes but only {next_label} labels were issued",
                index.graph.size()
            )));
        }
        let mut label_key = vec![DEAD; next_label as usize];
        let mut key_label = HashMap::with_capacity(labels.len());
        for (row, &label) in labels.iter().enumerate() {
            let key = store.key_at(row);
            if label >= next_label || label_key[label as usize] != DEAD {
                return Err(corrupt(format!(
                    "label {label} of key {key} is out of range or repeated"
                )));
            }
            if !index.graph.contains(label) {
                return Err(corrupt(format!(
                    "key {key} (label {label}) is not in the graph"
                )));
            }
            label_key[label as usize] = key;
            key_label.insert(key, label);
        }
        // The file does not carry the expansions; apply ours.
        index.graph.change_expansion_add(params.expansion_add);
        index.graph.change_expansion_search(params.expansion_search);
        index.reserve_graph(&index.graph, index.graph.capacity().max(1024))?;
        index.dead = next_label as usize - labels.len();
        index.label_key = label_key;
        index.key_label = key_label;
        index.store = store;
        Ok(index)
    }

    fn add_one(&self, graph: &Index, label: u64, v: &[f32]) -> Result<()> {
        let _slot = self.gate.enter();
        graph.add(label, v).map_err(backend)
    }

    /// Inserts `labels[i]` with vector `row(i)` into `graph` on all cores; returns failures.
    fn add_parallel<'a>(
        &self,
        graph: &Index,
        labels: &[u64],
        row: impl Fn(usize) -> &'a [f32] + Sync,
    ) -> Vec<(u64, IndexError)> {
        let threads = worker_threads().min(self.threads).max(1);
        if threads == 1 || labels.len() < 64 {
            return (0..labels.len())
                .filter_map(|i| {
                    self.add_one(graph, labels[i], row(i))
                        .err()
                        .map(|e| (labels[i], e))
                })
                .collect();
        }
        let row = &row;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        (t..labels.len())
                            .step_by(threads)
                            .filter_map(|i| {
                                self.add_one(graph, labels[i], row(i))
                                    .err()
                                    .map(|e| (labels[i], e))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("insert worker panicked"))
                .collect()
        })
    }

    /// Records that `key` now lives at `label` (the label just issued).
    fn bind(&mut self, key: DocKey, label: u64) {
        debug_assert_eq!(label as usize, self.label_key.len());
        self.label_key.push(key);
        if let Some(old) = self.key_label.insert(key, label) {
            self.label_key[old as usize] = DEAD;
            self.dead += 1;
        }
    }

    fn live_key(&self, label: u64) -> Option<DocKey> {
        match self.label_key.get(label as usize) {
            Some(&k) if k != DEAD => Some(k),
            _ => None,
        }
    }
}

impl VectorIndex for HnswIndex {
    fn dim(&self) -> usize {
        self.store.dim()
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn upsert(&mut self, key: DocKey, v: &[f32]) -> Result<()> {
        VectorStore::check_key(key)?;
        let v = self.store.prepare(v)?;
        self.ensure_capacity(1)?;
        let label = self.next_label();
        self.add_one(&self.graph, label, &v)?;
        self.bind(key, label);
        self.store.put(key, &v);
        self.maybe_compact()
    }

    fn upsert_batch(&mut self, keys: &[DocKey], vectors: &[f32]) -> Result<()> {
        let dim = self.dim();
        check_batch(dim, keys.len(), vectors.len())?;
        // Validate everything before touching the index, so a bad row leaves it unchanged.
        let mut last: HashMap<DocKey, usize> = HashMap::with_capacity(keys.len());
        for (i, &key) in keys.iter().enumerate() {
            VectorStore::check_key(key)?;
            last.insert(key, i);
        }
        let mut prepared = Vec::with_capacity(last.len() * dim);
        let mut order = Vec::with_capacity(last.len());
        for (i, &key) in keys.iter().enumerate() {
            if last[&key] == i {
                prepared.extend(self.store.prepare(&vectors[i * dim..(i + 1) * dim])?);
                order.push(key);
            }
        }
        self.ensure_capacity(order.len())?;
        self.store.reserve(order.len());
        let base = self.next_label();
        let labels: Vec<u64> = (base..base + order.len() as u64).collect();
        let failures =
            self.add_parallel(&self.graph, &labels, |i| &prepared[i * dim..(i + 1) * dim]);
        let failed: std::collections::HashSet<u64> = failures.iter().map(|f| f.0).collect();
        for (i, (&key, v)) in order.iter().zip(prepared.chunks_exact(dim)).enumerate() {
            if failed.contains(&labels[i]) {
                // Issued but not in the graph: a dead label, so labels stay dense.
                self.label_key.push(DEAD);
                self.dead += 1;
            } else {
                self.bind(key, labels[i]);
                self.store.put(key, v);
            }
        }
        if let Some((label, err)) = failures.into_iter().next() {
            let key = order[(label - base) as usize];
            return Err(IndexError::Backend(format!("inserting key {key}: {err}")));
        }
        self.maybe_compact()
    }

    fn remove(&mut self, key: DocKey) -> Result<bool> {
        let Some(label) = self.key_label.remove(&key) else {
            return Ok(false);
        };
        self.label_key[label as usize] = DEAD;
        self.dead += 1;
        self.store.delete(key);
        self.maybe_compact()?;
        Ok(true)
    }

    fn contains(&self, key: DocKey) -> bool {
        self.store.contains(key)
    }

    fn get(&self, key: DocKey) -> Option<Vec<f32>> {
        self.store.vector(key).map(<[f32]>::to_vec)
    }

    fn search(&self, q: &[f32], k: usize) -> Result<Vec<Hit>> {
        let q = self.store.prepare(q)?;
        let want = k.min(self.len());
        if want == 0 {
            return Ok(Vec::new());
        }
        let matches = {
            let _slot = self.gate.enter();
            if self.dead == 0 {
                self.graph.search(&q, want)
            } else {
                // Dead nodes still guide the traversal but must not take result slots.
                self.graph
                    .filtered_search(&q, want, |label| self.live_key(label).is_some())
            }
            .map_err(backend)?
        };
        let mut hits: Vec<Hit> = matches
            .keys
            .iter()
            .filter_map(|&label| {
                let key = self.live_key(label)?;
                self.store.score(&q, key).map(|score| Hit { key, score })
            })
            .collect();
        hits.sort_by(Hit::rank_cmp);
        hits.truncate(k);
        Ok(hits)
    }

    fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        let dim = self.dim();
        crate::check_queries(dim, queries.len())?;
        let nq = queries.len() / dim;
        let threads = worker_threads().min(nq).max(1);
        let per = nq.div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = queries
                .chunks(per * dim)
                .map(|part| {
                    s.spawn(move || {
                        part.chunks_exact(dim)
                            .map(|q| self.search(q, k))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(nq);
            for h in handles {
                out.extend(h.join().expect("search worker panicked")?);
            }
            Ok(out)
        })
    }

    fn neighbors(&self, key: DocKey, k: usize) -> Result<Vec<Hit>> {
        let v = self.store.vector(key).ok_or(IndexError::KeyNotFound(key))?;
        let label = self.key_label[&key];
        let mut links: Vec<DocKey> = self
            .graph
            .neighbors(label, 0)
            .filter_map(|l| self.live_key(l))
            .filter(|&n| n != key)
            .collect();
        links.sort_unstable();
        links.dedup();
        let mut hits: Vec<Hit> = links
            .into_iter()
            .filter_map(|n| self.store.score(v, n).map(|score| Hit { key: n, score }))
            .collect();
        hits.sort_by(Hit::rank_cmp);
        hits.truncate(k);
        Ok(hits)
    }

    fn keys(&self) -> Vec<DocKey> {
        self.store.sorted_keys()
    }
}
