//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

use crate::DocKey;

/// Result with [`IndexError`].
pub type Result<T> = std::result::Result<T, IndexError>;

/// Everything that can go wrong in this crate. File-related variants always name the file, so a
/// user can tell which part of an index directory is damaged.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A vector or query of the wrong length.
    #[error("vector has {got} values, the index has dimension {expected}")]
    DimMismatch {
        /// The index's dimension.
        expected: usize,
        /// The length passed in.
        got: usize,
    },
    /// A batch whose value buffer does not match its key count.
    #[error("batch of {keys} keys needs {keys} x {dim} values, got {values}")]
    BatchShape {
        /// Number of keys.
        keys: usize,
        /// The index's dimension.
        dim: usize,
        /// Number of values passed.
        values: usize,
    },
    /// A zero, NaN or infinite vector: it has no direction, so cosine is undefined.
    #[error("invalid vector: {0}")]
    InvalidVector(String),
    /// `u64::MAX`, which the HNSW backend reserves for freed slots.
    #[error("key {0} is reserved and cannot be stored")]
    ReservedKey(DocKey),
    /// A key that is not stored.
    #[error("key {0} is not in the index")]
    KeyNotFound(DocKey),
    /// Parameters that cannot build an index.
    #[error("invalid index parameters: {0}")]
    InvalidParams(String),
    /// The usearch backend reported a failure.
    #[error("HNSW backend: {0}")]
    Backend(String),
    /// An operating-system I/O failure.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("write", "rename", ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file the index manifest lists (or the manifest itself) does not exist.
    #[error("index file {file} is missing")]
    MissingFile {
        /// The missing file.
        file: PathBuf,
    },
    /// A data file whose size differs from the size recorded at save time.
    #[error("index file {file} is truncated or overlong: it has {found} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The damaged file.
        file: PathBuf,
        /// Bytes recorded in the manifest.
        expected: u64,
        /// Bytes found on disk.
        found: u64,
    },
    /// A file whose content no longer matches the sha256 recorded at save time.
    #[error("index file {file} is corrupted: sha256 is {found}, the manifest says {expected}")]
    ChecksumMismatch {
        /// The damaged file.
        file: PathBuf,
        /// Hash recorded in the manifest.
        expected: String,
        /// Hash of the bytes on disk.
        found: String,
    },
    /// An index written by a different (older or newer) format.
    #[error(
        "index file {file} has format_version {found}; this build reads format_version {supported}"
    )]
    UnsupportedVersion {
        /// The manifest.
        file: PathBuf,
        /// The version found (as written, it may not even be a number).
        found: String,
        /// The version this build reads.
        supported: u32,
    },
    /// Any other structural problem with an index file.
    #[error("index file {file} is invalid: {problem}")]
    Corrupt {
        /// The offending file.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Saving would replace something that is not an index directory.
    #[error("refusing to replace {path}: it is {found}, not an index directory (expected a new path, an empty directory, or a directory holding index.json)")]
    NotAnIndexDir {
        /// The target directory.
        path: PathBuf,
        /// What is there instead ("a file", "a symlink", ...).
        found: &'static str,
    },
    /// An index directory cannot be created because a file stands where one of its parent
    /// directories should be.
    #[error("cannot create the index directory {path}: {blocker} is a file, not a directory")]
    ParentNotADirectory {
        /// The index directory.
        path: PathBuf,
        /// The file in the way.
        blocker: PathBuf,
    },
    /// The index was built with a different model, template or adapter than the caller's.
    #[error("index is incompatible with the current configuration: {}", KeyDifference::list(.differences))]
    Incompatible {
        /// One entry per differing key.
        differences: Vec<KeyDifference>,
    },
    /// A deliberately injected failure (tests of crash safety).
    #[error("injected failure at {0}")]
    Injected(String),
}

/// One metadata key whose value in an index differs from what the caller expects.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyDifference {
    /// The metadata key (for example `model_sha256`).
    pub key: String,
    /// The value stored in the index, `None` if the index does not record the key.
    pub index: Option<serde_json::Value>,
    /// The value the caller expects.
    pub expected: serde_json::Value,
}

impl KeyDifference {
    fn list(diffs: &[KeyDifference]) -> String {
        diffs
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for KeyDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.index {
            Some(v) => write!(
                f,
                "{} differs (index has {}, expected {})",
                self.key, v, self.expected
            ),
            None => write!(
                f,
                "{} is not recorded in the index (expected {})",
                self.key, self.expected
            ),
        }
    }
}
