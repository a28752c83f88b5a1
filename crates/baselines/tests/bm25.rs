//! BM25 behaviour on a hand-made corpus small enough to reason about by hand.

use search_r3_baselines::bm25::{B, K1};
use search_r3_baselines::{Bm25Index, Bm25Params, TokenPattern};
use search_r3_core::corpus::Document;

fn doc(id: &str, title: &str, text: &str) -> Document {
    Document {
        id: id.into(),
        title: title.into(),
        text: text.into(),
    }
}

fn corpus() -> Vec<Document> {
    vec![
        doc(
            "plants",
            "Photosynthesis",
            "Chlorophyll absorbs light and plants turn it into sugar.",
        ),
        doc(
            "sport",
            "",
            "She runs every morning; the runner ran a marathon.",
        ),
        doc(
            "virus",
            "Coronavirus",
            "SARS-CoV-2 causes COVID-19, a respiratory disease.",
        ),
        doc(
            "stars",
            "Astronomy",
            "Stars fuse hydrogen into helium in their cores.",
        ),
        doc(
            "cells",
            "",
            "T cells and B cells are lymphocytes of the immune system.",
        ),
    ]
}

fn ids(hits: &[(String, f32)]) -> Vec<&str> {
    hits.iter().map(|(id, _)| id.as_str()).collect()
}

fn index() -> Bm25Index {
    Bm25Index::build(&corpus(), &Bm25Params::default()).unwrap()
}

#[test]
fn exact_term_match_ranks_first() {
    let idx = index();
    assert_eq!(idx.len(), 5);
    let hits = idx.search("chlorophyll photosynthesis", 3).unwrap();
    assert_eq!(ids(&hits), ["plants"]);
    // Scores come back best first and positive.
    let hits = idx.search("hydrogen cells", 5).unwrap();
    assert_eq!(hits.len(), 2);
    assert!(hits[0].1 >= hits[1].1 && hits[1].1 > 0.0);
}

#[test]
fn analyzer_matches_bm25s_tokenization() {
    let idx = index();
    // Lowercased, stop words ("the", "isn't"'s "t" is too short anyway) dropped, stemmed,
    // single characters dropped, punctuation splits.
    assert_eq!(
        idx.analyze("The Running cats' isn't a COVID-19 T-cell"),
        ["run", "cat", "isn", "covid", "19", "cell"]
    );
    assert!(idx.analyze("").is_empty());
}

#[test]
fn stemming_matches_inflections() {
    let idx = index();
    assert_eq!(ids(&idx.search("running", 5).unwrap()), ["sport"]);
    assert_eq!(ids(&idx.search("absorbing", 5).unwrap()), ["plants"]);

    let unstemmed = Bm25Index::build(
        &corpus(),
        &Bm25Params {
            stem: false,
            ..Bm25Params::default()
        },
    )
    .unwrap();
    assert!(unstemmed.search("running", 5).unwrap().is_empty());
    assert_eq!(ids(&unstemmed.search("runs", 5).unwrap()), ["sport"]);
}

#[test]
fn stop_words_are_ignored() {
    let idx = index();
    // "the", "of", "and", "are", "in", "their", "into" occur in the corpus but are not indexed.
    assert!(idx
        .search("the of and are in their into", 10)
        .unwrap()
        .is_empty());
    let plain = idx.search("helium", 5).unwrap();
    let padded = idx.search("the helium of the", 5).unwrap();
    assert_eq!(plain, padded);

    // Without the filter the same words are ordinary terms.
    let with_stop_words = Bm25Index::build(
        &corpus(),
        &Bm25Params {
            stopwords: false,
            ..Bm25Params::default()
        },
    )
    .unwrap();
    assert!(!with_stop_words.search("the", 10).unwrap().is_empty());
}

#[test]
fn query_syntax_characters_never_error() {
    let idx = index();
    let nasty = [
        "COVID-19 (SARS) isn't: a+b",
        "title:foo AND text:bar OR NOT baz",
        "\"unbalanced quote",
        "field:[a TO b] {c TO d}",
        "+-!(){}[]^\"~*?:\\/",
        "cells^2 stars~1 hel*um",
        "AND",
        "'",
        "\\",
        "\u{0}\u{7f}\u{feff}",
        "北京 Ελληνικά 🧬",
    ];
    for q in nasty {
        idx.search(q, 5)
            .unwrap_or_else(|e| panic!("query {q:?} failed: {e}"));
    }
    // Operators are plain words: "covid" still matches.
    assert_eq!(
        ids(&idx.search("COVID-19 (SARS) isn't: a+b", 5).unwrap()),
        ["virus"]
    );
}

#[test]
fn empty_queries_return_nothing() {
    let idx = index();
    for q in ["", "   ", "?!.,", "a", "the"] {
        assert!(idx.search(q, 10).unwrap().is_empty(), "{q:?}");
    }
    assert!(idx.search("cells", 0).unwrap().is_empty());
}

#[test]
fn k_larger_than_corpus() {
    let idx = index();
    // Only matching documents come back, however large k is.
    let hits = idx
        .search("cells stars virus plants runs", 1_000_000)
        .unwrap();
    assert_eq!(hits.len(), 4);
    let empty = Bm25Index::build(&[], &Bm25Params::default()).unwrap();
    assert!(empty.is_empty());
    assert!(empty.search("cells", 10).unwrap().is_empty());
}

#[test]
fn ties_keep_corpus_order() {
    // Identical texts score identically; order must not depend on anything but the corpus.
    let docs: Vec<Document> = ["d3", "d1", "d4", "d0", "d2"]
        .iter()
        .map(|id| doc(id, "", "identical protein folding text"))
        .collect();
    let want = ["d3", "d1", "d4", "d0", "d2"];
    for _ in 0..3 {
        let idx = Bm25Index::build(&docs, &Bm25Params::default()).unwrap();
        let hits = idx.search("protein", 10).unwrap();
        assert_eq!(ids(&hits), want);
        assert!(hits.iter().all(|(_, s)| *s == hits[0].1));
        assert_eq!(ids(&idx.search("protein", 2).unwrap()), want[..2]);
    }
}

#[test]
fn score_is_lucene_bm25_with_tantivy_constants() {
    // Lengths below 40 tokens are stored exactly, so the score can be checked to float
    // precision. Doc lengths after analysis: 3, 1, 2 (avg 2); "protein" is in two docs.
    let docs = vec![
        doc("a", "", "protein protein folding"),
        doc("b", "", "protein"),
        doc("c", "", "membrane transport"),
    ];
    let idx = Bm25Index::build(&docs, &Bm25Params::default()).unwrap();
    let hits = idx.search("protein", 10).unwrap();
    let (n, df, avgdl) = (3.0f32, 2.0f32, 2.0f32);
    let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
    let bm25 = |tf: f32, dl: f32| idf * tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * dl / avgdl));
    // The short document wins despite the lower term frequency: 1.257 vs 1.206.
    let want = [("b", bm25(1.0, 1.0)), ("a", bm25(2.0, 3.0))];
    assert!(want[0].1 > want[1].1);
    assert_eq!(hits.len(), 2);
    for ((id, score), (want_id, want_score)) in hits.iter().zip(want) {
        assert_eq!(id, want_id);
        assert!(
            (score - want_score).abs() < 1e-5,
            "{id}: {score} vs {want_score}"
        );
    }
    // A repeated query term counts twice, as in Lucene and bm25s.
    let twice = idx.search("protein protein", 1).unwrap();
    assert!((twice[0].1 - 2.0 * hits[0].1).abs() < 1e-5);
}

#[test]
fn batch_equals_single_searches() {
    let idx = index();
    let queries = ["cells", "", "running marathon", "hydrogen"];
    let batch = idx.search_batch(&queries, 3).unwrap();
    assert_eq!(batch.len(), queries.len());
    for (q, hits) in queries.iter().zip(&batch) {
        assert_eq!(&idx.search(q, 3).unwrap(), hits);
    }
}

#[test]
fn directory_index_reopens_with_its_analyzer() {
    let dir = tempfile::tempdir().unwrap();
    let params = Bm25Params {
        tokens: TokenPattern::Alphanumeric,
        stem: false,
        ..Bm25Params::default()
    };
    let built = Bm25Index::build_in(dir.path(), &corpus(), &params).unwrap();
    let before = built.search("cells runs t", 5).unwrap();
    drop(built);

    let opened = Bm25Index::open(dir.path()).unwrap();
    assert_eq!(opened.params(), &params);
    assert_eq!(opened.len(), 5);
    assert_eq!(opened.search("cells runs t", 5).unwrap(), before);
    // The alphanumeric tokenizer keeps single letters ("T cells").
    assert_eq!(opened.analyze("T cells"), ["t", "cells"]);

    // A second build into the same directory must not clobber the index.
    assert!(Bm25Index::build_in(dir.path(), &corpus(), &params).is_err());
    // A directory without an index is an error, not an empty index.
    let empty = tempfile::tempdir().unwrap();
    assert!(Bm25Index::open(empty.path()).is_err());
}
