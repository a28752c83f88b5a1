//! Reason-then-embed retrieval over a persistent index: build an index from a corpus, open it
//! (refusing one built with another model, template or adapter), search with or without
//! reasoning, and add or delete documents incrementally.
//!
//! On disk an index directory holds the vector index (`search-r3-index` format: checksummed,
//! swapped in atomically) plus `docs.jsonl`, the document table (key → id, title, text), written
//! in the same atomic swap and covered by the same checksums.
//!
//! The embedder and the identity an index is checked against come from [`crate::load`].

use crate::corpus::{corpus_fingerprint, Document};
use crate::embedder::{EmbedError, Embedder, QueryEmbedding, QueryMode};
use crate::encode::{encode_documents, EncodeError, EncodeOptions};
use crate::load::{load_embedder, EmbedderOptions, ModelIdentity};
use crate::templates::TemplateError;
use search_r3_index::{
    check_compatible, load_index_with_files, recover_index, save_index_with_files, AnyIndex,
    DocKey, HnswParams, IndexKind, IndexMeta, VectorIndex,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const DOCS_FILE: &str = "docs.jsonl";

/// Errors of the retrieval layer (loading, encoding, indexing, searching).
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// Loading the model or adapter failed.
    #[error(transparent)]
    Model(#[from] search_r3_model::Error),
    /// Template problem.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Embedding problem.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// Encoding job problem.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Index problem (I/O, corruption, incompatibility).
    #[error(transparent)]
    Index(#[from] search_r3_index::IndexError),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// One ranked document.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchHit {
    /// 1-based rank.
    pub rank: usize,
    /// Cosine similarity.
    pub score: f32,
    /// Document id.
    pub id: String,
    /// Title (may be empty).
    pub title: String,
    /// The start of the text.
    pub snippet: String,
}

/// The answer to a query.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchResult {
    /// The query.
    pub query: String,
    /// Direct or reason.
    pub mode: QueryMode,
    /// The query embedding's provenance (reasoning trace, forced flag, timings).
    pub embedding: QueryEmbedding,
    /// Ranked documents.
    pub hits: Vec<SearchHit>,
    /// Seconds in the index lookup.
    pub search_s: f64,
}

/// An opened index with its embedder and document table.
pub struct Searcher {
    /// The embedder whose identity matches the index (shared, so a server's model workers can
    /// embed while the index itself sits behind a lock).
    pub embedder: Arc<Embedder>,
    /// The vectors.
    pub index: AnyIndex,
    /// Document table: `docs[key]`, `None` for deleted keys (keys are never reused).
    pub docs: Vec<Option<Document>>,
    /// Metadata as stored.
    pub meta: IndexMeta,
    identity: ModelIdentity,
    by_id: HashMap<String, DocKey>,
    dir: PathBuf,
}

/// Index build settings.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// ANN (HNSW) or exact.
    pub kind: IndexKind,
    /// Graph parameters for HNSW.
    pub hnsw: HnswParams,
    /// Encoding job settings (batch budget, checkpoint, progress).
    pub encode: EncodeOptions,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            kind: IndexKind::Hnsw,
            hnsw: HnswParams::default(),
            encode: EncodeOptions::default(),
        }
    }
}

/// What a build did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    /// Documents indexed.
    pub docs: usize,
    /// Documents truncated to the token limit.
    pub truncated: usize,
    /// Prompt tokens encoded in this run.
    pub tokens: usize,
    /// Encoding seconds.
    pub encode_s: f64,
    /// Batches reused from a checkpoint.
    pub resumed_batches: usize,
}

fn snippet(text: &str, n: usize) -> String {
    let t: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.chars().count() <= n {
        t
    } else {
        t.chars().take(n).collect::<String>() + "…"
    }
}

/// The metadata every index records about the model that encoded it.
fn index_meta(embedder: &Embedder, identity: &ModelIdentity) -> IndexMeta {
    let mut meta = IndexMeta::with_extra(identity.compat_map());
    meta.extra.insert("model_spec".into(), json!(identity.spec));
    meta.extra
        .insert("model_id".into(), json!(embedder.model.id));
    meta.extra.insert(
        "templates".into(),
        serde_json::to_value(&embedder.templates).expect("serialisable"),
    );
    meta.extra
        .insert("max_doc_tokens".into(), json!(embedder.max_doc_tokens));
    meta
}

impl Searcher {
    /// Writes a new, empty index to `dir` for documents to be added later (`upsert`), e.g. by
    /// the server. Refuses a directory that already holds an index, including one an
    /// interrupted save left only in `.NAME.old-*` (recovered first, see [`recover_index`]).
    pub fn create_empty(
        embedder: Embedder,
        identity: ModelIdentity,
        dir: &Path,
        kind: IndexKind,
        hnsw: HnswParams,
    ) -> Result<Searcher, SearchError> {
        // Any manifest, readable or not: a damaged index must be repaired, not replaced.
        if recover_index(dir)? {
            return Err(SearchError::Other(format!(
                "{}: already holds an index; open it instead",
                dir.display()
            )));
        }
        let index = AnyIndex::new(kind, embedder.dim(), hnsw)?;
        let meta = index_meta(&embedder, &identity);
        let mut s = Searcher {
            embedder: Arc::new(embedder),
            index,
            docs: Vec::new(),
            meta,
            identity,
            by_id: HashMap::new(),
            dir: dir.to_path_buf(),
        };
        s.save()?;
        Ok(s)
    }

    /// Opens the index in `dir` or, when the directory holds none, creates an empty one of
    /// `kind` there to fill through [`Searcher::upsert`]: what `serve --index` does. An
    /// interrupted save is recovered before deciding ([`recover_index`]), so an index that
    /// survives only in `.NAME.old-*` is opened, never replaced by an empty one.
    pub fn open_or_create(
        dir: &Path,
        model: &str,
        opts: &EmbedderOptions,
        kind: IndexKind,
        hnsw: HnswParams,
    ) -> Result<Searcher, SearchError> {
        // Whatever state the index is in, it is opened (errors name it); only a missing or
        // empty directory gets a new index.
        if recover_index(dir)? {
            return Searcher::open(dir, Some(model), opts);
        }
        let (embedder, identity) = load_embedder(model, opts)?;
        Searcher::create_empty(embedder, identity, dir, kind, hnsw)
    }

    /// Encodes `docs` and writes a new index to `out` (atomically replacing an index there).
    /// The encoding checkpoint lives beside `out` (`<out>.encode.ckpt`) so an interrupted
    /// build resumes, and is removed on success.
    pub fn build(
        embedder: Embedder,
        identity: ModelIdentity,
        docs: Vec<Document>,
        out: &Path,
        opts: &BuildOptions,
        cancel: &AtomicBool,
    ) -> Result<(Searcher, BuildReport), SearchError> {
        let mut enc_opts = opts.encode.clone();
        let ckpt = enc_opts
            .checkpoint
            .get_or_insert_with(|| PathBuf::from(format!("{}.encode.ckpt", out.display())))
            .clone();
        let texts: Vec<String> = docs.iter().map(Document::full_text).collect();
        let enc = encode_documents(&embedder, &texts, &enc_opts, cancel)?;
        let mut index = AnyIndex::new(opts.kind, embedder.dim(), opts.hnsw)?;
        let keys: Vec<DocKey> = (0..docs.len() as DocKey).collect();
        let flat: Vec<f32> = enc.vectors.iter().flatten().copied().collect();
        index.upsert_batch(&keys, &flat)?;
        let mut meta = index_meta(&embedder, &identity);
        meta.extra.insert(
            "corpus_fingerprint".into(),
            json!(corpus_fingerprint(&docs)),
        );
        meta.extra
            .insert("truncated_docs".into(), json!(enc.truncated));
        let by_id = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), i as DocKey))
            .collect();
        let mut s = Searcher {
            embedder: Arc::new(embedder),
            index,
            docs: docs.into_iter().map(Some).collect(),
            meta,
            identity,
            by_id,
            dir: out.to_path_buf(),
        };
        s.save()?;
        let _ = std::fs::remove_file(&ckpt);
        let report = BuildReport {
            docs: s.len(),
            truncated: enc.truncated,
            tokens: enc.tokens,
            encode_s: enc.seconds,
            resumed_batches: enc.resumed_batches,
        };
        Ok((s, report))
    }

    /// Opens an index (recovering an interrupted save first, see [`recover_index`]). The model
    /// is the one recorded in the index unless `model` overrides it; either way its identity
    /// (model sha256, adapter, templates) must match the index.
    pub fn open(
        dir: &Path,
        model: Option<&str>,
        opts: &EmbedderOptions,
    ) -> Result<Searcher, SearchError> {
        let (index, meta, files) = load_index_with_files(dir)?;
        let spec = match model {
            Some(m) => m.to_string(),
            None => meta
                .extra
                .get("model_spec")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    SearchError::Other(format!(
                        "{}: index metadata has no model_spec; pass --model",
                        dir.display()
                    ))
                })?
                .to_string(),
        };
        let mut eopts = opts.clone();
        if eopts.max_doc_tokens.is_none() {
            eopts.max_doc_tokens = meta
                .extra
                .get("max_doc_tokens")
                .and_then(Value::as_u64)
                .map(|v| v as usize);
        }
        let (embedder, identity) = load_embedder(&spec, &eopts)?;
        check_compatible(&meta, &identity.compat_map())?;
        let docs_bytes = files
            .get(DOCS_FILE)
            .ok_or_else(|| SearchError::Other(format!("{}: missing {DOCS_FILE}", dir.display())))?;
        let mut docs = Vec::new();
        for (i, line) in docs_bytes.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let d: Option<Document> = serde_json::from_slice(line).map_err(|e| {
                SearchError::Other(format!("{}/{DOCS_FILE}:{}: {e}", dir.display(), i + 1))
            })?;
            docs.push(d);
        }
        let by_id = docs
            .iter()
            .enumerate()
            .filter_map(|(k, d)| d.as_ref().map(|d| (d.id.clone(), k as DocKey)))
            .collect();
        if docs.iter().filter(|d| d.is_some()).count() != index.len() {
            return Err(SearchError::Other(format!(
                "{}: {DOCS_FILE} lists {} documents but the index holds {} vectors",
                dir.display(),
                docs.iter().filter(|d| d.is_some()).count(),
                index.len()
            )));
        }
        Ok(Searcher {
            embedder: Arc::new(embedder),
            index,
            docs,
            meta,
            identity,
            by_id,
            dir: dir.to_path_buf(),
        })
    }

    /// Live documents.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The directory the index is saved to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity the index was checked against.
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// The document stored under `key`.
    pub fn doc(&self, key: DocKey) -> Option<&Document> {
        self.docs.get(key as usize).and_then(Option::as_ref)
    }

    /// The key of a document id.
    pub fn key_of(&self, id: &str) -> Option<DocKey> {
        self.by_id.get(id).copied()
    }

    /// Embeds the queries in `mode` and returns the top `k` documents for each.
    pub fn search(
        &self,
        queries: &[&str],
        k: usize,
        mode: QueryMode,
    ) -> Result<Vec<SearchResult>, SearchError> {
        let embs = self.embedder.embed_queries(queries, mode)?;
        let mut out = Vec::with_capacity(embs.len());
        for (q, e) in queries.iter().zip(embs) {
            let t0 = std::time::Instant::now();
            let hits = self.hits(&e.vector, k)?;
            let search_s = t0.elapsed().as_secs_f64();
            out.push(SearchResult {
                query: q.to_string(),
                mode,
                embedding: e,
                hits,
                search_s,
            });
        }
        Ok(out)
    }

    /// The top `k` documents for a query vector (the index lookup of [`Searcher::search`]).
    pub fn hits(&self, vector: &[f32], k: usize) -> Result<Vec<SearchHit>, SearchError> {
        Ok(self
            .index
            .search(vector, k)?
            .into_iter()
            .enumerate()
            .filter_map(|(r, h)| {
                let d = self.doc(h.key)?;
                Some(SearchHit {
                    rank: r + 1,
                    score: h.score,
                    id: d.id.clone(),
                    title: d.title.clone(),
                    snippet: snippet(&d.text, 200),
                })
            })
            .collect())
    }

    /// Adds or replaces documents (by id) and persists the index atomically.
    pub fn upsert(
        &mut self,
        docs: Vec<Document>,
        opts: &EncodeOptions,
    ) -> Result<usize, SearchError> {
        let texts: Vec<String> = docs.iter().map(Document::full_text).collect();
        let enc = encode_documents(&self.embedder, &texts, opts, &AtomicBool::new(false))?;
        self.upsert_vectors(docs, &enc.vectors)?;
        self.save()?;
        Ok(enc.truncated)
    }

    /// Adds or replaces documents (by id) with vectors the caller encoded (with this
    /// searcher's embedder); in memory only until [`Searcher::save`]. All vectors are checked
    /// before anything changes, so a bad one leaves the index as it was.
    pub fn upsert_vectors(
        &mut self,
        docs: Vec<Document>,
        vectors: &[Vec<f32>],
    ) -> Result<(), SearchError> {
        if docs.len() != vectors.len() {
            return Err(SearchError::Other(format!(
                "{} documents but {} vectors",
                docs.len(),
                vectors.len()
            )));
        }
        if let Some(v) = vectors.iter().find(|v| v.len() != self.index.dim()) {
            return Err(SearchError::Other(format!(
                "vector of width {} for an index of width {}",
                v.len(),
                self.index.dim()
            )));
        }
        for (d, v) in docs.into_iter().zip(vectors) {
            let key = match self.by_id.get(&d.id) {
                Some(&k) => k,
                None => {
                    self.docs.push(None);
                    (self.docs.len() - 1) as DocKey
                }
            };
            self.index.upsert(key, v)?;
            self.by_id.insert(d.id.clone(), key);
            self.docs[key as usize] = Some(d);
        }
        Ok(())
    }

    /// Deletes documents by id, persists, and returns the ids that were not present.
    pub fn delete(&mut self, ids: &[String]) -> Result<Vec<String>, SearchError> {
        let missing = self.remove(ids)?;
        self.save()?;
        Ok(missing)
    }

    /// Deletes documents by id in memory only (until [`Searcher::save`]); returns the ids
    /// that were not present.
    pub fn remove(&mut self, ids: &[String]) -> Result<Vec<String>, SearchError> {
        let mut missing = Vec::new();
        for id in ids {
            match self.by_id.remove(id) {
                Some(k) => {
                    self.index.remove(k)?;
                    self.docs[k as usize] = None;
                }
                None => missing.push(id.clone()),
            }
        }
        Ok(missing)
    }

    /// Writes index, metadata and document table in one atomic swap.
    pub fn save(&mut self) -> Result<(), SearchError> {
        let mut table = Vec::new();
        for d in &self.docs {
            serde_json::to_writer(&mut table, d).expect("documents serialise");
            table.push(b'\n');
        }
        self.meta = save_index_with_files(
            &self.dir,
            &self.index,
            &self.meta,
            &[(DOCS_FILE, table.as_slice())],
        )?;
        Ok(())
    }
}
