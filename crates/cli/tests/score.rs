//! `search-r3 score` on the pytrec_eval fixture and on broken input.

mod common;

use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/metrics")
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
