//! Vector indexes for search-r3.
//!
//! Two implementations sit behind one [`VectorIndex`] trait:
//!
//! * [`ExactIndex`]: a brute-force dot-product scan. It is the ground truth that the ANN index
//!   is measured against, and it is fast enough on its own for corpora of a few hundred thousand
//!   vectors.
//! * [`HnswIndex`]: an HNSW graph (the `usearch` crate) for large corpora. It keeps its own
//!   copy of every vector so that scores are recomputed exactly (identical to
//!   [`ExactIndex`] for the same candidates), `get` works, and the graph can be rebuilt.
//!
//! Both compare by cosine similarity. Callers are expected to pass L2-normalised vectors; the
//! index normalises again anyway, so a slightly-off norm cannot skew rankings. Zero or
//! non-finite vectors are rejected rather than silently stored.
//!
//! Persistence ([`save_index`] / [`load_index`]) writes a versioned, checksummed directory and
//! swaps it into place atomically, so a crash mid-write leaves the previous index loadable.

#![warn(missing_docs)]

mod bench;
mod error;
mod exact;
mod hnsw;
mod kernels;
mod persist;
mod store;

use std::cmp::Ordering;

pub use bench::{
    bench_recall, bench_recall_on, clustered_unit_vectors, random_unit_vectors, recall_at_k,
    BenchReport,
};
pub use error::{IndexError, KeyDifference, Result};
pub use exact::ExactIndex;
pub use hnsw::{HnswIndex, HnswParams};
pub use kernels::{dot, l2_normalize, mean_unit, normalize};
pub use persist::{
    check_compatible, check_save_target, crash_between_renames, load_index, load_index_with_files,
    read_meta, recover_index, save_index, save_index_failing_at, save_index_with_files, FailPoint,
    IndexKind, IndexMeta, IndexRef, Persistable, FORMAT_VERSION,
};

/// Key of a document inside an index.
///
/// Keys are dense internal numbers (the caller maps its own document ids onto them), which keeps
/// the index free of string handling. `u64::MAX` is reserved: the HNSW backend uses it to mark
/// freed graph slots.
pub type DocKey = u64;

/// The one key value an index refuses (see [`DocKey`]).
pub const RESERVED_KEY: DocKey = u64::MAX;

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// The document's key.
    pub key: DocKey,
    /// Cosine similarity to the query, in `[-1, 1]` up to rounding.
    pub score: f32,
}

impl Hit {
    /// Total order used for every ranking in this crate: higher score first, then smaller key,
    /// so that equal scores come out in the same order from every index kind.
    pub fn rank_cmp(&self, other: &Hit) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.key.cmp(&other.key))
    }
}

/// A mutable vector index compared by cosine similarity.
///
/// Every method that takes a vector checks its length against [`VectorIndex::dim`] and rejects
/// zero or non-finite vectors with an error instead of panicking.
pub trait VectorIndex: Send + Sync {
    /// Dimension of the stored vectors.
    fn dim(&self) -> usize;

    /// Number of live vectors.
    fn len(&self) -> usize;

    /// Whether the index holds no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inserts `v` under `key`, replacing the vector already stored there if any.
    fn upsert(&mut self, key: DocKey, v: &[f32]) -> Result<()>;

    /// Upserts many vectors. `vectors` holds `keys.len() * dim` values, row-major. A key that
    /// appears more than once ends up with its last vector, as with sequential upserts.
    ///
    /// Implementations may parallelise this; the default just loops.
    fn upsert_batch(&mut self, keys: &[DocKey], vectors: &[f32]) -> Result<()> {
        check_batch(self.dim(), keys.len(), vectors.len())?;
        for (key, v) in keys.iter().zip(vectors.chunks_exact(self.dim())) {
            self.upsert(*key, v)?;
        }
        Ok(())
    }

    /// Removes `key`; returns whether it was present.
    fn remove(&mut self, key: DocKey) -> Result<bool>;

    /// Whether `key` is stored.
    fn contains(&self, key: DocKey) -> bool;

    /// The stored (normalised) vector of `key`.
    fn get(&self, key: DocKey) -> Option<Vec<f32>>;

    /// The `k` most similar vectors to `q`, best first; equal scores are ordered by smaller key.
    fn search(&self, q: &[f32], k: usize) -> Result<Vec<Hit>>;

    /// [`VectorIndex::search`] for many queries (`queries` is row-major, `dim` values each).
    ///
    /// Implementations may batch or parallelise this; the default just loops.
    fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        let dim = self.dim();
        check_queries(dim, queries.len())?;
        queries
            .chunks_exact(dim)
            .map(|q| self.search(q, k))
            .collect()
    }

    /// Graph neighbours of a stored document, best first, never including `key` itself.
    ///
    /// For HNSW these are the node's level-0 links (at most `k` of them, which may be fewer
    /// than `k`); for the exact index, the `k` nearest other documents. The RL environment uses
    /// this to find the local region around documents whose vectors it refreshes.
    fn neighbors(&self, key: DocKey, k: usize) -> Result<Vec<Hit>>;

    /// All stored keys, ascending.
    fn keys(&self) -> Vec<DocKey>;
}

/// Rejects a batch whose vector buffer does not hold exactly `n` rows of `dim` values.
pub(crate) fn check_batch(dim: usize, n: usize, values: usize) -> Result<()> {
    if n.checked_mul(dim) != Some(values) {
        return Err(IndexError::BatchShape {
            keys: n,
            dim,
            values,
        });
    }
    Ok(())
}

/// Rejects a query buffer that is not a whole number of `dim`-long rows.
pub(crate) fn check_queries(dim: usize, values: usize) -> Result<()> {
    if dim == 0 || !values.is_multiple_of(dim) {
        return Err(IndexError::DimMismatch {
            expected: dim,
            got: values,
        });
    }
    Ok(())
}

/// Either index kind, for callers that pick the kind at run time (for example after
/// [`load_index`]).
pub enum AnyIndex {
    /// A brute-force index.
    Exact(ExactIndex),
    /// An HNSW graph index.
    Hnsw(HnswIndex),
}

impl AnyIndex {
    /// An empty index of the given kind; `params` is only used for HNSW.
    pub fn new(kind: IndexKind, dim: usize, params: HnswParams) -> Result<AnyIndex> {
        Ok(match kind {
            IndexKind::Exact => AnyIndex::Exact(ExactIndex::new(dim)?),
            IndexKind::Hnsw => AnyIndex::Hnsw(HnswIndex::new(dim, params)?),
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> IndexKind {
        match self {
            AnyIndex::Exact(_) => IndexKind::Exact,
            AnyIndex::Hnsw(_) => IndexKind::Hnsw,
        }
    }

    /// The inner index as a trait object.
    pub fn as_dyn(&self) -> &dyn VectorIndex {
        match self {
            AnyIndex::Exact(i) => i,
            AnyIndex::Hnsw(i) => i,
        }
    }

    /// The inner index as a mutable trait object.
    pub fn as_dyn_mut(&mut self) -> &mut dyn VectorIndex {
        match self {
            AnyIndex::Exact(i) => i,
            AnyIndex::Hnsw(i) => i,
        }
    }
}

impl From<ExactIndex> for AnyIndex {
    fn from(i: ExactIndex) -> Self {
        AnyIndex::Exact(i)
    }
}

impl From<HnswIndex> for AnyIndex {
    fn from(i: HnswIndex) -> Self {
        AnyIndex::Hnsw(i)
    }
}

impl VectorIndex for AnyIndex {
    fn dim(&self) -> usize {
        self.as_dyn().dim()
    }
    fn len(&self) -> usize {
        self.as_dyn().len()
    }
    fn upsert(&mut self, key: DocKey, v: &[f32]) -> Result<()> {
        self.as_dyn_mut().upsert(key, v)
    }
    fn upsert_batch(&mut self, keys: &[DocKey], vectors: &[f32]) -> Result<()> {
        self.as_dyn_mut().upsert_batch(keys, vectors)
    }
    fn remove(&mut self, key: DocKey) -> Result<bool> {
        self.as_dyn_mut().remove(key)
    }
    fn contains(&self, key: DocKey) -> bool {
        self.as_dyn().contains(key)
    }
    fn get(&self, key: DocKey) -> Option<Vec<f32>> {
        self.as_dyn().get(key)
    }
    fn search(&self, q: &[f32], k: usize) -> Result<Vec<Hit>> {
        self.as_dyn().search(q, k)
    }
    fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        self.as_dyn().search_batch(queries, k)
    }
    fn neighbors(&self, key: DocKey, k: usize) -> Result<Vec<Hit>> {
        self.as_dyn().neighbors(key, k)
    }
    fn keys(&self) -> Vec<DocKey> {
        self.as_dyn().keys()
    }
}
