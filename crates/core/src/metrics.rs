//! IR metrics computed exactly as trec_eval 9.x (and so pytrec_eval) computes them.
//!
//! The trec_eval rules this follows, each of which moves numbers if done differently:
//! - a query's documents are ranked by score, ties broken by document id in descending byte
//!   order ([`cmp_trec`]); the run file's rank column is ignored;
//! - only queries both in the run and in the qrels are scored, and means are over those
//!   (trec_eval without `-c`); a judged query whose judgments are all 0 is still scored (0);
//! - a document is relevant when its grade is ≥ 1 (recall, precision, MAP, reciprocal rank);
//! - nDCG (`ndcg_cut`) uses the grade itself as gain (negative grades gain 0), discounts rank
//!   `r` by `log2(r + 1)`, and normalises by the ideal ordering of *all* judged documents cut
//!   at the same depth;
//! - P@k divides by k even when fewer than k documents were retrieved.

use crate::corpus::{read_qrels, CorpusError};
use crate::trec::{cmp_trec, Run};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The metrics every results file must carry, in the order they are reported.
pub const METRIC_KEYS: [&str; 7] = [
    "ndcg@10",
    "ndcg@100",
    "recall@10",
    "recall@100",
    "mrr@10",
    "map@100",
    "p@10",
];

/// Every metric [`evaluate`] computes: [`METRIC_KEYS`] plus full-depth reciprocal rank (`mrr`).
pub const ALL_METRICS: [&str; 8] = [
    "ndcg@10",
    "ndcg@100",
    "recall@10",
    "recall@100",
    "mrr@10",
    "map@100",
    "p@10",
    "mrr",
];

/// Metric name (one of [`ALL_METRICS`]) → value.
pub type Scores = BTreeMap<&'static str, f64>;

/// Relevance judgements: query id → document id → grade.
#[derive(Debug, Clone, Default)]
pub struct Qrels {
    queries: BTreeMap<String, HashMap<String, i32>>,
}

impl Qrels {
    /// Builds qrels from `(query, doc, grade)` triples such as [`read_qrels`] returns; a later
    /// triple for the same pair replaces an earlier one.
    pub fn from_triples<I>(triples: I) -> Self
    where
        I: IntoIterator<Item = (String, String, i32)>,
    {
        let mut queries: BTreeMap<String, HashMap<String, i32>> = BTreeMap::new();
        for (q, d, g) in triples {
            queries.entry(q).or_default().insert(d, g);
        }
        Qrels { queries }
    }

    /// Reads a BEIR qrels TSV (see [`read_qrels`]).
    pub fn read(path: &Path) -> Result<Self, CorpusError> {
        Ok(Self::from_triples(read_qrels(path)?))
    }

    /// The judgements for one query, if it has any.
    pub fn judgments(&self, query_id: &str) -> Option<&HashMap<String, i32>> {
        self.queries.get(query_id)
    }

    /// Whether the query has judgements.
    pub fn contains(&self, query_id: &str) -> bool {
        self.queries.contains_key(query_id)
    }

    /// The judged query ids, in order.
    pub fn query_ids(&self) -> impl Iterator<Item = &str> {
        self.queries.keys().map(String::as_str)
    }

    /// How many queries have judgements.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    /// Whether there are no judgements at all.
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }
}

/// Scores for a run against qrels.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Evaluation {
    /// Query id → its scores, for each query both in the run and in the qrels.
    pub per_query: BTreeMap<String, Scores>,
    /// Mean of each metric over `per_query`; empty when no query was scored, since a mean of
    /// nothing has no value.
    pub mean: Scores,
    /// How many queries were scored (`per_query.len()`).
    pub queries: usize,
}

/// Scores one query's retrieved documents against its judgements.
///
/// `hits` may be in any order: they are ranked as trec_eval ranks them. Document ids must be
/// unique (as [`crate::trec::read_run`] guarantees).
pub fn evaluate_query(judgments: &HashMap<String, i32>, hits: &[(String, f64)]) -> Scores {
    let mut ranked: Vec<(&str, f64)> = hits.iter().map(|(d, s)| (d.as_str(), *s)).collect();
    ranked.sort_by(|a, b| cmp_trec(*a, *b));
    let grades: Vec<i32> = ranked
        .iter()
        .map(|(d, _)| judgments.get(*d).copied().unwrap_or(0))
        .collect();
    let num_rel = judgments.values().filter(|&&g| g >= 1).count();
    let mut ideal: Vec<i32> = judgments.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));

    let relevant = |g: i32| g >= 1;
    let rel_in_top = |k: usize| grades.iter().take(k).filter(|&&g| relevant(g)).count();
    let ratio = |num: f64, den: usize| if den == 0 { 0.0 } else { num / den as f64 };
    let dcg = |gains: &[i32], k: usize| -> f64 {
        gains
            .iter()
            .take(k)
            .enumerate()
            .filter(|(_, &g)| g > 0)
            .map(|(i, &g)| g as f64 / ((i + 2) as f64).log2())
            .sum()
    };
    let ndcg = |k: usize| {
        let ideal_dcg = dcg(&ideal, k);
        if ideal_dcg > 0.0 {
            dcg(&grades, k) / ideal_dcg
        } else {
            0.0
        }
    };
    let recip_rank = |k: usize| {
        grades
            .iter()
            .take(k)
            .position(|&g| relevant(g))
            .map_or(0.0, |i| 1.0 / (i + 1) as f64)
    };
    let average_precision = |k: usize| {
        let mut found = 0usize;
        let mut sum = 0.0;
        for (i, &g) in grades.iter().take(k).enumerate() {
            if relevant(g) {
                found += 1;
                sum += found as f64 / (i + 1) as f64;
            }
        }
        ratio(sum, num_rel)
    };

    let mut s = Scores::new();
    s.insert("ndcg@10", ndcg(10));
    s.insert("ndcg@100", ndcg(100));
    s.insert("recall@10", ratio(rel_in_top(10) as f64, num_rel));
    s.insert("recall@100", ratio(rel_in_top(100) as f64, num_rel));
    s.insert("mrr@10", recip_rank(10));
    s.insert("map@100", average_precision(100));
    s.insert("p@10", rel_in_top(10) as f64 / 10.0);
    s.insert("mrr", recip_rank(usize::MAX));
    s
}

/// Scores one in-memory ranking for `query_id`; `None` when the query has no judgements
/// (trec_eval skips such queries).
pub fn evaluate_hits(qrels: &Qrels, query_id: &str, hits: &[(String, f64)]) -> Option<Scores> {
    qrels.judgments(query_id).map(|j| evaluate_query(j, hits))
}

/// Scores every query of `run` that has judgements and averages over them, as trec_eval does
/// by default. Run queries without judgements are ignored (see [`unknown_queries`]); judged
/// queries absent from the run are not counted (see [`missing_queries`]).
pub fn evaluate(qrels: &Qrels, run: &Run) -> Evaluation {
    let per_query: BTreeMap<String, Scores> = run
        .iter()
        .filter_map(|(q, hits)| evaluate_hits(qrels, q, hits).map(|s| (q.clone(), s)))
        .collect();
    let queries = per_query.len();
    let mut mean = Scores::new();
    if queries > 0 {
        for name in ALL_METRICS {
            let sum: f64 = per_query.values().map(|s| s[name]).sum();
            mean.insert(name, sum / queries as f64);
        }
    }
    Evaluation {
        per_query,
        mean,
        queries,
    }
}

/// Query ids in the run that have no judgements (ignored by [`evaluate`]), in order.
pub fn unknown_queries(qrels: &Qrels, run: &Run) -> Vec<String> {
    run.keys().filter(|q| !qrels.contains(q)).cloned().collect()
}

/// Judged query ids the run has no entry for, in order. trec_eval leaves them out of the
/// means unless run with `-c`, and so does [`evaluate`].
pub fn missing_queries(qrels: &Qrels, run: &Run) -> Vec<String> {
    qrels
        .query_ids()
        .filter(|q| !run.contains_key(*q))
        .map(str::to_string)
        .collect()
}

/// A paired comparison of two systems on the same queries: per-query wins, ties and losses of
/// `b` against `a`, and a paired bootstrap interval of the mean difference `b − a` (Efron &
/// Tibshirani; Sakai 2006 for IR): each resample draws the queries with replacement and keeps
/// each query's pair together, so the interval reflects per-query variation, not just the two
/// means.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PairedComparison {
    /// Queries compared.
    pub queries: usize,
    /// Mean of `a`.
    pub mean_a: f64,
    /// Mean of `b`.
    pub mean_b: f64,
    /// `mean_b − mean_a`.
    pub difference: f64,
    /// 2.5th and 97.5th percentiles of the resampled mean differences.
    pub ci95: [f64; 2],
    /// Resamples drawn.
    pub resamples: usize,
    /// Seed of the resampling.
    pub seed: u64,
    /// Queries where `b` scores higher than `a` (by more than 1e-12).
    pub wins: usize,
    /// Queries where they score the same.
    pub ties: usize,
    /// Queries where `b` scores lower.
    pub losses: usize,
}

/// Compares per-query scores `b` against `a` (same queries, same order) with `resamples`
/// seeded bootstrap resamples; `None` when the lists are empty or of different lengths.
pub fn paired_bootstrap(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    seed: u64,
) -> Option<PairedComparison> {
    use rand::{Rng, SeedableRng};
    let n = a.len();
    if n == 0 || b.len() != n {
        return None;
    }
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| diff[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    // Nearest-rank percentiles of the sorted resampled means.
    let pct = |p: f64| -> f64 {
        if means.is_empty() {
            return f64::NAN;
        }
        let k = ((p * means.len() as f64).ceil() as usize).clamp(1, means.len());
        means[k - 1]
    };
    const EPS: f64 = 1e-12;
    Some(PairedComparison {
        queries: n,
        mean_a: mean(a),
        mean_b: mean(b),
        difference: mean(&diff),
        ci95: [pct(0.025), pct(0.975)],
        resamples,
        seed,
        wins: diff.iter().filter(|d| **d > EPS).count(),
        ties: diff.iter().filter(|d| d.abs() <= EPS).count(),
        losses: diff.iter().filter(|d| **d < -EPS).count(),
    })
}
