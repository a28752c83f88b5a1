//! A stage-2 step on a tiny random model with a word-level tokenizer: every trainable tensor
//! gets a finite, non-zero gradient, the InfoNCE ablation changes only what it should, and on a
//! synthetic retrieval task the mean reward rises within a few GRPO steps.

mod common;

use common::tiny::{closer, tiny_with_lora, tokenizer, Rng, EMBED};
use search_r3_index::IndexKind;
use search_r3_model::{LoraTarget, Model};
use search_r3_train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use search_r3_train::rl::env::{RefreshPolicy, RetrievalEnv};
use search_r3_train::rl::{rl_gradients, rollout, touched_documents, RlQuery, RlStepConfig};

fn model(seed: u64) -> Model {
    tiny_with_lora(seed, &[LoraTarget::Q, LoraTarget::V, LoraTarget::Down], 2)
}

/// `n` documents and `n` queries; query i's gold document is doc i.
fn task(n: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<RlQuery>) {
    let mut rng = Rng::new(seed);
    let docs = (0..n)
        .map(|_| {
            let mut d = rng.tokens(5);
            d.push(EMBED);
            d
        })
        .collect();
    let queries = (0..n)
        .map(|i| RlQuery {
            prompt: rng.tokens(4),
            gold: vec![i],
        })
        .collect();
    (docs, queries)
}

fn config() -> RlStepConfig {
    let mut c = RlStepConfig {
        group_size: 8,
        max_new_tokens: 6,
        nce_negatives: 3,
        touch_top: 3,
        micro_tokens: 256,
        ..RlStepConfig::default()
    };
    c.reward.top_k = 10;
    c.reward.reasoning_budget = 4;
    c
}

#[test]
fn every_trainable_tensor_gets_a_finite_nonzero_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let mut m = model(3);
    // LoRA B starts at zero, which zeroes A's gradient by construction; move it off zero.
    let mut rng = Rng::new(4);
    for (name, v) in m.trainable_vars() {
        if name.ends_with("lora_b") {
            v.set(&rng.tensor(v.dims(), 0.1)).unwrap();
        }
    }
    let (docs, queries) = task(6, 5);
    let env = RetrievalEnv::new(&m, docs, 0, 256, IndexKind::Exact, RefreshPolicy::Full).unwrap();
    let cfg = config();
    let rolls = rollout(&m, &tok, &env, &queries[..3], &closer(), &cfg, 7).unwrap();
    assert_eq!(rolls.len(), 3 * cfg.group_size);
    for r in &rolls {
        assert_eq!(r.tokens.len(), r.logprobs.len());
        assert_eq!(r.emitted, r.tokens.last() == Some(&EMBED));
        assert_eq!(r.sequence.last(), Some(&EMBED));
        // The embedding is what the environment would compute for this sequence.
        let fresh = common::embed_unit(&m, std::slice::from_ref(&r.sequence), 0, 256).unwrap();
        let d = fresh[0]
            .iter()
            .zip(&r.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d < 1e-4,
            "embedding differs from a fresh encoding of its sequence by {d}"
        );
        assert!(
            (r.reward.total - (r.reward.retrieval + r.reward.format + r.reward.length)).abs()
                < 1e-12
        );
        if !r.emitted {
            assert!(r.reward.format <= -cfg.reward.missing_embed_penalty);
        }
    }
    // Group advantages are centred.
    for g in rolls.chunks(cfg.group_size) {
        assert!(g.iter().map(|r| r.advantage).sum::<f64>().abs() < 1e-9);
    }
    let (grads, stats) = rl_gradients(&mut m, &env, &queries[..3], &rolls, &cfg, 0).unwrap();
    assert!(stats.nce.is_some() && stats.loss.is_finite());
    // Sampled with the same weights: every ratio is 1 up to the fast/diff path difference.
    assert!((stats.grpo.ratio - 1.0).abs() < 1e-4, "{stats:?}");
    assert_eq!(stats.grpo.clip_fraction, 0.0);
    for (name, v) in m.trainable_vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(g.iter().any(|x| *x != 0.0), "{name}: zero gradient");
    }
    // Without the InfoNCE term the loss is the GRPO objective alone.
    let off = RlStepConfig {
        lambda_nce: 0.0,
        ..cfg
    };
    let (_, s) = rl_gradients(&mut m, &env, &queries[..3], &rolls, &off, 0).unwrap();
    assert_eq!(s.nce, None);
    assert!(
        (s.loss - (-s.grpo.surrogate + cfg.loss.beta * s.grpo.kl)).abs() < 1e-6,
        "{s:?}"
    );
    assert!(
        m.lora_enabled,
        "the reference pass must restore the adapters"
    );
}

/// The synthetic task: 8 random documents, query i's gold document is doc i; the untrained
/// policy ranks it at random (and never writes `<|embed_token|>` within its 6-token budget, so
/// every trajectory pays both penalties). A few stage-2 steps must raise the mean reward.
#[test]
fn reward_rises_on_a_synthetic_task() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let mut m = model(11);
    let (docs, queries) = task(8, 12);
    let mut env = RetrievalEnv::new(
        &m,
        docs,
        0,
        256,
        IndexKind::Exact,
        RefreshPolicy::Local {
            budget: 4,
            neighbors: 2,
        },
    )
    .unwrap();
    let cfg = config();
    let named = m.trainable_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(named, AdamWConfig::default()).unwrap();
    let (mut rewards, mut retrieval) = (Vec::new(), Vec::new());
    for step in 0..24 {
        let batch = &queries[(step % 2) * 4..(step % 2) * 4 + 4];
        let rolls = rollout(&m, &tok, &env, batch, &closer(), &cfg, 100 + step as u64).unwrap();
        let (mut grads, stats) = rl_gradients(&mut m, &env, batch, &rolls, &cfg, 0).unwrap();
        rewards.push(stats.reward);
        retrieval.push(stats.retrieval);
        clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        opt.step(&grads, 2e-2).unwrap();
        env.refresh(&m, &touched_documents(batch, &rolls, cfg.touch_top))
            .unwrap();
    }
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    // Measured: reward −0.55 → −0.25, retrieval 0.45 → 0.75 (first vs last 4 steps). The
    // tiny policy never samples the embed token in 6 tokens, so the rise is the retrieval
    // part; the format part needs a policy that emits it at least sometimes.
    let (first, last) = (mean(&rewards[..4]), mean(&rewards[20..]));
    assert!(
        last > first + 0.2,
        "mean reward {first:.3} → {last:.3} over 24 steps: {rewards:?}"
    );
    let (first, last) = (mean(&retrieval[..4]), mean(&retrieval[20..]));
    assert!(
        last > first + 0.2,
        "mean retrieval reward {first:.3} → {last:.3}: {retrieval:?}"
    );
}
