//! On-disk format and atomic save/load.
//!
//! An index is a directory:
//!
//! | file            | content                                                        |
//! |-----------------|----------------------------------------------------------------|
//! | `index.json`    | [`IndexMeta`] (flattened), then `files`: byte size and sha256 of every data file, then `manifest_sha256`: sha256 of the manifest itself |
//! | `keys.u64`      | `count` keys, little-endian u64, ascending                     |
//! | `vectors.f32`   | `count x dim` normalised values, little-endian f32, rows in key order |
//! | `labels.u64`    | HNSW only: the next graph label to issue, then the graph label of each key (in `keys.u64` order), little-endian u64 |
//! | `graph.usearch` | HNSW only: usearch's own serialisation of the graph (its node keys are labels, see [`HnswIndex`]) |
//! | any other name  | files the caller stored with [`save_index_with_files`] (for example the document table) |
//!
//! The HNSW graph is saved rather than rebuilt on load because rebuilding costs minutes per
//! million vectors. usearch's file format has no checksum of its own, but that does not matter:
//! we checksum the exact bytes we got from usearch and verify them before handing them back,
//! so a damaged graph is reported like any other damaged file. After loading, every live label
//! in `labels.u64` must be in the graph. Loading holds the graph file in memory once while
//! usearch copies it (so peak memory is about twice the index size); reading it through a
//! second path instead would let a concurrent save swap a different file in between.
//!
//! Keys and vectors are written in key order so the same content always gives the same bytes.
//!
//! Saving writes a fresh sibling directory, fsyncs it, and then swaps it with the target
//! (`renameat2(RENAME_EXCHANGE)` on Linux, two renames elsewhere), so at every instant the
//! target is either the complete old index or the complete new one. Leftovers of an
//! interrupted save are cleaned up by the next save, once its new index is in place. One writer
//! per directory at a time.
//!
//! A crash between the two renames leaves the index only in `.NAME.old-*`. [`recover_index`]
//! renames it back, and it is the one place that happens: loading, reading the metadata and
//! saving all call it first, so every command (`search`, `serve --index`, `eval --index`,
//! `index add`, ...) sees the same directory, and a save never mistakes that only copy for
//! debris.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::store::VectorStore;
use crate::{
    AnyIndex, ExactIndex, HnswIndex, HnswParams, IndexError, KeyDifference, Result, VectorIndex,
    RESERVED_KEY,
};

/// Version of the on-disk format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const FORMAT_NAME: &str = "search-r3-index";
const MANIFEST: &str = "index.json";
const KEYS_FILE: &str = "keys.u64";
const VECTORS_FILE: &str = "vectors.f32";
const GRAPH_FILE: &str = "graph.usearch";
const LABELS_FILE: &str = "labels.u64";
const CHUNK: usize = 1 << 20;

/// Which index implementation a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexKind {
    /// [`ExactIndex`].
    Exact,
    /// [`HnswIndex`].
    Hnsw,
}

/// Metadata stored with an index.
///
/// The structural fields are filled in by [`save_index`] from the index itself; callers own
/// `extra`, where the retrieval layer records what the vectors depend on (model id and sha256,
/// template hash, adapter id, the path of the doc-id table) so that [`check_compatible`] can
/// refuse an index built with something else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    /// On-disk format version ([`FORMAT_VERSION`] when written by this build).
    pub format_version: u32,
    /// Index implementation.
    pub kind: IndexKind,
    /// Vector dimension.
    pub dim: usize,
    /// Number of vectors.
    pub count: usize,
    /// Graph parameters, for HNSW indexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hnsw: Option<HnswParams>,
    /// Caller-defined metadata.
    #[serde(default)]
    pub extra: Map<String, Value>,
}

impl IndexMeta {
    /// Metadata carrying only caller-defined `extra`; the rest is filled in when saving.
    pub fn with_extra(extra: Map<String, Value>) -> IndexMeta {
        IndexMeta {
            format_version: FORMAT_VERSION,
            kind: IndexKind::Exact,
            dim: 0,
            count: 0,
            hnsw: None,
            extra,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    #[serde(flatten)]
    meta: IndexMeta,
    files: BTreeMap<String, FileEntry>,
}

/// A borrowed index of either kind, as [`save_index`] needs it.
pub enum IndexRef<'a> {
    /// An exact index.
    Exact(&'a ExactIndex),
    /// An HNSW index.
    Hnsw(&'a HnswIndex),
}

/// Index types [`save_index`] can write.
pub trait Persistable {
    /// The index as one of the concrete kinds.
    fn index_ref(&self) -> IndexRef<'_>;
}

impl Persistable for ExactIndex {
    fn index_ref(&self) -> IndexRef<'_> {
        IndexRef::Exact(self)
    }
}

impl Persistable for HnswIndex {
    fn index_ref(&self) -> IndexRef<'_> {
        IndexRef::Hnsw(self)
    }
}

impl Persistable for AnyIndex {
    fn index_ref(&self) -> IndexRef<'_> {
        match self {
            AnyIndex::Exact(i) => IndexRef::Exact(i),
            AnyIndex::Hnsw(i) => IndexRef::Hnsw(i),
        }
    }
}

/// Points at which [`save_index_failing_at`] stops, as if the process had been killed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// After the data files, before `index.json` is written into the temporary directory.
    AfterDataFiles,
    /// With the new directory complete, before it is swapped in.
    BeforeSwap,
    /// Using the two-rename swap, after the old index was renamed away and before the new one
    /// was renamed into place: the only moment the target path does not exist.
    BetweenRenames,
    /// After the swap, before the old index is deleted.
    AfterSwap,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IndexError {
    let path = path.to_path_buf();
    move |source| IndexError::Io { op, path, source }
}

/// Writes `index` with `meta.extra` to `dir`, atomically replacing any index already there.
///
/// Returns the metadata as written: the structural fields (`format_version`, `kind`, `dim`,
/// `count`, `hnsw`) come from the index, whatever `meta` says. Refuses to replace a directory
/// that exists, is not empty, and has no `index.json`, so a wrong `--out` cannot delete a
/// user's files ([`check_save_target`] runs the same check up front). An index an interrupted
/// save left only in `.NAME.old-*` is put back first ([`recover_index`]) and replaced like any
/// other.
pub fn save_index<I: Persistable + ?Sized>(
    dir: impl AsRef<Path>,
    index: &I,
    meta: &IndexMeta,
) -> Result<IndexMeta> {
    save_impl(dir.as_ref(), index.index_ref(), meta, &[], None)
}

/// [`save_index`] plus caller files (for example the document table) stored in the same
/// directory, under the same checksums and in the same atomic swap, so the index and its
/// side tables can never come from different saves. Names must be plain file names that do
/// not clash with the index's own files.
pub fn save_index_with_files<I: Persistable + ?Sized, B: AsRef<[u8]>>(
    dir: impl AsRef<Path>,
    index: &I,
    meta: &IndexMeta,
    files: &[(&str, B)],
) -> Result<IndexMeta> {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_ref())).collect();
    save_impl(dir.as_ref(), index.index_ref(), meta, &files, None)
}

/// [`save_index`] that stops at `fail` as if the process crashed there, leaving whatever is on
/// disk at that moment. For tests of crash safety.
#[doc(hidden)]
pub fn save_index_failing_at<I: Persistable + ?Sized>(
    dir: impl AsRef<Path>,
    index: &I,
    meta: &IndexMeta,
    fail: FailPoint,
) -> Result<IndexMeta> {
    save_impl(dir.as_ref(), index.index_ref(), meta, &[], Some(fail))
}

fn injected(at: Option<FailPoint>, point: FailPoint) -> Result<()> {
    if at == Some(point) {
        return Err(IndexError::Injected(format!("{point:?}")));
    }
    Ok(())
}

struct Names {
    parent: PathBuf,
    name: String,
}

impl Names {
    fn of(dir: &Path) -> Result<Names> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| IndexError::Io {
                op: "use as index directory",
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    ErrorKind::InvalidInput,
                    "path has no final UTF-8 name",
                ),
            })?
            .to_string();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Names { parent, name })
    }

    /// Prefix of the temporary directory a save writes before swapping it in.
    fn tmp_prefix(&self) -> String {
        format!(".{}.tmp-", self.name)
    }

    /// Prefix under which the two-rename swap keeps the previous index.
    fn old_prefix(&self) -> String {
        format!(".{}.old-", self.name)
    }

    fn unique(&self, prefix: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Zero-padded so that names sort by age.
        self.parent
            .join(format!("{prefix}{nanos:024}-{}", std::process::id()))
    }

    /// Sibling directories left by interrupted saves with the given prefix, oldest first.
    /// Only names exactly as [`Names::unique`] makes them count, so the copies of an index
    /// whose own name starts like this one's (`idx.old-x` beside `idx`) are never taken for
    /// this index's.
    fn leftovers(&self, prefix: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = match fs::read_dir(&self.parent) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix(prefix))
                        .is_some_and(is_unique_suffix)
                })
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect(),
            Err(_) => Vec::new(),
        };
        found.sort();
        found
    }
}

/// Whether `s` is `<24 digits>-<digits>`, the tail [`Names::unique`] appends.
fn is_unique_suffix(s: &str) -> bool {
    let Some((nanos, pid)) = s.split_once('-') else {
        return false;
    };
    nanos.len() == 24
        && nanos.bytes().all(|b| b.is_ascii_digit())
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
}

/// Puts back an index that an interrupted save left only in `.NAME.old-*`, then says whether
/// `dir` holds an index (an `index.json`, readable or not: a damaged index is to be repaired,
/// never replaced by a new one).
///
/// Every opener runs this before deciding anything about `dir` ([`load_index`], [`read_meta`]
/// and the saves call it themselves), so that no command creates a fresh index over one that
/// is recoverable. Recovery applies when `dir` is missing or an empty directory (which holds
/// nothing to lose) and a `.NAME.old-*` sibling holds an `index.json`: the newest such copy is
/// renamed to `dir`, undoing the interrupted save (which was never acknowledged). Copies left
/// beside an index that is in place are stale and stay until the next save removes them.
///
/// Recovery renames, so it counts as a write: it needs write access to the parent directory,
/// and it must not race a save of the same directory (one writer at a time, as for saving).
pub fn recover_index(dir: impl AsRef<Path>) -> Result<bool> {
    let dir = dir.as_ref();
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            if fs::symlink_metadata(dir.join(MANIFEST)).is_ok() {
                return Ok(true);
            }
            let empty = fs::read_dir(dir)
                .map_err(io_err("read", dir))?
                .next()
                .is_none();
            if !empty {
                return Ok(false);
            }
        }
        // A file or a symlink is not an index, and recovery must not replace it.
        Ok(_) => return Ok(false),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {}
        Err(e) => return Err(io_err("inspect", dir)(e)),
    }
    let Ok(names) = Names::of(dir) else {
        return Ok(false);
    };
    let olds = names.leftovers(&names.old_prefix());
    let Some(old) = olds.into_iter().rev().find(|o| o.join(MANIFEST).is_file()) else {
        return Ok(false);
    };
    tracing::warn!(
        "{} holds no index; a save was interrupted, restoring the previous index from {}",
        dir.display(),
        old.display()
    );
    // rename(2) replaces an empty directory atomically, and fails if `dir` gained files since.
    fs::rename(&old, dir).map_err(io_err(
        "move back into place the index an interrupted save left in",
        &old,
    ))?;
    sync_dir(&names.parent)?;
    Ok(true)
}

/// Checks, without writing anything, that [`save_index`] could write to `dir`: that `dir` is
/// missing, an empty directory or an index directory, and that a missing `dir` could be
/// created (no file stands where one of its parents should be). Commands call it before
/// minutes of encoding whose result the save would otherwise refuse at the end.
pub fn check_save_target(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    if target_exists(dir)? {
        return Ok(());
    }
    for parent in dir.ancestors().skip(1) {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        match fs::metadata(parent) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(IndexError::ParentNotADirectory {
                    path: dir.to_path_buf(),
                    blocker: parent.to_path_buf(),
                })
            }
            // Keep walking up to the file that is in the way, and name it.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {}
            Err(e) => return Err(io_err("inspect", parent)(e)),
        }
    }
    Ok(())
}

/// Whether a save to `dir` replaces something (`true`) or creates it (`false`); an error when
/// `dir` is something a save must not replace.
fn target_exists(dir: &Path) -> Result<bool> {
    let refuse = |found: &'static str| {
        Err(IndexError::NotAnIndexDir {
            path: dir.to_path_buf(),
            found,
        })
    };
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            let has_manifest = dir.join(MANIFEST).is_file();
            let empty = fs::read_dir(dir)
                .map_err(io_err("read", dir))?
                .next()
                .is_none();
            if !has_manifest && !empty {
                return refuse("a non-empty directory without index.json");
            }
            Ok(true)
        }
        Ok(m) if m.file_type().is_symlink() => refuse("a symlink"),
        Ok(m) if m.is_file() => refuse("a file"),
        Ok(_) => refuse("neither a file nor a directory"),
        // A file where a parent should be: reported by the caller, which names that file.
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => Ok(false),
        Err(e) => Err(io_err("inspect", dir)(e)),
    }
}

/// Files of the format itself, which caller files may not replace.
const RESERVED_FILES: [&str; 5] = [MANIFEST, KEYS_FILE, VECTORS_FILE, LABELS_FILE, GRAPH_FILE];

fn check_attachment_name(dir: &Path, name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain || RESERVED_FILES.contains(&name) {
        return Err(IndexError::Io {
            op: "store extra file in",
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("{name:?} is not a plain file name or is reserved by the index format"),
            ),
        });
    }
    Ok(())
}

fn save_impl(
    dir: &Path,
    index: IndexRef<'_>,
    meta: &IndexMeta,
    attachments: &[(&str, &[u8])],
    fail: Option<FailPoint>,
) -> Result<IndexMeta> {
    for (i, (name, _)) in attachments.iter().enumerate() {
        check_attachment_name(dir, name)?;
        if attachments[..i].iter().any(|(n, _)| n == name) {
            return Err(IndexError::Io {
                op: "store extra file in",
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("{name:?} is given twice"),
                ),
            });
        }
    }
    let names = Names::of(dir)?;
    // An index left only in `.NAME.old-*` is the current content of `dir`, not debris: put it
    // back first, so that this save replaces it like any other index (deleting it only once
    // the new one is in place) and a save that stops early leaves it where readers look.
    recover_index(dir)?;
    let existing = target_exists(dir)?;
    fs::create_dir_all(&names.parent).map_err(io_err("create", &names.parent))?;
    // Temporary directories of crashed saves are never an index anyone reads.
    for stale in names.leftovers(&names.tmp_prefix()) {
        let _ = fs::remove_dir_all(stale);
    }

    let tmp = names.unique(&names.tmp_prefix());
    fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
    let written = match write_contents(&tmp, index, meta, attachments, fail) {
        Ok(m) => m,
        Err(e) => {
            // A crash would leave the directory behind; an ordinary error should not.
            if !matches!(e, IndexError::Injected(_)) {
                let _ = fs::remove_dir_all(&tmp);
            }
            return Err(e);
        }
    };
    injected(fail, FailPoint::BeforeSwap)?;

    if existing {
        let use_exchange = fail != Some(FailPoint::BetweenRenames);
        if use_exchange && exchange(&tmp, dir).map_err(io_err("swap into place", dir))? {
            // `tmp` now holds the previous index.
            sync_dir(&names.parent)?;
            injected(fail, FailPoint::AfterSwap)?;
            let _ = fs::remove_dir_all(&tmp);
        } else {
            let old = names.unique(&names.old_prefix());
            fs::rename(dir, &old).map_err(io_err("rename away", dir))?;
            injected(fail, FailPoint::BetweenRenames)?;
            fs::rename(&tmp, dir).map_err(io_err("rename into place", &tmp))?;
            sync_dir(&names.parent)?;
            injected(fail, FailPoint::AfterSwap)?;
            let _ = fs::remove_dir_all(&old);
        }
    } else {
        fs::rename(&tmp, dir).map_err(io_err("rename into place", &tmp))?;
        sync_dir(&names.parent)?;
    }
    // The new index is in place, so copies kept by interrupted swaps are no longer needed.
    for stale in names.leftovers(&names.old_prefix()) {
        let _ = fs::remove_dir_all(stale);
    }
    Ok(written)
}

/// Atomically exchanges two directories. `Ok(false)` where the platform or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both strings are valid NUL-terminated paths for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directory fsync makes the renames durable; where directories cannot be opened (not on
    // the platforms we run on) there is nothing more to do.
    if let Ok(f) = File::open(dir) {
        f.sync_all().map_err(io_err("fsync", dir))?;
    }
    Ok(())
}

/// Streams chunks into `path`, hashing as it goes, and fsyncs the file.
fn write_file<C: AsRef<[u8]>>(path: &Path, chunks: impl Iterator<Item = C>) -> Result<FileEntry> {
    let file = File::create(path).map_err(io_err("create", path))?;
    let mut w = BufWriter::with_capacity(CHUNK, file);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    for c in chunks {
        let c = c.as_ref();
        hasher.update(c);
        w.write_all(c).map_err(io_err("write", path))?;
        bytes += c.len() as u64;
    }
    let file = w
        .into_inner()
        .map_err(|e| io_err("write", path)(e.into_error()))?;
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(FileEntry {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Hashes and fsyncs a file someone else wrote.
fn seal_file(path: &Path) -> Result<FileEntry> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    file.sync_all().map_err(io_err("fsync", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

fn write_contents(
    tmp: &Path,
    index: IndexRef<'_>,
    meta: &IndexMeta,
    attachments: &[(&str, &[u8])],
    fail: Option<FailPoint>,
) -> Result<IndexMeta> {
    let (store, kind, hnsw): (&VectorStore, IndexKind, Option<&HnswIndex>) = match index {
        IndexRef::Exact(i) => (i.store(), IndexKind::Exact, None),
        IndexRef::Hnsw(i) => (i.store(), IndexKind::Hnsw, Some(i)),
    };
    // Rows are written in key order straight from the store, a chunk at a time, so saving
    // needs no second copy of the vectors.
    let order = store.sorted_order();
    let mut files = BTreeMap::new();
    let rows_per_chunk = (CHUNK / 8).max(1);
    files.insert(
        KEYS_FILE.to_string(),
        write_file(
            &tmp.join(KEYS_FILE),
            order.chunks(rows_per_chunk).map(|rows| {
                rows.iter()
                    .flat_map(|&r| store.key_at(r).to_le_bytes())
                    .collect::<Vec<u8>>()
            }),
        )?,
    );
    let rows_per_chunk = (CHUNK / (4 * store.dim())).max(1);
    files.insert(
        VECTORS_FILE.to_string(),
        write_file(
            &tmp.join(VECTORS_FILE),
            order.chunks(rows_per_chunk).map(|rows| {
                rows.iter()
                    .flat_map(|&r| store.row_at(r).iter().flat_map(|x| x.to_le_bytes()))
                    .collect::<Vec<u8>>()
            }),
        )?,
    );
    if let Some(h) = hnsw {
        let labels: Vec<u8> = std::iter::once(h.next_label())
            .chain(order.iter().map(|&r| {
                h.label_of(store.key_at(r))
                    .expect("every stored key has a graph label")
            }))
            .flat_map(u64::to_le_bytes)
            .collect();
        files.insert(
            LABELS_FILE.to_string(),
            write_file(&tmp.join(LABELS_FILE), labels.chunks(CHUNK))?,
        );
        let path = tmp.join(GRAPH_FILE);
        h.save_graph(&path)?;
        files.insert(GRAPH_FILE.to_string(), seal_file(&path)?);
    }
    for (name, bytes) in attachments {
        files.insert(
            name.to_string(),
            write_file(&tmp.join(name), bytes.chunks(CHUNK))?,
        );
    }
    injected(fail, FailPoint::AfterDataFiles)?;

    let written = IndexMeta {
        format_version: FORMAT_VERSION,
        kind,
        dim: store.dim(),
        count: order.len(),
        hnsw: hnsw.map(|h| h.params()),
        extra: meta.extra.clone(),
    };
    let manifest = Manifest {
        format: FORMAT_NAME.to_string(),
        meta: written.clone(),
        files,
    };
    let mut value = serde_json::to_value(&manifest).map_err(|e| IndexError::Corrupt {
        file: tmp.join(MANIFEST),
        problem: format!("cannot serialise metadata: {e}"),
    })?;
    let digest = manifest_digest(&value);
    if let Value::Object(map) = &mut value {
        map.insert("manifest_sha256".into(), Value::String(digest));
    }
    let text = serde_json::to_vec_pretty(&value).expect("a JSON value always serialises");
    write_file(&tmp.join(MANIFEST), std::iter::once(text.as_slice()))?;
    sync_dir(tmp)?;
    Ok(written)
}

/// sha256 of the compact serialisation of the manifest without its own checksum field.
fn manifest_digest(value: &Value) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(value).expect("a JSON value always serialises"),
    ))
}

/// `dir`, once [`recover_index`] has put back an index an interrupted save left elsewhere; an
/// error naming `index.json` when there is no index to read.
fn resolve(dir: &Path) -> Result<PathBuf> {
    if recover_index(dir)? {
        Ok(dir.to_path_buf())
    } else {
        Err(IndexError::MissingFile {
            file: dir.join(MANIFEST),
        })
    }
}

/// Reads and verifies `index.json` only: format, version and its own checksum. Cheap, so a
/// caller can refuse an incompatible index ([`check_compatible`]) before loading gigabytes.
/// Recovers an interrupted save first ([`recover_index`]).
pub fn read_meta(dir: impl AsRef<Path>) -> Result<IndexMeta> {
    let dir = resolve(dir.as_ref())?;
    Ok(read_manifest(&dir)?.meta)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let corrupt = |problem: String| IndexError::Corrupt {
        file: path.clone(),
        problem,
    };
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(IndexError::MissingFile { file: path });
        }
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let mut value: Value = serde_json::from_slice(&text)
        .map_err(|e| corrupt(format!("not valid JSON (truncated or damaged?): {e}")))?;
    let Value::Object(map) = &mut value else {
        return Err(corrupt("not a JSON object".into()));
    };
    if map.get("format").and_then(Value::as_str) != Some(FORMAT_NAME) {
        return Err(corrupt(format!(
            "not a {FORMAT_NAME} manifest (format is {})",
            map.get("format").unwrap_or(&Value::Null)
        )));
    }
    // The version decides how the rest is read, so it is checked before anything else.
    match map.get("format_version") {
        Some(v) if v.as_u64() == Some(FORMAT_VERSION as u64) => {}
        Some(v) => {
            return Err(IndexError::UnsupportedVersion {
                file: path,
                found: v.to_string(),
                supported: FORMAT_VERSION,
            })
        }
        None => return Err(corrupt("format_version is missing".into())),
    }
    let recorded = match map.remove("manifest_sha256") {
        Some(Value::String(s)) => s,
        _ => return Err(corrupt("manifest_sha256 is missing".into())),
    };
    let actual = manifest_digest(&value);
    if actual != recorded {
        return Err(IndexError::ChecksumMismatch {
            file: path,
            expected: recorded,
            found: actual,
        });
    }
    let manifest: Manifest =
        serde_json::from_value(value).map_err(|e| corrupt(format!("bad metadata: {e}")))?;
    Ok(manifest)
}

/// Opens a listed data file, checks its size, then streams it through sha256 and `sink`.
fn read_verified(
    dir: &Path,
    name: &str,
    files: &BTreeMap<String, FileEntry>,
    expected_bytes: u64,
    mut sink: impl FnMut(&[u8]),
) -> Result<()> {
    let path = dir.join(name);
    let entry = files.get(name).ok_or_else(|| IndexError::Corrupt {
        file: dir.join(MANIFEST),
        problem: format!("does not list the data file {name}"),
    })?;
    if entry.bytes != expected_bytes {
        return Err(IndexError::Corrupt {
            file: dir.join(MANIFEST),
            problem: format!(
                "lists {name} with {} bytes, but count and dim imply {expected_bytes}",
                entry.bytes
            ),
        });
    }
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(IndexError::MissingFile { file: path })
        }
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let found = file.metadata().map_err(io_err("inspect", &path))?.len();
    if found != entry.bytes {
        return Err(IndexError::SizeMismatch {
            file: path,
            expected: entry.bytes,
            found,
        });
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", &path))?;
        if n == 0 {
            break;
        }
        // Sinks decode fixed-size records; keep chunks aligned to 8 bytes for them.
        let mut filled = n;
        while !filled.is_multiple_of(8) {
            let m = file
                .read(&mut buf[filled..])
                .map_err(io_err("read", &path))?;
            if m == 0 {
                break;
            }
            filled += m;
        }
        hasher.update(&buf[..filled]);
        sink(&buf[..filled]);
        total += filled as u64;
    }
    if total != entry.bytes {
        // The file changed size while being read.
        return Err(IndexError::SizeMismatch {
            file: path,
            expected: entry.bytes,
            found: total,
        });
    }
    let sha = hex::encode(hasher.finalize());
    if sha != entry.sha256 {
        return Err(IndexError::ChecksumMismatch {
            file: path,
            expected: entry.sha256.clone(),
            found: sha,
        });
    }
    Ok(())
}

/// Loads an index saved by [`save_index`], verifying the format version and the size and
/// sha256 of every file first. Damage is reported as an error naming the file; it never
/// panics. Recovers an interrupted save first ([`recover_index`]).
pub fn load_index(dir: impl AsRef<Path>) -> Result<(AnyIndex, IndexMeta)> {
    let (index, meta, _) = load_index_with_files(dir)?;
    Ok((index, meta))
}

/// [`load_index`] that also returns the caller files stored by [`save_index_with_files`],
/// by name, verified like the rest.
pub fn load_index_with_files(
    dir: impl AsRef<Path>,
) -> Result<(AnyIndex, IndexMeta, BTreeMap<String, Vec<u8>>)> {
    let dir = resolve(dir.as_ref())?;
    let manifest = read_manifest(&dir)?;
    let meta = manifest.meta;
    let manifest_path = dir.join(MANIFEST);
    if meta.dim == 0 {
        return Err(IndexError::Corrupt {
            file: manifest_path,
            problem: "dim is 0".into(),
        });
    }
    let too_big = || IndexError::Corrupt {
        file: manifest_path.clone(),
        problem: format!("count {} x dim {} overflows", meta.count, meta.dim),
    };
    let key_bytes = (meta.count as u64).checked_mul(8).ok_or_else(too_big)?;
    let values = meta.count.checked_mul(meta.dim).ok_or_else(too_big)?;
    let vec_bytes = (values as u64).checked_mul(4).ok_or_else(too_big)?;

    let mut keys = Vec::with_capacity(meta.count);
    read_verified(&dir, KEYS_FILE, &manifest.files, key_bytes, |chunk| {
        keys.extend(
            chunk
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        )
    })?;
    let keys_path = dir.join(KEYS_FILE);
    let mut seen = HashSet::with_capacity(keys.len());
    for &k in &keys {
        if k == RESERVED_KEY || !seen.insert(k) {
            return Err(IndexError::Corrupt {
                file: keys_path,
                problem: format!("key {k} is reserved or repeated"),
            });
        }
    }
    drop(seen);

    let mut data: Vec<f32> = Vec::with_capacity(values);
    read_verified(&dir, VECTORS_FILE, &manifest.files, vec_bytes, |chunk| {
        data.extend(
            chunk
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        )
    })?;
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        return Err(IndexError::Corrupt {
            file: dir.join(VECTORS_FILE),
            problem: format!("value {i} is not finite"),
        });
    }
    let store = VectorStore::from_rows(meta.dim, keys, data)?;

    let index = match meta.kind {
        IndexKind::Exact => AnyIndex::Exact(ExactIndex::from_store(store)),
        IndexKind::Hnsw => {
            let params = meta.hnsw.ok_or_else(|| IndexError::Corrupt {
                file: manifest_path.clone(),
                problem: "kind is hnsw but the hnsw parameters are missing".into(),
            })?;
            let mut labels = Vec::with_capacity(meta.count + 1);
            read_verified(&dir, LABELS_FILE, &manifest.files, key_bytes + 8, |chunk| {
                labels.extend(
                    chunk
                        .chunks_exact(8)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
                )
            })?;
            let next_label = labels[0];
            if next_label > usize::MAX as u64 / 16 {
                return Err(IndexError::Corrupt {
                    file: dir.join(LABELS_FILE),
                    problem: format!("next label {next_label} is implausible"),
                });
            }
            let graph_bytes = manifest
                .files
                .get(GRAPH_FILE)
                .map(|e| e.bytes)
                .ok_or_else(|| IndexError::Corrupt {
                    file: manifest_path.clone(),
                    problem: format!("does not list the data file {GRAPH_FILE}"),
                })?;
            let cap = usize::try_from(graph_bytes).map_err(|_| too_big())?;
            let mut graph = Vec::with_capacity(cap);
            read_verified(&dir, GRAPH_FILE, &manifest.files, graph_bytes, |chunk| {
                graph.extend_from_slice(chunk)
            })?;
            AnyIndex::Hnsw(HnswIndex::from_parts(
                params,
                store,
                &labels[1..],
                next_label,
                &graph,
                &dir.join(GRAPH_FILE),
            )?)
        }
    };
    debug_assert_eq!(index.len(), meta.count);
    let mut attachments = BTreeMap::new();
    for (name, entry) in &manifest.files {
        if RESERVED_FILES.contains(&name.as_str()) {
            continue;
        }
        check_attachment_name(&dir, name).map_err(|_| IndexError::Corrupt {
            file: manifest_path.clone(),
            problem: format!("lists a file with an unsafe name: {name:?}"),
        })?;
        let cap = usize::try_from(entry.bytes).map_err(|_| too_big())?;
        let mut bytes = Vec::with_capacity(cap);
        read_verified(&dir, name, &manifest.files, entry.bytes, |chunk| {
            bytes.extend_from_slice(chunk)
        })?;
        attachments.insert(name.clone(), bytes);
    }
    Ok((index, meta, attachments))
}

/// Refuses an index whose `extra` metadata differs from `expected` on any key `expected`
/// names (keys only the index has, such as a table path, are not compared). The error lists
/// every differing key with both values.
pub fn check_compatible(meta: &IndexMeta, expected: &Map<String, Value>) -> Result<()> {
    let differences: Vec<KeyDifference> = expected
        .iter()
        .filter(|(k, v)| meta.extra.get(*k) != Some(*v))
        .map(|(k, v)| KeyDifference {
            key: k.clone(),
            index: meta.extra.get(k).cloned(),
            expected: v.clone(),
        })
        .collect();
    if differences.is_empty() {
        Ok(())
    } else {
        Err(IndexError::Incompatible { differences })
    }
}

/// For tests of crash recovery: leaves `dir` as a crash between the two renames of the
/// non-`renameat2` save does — the index renamed away to `.NAME.old-<24-digit
/// nanoseconds>-<pid>` (the save's naming, written out here so a change to it fails those
/// tests) and nothing at `dir`. Returns the copy's path.
#[doc(hidden)]
pub fn crash_between_renames(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a named directory");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    let old = dir
        .parent()
        .expect("a directory with a parent")
        .join(format!(".{name}.old-{nanos:024}-{}", std::process::id()));
    fs::rename(dir, &old).expect("renaming the index away");
    old
}
