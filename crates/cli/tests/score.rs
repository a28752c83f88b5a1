//! `search-r3 score` on the pytrec_eval fixture and on broken input.

mod common;

use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/metrics")
        .join(name)
}

fn score(args: &[&str]) -> (bool, String, String) {
    common::run(&[&["score"], args].concat())
}

fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() <= 1e-9
}

#[test]
fn scores_the_fixture_like_pytrec_eval() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results.json");
    let qrels = fixture("qrels.tsv");
    let run = fixture("run.trec");
    let (ok, stdout, stderr) = score(&[
        "--qrels",
        qrels.to_str().unwrap(),
        "--run",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--per-query",
    ]);
    assert!(ok, "{stderr}");
    // q_norel is in the run but not judged: a warning, not an error.
    assert!(
        stderr.contains("warning: 1 of the 41 queries") && stderr.contains("`q_norel`"),
        "{stderr}"
    );

    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for key in [
        "ndcg@10",
        "ndcg@100",
        "recall@10",
        "recall@100",
        "mrr@10",
        "map@100",
        "p@10",
        "queries",
    ] {
        assert!(got.get(key).is_some(), "results.json lacks {key}: {got}");
    }
    assert_eq!(got["queries"], 40);
    for (name, value) in want["mean"].as_object().unwrap() {
        assert!(
            close(&got[name], value),
            "mean {name}: {} vs {value}",
            got[name]
        );
    }
    let got_per = got["per_query"].as_object().unwrap();
    let want_per = want["per_query"].as_object().unwrap();
    assert_eq!(got_per.len(), want_per.len());
    assert!(!got_per.contains_key("q_norel"));
    for (q, metrics) in want_per {
        for (name, value) in metrics.as_object().unwrap() {
            assert!(
                close(&got_per[q][name], value),
                "{q} {name}: {} vs {value}",
                got_per[q][name]
            );
        }
    }

    // The printed table carries the same means, to 4 decimals, and the query count.
    let mean_ndcg = format!("{:.4}", want["mean"]["ndcg@10"].as_f64().unwrap());
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ndcg@10 ") && l.ends_with(&mean_ndcg)),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("queries ") && l.ends_with(" 40")),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("q39 ")), "{stdout}");
}

#[test]
fn strict_refuses_unjudged_run_queries() {
    let (ok, _, stderr) = score(&[
        "--qrels",
        fixture("qrels.tsv").to_str().unwrap(),
        "--run",
        fixture("run.trec").to_str().unwrap(),
        "--strict",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("error:") && stderr.contains("`q_norel`"),
        "{stderr}"
    );
}

#[test]
fn malformed_run_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("broken.trec");
    std::fs::write(&run, "q0 Q0 d1 1 1.0 t\nq0 Q0 d2 2 0.5\n").unwrap();
    let out = dir.path().join("results.json");
    let (ok, _, stderr) = score(&[
        "--qrels",
        fixture("qrels.tsv").to_str().unwrap(),
        "--run",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("broken.trec line 2: expected 6 whitespace-separated columns"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists());

    std::fs::write(&run, "q0 Q0 d1 1 1.0 t\nq0 Q0 d2 2 x t\n").unwrap();
    let (ok, _, stderr) = score(&[
        "--qrels",
        fixture("qrels.tsv").to_str().unwrap(),
        "--run",
        run.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("broken.trec line 2: column 5 (score)"),
        "{stderr}"
    );
}

#[test]
fn run_sharing_no_query_with_the_qrels_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("other.trec");
    std::fs::write(&run, "x1 Q0 d1 1 1.0 t\n").unwrap();
    let (ok, _, stderr) = score(&[
        "--qrels",
        fixture("qrels.tsv").to_str().unwrap(),
        "--run",
        run.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("nothing to score"), "{stderr}");
}

#[test]
fn baseline_comparison_counts_wins_and_bounds_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let qrels = p(
        "qrels.tsv",
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td3\t1\n",
    );
    // The run ranks q1's and q2's document first; the baseline ranks q1's second and q3's first.
    let run = p(
        "run.trec",
        "q1 Q0 d1 1 2.0 r\nq1 Q0 dx 2 1.0 r\nq2 Q0 d2 1 1.0 r\nq3 Q0 dx 1 2.0 r\nq3 Q0 d3 2 1.0 r\n",
    );
    let base = p(
        "base.trec",
        "q1 Q0 dx 1 2.0 b\nq1 Q0 d1 2 1.0 b\nq2 Q0 d2 1 1.0 b\nq3 Q0 d3 1 2.0 b\n",
    );
    let out = dir.path().join("cmp.json");
    let (ok, stdout, stderr) = score(&[
        "--qrels",
        qrels.to_str().unwrap(),
        "--run",
        run.to_str().unwrap(),
        "--baseline",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("wins / ties / losses 1 / 1 / 1"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let c = &v["comparison"];
    assert_eq!(
        (c["wins"].as_u64(), c["ties"].as_u64(), c["losses"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    // nDCG@10 per query: run (1, 1, 1/log2 3), baseline (1/log2 3, 1, 1): difference 0.
    assert!(c["difference"].as_f64().unwrap().abs() < 1e-12, "{c}");
    let (lo, hi) = (
        c["ci95"][0].as_f64().unwrap(),
        c["ci95"][1].as_f64().unwrap(),
    );
    assert!(
        lo < 0.0 && hi > 0.0 && c["resamples"] == 1000 && c["metric"] == "ndcg@10",
        "{c}"
    );
    let (ok, _, stderr) = score(&[
        "--qrels",
        qrels.to_str().unwrap(),
        "--run",
        run.to_str().unwrap(),
        "--baseline",
        base.to_str().unwrap(),
        "--metric",
        "ndcg@7",
    ]);
    assert!(!ok && stderr.contains("--metric `ndcg@7`"), "{stderr}");
}
