//! `index`, `search`, `index add|delete` end to end on the real default model (fetched in CI,
//! skipped locally when absent).

mod common;

use common::{model_available, run};
use std::path::Path;
use std::process::Command;

const DOCS: &[(&str, &str)] = &[
    (
        "paris",
        "Paris is the capital and most populous city of France.",
    ),
    (
        "seasons",
        "Earth's axial tilt of about 23.4 degrees causes the seasons as the planet orbits the Sun.",
    ),
    (
        "python",
        "Python is a high-level programming language known for its readable syntax.",
    ),
    (
        "insulin",
        "Insulin is a hormone produced by the pancreas that regulates blood glucose.",
    ),
    (
        "everest",
        "Mount Everest is Earth's highest mountain above sea level, in the Himalayas.",
    ),
    (
        "photosynthesis",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
    ),
];

fn write_corpus(path: &Path, docs: &[(&str, &str)]) {
    let lines: Vec<String> = docs
        .iter()
        .map(|(id, text)| serde_json::json!({"id": id, "text": text}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn top_ids(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v[0]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn index_search_add_delete_round_trip() {
    if !model_available("smollm2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("docs.jsonl");
    write_corpus(&corpus, DOCS);
    let idx = dir.path().join("idx");
    let (c, i) = (corpus.to_str().unwrap(), idx.to_str().unwrap());
    let (ok, _, err) = run(&["index", "--corpus", c, "--out", i, "--kind", "exact"]);
    assert!(ok, "{err}");
    assert!(err.contains("indexed 6 documents"), "{err}");

    let (ok, out, err) = run(&[
        "search",
        "--index",
        i,
        "What is the capital of France?",
        "-k",
        "3",
        "--json",
    ]);
    assert!(ok, "{err}");
    let ids = top_ids(&out);
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&"paris".to_string()), "{ids:?}");

    // Reasoning mode prints the trace in the table.
    let (ok, out, err) = run(&[
        "search",
        "--index",
        i,
        "Why do we have summer and winter?",
        "--reason",
        "-k",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("reasoning"), "{out}");

    // Add a document, find it; delete it, it is gone; both persisted.
    let extra = dir.path().join("extra.jsonl");
    write_corpus(
        &extra,
        &[(
            "volcano",
            "A volcano is a rupture in the crust where lava, ash and gases escape.",
        )],
    );
    let (ok, _, err) = run(&[
        "index",
        "add",
        "--index",
        i,
        "--corpus",
        extra.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (_, out, _) = run(&[
        "search",
        "--index",
        i,
        "lava and ash erupting from a mountain",
        "-k",
        "1",
        "--json",
    ]);
    assert_eq!(top_ids(&out), vec!["volcano"]);
    let (ok, _, err) = run(&["index", "delete", "--index", i, "volcano"]);
    assert!(ok, "{err}");
    let (_, out, _) = run(&[
        "search",
        "--index",
        i,
        "lava and ash erupting from a mountain",
        "-k",
        "10",
        "--json",
    ]);
    let ids = top_ids(&out);
    assert!(
        !ids.contains(&"volcano".to_string()) && ids.len() == 6,
        "{ids:?}"
    );

    // An index is refused with other templates.
    let t = dir.path().join("t.toml");
    let tmpl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../templates/default.toml"
    ))
    .unwrap()
    .replacen("Please represent user queries.", "Represent this.", 1);
    std::fs::write(&t, tmpl).unwrap();
    let (ok, _, err) = run(&[
        "search",
        "--index",
        i,
        "x",
        "--templates",
        t.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("template_hash"), "{err}");

    // A corrupted index file is reported by name, never a panic.
    let docs_file = idx.join("docs.jsonl");
    let mut bytes = std::fs::read(&docs_file).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&docs_file, bytes).unwrap();
    let (ok, _, err) = run(&["search", "--index", i, "x"]);
    assert!(!ok);
    assert!(
        err.contains("docs.jsonl") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn malformed_corpus_lines_are_reported_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("bad.jsonl");
    std::fs::write(
        &corpus,
        "{\"id\": \"a\", \"text\": \"fine\"}\n{\"id\": \"b\", \"text\": 3}\n",
    )
    .unwrap();
    let out = dir.path().join("idx");
    let (ok, _, err) = run(&[
        "index",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bad.jsonl:2") && err.contains("text"), "{err}");
}

/// `kill -9` in the middle of `search-r3 index`, then the same command again: the resumed index
/// holds exactly the vectors of an uninterrupted build.
#[test]
fn killed_index_build_resumes_to_the_same_index() {
    if !model_available("smollm2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("docs.jsonl");
    let docs: Vec<(String, String)> = (0..40)
        .map(|i| {
            (
                format!("d{i}"),
                format!("Note {i} about {}", "cells and proteins ".repeat(1 + i % 7)),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_corpus(&corpus, &refs);
    let c = corpus.to_str().unwrap();
    let build = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_search-r3"))
            .args([
                "index",
                "--corpus",
                c,
                "--out",
                out.to_str().unwrap(),
                "--kind",
                "exact",
            ])
            .args(["--batch-tokens", "200"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let killed = dir.path().join("killed");
    let ckpt = dir.path().join("killed.encode.ckpt");
    let mut child = build(&killed);
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&ckpt)
        .map(|m| m.len() <= 72)
        .unwrap_or(true)
    {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("index.json").exists(),
        "killed before finishing"
    );
    assert!(build(&killed).wait().unwrap().success());
    assert!(!ckpt.exists(), "checkpoint removed after success");
    let straight = dir.path().join("straight");
    assert!(build(&straight).wait().unwrap().success());

    let (a, _) = search_r3_index::load_index(&killed).unwrap();
    let (b, _) = search_r3_index::load_index(&straight).unwrap();
    use search_r3_index::VectorIndex;
    assert_eq!(a.keys(), b.keys());
    for k in a.keys() {
        assert_eq!(a.get(k), b.get(k), "vector of key {k}");
    }
}

/// An `--out` that cannot hold an index fails at once, naming the path and what was expected,
/// before the model is even loaded (the model name here does not exist, so reaching the model
/// would give another error) and without touching the file.
#[test]
fn out_that_is_a_file_fails_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("docs.jsonl");
    write_corpus(&corpus, &DOCS[..2]);
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "mine").unwrap();
    let f = file.to_str().unwrap();
    let (ok, _, err) = run(&[
        "index",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        f,
        "--model",
        "no-such-model",
    ]);
    assert!(!ok);
    assert!(
        err.contains(&format!("--out {f}"))
            && err.contains("it is a file")
            && err.contains(
                "expected a new path, an empty directory, or a directory holding index.json"
            )
            && !err.contains("no-such-model"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

    // A file where a parent directory should be.
    let below = file.join("idx");
    let (ok, _, err) = run(&[
        "index",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        below.to_str().unwrap(),
        "--model",
        "no-such-model",
    ]);
    assert!(!ok);
    assert!(
        err.contains(&format!("{f} is a file, not a directory")) && !err.contains("no-such-model"),
        "{err}"
    );

    // demo checks its --out before writing its corpus beside it or fetching the model.
    let (ok, _, err) = run(&["demo", "--out", f, "--model", "no-such-model"]);
    assert!(!ok);
    assert!(
        err.contains(&format!("--out {f}")) && err.contains("it is a file"),
        "{err}"
    );
    assert!(!dir.path().join("precious.txt.corpus.jsonl").exists());
}
