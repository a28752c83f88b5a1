//! The stage-2 loop (`train_rl`) on a tiny random model: exact resume (the environment's
//! vectors, graph and staleness included), the saved adapter stacked on a folded stage-1
//! adapter, the environment measurements against their baselines, and config errors.

mod common;

use common::tiny::{closer, tiny_base, tiny_with_lora, tokenizer, Rng, EMBED};
use common::{assert_same_trainable, metric_lines};
use search_r3_index::IndexKind;
use search_r3_model::{Batch, LoraTarget, Model, Path as Fwd};
use search_r3_train::rl::env::RefreshPolicy;
use search_r3_train::rl::{train_rl, RlConfig, RlData, RlQuery};
use search_r3_train::run::config::RunConfig;
use search_r3_train::run::TrainOptions;
use std::path::Path;

/// `n` documents; `n` queries whose gold is the document of the same index, the first
/// `held` of them held out.
fn data(n: usize, held: usize, seed: u64) -> RlData {
    let mut rng = Rng::new(seed);
    let docs: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            let mut d = rng.tokens(5);
            d.push(EMBED);
            d
        })
        .collect();
    let mut queries: Vec<RlQuery> = (0..n)
        .map(|i| RlQuery {
            prompt: rng.tokens(4),
            gold: vec![i],
        })
        .collect();
    let train = queries.split_off(held);
    RlData {
        queries: train,
        eval: queries,
        docs,
        pad_id: 0,
        closer: closer(),
    }
}

fn config(steps: usize) -> RlConfig {
    let mut c = RlConfig {
        steps,
        warmup_steps: 1,
        lr: 5e-3,
        min_lr: 5e-4,
        queries_per_step: 3,
        checkpoint_every: 2,
        eval_every: 2,
        measure_every: 2,
        probe_docs: 8,
        index: IndexKind::Hnsw,
        refresh: RefreshPolicy::Local {
            budget: 3,
            neighbors: 2,
        },
        baselines: vec![RefreshPolicy::Never, RefreshPolicy::Full],
        ..RlConfig::default()
    };
    c.lora.rank = 4;
    c.lora.alpha = 8.0;
    c.lora.targets = vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down];
    c.rollout.group_size = 4;
    c.rollout.max_new_tokens = 5;
    c.rollout.nce_negatives = 3;
    c.rollout.touch_top = 2;
    c.rollout.micro_tokens = 256;
    c.rollout.reward.top_k = 10;
    c.rollout.reward.reasoning_budget = 4;
    c
}

/// `cfg` without evaluations and environment measurements (tests about other things).
fn unmeasured(mut cfg: RlConfig) -> RlConfig {
    cfg.eval_every = 0;
    cfg.measure_every = 0;
    cfg
}

fn opts(out: &Path, resume: bool, stop_after: Option<usize>) -> TrainOptions {
    TrainOptions {
        out: out.to_path_buf(),
        resume,
        stop_after,
        ..TrainOptions::default()
    }
}

fn base() -> Model {
    tiny_base(&mut Rng::new(5))
}

#[test]
fn resume_equals_straight_run_environment_included() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let d = data(16, 4, 1);
    let cfg = config(4);

    let straight = tmp.path().join("straight");
    let mut a = base();
    let sa = train_rl(&mut a, &tok, &d, &cfg, None, &opts(&straight, false, None)).unwrap();
    assert_eq!(sa.step, 4);
    assert!(!sa.stopped_early);
    assert!(
        sa.start_eval.is_some(),
        "step-0 evaluation of the starting policy"
    );

    let resumed = tmp.path().join("resumed");
    let mut b = base();
    let sb = train_rl(
        &mut b,
        &tok,
        &d,
        &cfg,
        None,
        &opts(&resumed, false, Some(2)),
    )
    .unwrap();
    assert!(sb.stopped_early && !resumed.join("adapter.safetensors").exists());
    // A different process: a fresh model, everything else from the checkpoint.
    let mut c = base();
    let sc = train_rl(&mut c, &tok, &d, &cfg, None, &opts(&resumed, true, None)).unwrap();
    assert_eq!(sc.step, 4);

    assert_same_trainable(&a, &c);
    assert_eq!(metric_lines(&straight), metric_lines(&resumed));
    for f in ["adapter.safetensors", "manifest.json", "curves.png"] {
        assert!(resumed.join(f).exists(), "{f} missing");
    }
}

#[test]
fn metrics_report_rewards_environment_and_baselines() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let d = data(16, 4, 2);
    let out = tmp.path().join("run");
    let mut m = base();
    train_rl(&mut m, &tok, &d, &config(4), None, &opts(&out, false, None)).unwrap();
    let lines = metric_lines(&out);
    let steps: Vec<_> = lines.iter().filter(|l| l.get("reward").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for l in &steps {
        for k in ["kl", "length", "emitted", "grad_norm", "clip_fraction"] {
            assert!(l[k].as_f64().unwrap().is_finite(), "{k} in {l}");
        }
        assert_eq!(
            l["refresh"]["reencoded"].as_u64().unwrap(),
            3,
            "local budget of 3"
        );
    }
    let evals: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("eval").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 2, 4]);
    let envs: Vec<_> = lines.iter().filter(|l| l.get("env").is_some()).collect();
    assert_eq!(envs.len(), 2);
    for l in envs {
        let e = &l["env"];
        let local = &e["local-3x2"];
        assert!((local["reencoded_per_step"].as_f64().unwrap() - 3.0 / 16.0).abs() < 1e-12);
        // The exact baseline: every vector current, rewards identical to a fresh encoding.
        let full = &e["full"];
        assert_eq!(full["reencoded_per_step"].as_f64().unwrap(), 1.0);
        assert_eq!(full["stale"].as_f64().unwrap(), 0.0);
        assert!(full["mean_abs_diff"].as_f64().unwrap() < 1e-9, "{full}");
        // Never refreshing: nothing re-encoded, every probe document stale and drifted.
        let never = &e["never"];
        assert_eq!(never["reencoded_per_step"].as_f64().unwrap(), 0.0);
        assert_eq!(never["stale"].as_f64().unwrap(), 1.0);
        assert!(never["drift_mean_cos"].as_f64().unwrap() < 1.0);
    }
}

#[test]
fn saved_adapter_stacks_onto_the_folded_stage1_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let d = data(12, 0, 3);
    let cfg = unmeasured(config(2));
    // A stage-1 model whose adapter is not zero.
    let stage1 = tiny_with_lora(5, &[LoraTarget::Q, LoraTarget::Up], 9);
    for (name, v) in stage1.trainable_vars() {
        if name.ends_with("lora_b") {
            let t = Rng::new(11).tensor(v.dims(), 0.05);
            v.set(&t).unwrap();
        }
    }
    let base_lora = stage1.lora.clone().unwrap();
    let mut policy = stage1.clone();
    policy.merge_lora().unwrap();
    let out = tmp.path().join("run");
    train_rl(
        &mut policy,
        &tok,
        &d,
        &cfg,
        Some(&base_lora),
        &opts(&out, false, None),
    )
    .unwrap();

    // The saved adapter on the plain base model computes what the trained policy computes.
    let mut plain = base();
    search_r3_model::state::load_trainable(&mut plain, &out.join("adapter.safetensors")).unwrap();
    assert_eq!(plain.lora.as_ref().unwrap().config.rank, 4 + 4);
    let batch = Batch::right_padded(&d.docs[..3], 0).unwrap();
    let h1 = policy.forward(&batch, Fwd::Fast, None).unwrap();
    let h2 = plain.forward(&batch, Fwd::Fast, None).unwrap();
    let diff = (h1 - h2)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "stacked adapter differs by {diff}");
}

#[test]
fn bad_configs_and_data_are_refused() {
    let refused = |text: &str| {
        RlConfig::from_toml(text, "rl.toml")
            .unwrap_err()
            .to_string()
    };
    let err = refused("stepz = 3");
    assert!(err.contains("rl.toml") && err.contains("stepz"), "{err}");
    let err = refused("[rollout]\ngroup_size = 1");
    assert!(err.contains("group_size"), "{err}");
    let err = refused("refresh = { policy = \"local\", budget = 0, neighbors = 4 }");
    assert!(err.contains("budget of 0"), "{err}");
    let err = refused("refresh = { policy = \"never\" }\nbaselines = [{ policy = \"never\" }]");
    assert!(err.contains("`never` appears twice"), "{err}");
    let c = RlConfig::from_toml(
        "baselines = [{ policy = \"full\" }]\nrefresh = { policy = \"never\" }\nindex = \"exact\"",
        "rl.toml",
    )
    .unwrap();
    assert_eq!(c.baselines, vec![RefreshPolicy::Full]);
    assert_eq!(c.refresh, RefreshPolicy::Never);

    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let mut d = data(8, 0, 4);
    d.queries[2].gold = vec![99];
    let err = train_rl(
        &mut base(),
        &tok,
        &d,
        &config(2),
        None,
        &opts(tmp.path(), false, None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("query 2") && err.contains("99"), "{err}");
    // A model that still carries its stage-1 adapter would make the KL reference the base.
    let d = data(8, 0, 4);
    let mut with_lora = tiny_with_lora(5, &[LoraTarget::Q], 1);
    let err = train_rl(
        &mut with_lora,
        &tok,
        &d,
        &config(2),
        None,
        &opts(tmp.path(), false, None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("merge_lora"), "{err}");
}

#[test]
fn resume_refuses_another_stage1_adapter_or_a_stage1_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let d = data(12, 0, 6);
    let cfg = unmeasured(config(4));
    let out = tmp.path().join("run");
    let mut m = base();
    let s = train_rl(&mut m, &tok, &d, &cfg, None, &opts(&out, false, Some(2))).unwrap();
    assert!(s.stopped_early);
    // Same config and data, but the policy now starts from a folded stage-1 adapter.
    let stage1 = tiny_with_lora(5, &[LoraTarget::Q], 3);
    let lora = stage1.lora.clone().unwrap();
    let mut folded = stage1.clone();
    folded.merge_lora().unwrap();
    let err = train_rl(
        &mut folded,
        &tok,
        &d,
        &cfg,
        Some(&lora),
        &opts(&out, true, None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("stage-1 adapter"), "{err}");

    // A stage-1 checkpoint directory is named as such instead of "no checkpoint".
    let sft = tmp.path().join("sft");
    std::fs::create_dir_all(sft.join("checkpoint")).unwrap();
    std::fs::write(sft.join("checkpoint/trainer_state.json"), "{}").unwrap();
    let err = train_rl(&mut base(), &tok, &d, &cfg, None, &opts(&sft, true, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("stage-1 (train sft) checkpoint"), "{err}");
}
