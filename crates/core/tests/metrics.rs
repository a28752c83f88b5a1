//! trec_eval-exact metrics, TREC run files and RRF fusion, checked against values produced by
//! pytrec_eval (`fixtures/metrics` in the repository) and against small hand-computed cases.

use search_r3_core::metrics::{
    evaluate, evaluate_hits, missing_queries, unknown_queries, Qrels, Scores, ALL_METRICS,
    METRIC_KEYS,
};
use search_r3_core::trec::{fuse_rrf, read_run, write_run, Run, TrecError, RRF_K};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/metrics")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9
}

/// Compares every metric the fixture lists (and insists the fixture lists all of ours).
fn assert_matches(what: &str, got: &Scores, want: &serde_json::Value) {
    let want = want.as_object().unwrap();
    assert_eq!(
        want.len(),
        ALL_METRICS.len(),
        "{what}: fixture keys {want:?}"
    );
    for (name, value) in want {
        let value = value.as_f64().unwrap();
        let ours = *got
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{what}: no {name}"));
        assert!(
            close(ours, value),
            "{what} {name}: got {ours}, want {value}"
        );
    }
}

fn qrels(triples: &[(&str, &str, i32)]) -> Qrels {
    Qrels::from_triples(
        triples
            .iter()
            .map(|(q, d, g)| (q.to_string(), d.to_string(), *g)),
    )
}

fn hits(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|(d, s)| (d.to_string(), *s)).collect()
}

fn run_of(queries: &[(&str, &[(&str, f64)])]) -> Run {
    queries
        .iter()
        .map(|(q, pairs)| (q.to_string(), hits(pairs)))
        .collect()
}

#[test]
fn fixture_values_match_pytrec_eval() {
    let dir = fixture_dir();
    let qrels = Qrels::read(&dir.join("qrels.tsv")).unwrap();
    let run = read_run(&dir.join("run.trec")).unwrap();
    let ev = evaluate(&qrels, &run);
    let want = expected();
    let want_per = want["per_query"].as_object().unwrap();

    assert_eq!(ev.queries, want_per.len());
    assert_eq!(ev.queries, 40);
    let got_ids: Vec<&String> = ev.per_query.keys().collect();
    let want_ids: Vec<&String> = {
        let mut v: Vec<&String> = want_per.keys().collect();
        v.sort();
        v
    };
    assert_eq!(got_ids, want_ids);
    for (q, scores) in want_per {
        assert_matches(q, &ev.per_query[q], scores);
    }
    assert_matches("mean", &ev.mean, &want["mean"]);

    // The unjudged query is in the run but neither scored nor averaged.
    assert!(run.contains_key("q_norel"));
    assert!(!ev.per_query.contains_key("q_norel"));
    assert_eq!(unknown_queries(&qrels, &run), ["q_norel"]);
    assert!(missing_queries(&qrels, &run).is_empty());
    for key in METRIC_KEYS {
        assert!(ev.mean.contains_key(key), "{key}");
    }
}

/// The fixture's ties only test something if breaking them the other way changes a value;
/// rank ties by ascending doc id instead and some query must come out different.
#[test]
fn fixture_ties_decide_values() {
    let dir = fixture_dir();
    let qrels = Qrels::read(&dir.join("qrels.tsv")).unwrap();
    let run = read_run(&dir.join("run.trec")).unwrap();
    let want = expected();
    let mut changed = Vec::new();
    for (q, pairs) in &run {
        let mut ascending = pairs.clone();
        ascending.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then_with(|| a.0.cmp(&b.0)));
        // Strictly decreasing stand-in scores freeze that order.
        let n = ascending.len();
        let frozen: Vec<(String, f64)> = ascending
            .into_iter()
            .enumerate()
            .map(|(i, (d, _))| (d, (n - i) as f64))
            .collect();
        let Some(scores) = evaluate_hits(&qrels, q, &frozen) else {
            continue;
        };
        let w = &want["per_query"][q];
        if ALL_METRICS
            .iter()
            .any(|m| !close(scores[m], w[m].as_f64().unwrap()))
        {
            changed.push(q.clone());
        }
    }
    assert!(
        !changed.is_empty(),
        "no fixture query depends on tie-breaking"
    );
}

#[test]
fn ties_break_by_descending_doc_id() {
    let q = qrels(&[("q", "a", 1)]);
    // "b" > "a", so trec_eval ranks b first and the relevant a second.
    let s = evaluate_hits(&q, "q", &hits(&[("a", 1.0), ("b", 1.0)])).unwrap();
    let at_rank_two = 1.0 / 3f64.log2();
    assert!(close(s["ndcg@10"], at_rank_two), "{s:?}");
    assert!(close(s["ndcg@100"], at_rank_two));
    assert!(close(s["mrr"], 0.5));
    assert!(close(s["mrr@10"], 0.5));
    assert!(close(s["map@100"], 0.5));

    // Byte order, not numeric: "d10" > "d1" (a prefix sorts lower), and "d9" > "d10".
    let q = qrels(&[("q", "d1", 1)]);
    let s = evaluate_hits(
        &q,
        "q",
        &hits(&[("d1", 2.0), ("d10", 2.0), ("d9", 2.0), ("d0", 3.0)]),
    )
    .unwrap();
    assert!(close(s["mrr"], 0.25), "{s:?}"); // d0, d9, d10, d1

    // The rank column of a run file plays no part: only score and id do.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.trec");
    std::fs::write(&p, "q Q0 a 1 1.0 t\nq Q0 b 2 1.0 t\n").unwrap();
    let run = read_run(&p).unwrap();
    let ev = evaluate(&qrels(&[("q", "a", 1)]), &run);
    assert!(close(ev.per_query["q"]["mrr"], 0.5));
}

#[test]
fn precision_divides_by_ten_with_fewer_retrieved() {
    let q = qrels(&[("q", "a", 1), ("q", "c", 2), ("q", "z", 1)]);
    let s = evaluate_hits(&q, "q", &hits(&[("a", 3.0), ("b", 2.0), ("c", 1.0)])).unwrap();
    assert!(close(s["p@10"], 0.2), "{s:?}");
    assert!(close(s["recall@10"], 2.0 / 3.0));
    assert!(close(s["recall@100"], 2.0 / 3.0));
    // AP: precision 1/1 at a and 2/3 at c, over the 3 relevant documents.
    assert!(close(s["map@100"], (1.0 + 2.0 / 3.0) / 3.0));
}

#[test]
fn graded_ndcg_uses_linear_gain_and_ideal_over_all_judged() {
    // z (grade 2) is never retrieved but still belongs in the ideal ranking; x is unjudged.
    let q = qrels(&[("q", "a", 3), ("q", "b", 1), ("q", "c", 2), ("q", "z", 2)]);
    let s = evaluate_hits(
        &q,
        "q",
        &hits(&[("b", 0.9), ("a", 0.8), ("x", 0.7), ("c", 0.6)]),
    )
    .unwrap();
    let dcg = 1.0 + 3.0 / 3f64.log2() + 2.0 / 5f64.log2();
    let ideal = 3.0 + 2.0 / 3f64.log2() + 2.0 / 4f64.log2() + 1.0 / 5f64.log2();
    assert!(close(s["ndcg@10"], dcg / ideal), "{s:?}");
    assert!(close(s["ndcg@100"], dcg / ideal));
    assert!(close(s["mrr"], 1.0));
    assert!(close(s["recall@10"], 0.75));
    assert!(close(s["map@100"], (1.0 + 1.0 + 3.0 / 4.0) / 4.0));

    // A negative grade gains nothing and is not relevant.
    let q = qrels(&[("q", "a", -1), ("q", "b", 1)]);
    let s = evaluate_hits(&q, "q", &hits(&[("a", 2.0), ("b", 1.0)])).unwrap();
    assert!(close(s["ndcg@10"], 1.0 / 3f64.log2()), "{s:?}");
    assert!(close(s["mrr"], 0.5));
}

#[test]
fn ndcg_at_ten_cuts_both_rankings() {
    // Eleven relevant grade-1 documents, one retrieved at rank 11: nDCG@10 is 0 while the
    // ideal DCG@10 only counts ten of them.
    let mut triples = vec![];
    let mut pairs = vec![];
    for i in 0..11 {
        triples.push(("q".to_string(), format!("r{i:02}"), 1));
        pairs.push((format!("n{i:02}"), 100.0 - i as f64));
    }
    pairs[10].0 = "r00".to_string();
    let q = Qrels::from_triples(triples);
    let s = evaluate_hits(&q, "q", &pairs).unwrap();
    assert_eq!(s["ndcg@10"], 0.0);
    let ideal_100: f64 = (0..11).map(|i| 1.0 / ((i + 2) as f64).log2()).sum();
    assert!(
        close(s["ndcg@100"], (1.0 / 12f64.log2()) / ideal_100),
        "{s:?}"
    );
    assert_eq!(s["mrr@10"], 0.0);
    assert!(close(s["mrr"], 1.0 / 11.0));
}

#[test]
fn query_without_relevant_documents_scores_zero_and_counts() {
    let q = qrels(&[("none", "a", 0), ("some", "a", 1)]);
    let run = run_of(&[
        ("none", &[("a", 1.0), ("b", 0.5)]),
        ("some", &[("a", 1.0)]),
        ("unjudged", &[("a", 1.0)]),
    ]);
    let ev = evaluate(&q, &run);
    assert_eq!(ev.queries, 2);
    for m in ALL_METRICS {
        assert_eq!(ev.per_query["none"][m], 0.0, "{m}");
    }
    assert!(close(ev.mean["ndcg@10"], 0.5));
    assert!(close(ev.mean["p@10"], 0.05));
    assert_eq!(unknown_queries(&q, &run), ["unjudged"]);

    // Nothing judged retrieved: no means rather than made-up ones.
    let ev = evaluate(&q, &run_of(&[("unjudged", &[("a", 1.0)])]));
    assert_eq!(ev.queries, 0);
    assert!(ev.mean.is_empty());
    assert_eq!(
        missing_queries(&q, &run_of(&[("some", &[("a", 1.0)])])),
        ["none"]
    );
}

fn read_err(body: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("run.trec");
    std::fs::write(&p, body).unwrap();
    read_run(&p).unwrap_err().to_string()
}

#[test]
fn bad_run_lines_name_file_and_line() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"q Q0 a 1 1.0 t\nq Q0 b 2 0.5\n",
            "run.trec line 2: expected 6 whitespace-separated columns (qid Q0 docid rank score tag), got 5",
        ),
        (
            b"q Q0 a 1 high t\n",
            "run.trec line 1: column 5 (score): expected a finite number, got `high`",
        ),
        (
            b"q Q0 a 1 NaN t\n",
            "run.trec line 1: column 5 (score): expected a finite number, got `NaN`",
        ),
        (
            b"q Q0 a 1 inf t\n",
            "line 1: column 5 (score): expected a finite number, got `inf`",
        ),
        (
            b"q Q0 a 1.5 1.0 t\n",
            "run.trec line 1: column 4 (rank): expected an integer, got `1.5`",
        ),
        (
            b"q Q0 a 1 1.0 t\n\nq Q0 b 2 0.5 t\nq Q0 a 3 0.1 t\n",
            "run.trec line 4: query `q` lists document `a` again (first on line 1)",
        ),
        (b"q Q0 a 1 1.0 t\nq Q0 \xFFb 2 1.0 t\n", "run.trec line 2: invalid UTF-8"),
    ];
    for (body, want) in cases {
        let err = read_err(body);
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
    let err = read_run(Path::new("/nonexistent/run.trec"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/run.trec: cannot open"), "{err}");
}

#[test]
fn run_files_allow_blank_lines_and_the_same_doc_across_queries() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("run.trec");
    std::fs::write(
        &p,
        "\nq1 Q0 a 1 2 t\r\n  \nq2\tQ0\ta\t1\t-1e-3\tt\nq1 0 b 9 1 x",
    )
    .unwrap();
    let run = read_run(&p).unwrap();
    let want = run_of(&[("q1", &[("a", 2.0), ("b", 1.0)]), ("q2", &[("a", -0.001)])]);
    assert_eq!(run, want);
}

#[test]
fn written_runs_read_back_exactly_in_trec_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.trec");
    let third = 0.1 + 0.2; // 0.30000000000000004: six decimals would tie it with 0.3
    let run = run_of(&[
        ("q2", &[("x", 1.0)]),
        ("q1", &[("a", 0.3), ("b", third), ("c", 0.3), ("d", 1e-12)]),
    ]);
    write_run(&p, &run, "mytag").unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "q1 Q0 b 1 0.30000000000000004 mytag",
            "q1 Q0 c 2 0.3 mytag",
            "q1 Q0 a 3 0.3 mytag",
            "q1 Q0 d 4 0.000000000001 mytag",
            "q2 Q0 x 1 1 mytag",
        ]
    );
    let mut back = read_run(&p).unwrap();
    let mut want = run.clone();
    for hits in back.values_mut().chain(want.values_mut()) {
        hits.sort_by(|a, b| a.0.cmp(&b.0));
    }
    assert_eq!(back, want);
    // Nothing but the run is left in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    for (bad, want) in [
        (run_of(&[("q 1", &[("a", 1.0)])]), "query id `q 1`"),
        (run_of(&[("q", &[("", 1.0)])]), "document id ``"),
        (run_of(&[("q", &[("a", f64::NAN)])]), "not finite"),
        (run_of(&[("q", &[("a", 1.0), ("a", 2.0)])]), "twice"),
    ] {
        let err = write_run(&p, &bad, "t").unwrap_err().to_string();
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
    let err = write_run(&p, &run, "two words").unwrap_err();
    assert!(matches!(
        err,
        TrecError::BadField {
            what: "run tag",
            ..
        }
    ));
}

#[test]
fn rrf_fuses_by_reciprocal_rank() {
    // Scores only decide ranks; run 2's scale is unrelated to run 1's.
    let r1 = run_of(&[
        ("q", &[("c", 1.0), ("a", 3.0), ("b", 2.0)]), // a1 b2 c3
        ("t", &[("x", 2.0), ("y", 1.0)]),             // x1 y2
        ("only1", &[("m", 5.0)]),
    ]);
    let r2 = run_of(&[
        ("q", &[("a", 50.0), ("c", 90.0), ("d", 10.0)]), // c1 a2 d3
        ("t", &[("x", 1.0), ("y", 1.0)]),                // tie: y1 x2
    ]);
    let fused = fuse_rrf(&[&r1, &r2], RRF_K, 3);
    let want: BTreeMap<&str, Vec<(&str, f64)>> = [
        (
            "q",
            vec![
                ("a", 1.0 / 61.0 + 1.0 / 62.0),
                ("c", 1.0 / 61.0 + 1.0 / 63.0),
                ("b", 1.0 / 62.0),
                // d (1/63) falls below the depth of 3.
            ],
        ),
        // x and y both hold ranks 1 and 2: an exact tie, so the higher id comes first.
        (
            "t",
            vec![
                ("y", 1.0 / 61.0 + 1.0 / 62.0),
                ("x", 1.0 / 61.0 + 1.0 / 62.0),
            ],
        ),
        ("only1", vec![("m", 1.0 / 61.0)]),
    ]
    .into_iter()
    .collect();
    assert_eq!(fused.len(), want.len());
    for (q, want_hits) in want {
        let got = &fused[q];
        assert_eq!(got.len(), want_hits.len(), "{q}: {got:?}");
        for ((gd, gs), (wd, ws)) in got.iter().zip(&want_hits) {
            assert_eq!(gd, wd, "{q}: {got:?}");
            assert!(close(*gs, *ws), "{q} {gd}: {gs} vs {ws}");
        }
    }
    assert_eq!(fused["t"][0].1, fused["t"][1].1);

    // Another k changes the weights: with k = 0, rank 1 is worth 1 and rank 2 a half.
    let fused = fuse_rrf(&[&r1, &r2], 0.0, 10);
    assert!(close(fused["q"][0].1, 1.5));
    assert_eq!(fused["q"].len(), 4);
}

#[test]
fn runs_from_entries_refuse_duplicates() {
    use search_r3_core::trec::{run_from_entries, RunEntry};
    let e = |q: &str, d: &str, s: f64| RunEntry {
        query_id: q.into(),
        doc_id: d.into(),
        score: s,
    };
    let run = run_from_entries([e("q", "a", 1.0), e("r", "a", 2.0), e("q", "b", 0.5)]).unwrap();
    assert_eq!(
        run,
        run_of(&[("q", &[("a", 1.0), ("b", 0.5)]), ("r", &[("a", 2.0)])])
    );
    let err = run_from_entries([e("q", "a", 1.0), e("q", "a", 2.0)]).unwrap_err();
    assert_eq!(err.to_string(), "query `q` lists document `a` twice");
}

#[test]
fn paired_bootstrap_counts_and_interval() {
    use search_r3_core::metrics::paired_bootstrap;
    // Wins, ties and losses on hand values.
    let a = [0.5, 0.5, 1.0, 0.0, 0.25];
    let b = [0.75, 0.5, 0.5, 0.0, 1.0];
    let c = paired_bootstrap(&a, &b, 1000, 7).unwrap();
    assert_eq!((c.wins, c.ties, c.losses), (2, 2, 1));
    assert!(close(c.difference, (0.25 - 0.5 + 0.75) / 5.0));
    assert!(c.ci95[0] <= c.difference && c.difference <= c.ci95[1]);
    // A constant difference has a zero-width interval at that difference.
    let c = paired_bootstrap(&[0.1, 0.2, 0.3], &[0.3, 0.4, 0.5], 200, 1).unwrap();
    assert!(
        close(c.ci95[0], 0.2) && close(c.ci95[1], 0.2),
        "{:?}",
        c.ci95
    );
    // 300 differences of ±1 with mean 0.2 (sd ≈ 0.98): the 95% interval is about
    // 0.2 ± 1.96·0.98/√300 = 0.2 ± 0.111; the same seed gives the same interval.
    let a = vec![0.0; 300];
    let b: Vec<f64> = (0..300)
        .map(|i| if i % 5 < 3 { 1.0 } else { -1.0 })
        .collect();
    let c = paired_bootstrap(&a, &b, 1000, 3).unwrap();
    let half = (c.ci95[1] - c.ci95[0]) / 2.0;
    assert!((half - 0.111).abs() < 0.015, "half width {half}");
    assert!((c.ci95[0] + half - 0.2).abs() < 0.02, "{:?}", c.ci95);
    assert_eq!(paired_bootstrap(&a, &b, 1000, 3).unwrap(), c);
    assert!(paired_bootstrap(&a, &b[..10], 10, 0).is_none());
}
