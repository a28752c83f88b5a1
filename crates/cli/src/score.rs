//! `search-r3 score`: trec_eval-exact metrics for a TREC run file against BEIR qrels.

use anyhow::{bail, Context, Result};
use clap::Args;
use search_r3_core::metrics::{
    evaluate, missing_queries, paired_bootstrap, unknown_queries, Evaluation, Qrels, ALL_METRICS,
};
use search_r3_core::trec::read_run;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How many offending query ids a message names before summarising the rest.
const EXAMPLES: usize = 5;

/// `search-r3 score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Relevance judgements: a BEIR qrels TSV (query-id, corpus-id, score).
    #[arg(long)]
    qrels: PathBuf,
    /// The run to score, in TREC format (qid Q0 docid rank score tag).
    #[arg(long)]
    run: PathBuf,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Report every query's metrics too (printed, and under "per_query" in --out).
    #[arg(long)]
    per_query: bool,
    /// Fail when the run has queries that the qrels do not judge, instead of ignoring them.
    #[arg(long)]
    strict: bool,
    /// Compare the run against this baseline run (TREC format) on the queries both score:
    /// per-query wins / ties / losses and a paired bootstrap 95% interval of the difference in
    /// `--metric` (printed, and under "comparison" in --out).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The metric compared with --baseline.
    #[arg(long, default_value = "ndcg@10")]
    metric: String,
    /// Bootstrap resamples for --baseline.
    #[arg(long, default_value_t = 1000)]
    resamples: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn examples(ids: &[String]) -> String {
    let mut s = ids
        .iter()
        .take(EXAMPLES)
        .map(|q| format!("`{q}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > EXAMPLES {
        s.push_str(&format!(" and {} more", ids.len() - EXAMPLES));
    }
    s
}

/// Runs `search-r3 score`.
pub fn score(a: &ScoreArgs) -> Result<()> {
    let qrels =
        Qrels::read(&a.qrels).with_context(|| format!("reading qrels {}", a.qrels.display()))?;
    let run = read_run(&a.run).with_context(|| format!("reading run {}", a.run.display()))?;

    let unknown = unknown_queries(&qrels, &run);
    if !unknown.is_empty() {
        let what = format!(
            "{} of the {} queries in {} have no judgements in {}: {}",
            unknown.len(),
            run.len(),
            a.run.display(),
            a.qrels.display(),
            examples(&unknown)
        );
        if a.strict {
            bail!("{what}");
        }
        eprintln!("warning: {what}; they are ignored, as trec_eval ignores them");
    }
    let missing = missing_queries(&qrels, &run);
    if !missing.is_empty() {
        // trec_eval without -c leaves them out of the means; saying so keeps a short run from
        // looking better than it is unnoticed.
        eprintln!(
            "note: {} of the {} judged queries are absent from the run and not scored: {}",
            missing.len(),
            qrels.len(),
            examples(&missing)
        );
    }

    let ev = evaluate(&qrels, &run);
    if ev.queries == 0 {
        bail!(
            "no query in {} is judged in {}: nothing to score (do the query ids match?)",
            a.run.display(),
            a.qrels.display()
        );
    }

    print_metrics(&ev, a.per_query)?;
    let comparison = match &a.baseline {
        Some(b) => Some(compare(a, &qrels, &ev, b)?),
        None => None,
    };

    if let Some(out) = &a.out {
        let mut json = metrics_json(&ev, a.per_query)?;
        if let Some(c) = &comparison {
            json.insert("comparison".into(), serde_json::to_value(c)?);
        }
        json.insert("qrels".into(), a.qrels.display().to_string().into());
        json.insert("run".into(), a.run.display().to_string().into());
        write_atomic(out, &serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing results {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// `--baseline`: the run's per-query `--metric` against the baseline's on the queries both
/// score, printed and returned for the JSON.
fn compare(
    a: &ScoreArgs,
    qrels: &Qrels,
    ev: &Evaluation,
    baseline: &Path,
) -> Result<serde_json::Value> {
    let metric = ALL_METRICS
        .iter()
        .find(|m| **m == a.metric)
        .with_context(|| {
            format!(
                "--metric `{}`: expected one of {}",
                a.metric,
                ALL_METRICS.join(", ")
            )
        })?;
    let base_run =
        read_run(baseline).with_context(|| format!("reading run {}", baseline.display()))?;
    let base = evaluate(qrels, &base_run);
    let shared: Vec<&String> = ev
        .per_query
        .keys()
        .filter(|q| base.per_query.contains_key(*q))
        .collect();
    if shared.is_empty() {
        bail!(
            "{} and {} score no query in common",
            a.run.display(),
            baseline.display()
        );
    }
    let xs: Vec<f64> = shared.iter().map(|q| base.per_query[*q][metric]).collect();
    let ys: Vec<f64> = shared.iter().map(|q| ev.per_query[*q][metric]).collect();
    let c = paired_bootstrap(&xs, &ys, a.resamples, a.seed).expect("same non-empty queries");
    println!(
        "\n{metric}: run {:.4} vs baseline {:.4} over {} queries: difference {:+.4}, 95% CI [{:+.4}, {:+.4}] ({} paired bootstrap resamples, seed {}); wins / ties / losses {} / {} / {}",
        c.mean_b, c.mean_a, c.queries, c.difference, c.ci95[0], c.ci95[1], c.resamples, c.seed,
        c.wins, c.ties, c.losses
    );
    let mut v = serde_json::to_value(&c)?;
    v["metric"] = (*metric).into();
    v["baseline"] = baseline.display().to_string().into();
    Ok(v)
}

/// Prints the mean metrics (and, with `per_query`, one row per query) as a table on stdout.
pub(crate) fn print_metrics(ev: &Evaluation, per_query: bool) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if per_query {
        write!(stdout, "{:<16}", "query")?;
        for m in ALL_METRICS {
            write!(stdout, " {m:>10}")?;
        }
        writeln!(stdout)?;
        for (q, scores) in &ev.per_query {
            write!(stdout, "{q:<16}")?;
            for m in ALL_METRICS {
                write!(stdout, " {:>10.4}", scores[m])?;
            }
            writeln!(stdout)?;
        }
        writeln!(stdout)?;
    }
    writeln!(stdout, "{:<12} {:>8}", "metric", "value")?;
    for m in ALL_METRICS {
        writeln!(stdout, "{m:<12} {:>8.4}", ev.mean[m])?;
    }
    writeln!(stdout, "{:<12} {:>8}", "queries", ev.queries)?;
    Ok(())
}

/// The results object both `score` and `eval` write: every metric's mean at the top level,
/// `queries`, and with `per_query` the per-query values under `"per_query"`.
pub(crate) fn metrics_json(
    ev: &Evaluation,
    per_query: bool,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut json = serde_json::Map::new();
    for m in ALL_METRICS {
        json.insert(m.to_string(), ev.mean[m].into());
    }
    json.insert("queries".into(), ev.queries.into());
    if per_query {
        json.insert("per_query".into(), serde_json::to_value(&ev.per_query)?);
    }
    Ok(json)
}

/// Writes a results file (with a final newline) whole or not at all.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    search_r3_model::files::write_atomic(path, format!("{text}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
