//! The RL environment on a tiny random model: refreshed vectors equal fresh encodings, the
//! local policy spends its budget on touched documents and then their graph neighbours, the
//! baselines (full / never) behave as named, and the drift and reward-fidelity measurements
//! read 1 and 0 where they must. Rank correlations against hand-computed values.

mod common;

use common::embed_unit;
use common::tiny::{tiny_with_lora, Rng, EMBED};
use search_r3_index::IndexKind;
use search_r3_model::{LoraTarget, Model};
use search_r3_train::rl::env::{kendall_tau_b, spearman, ProbeQuery, RefreshPolicy, RetrievalEnv};

fn corpus(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let mut d = rng.tokens(4 + i % 5);
            d.push(EMBED);
            d
        })
        .collect()
}

/// The base model with LoRA on q and v (B = 0: identical to the base until `update`).
fn model(seed: u64) -> Model {
    tiny_with_lora(seed, &[LoraTarget::Q, LoraTarget::V], 1)
}

/// A stand-in for an optimizer step: every LoRA B factor moves.
fn update(m: &Model, seed: u64, scale: f32) {
    let mut rng = Rng::new(seed);
    for (name, v) in m.trainable_vars() {
        if name.ends_with("lora_b") {
            let t = (v.as_tensor() + rng.tensor(v.dims(), scale)).unwrap();
            v.set(&t).unwrap();
        }
    }
}

fn fresh(m: &Model, prompts: &[Vec<u32>], doc: usize) -> Vec<f32> {
    embed_unit(m, &[prompts[doc].clone()], 0, 256)
        .unwrap()
        .remove(0)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn local_refresh_reencodes_touched_then_neighbours_and_matches_fresh_encodings() {
    for kind in [IndexKind::Exact, IndexKind::Hnsw] {
        let prompts = corpus(40, 3);
        let m = model(5);
        let policy = RefreshPolicy::Local {
            budget: 6,
            neighbors: 4,
        };
        let mut env = RetrievalEnv::new(&m, prompts.clone(), 0, 256, kind, policy).unwrap();
        let before: Vec<Vec<f32>> = (0..40).map(|d| env.stored(d).unwrap()).collect();
        let near: Vec<usize> = [3, 7]
            .iter()
            .flat_map(|&d| env.neighbors(d, 4).unwrap())
            .collect();
        update(&m, 9, 0.5);
        let r = env.refresh(&m, &[3, 7, 3]).unwrap();
        assert_eq!((r.reencoded, r.touched), (6, 2));
        assert!((r.fraction - 6.0 / 40.0).abs() < 1e-12);
        let refreshed: Vec<usize> = (0..40).filter(|&d| env.staleness(d) == 0).collect();
        assert_eq!(refreshed.len(), 6, "{kind:?}");
        assert!(refreshed.contains(&3) && refreshed.contains(&7));
        for d in &refreshed {
            assert!(
                [3, 7].contains(d) || near.contains(d),
                "{kind:?}: doc {d} is neither touched nor a graph neighbour of a touched doc"
            );
        }
        for (d, old) in before.iter().enumerate() {
            let stored = env.stored(d).unwrap();
            if env.staleness(d) == 0 {
                let diff = max_diff(&stored, &fresh(&m, &prompts, d));
                assert!(
                    diff <= 1e-5,
                    "{kind:?}: doc {d} differs from a fresh encoding by {diff}"
                );
            } else {
                assert_eq!(&stored, old, "{kind:?}: doc {d} changed without a refresh");
                assert!(
                    max_diff(&stored, &fresh(&m, &prompts, d)) > 1e-4,
                    "update had no effect"
                );
            }
        }
        // Only the budget is spent: the touched docs and 4 of their neighbours.
        assert_eq!(env.reencoded_total(), 6);
    }
}

#[test]
fn neighbours_come_from_the_index_and_stalest_go_first() {
    let prompts = corpus(30, 4);
    let m = model(6);
    let mut env = RetrievalEnv::new(
        &m,
        prompts,
        0,
        256,
        IndexKind::Exact,
        RefreshPolicy::Local {
            budget: 3,
            neighbors: 29,
        },
    )
    .unwrap();
    update(&m, 1, 0.3);
    // Touching doc 0 with a budget of 3: doc 0 plus two others, all neighbours of doc 0.
    let nearest = env.neighbors(0, 2).unwrap();
    env.refresh(&m, &[0]).unwrap();
    let first: Vec<usize> = (0..30).filter(|&d| env.staleness(d) == 0).collect();
    assert_eq!(first.len(), 3);
    // All equally stale: the closest neighbours win.
    for d in &nearest {
        assert!(first.contains(d), "{first:?} lacks nearest neighbour {d}");
    }
    update(&m, 2, 0.3);
    // Next update: the two docs refreshed last time are now the least stale, so the budget
    // goes to never-refreshed neighbours (staleness 2) instead.
    env.refresh(&m, &[0]).unwrap();
    for d in first.iter().filter(|&&d| d != 0) {
        assert_eq!(
            env.staleness(*d),
            1,
            "doc {d} was refreshed again before staler ones"
        );
    }
}

#[test]
fn baselines_full_and_never_and_the_measurements() {
    let prompts = corpus(25, 7);
    let m = model(8);
    let mut full = RetrievalEnv::new(
        &m,
        prompts.clone(),
        0,
        256,
        IndexKind::Exact,
        RefreshPolicy::Full,
    )
    .unwrap();
    let mut never = RetrievalEnv::new(
        &m,
        prompts.clone(),
        0,
        256,
        IndexKind::Exact,
        RefreshPolicy::Never,
    )
    .unwrap();
    update(&m, 3, 1.0);
    assert_eq!(full.refresh(&m, &[1]).unwrap().reencoded, 25);
    assert_eq!(never.refresh(&m, &[1]).unwrap().reencoded, 0);
    let probe: Vec<usize> = (0..25).collect();
    let d = full.drift(&m, &probe).unwrap();
    assert_eq!((d.stale, d.mean_cos), (0, 1.0));
    let d = never.drift(&m, &probe).unwrap();
    assert_eq!(d.stale, 25);
    assert!(d.mean_cos < 0.9999 && d.min_cos <= d.mean_cos, "{d:?}");

    // Queries: fresh encodings of some docs, gold = a doc nearby.
    let queries: Vec<ProbeQuery> = (0..10)
        .map(|i| ProbeQuery {
            embedding: fresh(&m, &prompts, i),
            gold: vec![i, (i + 5) % 25],
        })
        .collect();
    let f = full.reward_fidelity(&m, &queries, 10).unwrap();
    assert_eq!(f.env_rewards, f.fresh_rewards);
    assert_eq!(f.mean_abs_diff, 0.0);
    if let Some(s) = f.spearman {
        assert!((s - 1.0).abs() < 1e-12);
    }
    let g = never.reward_fidelity(&m, &queries, 10).unwrap();
    assert_eq!(
        g.fresh_rewards, f.fresh_rewards,
        "the fresh side does not depend on the env"
    );
    assert!(
        g.mean_abs_diff > 0.0,
        "a stale index gave the exact rewards: {g:?}"
    );
}

#[test]
fn rank_correlations_by_hand() {
    // Ranks of b: [1, 2, 3.5, 5, 3.5] → ρ = 8/√95; τ-b: C = 8, D = 1, one tie in b → 7/√90.
    let a = [1.0, 2.0, 3.0, 4.0, 5.0];
    let b = [5.0, 6.0, 7.0, 8.0, 7.0];
    assert!((spearman(&a, &b).unwrap() - 8.0 / 95f64.sqrt()).abs() < 1e-12);
    assert!((kendall_tau_b(&a, &b).unwrap() - 7.0 / 90f64.sqrt()).abs() < 1e-12);
    assert!((spearman(&a, &a).unwrap() - 1.0).abs() < 1e-12);
    let rev: Vec<f64> = a.iter().rev().copied().collect();
    assert!((kendall_tau_b(&a, &rev).unwrap() + 1.0).abs() < 1e-12);
    assert_eq!(spearman(&a, &[1.0; 5]), None);
    assert_eq!(kendall_tau_b(&[2.0; 5], &a), None);
    assert_eq!(spearman(&a, &b[..4]), None);
}

#[test]
fn bad_input_is_refused() {
    let m = model(1);
    let err = |r: search_r3_train::Result<RetrievalEnv>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err(RetrievalEnv::new(
        &m,
        vec![],
        0,
        64,
        IndexKind::Exact,
        RefreshPolicy::Full
    ))
    .contains("empty"));
    let zero = RefreshPolicy::Local {
        budget: 0,
        neighbors: 1,
    };
    assert!(err(RetrievalEnv::new(
        &m,
        corpus(3, 1),
        0,
        64,
        IndexKind::Exact,
        zero
    ))
    .contains("never"));
    let mut env = RetrievalEnv::new(
        &m,
        corpus(3, 1),
        0,
        64,
        IndexKind::Exact,
        RefreshPolicy::Full,
    )
    .unwrap();
    assert!(env
        .refresh(&m, &[3])
        .unwrap_err()
        .to_string()
        .contains("outside"));
}

/// The environment's vector for a document is the vector `index`, `eval` and `serve` compute
/// for it: both come from `search_r3_core::embedder::embed_at_token`, so with the same batch
/// budget they are bit-identical (real default model; skipped locally when it is not fetched).
#[test]
fn environment_vectors_equal_the_served_document_vectors() {
    let Some(m) = search_r3_model::known_model_for_tests("smollm2") else {
        return;
    };
    let templates = search_r3_core::templates::Templates::for_arch(m.model.config.arch);
    let mut embedder = search_r3_core::embedder::Embedder::new(m, templates, 64).unwrap();
    let budget = 512;
    embedder.batch_tokens = budget;
    let texts = [
        "Aspirin irreversibly inhibits cyclooxygenase.",
        "The mitochondrion is the powerhouse of the cell, producing most of its ATP.",
        "shutil.rmtree(path) deletes an entire directory tree.",
        "Vitamin D deficiency is associated with an increased risk of fractures in older adults, \
         according to several cohort studies.",
    ];
    let (served, _) = embedder.embed_documents(&texts).unwrap();
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| embedder.document_prompt(t).unwrap().ids)
        .collect();
    let pad = embedder.model.tokenizer.pad_id;
    let env = RetrievalEnv::new(
        &embedder.model.model,
        prompts,
        pad,
        budget,
        IndexKind::Exact,
        RefreshPolicy::Never,
    )
    .unwrap();
    // What a served index holds for those vectors (indexes store their own unit copy).
    let mut index = search_r3_index::ExactIndex::new(embedder.dim()).unwrap();
    for (d, v) in served.iter().enumerate() {
        search_r3_index::VectorIndex::upsert(&mut index, d as u64, v).unwrap();
    }
    for d in 0..texts.len() {
        let want = search_r3_index::VectorIndex::get(&index, d as u64).unwrap();
        assert_eq!(env.stored(d).unwrap(), want, "document {d}");
    }
}
