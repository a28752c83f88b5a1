//! The thought stage (`train reason`): the selection rule on crafted vectors, and the loop on a
//! tiny random model — exact resume (mid-round and at a round boundary), frozen documents, the
//! query tower saved stacked, and a trained tower whose trainable tensors all moved.

mod common;

use common::tiny::{closer, tiny_base, tiny_with_lora, tokenizer, Rng, ASSISTANT, D, EMBED};
use common::{assert_same_trainable, metric_lines, trainable};
use search_r3_index::l2_normalize;
use search_r3_model::{LoraTarget, Model};
use search_r3_train::reason::select::{beats, retrieval, select_thought, Retrieval};
use search_r3_train::reason::{
    train_reason, ReasonConfig, ReasonData, ReasonQuery, Teacher, TeacherSection,
};
use search_r3_train::run::config::RunConfig;
use search_r3_train::run::TrainOptions;
use std::path::Path;

fn unit(v: &[f32]) -> Vec<f32> {
    l2_normalize(v.to_vec())
}

#[test]
fn retrieval_scores_exact_ranks_of_the_gold_documents() {
    let docs = vec![unit(&[1.0, 0.0]), unit(&[0.8, 0.6]), unit(&[0.0, 1.0])];
    let q = unit(&[0.6, 0.8]); // scores 0.6, 0.96, 0.8
    let r = retrieval(&q, &docs, &[2]);
    assert_eq!(r.best_rank, 2);
    assert!((r.ndcg - 1.0 / 3f64.log2()).abs() < 1e-12);
    assert!((r.gold_cos - 0.8).abs() < 1e-6);
    // Two gold documents at ranks 1 and 2: DCG = 1 + 1/log2(3), IDCG the same.
    let r = retrieval(&q, &docs, &[1, 2]);
    assert!((r.ndcg - 1.0).abs() < 1e-12 && r.best_rank == 1);
}

#[test]
fn selection_keeps_exactly_the_thoughts_that_beat_direct() {
    let r = |ndcg: f64, gold_cos: f64| Retrieval {
        ndcg,
        best_rank: 1,
        gold_cos,
    };
    let direct = r(0.5, 0.70);
    // Better ranking; worse ranking; same ranking and closer; an exact tie.
    let thoughts = [r(0.63, 0.60), r(0.43, 0.90), r(0.5, 0.75), r(0.5, 0.70)];
    let wins: Vec<bool> = thoughts.iter().map(|t| beats(t, &direct)).collect();
    assert_eq!(wins, [true, false, true, false]);
    // The best of the winners is kept (ranking first, then closeness).
    assert_eq!(select_thought(&direct, &thoughts), Some(0));
    assert_eq!(select_thought(&direct, &thoughts[1..]), Some(1));
    // Nothing that only ties or loses is kept.
    assert_eq!(select_thought(&direct, &[r(0.5, 0.70), r(0.2, 0.99)]), None);
    assert_eq!(select_thought(&direct, &[]), None);
    // The best thought loses to direct even though another one ties: none kept.
    assert_eq!(
        select_thought(&r(1.0, 0.9), &[r(1.0, 0.9), r(0.9, 0.95)]),
        None
    );
}

/// `n` frozen documents and `n` queries (gold = the document of the same index), the first
/// `held` held out.
fn data(n: usize, held: usize, seed: u64) -> ReasonData {
    let mut rng = Rng::new(seed);
    let docs: Vec<Vec<f32>> = (0..n)
        .map(|_| unit(&(0..D).map(|_| rng.uniform() - 0.5).collect::<Vec<f32>>()))
        .collect();
    let mut queries: Vec<ReasonQuery> = (0..n)
        .map(|i| {
            let prompt = rng.tokens(4);
            let mut direct = prompt.clone();
            direct.extend(ASSISTANT);
            direct.push(EMBED);
            ReasonQuery {
                direct_start: prompt.len(),
                prompt,
                direct,
                gold: vec![i],
            }
        })
        .collect();
    let train = queries.split_off(held);
    ReasonData {
        queries: train,
        eval: queries,
        docs,
        pad_id: 0,
    }
}

fn config() -> ReasonConfig {
    let mut c = ReasonConfig {
        rounds: 2,
        queries_per_round: 6,
        thoughts: 3,
        thought_tokens: 5,
        min_thought_tokens: 2,
        temperature: 1.0,
        generation_batch: 4,
        steps_per_round: 3,
        queries_per_step: 3,
        lr: 5e-3,
        min_lr: 5e-4,
        warmup_steps: 1,
        micro_tokens: 256,
        checkpoint_every: 2,
        ..ReasonConfig::default()
    };
    c.lora.rank = 4;
    c.lora.alpha = 8.0;
    c.lora.targets = vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down];
    c
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
fn resume_equals_straight_run_mid_round_and_at_a_round_boundary() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let cl = closer();
    let d = data(14, 4, 1);
    let cfg = config();

    let straight = tmp.path().join("straight");
    let mut a = base();
    let sa = train_reason(
        &mut a,
        &tok,
        &cl,
        &d,
        None,
        &cfg,
        None,
        &opts(&straight, false, None),
    )
    .unwrap();
    assert_eq!(sa.step, 6);
    assert!(sa.start_eval.is_some());
    assert_eq!(sa.rounds.len(), 2);
    assert!(sa.rounds.iter().all(|(s, e)| s.queries == 6 && e.is_some()));
    for f in [
        "adapter.safetensors",
        "manifest.json",
        "thoughts-round1.jsonl",
        "thoughts-round2.jsonl",
    ] {
        assert!(straight.join(f).exists(), "{f} missing");
    }

    // Stopped inside round 1 (step 2), then at the end of round 1 (step 3), each resumed by a
    // fresh process: the same weights, the same log.
    for stop in [2, 3, 4] {
        let resumed = tmp.path().join(format!("resumed-{stop}"));
        let mut b = base();
        let sb = train_reason(
            &mut b,
            &tok,
            &cl,
            &d,
            None,
            &cfg,
            None,
            &opts(&resumed, false, Some(stop)),
        )
        .unwrap();
        assert!(sb.stopped_early && sb.step == stop);
        let mut c = base();
        let sc = train_reason(
            &mut c,
            &tok,
            &cl,
            &d,
            None,
            &cfg,
            None,
            &opts(&resumed, true, None),
        )
        .unwrap();
        assert_eq!(sc.step, 6);
        assert_same_trainable(&a, &c);
        assert_eq!(
            metric_lines(&straight),
            metric_lines(&resumed),
            "stop at {stop}"
        );
        assert_eq!(sc.rounds, sa.rounds, "stop at {stop}");
        for r in ["thoughts-round1.jsonl", "thoughts-round2.jsonl"] {
            assert_eq!(
                std::fs::read(straight.join(r)).unwrap(),
                std::fs::read(resumed.join(r)).unwrap()
            );
        }
    }
    // Another config is refused on resume.
    let other = ReasonConfig {
        thoughts: 2,
        ..cfg.clone()
    };
    let err = train_reason(
        &mut base(),
        &tok,
        &cl,
        &d,
        None,
        &other,
        None,
        &opts(&tmp.path().join("resumed-2"), true, None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("different config"), "{err}");
}

#[test]
fn every_trainable_tensor_moves_and_the_tower_is_saved_stacked() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let cl = closer();
    let d = data(14, 4, 2);
    let cfg = ReasonConfig {
        thought_dropout: 0.5,
        ..config()
    };
    // A folded "document adapter" the tower starts from and is saved stacked onto.
    let mut m = tiny_with_lora(5, &[LoraTarget::Q, LoraTarget::Up], 9);
    let doc_lora = m.lora.clone().unwrap();
    m.merge_lora().unwrap();
    let out = tmp.path().join("run");
    let before: Vec<(String, Vec<f32>)> = {
        let mut probe = m.clone();
        probe.add_lora(cfg.lora.config(), cfg.lora.seed).unwrap();
        trainable(&probe)
    };
    let s = train_reason(
        &mut m,
        &tok,
        &cl,
        &d,
        None,
        &cfg,
        Some(&doc_lora),
        &opts(&out, false, None),
    )
    .unwrap();
    assert_eq!(s.step, 6);
    let after = trainable(&m);
    assert_eq!(before.len(), after.len());
    for ((name, x), (_, y)) in before.iter().zip(&after) {
        let moved = x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(moved.is_finite() && moved > 0.0, "{name} did not move");
    }
    // The saved tower loads on the plain base model and computes what the trained one does.
    let mut plain = base();
    search_r3_model::state::load_trainable(&mut plain, &out.join("final.safetensors")).unwrap();
    let lora = plain.lora.as_ref().unwrap();
    assert_eq!(lora.config.rank, doc_lora.config.rank + cfg.lora.rank);
    let seq = vec![vec![3u32, 4, 5, 60, 61, 62, EMBED]];
    let x = common::embed_unit(&m, &seq, 0, 256).unwrap();
    let y = common::embed_unit(&plain, &seq, 0, 256).unwrap();
    let diff = x[0]
        .iter()
        .zip(&y[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "stacked tower differs by {diff}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["format"], "search-r3-reason-adapter");
    assert_eq!(manifest["stacked_on_base_adapter"], true);
}

#[test]
fn teacher_thoughts_compete_in_the_selection_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer(tmp.path());
    let cl = closer();
    let d = data(14, 4, 3);
    let cfg = ReasonConfig {
        teacher: Some(TeacherSection {
            thoughts: 2,
            max_tokens: 6,
            temperature: 1.0,
            ..TeacherSection::default()
        }),
        ..config()
    };
    // Any model can teach; here another tiny one, prompted with the query's own tokens.
    let teacher_model = tiny_base(&mut Rng::new(11));
    let teacher = |id: &str| Teacher {
        model: &teacher_model,
        tok: &tok,
        prompts: d.queries.iter().map(|q| q.prompt.clone()).collect(),
        id: id.into(),
    };
    let t = teacher("tiny-11");
    let straight = tmp.path().join("straight");
    let sa = train_reason(
        &mut base(),
        &tok,
        &cl,
        &d,
        Some(&t),
        &cfg,
        None,
        &opts(&straight, false, None),
    )
    .unwrap();
    assert_eq!(sa.step, 6);
    let mut from_teacher = 0;
    for r in ["thoughts-round1.jsonl", "thoughts-round2.jsonl"] {
        for line in std::fs::read_to_string(straight.join(r)).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let thoughts = v["thoughts"].as_array().unwrap();
            let n = thoughts.iter().filter(|t| t["source"] == "teacher").count();
            assert!(n <= 2, "{line}");
            assert_eq!(thoughts.len() - n, cfg.thoughts, "{line}");
            from_teacher += n;
        }
    }
    assert!(from_teacher > 0, "no teacher thought reached the selection");
    for (s, _) in &sa.rounds {
        assert!(s.kept_teacher <= s.kept);
    }
    // Stopped at the round boundary and resumed: round 2's teacher thoughts are the same.
    let resumed = tmp.path().join("resumed");
    let sb = train_reason(
        &mut base(),
        &tok,
        &cl,
        &d,
        Some(&t),
        &cfg,
        None,
        &opts(&resumed, false, Some(3)),
    )
    .unwrap();
    assert!(sb.stopped_early);
    let sc = train_reason(
        &mut base(),
        &tok,
        &cl,
        &d,
        Some(&t),
        &cfg,
        None,
        &opts(&resumed, true, None),
    )
    .unwrap();
    assert_eq!(sc.rounds, sa.rounds);
    assert_eq!(
        std::fs::read(straight.join("thoughts-round2.jsonl")).unwrap(),
        std::fs::read(resumed.join("thoughts-round2.jsonl")).unwrap()
    );
    // Another teacher, or none, is refused.
    let other = teacher("tiny-12");
    let err = train_reason(
        &mut base(),
        &tok,
        &cl,
        &d,
        Some(&other),
        &cfg,
        None,
        &opts(&resumed, true, None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("teacher"), "{err}");
    let err = train_reason(
        &mut base(),
        &tok,
        &cl,
        &d,
        None,
        &cfg,
        None,
        &opts(&tmp.path().join("none"), false, None),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("[teacher]"), "{err}");
}

#[test]
fn config_errors_name_the_field() {
    for (toml, field) in [
        ("thoughts = 0", "thoughts"),
        (
            "min_thought_tokens = 40\nthought_tokens = 32",
            "min_thought_tokens",
        ),
        ("thought_dropout = 1.5", "thought_dropout"),
        ("select_by = \"best\"", "select_by"),
        ("top_p = 0.0", "top_p"),
        ("nonsense = 1", "nonsense"),
        ("[teacher]\nuser = \"no slot\"", "{text}"),
        ("[teacher]\nthoughts = 0", "thoughts"),
        ("[teacher]\nbogus = 1", "bogus"),
    ] {
        let err = ReasonConfig::from_toml(toml, "reason.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reason.toml") && err.contains(field),
            "{toml}: {err}"
        );
    }
}
