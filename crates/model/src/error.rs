//! One error type for the runtime. Every variant that comes from a file names the file, so a
//! user who points `--model` at the wrong thing learns which file and what was expected.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file (GGUF, safetensors, config.json, tokenizer.json …) is unusable.
    #[error("{}: {msg}", path.display())]
    File {
        /// The offending file or directory.
        path: PathBuf,
        /// What is wrong with it and what was expected.
        msg: String,
    },
    /// The architecture named by the file is not one this runtime implements.
    #[error("{}: unsupported architecture `{arch}` (supported: llama, qwen2, qwen3)", path.display())]
    UnknownArchitecture {
        /// The model file or directory.
        path: PathBuf,
        /// The architecture string found in it.
        arch: String,
    },
    /// A weight has a shape that disagrees with the configuration.
    #[error("{}: tensor `{name}` has shape {actual:?}, expected {expected:?} from the model config", path.display())]
    Shape {
        /// The model file or directory.
        path: PathBuf,
        /// Tensor name as stored in the file.
        name: String,
        /// Shape implied by the configuration.
        expected: Vec<usize>,
        /// Shape found in the file.
        actual: Vec<usize>,
    },
    /// Tokenizer failure (encoding/decoding, or building it from metadata).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Chat-template rendering failure.
    #[error("chat template: {0}")]
    Template(String),
    /// Invalid argument passed by the caller (wrong batch shape, unknown LoRA target…).
    #[error("{0}")]
    Invalid(String),
    /// The caller stopped the work between two forward passes (see [`crate::Cancel`]).
    #[error("cancelled: nobody waits for the result any more")]
    Cancelled,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// I/O failure with the path that caused it.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Result alias for the runtime.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::File`].
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
