//! The `search-r3` binary as a user runs it.

mod common;

use common::run;

#[test]
fn model_list_names_every_known_model() {
    let (ok, out, err) = run(&["model", "list"]);
    assert!(ok, "{err}");
    for name in ["smollm2", "qwen2.5-coder-0.5b", "minilm"] {
        assert!(out.contains(name), "missing {name} in:\n{out}");
    }
}

#[test]
fn unknown_model_name_is_a_clear_error() {
    let (ok, _, err) = run(&["tokenize", "--model", "no-such-model", "hi"]);
    assert!(!ok);
    assert!(
        err.contains("no-such-model") && err.contains("smollm2"),
        "{err}"
    );
}

#[test]
fn corrupt_gguf_path_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let (ok, _, err) = run(&["tokenize", "--model", p.to_str().unwrap(), "hi"]);
    assert!(!ok);
    assert!(err.contains("broken.gguf"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn fetch_unknown_model_lists_known_ones() {
    let (ok, _, err) = run(&["model", "fetch", "gpt-17"]);
    assert!(!ok);
    assert!(
        err.contains("gpt-17") && err.contains("qwen2.5-coder-0.5b"),
        "{err}"
    );
}

/// End to end on the real default model (fetched in CI, skipped locally when absent).
#[test]
fn generate_answers_with_the_default_model() {
    if search_r3_model::fetch::cached_path("smollm2").is_none() && std::env::var_os("CI").is_none()
    {
        eprintln!("SKIP: smollm2 not fetched");
        return;
    }
    let (ok, out, err) = run(&[
        "generate",
        "What is the capital of France?",
        "--max-new-tokens",
        "16",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "{out}");
    // As markup the embed token is one token; as text (documents, queries) its characters.
    for (markup, last) in [(true, "<|embed_token|>"), (false, ">")] {
        let mut args = vec!["tokenize", "The embedding is <|embed_token|>"];
        if markup {
            args.push("--markup");
        }
        let (ok, out, err) = run(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let toks: Vec<&str> = v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(toks.last(), Some(&last), "{toks:?}");
    }
}
