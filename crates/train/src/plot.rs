//! Training-curve plots: one PNG with a panel per series of a run's `metrics.jsonl`.
//!
//! The reader is deliberately schema-free so that the SFT trainer, the RL trainer and whatever
//! comes later can all be plotted without touching this file: every numeric leaf of a step line
//! becomes a series named by its dotted path, and every numeric entry of an `eval` object an
//! eval series.
//!
//! Text is rendered with plotters' `ab_glyph` backend and a bundled DejaVu Sans
//! (`assets/DejaVuSans.ttf`, license in `assets/DejaVu-LICENSE.txt`), so plotting needs no
//! fontconfig or freetype on the machine.

use crate::error::{file_err, Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use search_r3_model::files::write_atomic;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

/// The bundled font (see the module docs for its license).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// The family every text style below asks for; plotters' `FontFamily::SansSerif` maps to it.
const FAMILY: &str = "sans-serif";

/// Image width; panels share it in `COLS` columns.
const WIDTH: u32 = 1600;
/// Height of one row of panels.
const ROW_HEIGHT: u32 = 400;
/// Height of the band holding the caller's title above the panels.
const TITLE_HEIGHT: u32 = 60;
/// Panels per row (fewer when there are fewer series).
const COLS: usize = 3;
/// Smoothing of the bold line: `ema = ALPHA·x + (1−ALPHA)·ema`.
const EMA_ALPHA: f64 = 0.1;
/// Above this many points the raw line is noise; the moving average carries the trend.
const EMA_MIN_POINTS: usize = 10;
/// A series whose mean |second difference| is below this fraction of its range is
/// deterministic (a learning-rate schedule), not noisy: it gets no moving average.
const SMOOTH_ROUGHNESS: f64 = 0.01;
/// Top-level keys of step lines that are bookkeeping, not curves.
const NOT_SERIES: [&str; 3] = ["step", "seconds", "tokens"];

/// Colour of step series.
const STEP_COLOR: RGBColor = RGBColor(31, 119, 180);
/// Colour of eval series, distinct so that the panels that matter most stand out.
const EVAL_COLOR: RGBColor = RGBColor(214, 39, 40);

/// One curve: `(step, value)` points in file order.
struct Series {
    name: String,
    eval: bool,
    points: Vec<(f64, f64)>,
}

/// Renders the curves in `metrics` (a `metrics.jsonl` written by a trainer) to the PNG `out`,
/// with `title` (e.g. the run name) above the panels.
///
/// Step lines (no `eval` object) contribute one series per numeric leaf, named by its dotted
/// path (`loss.total`, `grad_norm`, `reward.mean`), except the top-level `step`, `seconds` and
/// `tokens`; lines with an `eval` object contribute `eval <metric>` series. Panels are laid out
/// three per row: eval series first, then `loss.total`, the other `loss.*`, and the rest by
/// name. Each panel shows the raw values and, for a noisy series of more than ten points, an
/// exponential moving average (α = 0.1); a smooth one such as a learning-rate schedule is drawn
/// as is, since its average would only lag behind it.
///
/// The image is written to a temporary file next to `out` and renamed over it, so an existing
/// plot is never left half-written.
///
/// # Errors
/// [`Error::File`] when `metrics` cannot be read, a line is not a JSON object with a numeric
/// `step` (the message names the file and the 1-based line), there is no numeric series at all,
/// or the image cannot be drawn or written.
pub fn plot_metrics(metrics: &Path, out: &Path, title: &str) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| file_err(metrics, e))?;
    let series = parse(metrics, &text)?;
    if series.is_empty() {
        return Err(file_err(
            metrics,
            "nothing to plot: no numeric values besides step/seconds/tokens and no eval metrics",
        ));
    }
    register_bundled_font()?;

    let cols = series.len().min(COLS);
    let rows = series.len().div_ceil(cols);
    let height = TITLE_HEIGHT + ROW_HEIGHT * rows as u32;
    let mut rgb = vec![0u8; WIDTH as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, height)).into_drawing_area();
        draw(&root, title, &series, rows, cols).map_err(|e| file_err(out, e))?;
        root.present().map_err(|e| file_err(out, e))?;
    }
    let png = encode_png(&rgb, WIDTH, height).map_err(|e| file_err(out, e))?;
    write_atomic(out, &png).map_err(|e| file_err(out, e))
}

/// Registers the bundled font with plotters once per process; plotters keeps a global table.
fn register_bundled_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(
            "plot: the bundled DejaVuSans.ttf could not be parsed".into(),
        ))
    }
}

/// Reads every series out of the JSONL text, in the order the panels are drawn.
fn parse(path: &Path, text: &str) -> Result<Vec<Series>> {
    let mut by_name: BTreeMap<String, Series> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: String| file_err(path, format!("line {}: {what}", i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON ({e})")))?;
        let Value::Object(obj) = v else {
            return Err(bad("expected a JSON object".into()));
        };
        let step = obj
            .get("step")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("expected a numeric \"step\"".into()))?;
        let mut push = |name: String, eval: bool, y: f64| {
            by_name
                .entry(name.clone())
                .or_insert_with(|| Series {
                    name,
                    eval,
                    points: Vec::new(),
                })
                .points
                .push((step, y));
        };
        if let Some(Value::Object(eval)) = obj.get("eval") {
            for (k, v) in eval {
                if let Some(y) = v.as_f64() {
                    push(format!("eval {k}"), true, y);
                }
            }
        } else {
            let mut leaves = Vec::new();
            flatten("", &obj, &mut leaves);
            for (name, y) in leaves {
                push(name, false, y);
            }
        }
    }
    let mut series: Vec<Series> = by_name.into_values().collect();
    series.sort_by(|a, b| (rank(a), &a.name).cmp(&(rank(b), &b.name)));
    Ok(series)
}

/// Collects the numeric leaves of `obj` as `(dotted.path, value)`, skipping the bookkeeping
/// keys at the top level only (a nested `reward.tokens` would be a real curve).
fn flatten(prefix: &str, obj: &Map<String, Value>, out: &mut Vec<(String, f64)>) {
    for (k, v) in obj {
        if prefix.is_empty() && NOT_SERIES.contains(&k.as_str()) {
            continue;
        }
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(inner) => flatten(&name, inner, out),
            _ => {
                if let Some(y) = v.as_f64() {
                    out.push((name, y));
                }
            }
        }
    }
}

/// Panel order: eval metrics matter most, then the objective, its terms, and everything else.
fn rank(s: &Series) -> u8 {
    if s.eval {
        0
    } else if s.name == "loss.total" {
        1
    } else if s.name.starts_with("loss.") {
        2
    } else {
        3
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    series: &[Series],
    rows: usize,
    cols: usize,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(TITLE_HEIGHT);
    let (w, h) = top.dim_in_pixel();
    let style = TextStyle::from((FAMILY, 34).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Center));
    top.draw_text(title, &style, (w as i32 / 2, h as i32 / 2))?;
    // One step axis for every panel so that an eval point lines up with the training steps
    // around it.
    let xs = axis_range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        false,
    );
    for (area, s) in body.split_evenly((rows, cols)).iter().zip(series) {
        draw_panel(area, s, xs.clone())?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &Series,
    xs: std::ops::Range<f64>,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let ys = axis_range(s.points.iter().map(|p| p.1), true);
    let y_fmt = label_format(&ys);
    let mut chart = ChartBuilder::on(area)
        .caption(&s.name, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(xs, ys)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(6)
        .x_desc("step")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 14))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_label_formatter(&fmt_step)
        .y_label_formatter(&y_fmt)
        .draw()?;

    let color = if s.eval { EVAL_COLOR } else { STEP_COLOR };
    let many = s.points.len() > EMA_MIN_POINTS;
    let smoothed = many && !is_smooth(&s.points);
    let raw = if smoothed {
        color.mix(0.4).stroke_width(1)
    } else {
        color.stroke_width(2)
    };
    chart.draw_series(LineSeries::new(s.points.iter().copied(), raw))?;
    // Markers make eval points (few, each an expensive evaluation) and short runs readable;
    // a single point has no line at all without them.
    if s.eval || !many {
        let dot = if smoothed {
            color.mix(0.6).filled()
        } else {
            color.filled()
        };
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, dot)))?;
    }
    if smoothed {
        chart.draw_series(LineSeries::new(ema(&s.points), color.stroke_width(3)))?;
    }
    Ok(())
}

/// Whether the values already form a smooth curve. An EMA of a schedule only lags behind it:
/// on a 50-step run a warmup peak at step 5 would be drawn at step 20.
fn is_smooth(points: &[(f64, f64)]) -> bool {
    if points.len() < 3 {
        return true;
    }
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return true;
    }
    let rough: f64 = points
        .windows(3)
        .map(|w| (w[2].1 - 2.0 * w[1].1 + w[0].1).abs())
        .sum::<f64>()
        / (points.len() - 2) as f64;
    rough < SMOOTH_ROUGHNESS * span
}

/// Exponential moving average of the values, seeded with the first one so that the curve
/// starts on the data instead of climbing from zero.
fn ema(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut acc = None;
    points
        .iter()
        .map(|&(x, y)| {
            let m = match acc {
                None => y,
                Some(m) => EMA_ALPHA * y + (1.0 - EMA_ALPHA) * m,
            };
            acc = Some(m);
            (x, m)
        })
        .collect()
}

/// The data's range with a small margin. A degenerate range (a constant series, a single
/// point) is widened around its value, since plotters needs `start < end` to place ticks.
fn axis_range(values: impl Iterator<Item = f64>, pad_span: bool) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let span = hi - lo;
    if span.is_infinite() {
        // Values near ±f64::MAX: any margin would overflow.
        return lo..hi;
    }
    if span <= f64::EPSILON * lo.abs().max(hi.abs()) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad)..(hi + pad);
    }
    // Steps sit flush with the panel edges; values get air so the extremes stay visible.
    let pad = if pad_span { span * 0.05 } else { 0.0 };
    (lo - pad)..(hi + pad)
}

/// A y-tick formatter whose precision follows the axis span: losses around 10 need one
/// decimal, a learning rate of 4e-5 needs scientific notation.
fn label_format(range: &std::ops::Range<f64>) -> impl Fn(&f64) -> String {
    let span = range.end - range.start;
    let mag = range.start.abs().max(range.end.abs());
    let scientific = !(1e-3..1e5).contains(&mag) || span < 1e-4 * mag;
    // Six ticks over the span: enough decimals to tell neighbouring ticks apart.
    let decimals = (-(span / 6.0).log10().floor()).clamp(0.0, 6.0) as usize;
    move |v: &f64| {
        if scientific {
            format!("{v:.2e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
}

/// Step ticks: integers as integers; fractional ticks only appear on very short runs.
fn fmt_step(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    }
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> std::result::Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    // The default settings leave a mostly-white plot at over 1 MB; these shrink it several
    // times for a few milliseconds more.
    enc.set_compression(png::Compression::Best);
    enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut w = enc
        .write_header()
        .map_err(|e| format!("encoding PNG: {e}"))?;
    w.write_image_data(rgb)
        .map_err(|e| format!("encoding PNG: {e}"))?;
    w.finish().map_err(|e| format!("encoding PNG: {e}"))?;
    Ok(bytes)
}
