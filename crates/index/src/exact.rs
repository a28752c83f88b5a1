//! Brute-force index: the ground truth.

use crate::store::VectorStore;
use crate::{DocKey, Hit, IndexError, Result, VectorIndex};

/// Exhaustive dot-product search over contiguous normalised vectors.
///
/// Search cost is one pass over `len * dim` floats (spread over the available cores for large
/// indexes); there is no build step and updates are O(dim).
#[derive(Clone)]
pub struct ExactIndex {
    store: VectorStore,
}

impl ExactIndex {
    /// An empty index of dimension `dim` (> 0).
    pub fn new(dim: usize) -> Result<ExactIndex> {
        Ok(ExactIndex {
            store: VectorStore::new(dim)?,
        })
    }

    /// Pre-allocates room for `n` more vectors.
    pub fn reserve(&mut self, n: usize) {
        self.store.reserve(n)
    }

    pub(crate) fn from_store(store: VectorStore) -> ExactIndex {
        ExactIndex { store }
    }

    pub(crate) fn store(&self) -> &VectorStore {
        &self.store
    }
}

impl VectorIndex for ExactIndex {
    fn dim(&self) -> usize {
        self.store.dim()
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn upsert(&mut self, key: DocKey, v: &[f32]) -> Result<()> {
        VectorStore::check_key(key)?;
        let v = self.store.prepare(v)?;
        self.store.put(key, &v);
        Ok(())
    }

    fn remove(&mut self, key: DocKey) -> Result<bool> {
        Ok(self.store.delete(key))
    }

    fn contains(&self, key: DocKey) -> bool {
        self.store.contains(key)
    }

    fn get(&self, key: DocKey) -> Option<Vec<f32>> {
        self.store.vector(key).map(<[f32]>::to_vec)
    }

    fn search(&self, q: &[f32], k: usize) -> Result<Vec<Hit>> {
        let q = self.store.prepare(q)?;
        Ok(self.store.scan(&q, k, None))
    }

    fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        let dim = self.dim();
        crate::check_queries(dim, queries.len())?;
        let mut prepared = Vec::with_capacity(queries.len());
        for q in queries.chunks_exact(dim) {
            prepared.extend(self.store.prepare(q)?);
        }
        Ok(self.store.scan_batch(&prepared, k))
    }

    fn neighbors(&self, key: DocKey, k: usize) -> Result<Vec<Hit>> {
        let v = self.store.vector(key).ok_or(IndexError::KeyNotFound(key))?;
        Ok(self.store.scan(v, k, Some(key)))
    }

    fn keys(&self) -> Vec<DocKey> {
        self.store.sorted_keys()
    }
}
