//! The stage-1 loop (`train_sft`) on a tiny random model built in memory: exact resume,
//! corrupted-checkpoint detection, a decreasing loss, config parsing and the output files.

mod common;

use common::embed_unit;
use common::tiny::{tiny_base, Rng, ASSISTANT, EMBED};
use common::{assert_same_trainable, metric_lines, trainable};
use search_r3_model::{LoraTarget, Model};
use search_r3_train::run::config::{LoraSection, RunConfig};
use search_r3_train::run::TrainOptions;
use search_r3_train::sft::{train_sft, EvalHook, SftConfig, TrainData, TrainQuery};
use std::path::Path;

/// The base model; the trainer attaches the adapters.
fn tiny_model(seed: u64) -> Model {
    tiny_base(&mut Rng::new(seed))
}

/// `n` queries; query i's positive is doc i, its negatives docs n+i and n+(i+1)%n; query 0 also
/// lists doc 1 as relevant.
fn tiny_data(n: usize, seed: u64) -> TrainData {
    let mut rng = Rng::new(seed);
    let queries = (0..n)
        .map(|i| {
            let mut ids = rng.tokens(4 + i % 3);
            let start = ids.len();
            ids.extend(ASSISTANT);
            ids.push(EMBED);
            TrainQuery {
                ids,
                assistant_start: start,
                positives: if i == 0 { vec![0, 1] } else { vec![i] },
                negatives: vec![n + i, n + (i + 1) % n],
            }
        })
        .collect();
    let docs = (0..2 * n)
        .map(|j| {
            let mut d = rng.tokens(5 + j % 4);
            d.push(EMBED);
            d
        })
        .collect();
    TrainData {
        queries,
        docs,
        pad_id: 0,
    }
}

fn tiny_config(steps: usize) -> SftConfig {
    SftConfig {
        steps,
        warmup_steps: 2,
        lr: 1e-2,
        min_lr: 1e-3,
        queries_per_batch: 4,
        grad_accum_steps: 2,
        hard_negatives: 1,
        micro_tokens: 64,
        checkpoint_every: 3,
        eval_every: 2,
        lora: LoraSection {
            rank: 4,
            alpha: 8.0,
            targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down],
            seed: 7,
        },
        ..SftConfig::default()
    }
}

/// Mean cosine of each query to its first positive (a deterministic function of the weights).
struct MeanPositiveCosine(TrainData);

impl EvalHook for MeanPositiveCosine {
    fn evaluate(&mut self, model: &Model, _step: usize) -> search_r3_train::Result<f64> {
        let qs: Vec<Vec<u32>> = self.0.queries.iter().map(|q| q.ids.clone()).collect();
        let ds: Vec<Vec<u32>> = self
            .0
            .queries
            .iter()
            .map(|q| self.0.docs[q.positives[0]].clone())
            .collect();
        let q = embed_unit(model, &qs, 0, 64)?;
        let d = embed_unit(model, &ds, 0, 64)?;
        let cos: f64 = q
            .iter()
            .zip(&d)
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>())
            .sum();
        Ok(cos / qs.len() as f64)
    }
}

fn opts(out: &Path, resume: bool, stop_after: Option<usize>) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        resume,
        stop_after,
        ..TrainOptions::default()
    }
}

#[test]
fn resume_equals_straight_run() {
    let data = tiny_data(10, 3);
    let n = 6;
    let cfg = tiny_config(2 * n);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("straight"), dir.path().join("resumed"));

    let mut m1 = tiny_model(1);
    let mut hook = MeanPositiveCosine(data.clone());
    let s1 = train_sft(
        &mut m1,
        &data,
        &cfg,
        &opts(&a, false, None),
        Some(&mut hook),
    )
    .unwrap();
    assert_eq!(s1.step, 2 * n);
    assert!(!s1.stopped_early);

    let mut m2 = tiny_model(1);
    let s2 = train_sft(
        &mut m2,
        &data,
        &cfg,
        &opts(&b, false, Some(n)),
        Some(&mut hook),
    )
    .unwrap();
    assert!(s2.stopped_early);
    assert_eq!(s2.step, n);
    assert!(!b.join("manifest.json").exists());
    // A fresh process: a new model, the checkpoint, the same config.
    let mut m3 = tiny_model(1);
    let s3 = train_sft(&mut m3, &data, &cfg, &opts(&b, true, None), Some(&mut hook)).unwrap();
    assert_eq!(s3.step, 2 * n);

    assert_same_trainable(&m1, &m3);
    let t3 = trainable(&m3);
    let (l1, l3) = (metric_lines(&a), metric_lines(&b));
    assert_eq!(l1, l3);
    assert_eq!(l1.iter().filter(|v| v.get("loss").is_some()).count(), 2 * n);
    assert!(l1.iter().any(|v| v.get("eval").is_some()));
    assert_eq!(s1.best, s3.best);

    // The outputs of a finished run.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["steps"], 2 * n);
    assert_eq!(manifest["data_hash"], data.hash());
    assert_eq!(manifest["config"]["lora"]["rank"], 4);
    for f in [
        "adapter.safetensors",
        "final.safetensors",
        "best.safetensors",
    ] {
        assert!(b.join(f).exists(), "{f}");
    }
    // The shipped adapter loads into a fresh base model.
    let mut m4 = tiny_model(1);
    search_r3_model::state::load_trainable(&mut m4, &b.join("final.safetensors")).unwrap();
    assert_eq!(trainable(&m4), t3);
}

/// Ctrl-C sets the interrupt flag: the run stops after the step in progress, writes a
/// checkpoint even when none is due, and `--resume` ends where an uninterrupted run ends.
#[test]
fn interrupt_checkpoints_and_resumes_exactly() {
    let data = tiny_data(8, 9);
    let cfg = tiny_config(5);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("straight"), dir.path().join("interrupted"));
    let mut m1 = tiny_model(3);
    train_sft(&mut m1, &data, &cfg, &opts(&a, false, None), None).unwrap();
    assert!(a.join("curves.png").exists(), "no curves.png at the end");

    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut o = opts(&b, false, None);
    o.interrupt = Some(flag);
    let mut m2 = tiny_model(3);
    let s = train_sft(&mut m2, &data, &cfg, &o, None).unwrap();
    assert!(s.interrupted && s.stopped_early);
    assert_eq!(
        s.step, 1,
        "checkpoint_every is 3: the checkpoint exists only because of the stop"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(b.join("checkpoint").join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 1);
    assert!(!b.join("manifest.json").exists());

    let mut m3 = tiny_model(3);
    let s = train_sft(&mut m3, &data, &cfg, &opts(&b, true, None), None).unwrap();
    assert!(!s.interrupted);
    assert_eq!(s.step, 5);
    assert_same_trainable(&m1, &m3);
    assert_eq!(metric_lines(&a), metric_lines(&b));
}

#[test]
fn corrupted_checkpoint_is_detected_on_resume() {
    let data = tiny_data(8, 5);
    let cfg = tiny_config(6);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut m = tiny_model(2);
    train_sft(&mut m, &data, &cfg, &opts(&out, false, Some(3)), None).unwrap();
    let opt = out.join("checkpoint").join("optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let k = bytes.len() - 5;
    bytes[k] ^= 0x40;
    std::fs::write(&opt, bytes).unwrap();
    let mut m = tiny_model(2);
    let err = train_sft(&mut m, &data, &cfg, &opts(&out, true, None), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optimizer.safetensors") && err.contains("corrupted"),
        "{err}"
    );

    // A different config is refused, and so is starting over on top of a checkpoint.
    let mut other = cfg.clone();
    other.lr = 5e-3;
    let err = train_sft(&mut m, &data, &other, &opts(&out, false, None), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn loss_decreases_on_the_tiny_task() {
    let data = tiny_data(8, 11);
    let mut cfg = tiny_config(30);
    cfg.grad_accum_steps = 1;
    cfg.checkpoint_every = 0;
    cfg.eval_every = 0;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut m = tiny_model(4);
    let s = train_sft(&mut m, &data, &cfg, &opts(&out, false, None), None).unwrap();
    assert_eq!(s.skipped_steps, 0);
    let totals: Vec<f64> = metric_lines(&out)
        .iter()
        .filter_map(|v| v["loss"]["total"].as_f64())
        .collect();
    assert_eq!(totals.len(), 30);
    let first = totals[..5].iter().sum::<f64>() / 5.0;
    let last = totals[25..].iter().sum::<f64>() / 5.0;
    eprintln!("loss: first 5 mean {first:.4}, last 5 mean {last:.4}");
    assert!(last < 0.7 * first, "first {first}, last {last}");
}

#[test]
fn config_toml_round_trip_and_unknown_keys() {
    let cfg = SftConfig::from_toml(
        "steps = 10\nwarmup_steps = 1\n[loss]\ntau = 0.02\n[lora]\nrank = 8\ntargets = [\"q\", \"v\"]\n",
        "t.toml",
    )
    .unwrap();
    assert_eq!((cfg.steps, cfg.loss.tau, cfg.lora.rank), (10, 0.02, 8));
    assert_eq!(cfg.lora.targets, vec![LoraTarget::Q, LoraTarget::V]);
    assert_eq!(
        cfg.queries_per_batch,
        SftConfig::default().queries_per_batch
    );
    let back = SftConfig::from_toml(&toml::to_string(&cfg).unwrap(), "x").unwrap();
    assert_eq!(back, cfg);
    let err = SftConfig::from_toml("stepz = 3\n", "t.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("t.toml") && err.contains("stepz"), "{err}");
    let err = SftConfig::from_toml("warmup_steps = 500\nsteps = 10\n", "t.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("warmup_steps"), "{err}");
}

#[test]
fn a_stage2_checkpoint_is_named_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("checkpoint")).unwrap();
    std::fs::write(tmp.path().join("checkpoint/rl_state.json"), "{}").unwrap();
    let err = train_sft(
        &mut tiny_model(1),
        &tiny_data(10, 1),
        &tiny_config(2),
        &opts(tmp.path(), true, None),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("stage-2 (train rl) checkpoint"), "{err}");
}
