//! `search-r3 plot`: a PNG of a training run's curves from its `metrics.jsonl`.

use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};

/// `search-r3 plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// The run's metrics log, e.g. runs/NAME/metrics.jsonl.
    #[arg(long)]
    metrics: PathBuf,
    /// Where to write the PNG [default: curves.png next to the metrics file].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Title above the panels [default: the name of the run directory].
    #[arg(long)]
    title: Option<String>,
}

/// Runs `search-r3 plot`.
pub fn plot(a: &PlotArgs) -> Result<()> {
    let dir = run_dir(&a.metrics);
    let out = a.out.clone().unwrap_or_else(|| dir.join("curves.png"));
    let title = a.title.clone().unwrap_or_else(|| run_name(&dir));
    search_r3_train::plot::plot_metrics(&a.metrics, &out, &title)?;
    println!("{}", out.display());
    Ok(())
}

/// The directory holding the metrics file; `.` for a bare file name, whose parent is empty.
fn run_dir(metrics: &Path) -> PathBuf {
    match metrics.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The run directory's name. `.` and `..` have no name of their own, so they are resolved
/// first; without any usable name the title falls back to a generic one.
fn run_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            std::fs::canonicalize(dir)
                .ok()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "training curves".to_string())
}
