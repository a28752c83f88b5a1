//! Reference retrievers that `search-r3 eval` runs beside the Search-R3 embedder, so every
//! reported number has a familiar yardstick next to it (BRIEF §4, "SciFact baselines"):
//!
//! - [`bm25`]: lexical BM25 over a tantivy index, with an analyzer chosen to match the bm25s
//!   setup the brief measured;
//! - [`minilm`]: all-MiniLM-L6-v2 sentence embeddings through candle's BERT, numerically
//!   matched to sentence-transformers.
#![warn(missing_docs)]

pub mod bm25;
pub mod minilm;

pub use bm25::{Bm25Index, Bm25Params, TokenPattern};
pub use minilm::SentenceEncoder;

/// Everything that can go wrong in a baseline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The search library failed (index creation, I/O inside the index, a bad query).
    #[error("tantivy: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A model or index directory is not what this crate can use.
    #[error("{0}")]
    Unsupported(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
