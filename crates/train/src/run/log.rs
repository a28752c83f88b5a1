//! What a run tells the user while it runs: `metrics.jsonl` (one JSON object per line, each
//! with its `step`; a resumed run first drops the lines after its checkpoint), `curves.png`
//! redrawn from it, and progress lines with the time per step and an ETA.

use crate::error::{file_err, Result};
use search_r3_model::files::write_atomic;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The metrics log of a run.
pub(crate) const METRICS: &str = "metrics.jsonl";
/// Loss and eval curves, redrawn as the run goes and at the end.
pub const CURVES: &str = "curves.png";

/// `OUT/metrics.jsonl`, open for appending.
pub(crate) struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log of the run in `out`: emptied for a fresh run, cut after `resume_step`
    /// for a resumed one.
    pub(crate) fn open(out: &Path, resume_step: Option<usize>) -> Result<Self> {
        let path = out.join(METRICS);
        match resume_step {
            Some(step) => truncate_metrics(&path, step)?,
            None => std::fs::write(&path, b"").map_err(|e| file_err(&path, e))?,
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| file_err(&path, e))?;
        Ok(MetricsLog { file, path })
    }

    /// Appends one JSON line.
    pub(crate) fn line(&mut self, v: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")
            .and_then(|_| self.file.flush())
            .map_err(|e| file_err(&self.path, e))
    }

    /// Redraws `curves.png` beside the log; a plotting failure must not end a training run,
    /// so it is only reported.
    pub(crate) fn plot(&self) {
        let out = self.path.parent().unwrap_or(Path::new("."));
        plot_curves(&self.path, out);
    }
}

/// Keeps the lines of `metrics.jsonl` whose `step` is at most `step` (a resumed run rewrites
/// what came after its checkpoint); unparsable lines (a write cut by a crash) are dropped.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(file_err(path, e)),
    };
    let mut kept = String::new();
    for line in text.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            .is_some_and(|s| s as usize <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes()).map_err(|e| file_err(path, e))
}

fn plot_curves(metrics: &Path, out: &Path) {
    let title = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(e) = crate::plot::plot_metrics(metrics, &out.join(CURVES), &title) {
        eprintln!(
            "warning: could not draw {}: {e}",
            out.join(CURVES).display()
        );
    }
}

/// Seconds per step and ETA since this invocation started (a resumed run counts only its own
/// steps).
pub(crate) struct Pace {
    started: Instant,
    first_step: usize,
    steps: usize,
}

impl Pace {
    /// Starts timing at `first_step` of a run of `steps`.
    pub(crate) fn new(first_step: usize, steps: usize) -> Self {
        Pace {
            started: Instant::now(),
            first_step,
            steps,
        }
    }

    /// `"{s}s/step eta H:MM:SS"` after `step` steps.
    pub(crate) fn after(&self, step: usize) -> String {
        let done = step.saturating_sub(self.first_step).max(1);
        let per = self.started.elapsed().as_secs_f64() / done as f64;
        let eta = per * self.steps.saturating_sub(step) as f64;
        format!("{per:.1}s/step eta {}", fmt_duration(eta))
    }
}

/// `H:MM:SS`.
pub(crate) fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
