//! Search-R3 retrieval core: prompt templates, the reason-then-embed embedder, corpus reading
//! and encoding jobs.
#![warn(missing_docs)]

pub mod corpus;
pub mod dataset;
pub mod embedder;
pub mod encode;
pub mod metrics;
pub mod searcher;
pub mod templates;
pub mod trec;
pub mod triples;

pub use embedder::{Embedder, QueryEmbedding, QueryMode};
pub use templates::Templates;
