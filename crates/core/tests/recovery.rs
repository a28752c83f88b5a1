//! Crash recovery of an index directory through the path `serve --index` opens it by
//! ([`Searcher::open_or_create`]): after a crash between the two renames of a save, the index
//! survives, and the next save keeps its documents.

use search_r3_core::corpus::Document;
use search_r3_core::load::{load_embedder, EmbedderOptions};
use search_r3_core::searcher::Searcher;
use search_r3_index::{crash_between_renames, HnswParams, IndexKind, VectorIndex};
use std::path::Path;

/// The real model is cached here or fetched in CI; elsewhere the case is skipped.
fn model_available() -> bool {
    if search_r3_model::fetch::cached_path("smollm2").is_some() || std::env::var_os("CI").is_some()
    {
        return true;
    }
    eprintln!("SKIP: smollm2 not fetched (run `search-r3 model fetch smollm2`); CI fetches it");
    false
}

fn open(dir: &Path) -> Searcher {
    Searcher::open_or_create(
        dir,
        "smollm2",
        &EmbedderOptions::default(),
        IndexKind::Hnsw,
        HnswParams::default(),
    )
    .unwrap()
}

fn doc(id: &str) -> Document {
    Document {
        id: id.into(),
        title: String::new(),
        text: format!("text of {id}"),
    }
}

/// A unit vector along axis `i`: the test needs stored vectors, not meaningful ones, and
/// encoding real text would only slow it down.
fn axis(dim: usize, i: usize) -> Vec<f32> {
    let mut v = vec![0.0; dim];
    v[i] = 1.0;
    v
}

fn ids(s: &Searcher) -> Vec<String> {
    let mut v: Vec<String> = s.docs.iter().flatten().map(|d| d.id.clone()).collect();
    v.sort();
    v
}

#[test]
fn serve_recovers_an_interrupted_save_instead_of_creating_an_empty_index() {
    if !model_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    {
        let mut s = open(&dir);
        let dim = s.index.dim();
        s.upsert_vectors(vec![doc("a"), doc("b")], &[axis(dim, 0), axis(dim, 1)])
            .unwrap();
        s.save().unwrap();
    }
    crash_between_renames(&dir);

    // Creating an index there is refused: the interrupted save's copy is put back first.
    let (embedder, identity) = load_embedder("smollm2", &EmbedderOptions::default()).unwrap();
    let err = Searcher::create_empty(
        embedder,
        identity,
        &dir,
        IndexKind::Hnsw,
        HnswParams::default(),
    )
    .err()
    .expect("create_empty over a recoverable index");
    assert!(err.to_string().contains("already holds an index"), "{err}");

    let mut s = open(&dir);
    assert_eq!(ids(&s), ["a", "b"], "the index is opened, not replaced");
    let dim = s.index.dim();
    s.upsert_vectors(vec![doc("c")], &[axis(dim, 2)]).unwrap();
    s.save().unwrap();
    drop(s);

    let s = open(&dir);
    assert_eq!(ids(&s), ["a", "b", "c"], "the next save kept them");
    let debris: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".index."))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
}
