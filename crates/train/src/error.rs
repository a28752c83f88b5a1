//! One error type for the training crate. Invalid arguments are reported before any tensor op
//! runs, so a shape bug in a training loop names the loss and the offending shapes instead of
//! surfacing as an opaque broadcast error deep inside candle.

use std::path::PathBuf;

/// Errors raised by losses and optimizer utilities.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller passed something unusable (shape mismatch, τ ≤ 0, empty batch, index out of
    /// range, unknown state key…). The message names the function and the values involved.
    #[error("{0}")]
    Invalid(String),
    /// A gradient norm (or another quantity that must be finite) is NaN or infinite. Nothing
    /// was modified; the caller should skip the optimizer step (and usually log the batch).
    #[error("non-finite {what}: {value}")]
    NonFinite {
        /// What was being computed, e.g. `gradient norm`.
        what: &'static str,
        /// The offending value.
        value: f64,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model runtime rejected a batch or failed in a forward pass.
    #[error("model: {0}")]
    Model(#[from] search_r3_model::Error),
    /// I/O failure with the path that caused it.
    #[error("{}: {msg}", path.display())]
    File {
        /// The file being read or written.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
}

/// [`Error::File`] for `path`.
pub(crate) fn file_err(path: &std::path::Path, msg: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Result alias for the training crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for returning [`Error::Invalid`] with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Invalid(format!($($arg)*)))
    };
}
pub(crate) use invalid;
