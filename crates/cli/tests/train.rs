//! `search-r3 train sft` as a user runs it: bad input fails early with a clear message, and a
//! tiny run on the real default model writes an adapter that `eval --adapter` accepts, resumes,
//! and detects a corrupted checkpoint (the model case is skipped locally when it is absent).

mod common;

use std::path::Path;

/// (success, stderr): these cases check messages, not output.
fn run(args: &[&str]) -> (bool, String) {
    let (ok, _, err) = common::run(args);
    (ok, err)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A BEIR directory whose `train` split has query q2 judged only with grade 0.
fn tiny_beir(dir: &Path) {
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(
        dir.join("corpus.jsonl"),
        "{\"_id\": \"d1\", \"title\": \"\", \"text\": \"one\"}\n{\"_id\": \"d2\", \"title\": \"\", \"text\": \"two\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("queries.jsonl"),
        "{\"_id\": \"q1\", \"text\": \"first\"}\n{\"_id\": \"q2\", \"text\": \"second\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("qrels/train.tsv"),
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0\n",
    )
    .unwrap();
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let Some(sf) = common::scifact() else {
        return;
    };
    let (ok, err) = run(&[
        "train",
        "sft",
        "--dataset",
        s(&sf),
        "--split",
        "dev",
        "--out",
        s(&out),
    ]);
    assert!(!ok && err.contains("dev") && err.contains("train"), "{err}");

    let beir = dir.path().join("beir");
    tiny_beir(&beir);
    let (ok, err) = run(&["train", "sft", "--dataset", s(&beir), "--out", s(&out)]);
    assert!(
        !ok && err.contains("q2") && err.contains("positive"),
        "{err}"
    );

    let cfg = dir.path().join("sft.toml");
    std::fs::write(&cfg, "steps = 3\nlearning_rate = 1e-3\n").unwrap();
    let (ok, err) = run(&[
        "train",
        "sft",
        "--dataset",
        s(&sf),
        "--out",
        s(&out),
        "--config",
        s(&cfg),
    ]);
    assert!(
        !ok && err.contains("sft.toml") && err.contains("learning_rate"),
        "{err}"
    );

    let (ok, err) = run(&["train", "sft", "--out", s(&out)]);
    assert!(!ok && err.contains("--triples"), "{err}");
}

#[test]
fn tiny_run_resumes_and_its_adapter_evaluates() {
    if !common::model_available("smollm2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = dir.path().join("sft.toml");
    std::fs::write(
        &cfg,
        "steps = 2\nwarmup_steps = 1\nqueries_per_batch = 2\ncheckpoint_every = 1\n\
         eval_every = 1\neval_queries = 2\neval_docs = 8\nmax_doc_tokens = 16\n\
         max_query_tokens = 16\n[lora]\nrank = 2\n",
    )
    .unwrap();
    let Some(sf) = common::scifact() else {
        return;
    };
    let base = [
        "train",
        "sft",
        "--dataset",
        s(&sf),
        "--out",
        s(&out),
        "--config",
        s(&cfg),
        "--max-queries",
        "6",
    ];
    let (ok, err) = run(&base);
    assert!(ok, "{err}");
    for f in ["adapter.safetensors", "manifest.json", "metrics.jsonl"] {
        assert!(out.join(f).exists(), "{f}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["steps"], 2);
    assert_eq!(manifest["base_model"]["id"], "smollm2");
    assert!(manifest["base_model"]["sha256"].as_str().unwrap().len() == 64);
    assert!(manifest["command_line"]
        .as_str()
        .unwrap()
        .contains("train sft"));
    let evals = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("ndcg@10"))
        .count();
    assert_eq!(evals, 2);

    // Starting over on top of a checkpoint is refused; resuming a finished run is a no-op.
    let (ok, err) = run(&base);
    assert!(!ok && err.contains("--resume"), "{err}");
    let mut resume = base.to_vec();
    resume.push("--resume");
    let (ok, err) = run(&resume);
    assert!(ok, "{err}");

    // The adapter (given as the run directory) is usable by eval, and `adapter merge` writes a
    // standalone model that evaluates exactly like base + adapter.
    let eval_small = |model: &[&str], results: &Path| {
        let mut args = vec!["eval", "--dataset", s(&sf), "--split", "test"];
        args.extend_from_slice(model);
        args.extend([
            "--max-queries",
            "2",
            "--max-docs",
            "10",
            "--max-doc-tokens",
            "16",
            "--out",
            s(results),
        ]);
        let (ok, err) = run(&args);
        assert!(ok, "{err}");
    };
    let ev = dir.path().join("eval");
    eval_small(&["--adapter", s(&out)], &ev);
    let merged = dir.path().join("merged");
    let merge = [
        "adapter",
        "merge",
        "--adapter",
        s(&out),
        "--out",
        s(&merged),
    ];
    let (ok, err) = run(&merge);
    assert!(ok, "{err}");
    let ev2 = dir.path().join("eval-merged");
    eval_small(&["--model", s(&merged)], &ev2);
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (r1, r2) = (read(&ev), read(&ev2));
    for k in ["ndcg@10", "recall@100", "mrr"] {
        let (a, b) = (r1[k].as_f64().unwrap(), r2[k].as_f64().unwrap());
        assert!((a - b).abs() < 1e-9, "{k}: adapter {a} vs merged {b}");
    }
    // Merging again into the same place is refused; the adapter does not go on top of a
    // model it was not trained on (shapes match, the base model's hash does not).
    let (ok, err) = run(&merge);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, err) = run(&[
        "adapter",
        "merge",
        "--model",
        s(&merged),
        "--adapter",
        s(&out),
        "--out",
        s(&dir.path().join("twice")),
    ]);
    assert!(!ok && err.contains("trained on base model"), "{err}");

    // A flipped byte in the optimizer state is caught on resume, naming the file.
    let opt = out.join("checkpoint/optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let k = bytes.len() - 3;
    bytes[k] ^= 1;
    std::fs::write(&opt, bytes).unwrap();
    let (ok, err) = run(&resume);
    assert!(!ok && err.contains("optimizer.safetensors"), "{err}");
}

/// The safetensors header's `__metadata__` of a file.
fn safetensors_metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

#[test]
fn tiny_rl_run_on_the_shipped_sft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sf) = common::scifact() else {
        return;
    };
    let out = dir.path().join("rl");
    // Bad input first: a missing stage-1 adapter and an unknown split are named.
    let missing = dir.path().join("nope.safetensors");
    let (ok, err) = run(&[
        "train",
        "rl",
        "--dataset",
        s(&sf),
        "--split",
        "dev",
        "--out",
        s(&out),
    ]);
    assert!(!ok && err.contains("dev"), "{err}");
    if !common::model_available("smollm2") {
        return;
    }
    let (ok, err) = run(&[
        "train",
        "rl",
        "--dataset",
        s(&sf),
        "--adapter",
        s(&missing),
        "--out",
        s(&out),
    ]);
    assert!(!ok && err.contains("nope.safetensors"), "{err}");

    let cfg = dir.path().join("rl.toml");
    std::fs::write(
        &cfg,
        "steps = 2\nwarmup_steps = 1\nqueries_per_step = 2\ncheckpoint_every = 1\n\
         eval_every = 2\nmeasure_every = 2\nprobe_docs = 4\nenv_docs = 12\neval_queries = 2\n\
         max_doc_tokens = 16\nmax_query_tokens = 16\n\
         refresh = { policy = \"local\", budget = 2, neighbors = 2 }\n\
         [rollout]\ngroup_size = 2\nmax_new_tokens = 6\n[lora]\nrank = 2\n",
    )
    .unwrap();
    let sft = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../adapters/sft-smollm2");
    let (ok, err) = run(&[
        "train",
        "rl",
        "--dataset",
        s(&sf),
        "--adapter",
        s(&sft),
        "--out",
        s(&out),
        "--config",
        s(&cfg),
        "--max-queries",
        "6",
    ]);
    assert!(ok, "{err}");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let manifest = read(&out.join("manifest.json"));
    assert_eq!(manifest["format"], "search-r3-rl-adapter");
    assert_eq!(manifest["stacked_on_base_adapter"], true);
    let sft_manifest = read(&sft.join("manifest.json"));
    assert_eq!(
        manifest["stage1_adapter"]["sha256"],
        sft_manifest["adapter_sha256"]
    );
    // One adapter for the plain base model: the SFT rank (16) plus this stage's (2).
    let md = safetensors_metadata(&out.join("adapter.safetensors"));
    let lora: serde_json::Value = serde_json::from_str(md["lora"].as_str().unwrap()).unwrap();
    assert_eq!(lora["rank"], 18, "{lora}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let evals: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("eval").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 2]);
    let env = lines.iter().find(|l| l.get("env").is_some()).unwrap();
    for policy in ["local-2x2", "never"] {
        let p = &env["env"][policy];
        assert!(p["drift_mean_cos"].as_f64().unwrap() <= 1.0, "{env}");
    }
    // The adapter evaluates with and without reasoning.
    for mode in [None, Some("--reason")] {
        let results = dir.path().join("eval.json");
        let mut args = vec![
            "eval",
            "--dataset",
            s(&sf),
            "--split",
            "test",
            "--adapter",
            s(&out),
            "--max-queries",
            "2",
            "--max-docs",
            "10",
            "--max-doc-tokens",
            "16",
            "--out",
            s(&results),
        ];
        args.extend(mode);
        let (ok, err) = run(&args);
        assert!(ok, "{err}");
        let r = read(&results);
        assert!(r["reward"]["mean"].as_f64().unwrap() >= 0.0, "{r}");
    }
}

#[test]
fn tiny_reason_run_makes_an_adapter_directory_whose_index_stays_valid() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sf) = common::scifact() else {
        return;
    };
    if !common::model_available("smollm2") {
        return;
    }
    let rl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../adapters/rl-smollm2");
    let out = dir.path().join("reason");
    let cfg = dir.path().join("reason.toml");
    std::fs::write(
        &cfg,
        "rounds = 1\nqueries_per_round = 3\nthoughts = 2\nthought_tokens = 6\n\
         min_thought_tokens = 2\nsteps_per_round = 1\nwarmup_steps = 0\nqueries_per_step = 2\n\
         eval_queries = 2\n\
         env_docs = 12\nmax_doc_tokens = 16\nmax_query_tokens = 16\n[lora]\nrank = 2\n",
    )
    .unwrap();
    let (ok, err) = run(&[
        "train",
        "reason",
        "--dataset",
        s(&sf),
        "--adapter",
        s(&rl),
        "--out",
        s(&out),
        "--config",
        s(&cfg),
        "--max-queries",
        "6",
    ]);
    assert!(ok, "{err}");
    // An adapter directory: the document side as given, the query tower beside it.
    assert_eq!(
        std::fs::read(out.join("adapter.safetensors")).unwrap(),
        std::fs::read(rl.join("adapter.safetensors")).unwrap()
    );
    let md = safetensors_metadata(&out.join("query.safetensors"));
    let lora: serde_json::Value = serde_json::from_str(md["lora"].as_str().unwrap()).unwrap();
    assert_eq!(
        lora["rank"], 34,
        "stage 1 (16) + stage 2 (16) + the tower (2): {lora}"
    );
    assert!(out.join("thoughts-round1.jsonl").exists());

    // An index built with the document adapter serves the new directory unchanged.
    let index = dir.path().join("index");
    let results = dir.path().join("eval.json");
    let eval = |adapter: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--dataset",
            s(&sf),
            "--adapter",
            s(adapter),
            "--max-queries",
            "2",
            "--max-docs",
            "10",
            "--max-doc-tokens",
            "16",
            "--index",
            s(&index),
            "--out",
            s(&results),
        ];
        args.extend(extra);
        let (ok, err) = run(&args);
        assert!(ok, "{err}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
        (r, err)
    };
    eval(&rl, &[]);
    let (r, err) = eval(&out, &["--reason", "--reason-mode", "mean:2,max=4"]);
    assert!(err.contains("reusing the index"), "{err}");
    let c = &r["config"];
    assert!(c["query_adapter_sha256"].is_string(), "{c}");
    assert_eq!(c["reasoning"]["mode"], "mean:2,max=4");
    let per_query = c["reasoning"]["per_query"].as_object().unwrap();
    assert_eq!(per_query.len(), 2);
    for q in per_query.values() {
        assert_eq!(q["thoughts"].as_array().unwrap().len(), 2, "{q}");
        assert!(q["generated_tokens"].as_u64().unwrap() <= 8, "{q}");
    }
}
