//! Reference retrievers that `search-r3 eval` runs beside the Search-R3 embedder, so every
//! reported number has a familiar yardstick next to it (BRIEF §4, "SciFact baselines"):
//!
//! - [`bm25`]: lexical BM25 over a tantivy index, with an analyzer chosen to match the bm25s
//!   setup the brief measured;
//! - [`minilm`]: all-MiniLM-L6-v2 sentence embeddings through candle's BERT, numerically
//!   matched to sentence-transformers.
//!
//! The baselines' model files are fetched by the LLM runtime's machinery
//! (`search_r3_model::fetch`); [`known_models`] lists them for `search-r3 model fetch` and
//! `model list`, beside the LLMs.
#![warn(missing_docs)]

pub mod bm25;
pub mod minilm;

pub use bm25::{Bm25Index, Bm25Params, TokenPattern};
pub use minilm::SentenceEncoder;

use search_r3_model::fetch::KnownModel;

/// The models the baselines need, fetched like the LLMs (`search_r3_model::fetch::fetch_known`)
/// but declared here, where they are used: today only [`minilm::MINILM`].
pub fn known_models() -> &'static [KnownModel] {
    std::slice::from_ref(&minilm::MINILM)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use search_r3_model::fetch::Layout;

    /// The same checks `search_r3_model::fetch` makes of its own table, plus no clash with it:
    /// the CLI looks names up in both.
    #[test]
    fn known_table_is_consistent() {
        let llms = search_r3_model::fetch::known_models();
        for m in known_models() {
            assert!(
                llms.iter().all(|l| l.name != m.name),
                "duplicate {}",
                m.name
            );
            assert_eq!(m.sha256.len(), 64);
            assert!(m.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(!m.packages.is_empty() && m.size > 0);
            if let Layout::Gguf { parts, .. } = m.layout {
                assert_eq!(parts.len(), m.packages.len());
            }
        }
        assert_eq!(known_models()[0].name, "minilm");
    }
}
