//! Search-R3 retrieval core: prompt templates, the reason-then-embed embedder, corpus reading
//! and encoding jobs. Every public name has one path, through its module:
//!
//! * [`corpus`] — reading corpora (BEIR, plain JSONL, text), BEIR queries and qrels.
//! * [`dataset`] — a BEIR dataset split, cross-checked, and deterministic subsampling.
//! * [`embedder`] — the embedder: `<|embed_token|>` embeddings, direct or after reasoning.
//! * [`encode`] — corpus encoding as a resumable, checkpointed batch job.
//! * [`import`] — BEIR datasets built from Debian-packaged text (WordNet, FOLDOC, man pages).
//! * [`load`] — loading a model + adapter + templates into an embedder, and its identity.
//! * [`metrics`] — IR metrics computed exactly as trec_eval computes them.
//! * [`searcher`] — a persistent index: build, open, search, upsert and delete.
//! * [`templates`] — versioned prompt templates per model family, and their hash.
//! * [`trec`] — TREC run files, trec_eval's ranking order and reciprocal-rank fusion.
//! * [`triples`] — stage-1 training examples from a BEIR split or a triples JSONL file.
#![warn(missing_docs)]

pub mod corpus;
pub mod dataset;
pub mod embedder;
pub mod encode;
pub mod export;
pub mod import;
pub mod load;
pub mod metrics;
pub mod searcher;
pub mod templates;
pub mod trec;
pub mod triples;
