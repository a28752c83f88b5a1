//! Stage-1 step with gradient caching (`sft_gradients`) on tiny random models built in memory:
//! it must equal the one-graph gradient, reach every trainable var, and be able to overfit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny::{tiny_base, Rng, ASSISTANT, EMBED};
use search_r3_model::{Batch, LoraConfig, LoraTarget, Model, Path};
use search_r3_train::losses::{cross_entropy, info_nce, kl_to_reference, triplet, SftLossConfig};
use search_r3_train::optim::{AdamW, AdamWConfig};
use search_r3_train::sft::{sft_gradients, SftBatch, SftExample};
use std::time::Instant;

/// 2 blocks, d=32, 4 heads / 2 KV heads of width 8, ff=64, 64 tokens + `<|embed_token|>`,
/// LoRA r=4 on q, v, down with B perturbed away from zero when `perturb_b`.
fn tiny_model(seed: u64, perturb_b: bool) -> Model {
    let mut rng = Rng::new(seed);
    let mut model = tiny_base(&mut rng);
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down],
    };
    model.add_lora(lora, seed ^ 0x5eed).unwrap();
    if perturb_b {
        for (name, var) in model.trainable_vars() {
            if name.ends_with("lora_b") {
                var.set(&rng.tensor(var.dims(), 0.2)).unwrap();
            }
        }
    }
    model
}

/// A query prompt: `prefix` tokens, then the assistant span `The embedding is <|embed|>`.
fn query(prefix: Vec<u32>) -> (Vec<u32>, usize) {
    let start = prefix.len();
    let mut q = prefix;
    q.extend(ASSISTANT);
    q.push(EMBED);
    (q, start)
}

fn doc(mut body: Vec<u32>) -> Vec<u32> {
    body.push(EMBED);
    body
}

/// 4 queries of different lengths, 6 docs: doc i is query i's positive, docs 4 and 5 are hard
/// negatives of queries 0 and 2; query 0 also lists doc 1 (query 1's positive) as relevant.
fn small_batch(seed: u64) -> SftBatch {
    let mut rng = Rng::new(seed);
    let examples = (0..4)
        .map(|i| {
            let (q, start) = query(rng.tokens(3 + 2 * i));
            SftExample {
                query: q,
                assistant_start: start,
                positives: if i == 0 { vec![0, 1] } else { vec![i] },
                negative: match i {
                    0 => Some(4),
                    2 => Some(5),
                    _ => None,
                },
            }
        })
        .collect();
    let docs = (0..6).map(|j| doc(rng.tokens(4 + j % 3))).collect();
    SftBatch {
        examples,
        docs,
        pad_id: 0,
        frozen_docs: None,
    }
}

fn last_rows(hidden: &Tensor, seqs: &[Vec<u32>]) -> Tensor {
    let (b, t, d) = hidden.dims3().unwrap();
    let idx: Vec<u32> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| (i * t + s.len() - 1) as u32)
        .collect();
    let idx = Tensor::from_vec(idx, seqs.len(), &Device::Cpu).unwrap();
    hidden
        .reshape((b * t, d))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap()
}

/// The stage-1 loss of the whole batch in one differentiable graph, written independently of
/// `sft_gradients` (full `[b, t, v]` logits, dense masks).
fn one_graph_loss(model: &mut Model, batch: &SftBatch, cfg: &SftLossConfig) -> Tensor {
    let dev = Device::Cpu;
    let qs: Vec<Vec<u32>> = batch.examples.iter().map(|e| e.query.clone()).collect();
    let qb = Batch::right_padded(&qs, batch.pad_id).unwrap();
    let hidden = model.forward(&qb, Path::Diff, None).unwrap();
    let q = last_rows(&hidden, &qs);
    let (b, t) = (qb.b, qb.t);
    let mut targets = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for (i, e) in batch.examples.iter().enumerate() {
        for j in e.assistant_start - 1..e.query.len() - 1 {
            targets[i * t + j] = e.query[j + 1];
            mask[i * t + j] = 1.0;
        }
    }
    let targets = Tensor::from_vec(targets, (b, t), &dev).unwrap();
    let mask = Tensor::from_vec(mask, (b, t), &dev).unwrap();
    let logits = model.logits(&hidden).unwrap();
    model.lora_enabled = false;
    let ref_hidden = model.forward(&qb, Path::Fast, None).unwrap();
    let ref_logits = model.logits(&ref_hidden).unwrap().detach();
    model.lora_enabled = true;
    let ce = cross_entropy(&logits, &targets, &mask).unwrap();
    let kl = kl_to_reference(&logits, &ref_logits, &mask).unwrap();

    let docs = match &batch.frozen_docs {
        Some(t) => t.clone(),
        None => {
            let db = Batch::right_padded(&batch.docs, batch.pad_id).unwrap();
            last_rows(&model.forward(&db, Path::Diff, None).unwrap(), &batch.docs)
        }
    };
    let n = docs.dim(0).unwrap();
    let mut keep = vec![1f32; b * n];
    for (i, e) in batch.examples.iter().enumerate() {
        for &p in &e.positives[1..] {
            keep[i * n + p] = 0.0;
        }
    }
    let keep = Tensor::from_vec(keep, (b, n), &dev).unwrap();
    let pos: Vec<usize> = batch.examples.iter().map(|e| e.positives[0]).collect();
    let nce = info_nce(&q, &docs, &pos, cfg.tau, Some(&keep)).unwrap();
    let (mut qi, mut pi, mut ni) = (vec![], vec![], vec![]);
    for (i, e) in batch.examples.iter().enumerate() {
        if let Some(neg) = e.negative {
            qi.push(i as u32);
            pi.push(e.positives[0] as u32);
            ni.push(neg as u32);
        }
    }
    let sel = |x: &Tensor, idx: &[u32]| {
        x.index_select(&Tensor::from_slice(idx, idx.len(), &dev).unwrap(), 0)
            .unwrap()
    };
    let tri = triplet(&sel(&q, &qi), &sel(&docs, &pi), &sel(&docs, &ni), cfg.theta).unwrap();
    cfg.combine(Some(&ce), Some(&kl), Some(&nce), Some(&tri))
        .unwrap()
        .0
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn gradcache_equals_one_graph() {
    let mut model = tiny_model(7, true);
    let batch = small_batch(11);
    let cfg = SftLossConfig::default();
    let start = Instant::now();
    // 24 padded tokens: the 4 queries (7..13 tokens) and 6 docs (5..7 tokens) are split into
    // several micro-batches each.
    let out = sft_gradients(&mut model, &batch, &cfg, 24).unwrap();
    let cached_time = start.elapsed();
    assert!(model.lora_enabled, "reference flag restored");
    let terms = out.terms;
    assert!(terms.is_finite(), "{terms:?}");
    assert!(terms.tri.unwrap() > 0.0, "triplet active: {terms:?}");

    let loss = one_graph_loss(&mut model, &batch, &cfg);
    let full = loss.backward().unwrap();
    let full_total = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (full_total - terms.total).abs() <= 1e-4 * full_total.abs(),
        "total {} vs one-graph {full_total}",
        terms.total
    );

    let vars = model.trainable_vars();
    assert_eq!(vars.len(), 1 + 2 * 3 * 2); // embed row + 2 layers × 3 targets × (A, B)
    let mut worst = 0f64;
    for (name, var) in &vars {
        let g = out
            .grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient from sft_gradients"));
        let r = full
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no one-graph gradient"));
        let (gn, rn) = (norm(g), norm(r));
        assert!(gn.is_finite() && gn > 0.0, "{name}: gradient norm {gn}");
        let rel = norm(&(g - r).unwrap()) / rn;
        worst = worst.max(rel);
        assert!(
            rel <= 1e-4,
            "{name}: relative difference {rel:e} (|g|={gn:e})"
        );
    }
    let w = &model.weights;
    for base in [
        &w.embed,
        &w.norm,
        &w.layers[0].wqkv_t,
        &w.layers[1].w_down_t,
    ] {
        assert!(
            out.grads.get(base).is_none(),
            "a base weight got a gradient"
        );
    }
    eprintln!(
        "gradcache vs one-graph: {} vars, worst relative difference {worst:.2e}, total {:.6} vs {full_total:.6}, terms {terms:?}, gradcache step {:?}",
        vars.len(),
        terms.total,
        cached_time
    );
}

/// Frozen document vectors (a query tower against a fixed index) are constants of the loss:
/// the gradient equals the one-graph gradient with those vectors as constants, and differs
/// from the gradient that also trains the document encodings.
#[test]
fn frozen_documents_are_constants_of_the_loss() {
    let mut model = tiny_model(7, true);
    let trained = small_batch(11);
    let db = Batch::right_padded(&trained.docs, 0).unwrap();
    let fixed = last_rows(
        &model.forward(&db, Path::Fast, None).unwrap(),
        &trained.docs,
    );
    let frozen = SftBatch {
        docs: vec![],
        frozen_docs: Some(fixed.detach()),
        ..trained.clone()
    };
    let cfg = SftLossConfig::default();
    let out = sft_gradients(&mut model, &frozen, &cfg, 24).unwrap();
    let loss = one_graph_loss(&mut model, &frozen, &cfg);
    let full = loss.backward().unwrap();
    let with_docs = sft_gradients(&mut model, &trained, &cfg, 24).unwrap();
    // Same vectors, so the same loss value; only the gradient's document half is gone.
    assert!(
        (out.terms.total - with_docs.terms.total).abs() < 1e-4,
        "{:?}",
        out.terms
    );
    let mut moved = 0f64;
    for (name, var) in &model.trainable_vars() {
        let g = out
            .grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let r = full.get(var).unwrap();
        let rel = norm(&(g - r).unwrap()) / norm(r);
        assert!(rel <= 1e-4, "{name}: relative difference {rel:e}");
        let w = with_docs.grads.get(var).unwrap();
        moved = moved.max(norm(&(g - w).unwrap()) / norm(w));
    }
    assert!(
        moved > 1e-3,
        "frozen documents changed no gradient ({moved:e})"
    );
    // Prompts and frozen vectors together are refused.
    let both = SftBatch {
        frozen_docs: Some(fixed),
        ..trained
    };
    let err = sft_gradients(&mut model, &both, &cfg, 24)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not both"), "{err}");
}

/// The assistant span equals the base model's when the adapters are a no-op (B = 0), so the KL
/// term is 0 (up to the ~1e-5 difference between the fast reference and the differentiable
/// policy forward); CE alone is positive.
#[test]
fn kl_is_zero_with_zero_lora_b() {
    let mut model = tiny_model(3, false);
    let batch = small_batch(5);
    let cfg = SftLossConfig {
        lambda_ce: 1.0,
        lambda_kl: 1.0,
        lambda_nce: 0.0,
        lambda_tri: 0.0,
        ..SftLossConfig::default()
    };
    let out = sft_gradients(&mut model, &batch, &cfg, 16).unwrap();
    let kl = out.terms.kl.unwrap();
    let ce = out.terms.ce.unwrap();
    eprintln!("B = 0: kl {kl:e}, ce {ce}");
    assert!(kl.abs() < 1e-7, "kl {kl}");
    assert!(ce > 0.0 && ce.is_finite());
    assert!(out.terms.nce.is_none() && out.terms.tri.is_none());
    // With B = 0 the CE gradient reaches B and the embed-token row (A waits for B to move).
    let vars = model.trainable_vars();
    for (name, var) in &vars {
        if name.ends_with("lora_b") || name.starts_with("embed_token") {
            let g = out.grads.get(var).unwrap();
            assert!(norm(g) > 0.0, "{name}");
        }
    }
}

fn cosine_ranks_positive_first(model: &Model, batch: &SftBatch) -> (bool, f64) {
    let qs: Vec<Vec<u32>> = batch.examples.iter().map(|e| e.query.clone()).collect();
    let enc = |seqs: &[Vec<u32>]| {
        let b = Batch::right_padded(seqs, 0).unwrap();
        last_rows(&model.forward(&b, Path::Fast, None).unwrap(), seqs)
    };
    let (q, d) = (enc(&qs), enc(&batch.docs));
    let pos: Vec<usize> = batch.examples.iter().map(|e| e.positives[0]).collect();
    let nce = info_nce(&q, &d, &pos, 0.05, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let unit = |x: &Tensor| {
        x.broadcast_div(&x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
            .unwrap()
    };
    let sim = unit(&q)
        .matmul(&unit(&d).t().unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let all_first = sim
        .iter()
        .zip(&pos)
        .all(|(row, &p)| row.iter().enumerate().all(|(j, &s)| j == p || s < row[p]));
    (all_first, nce)
}

#[test]
fn overfits_eight_examples() {
    let mut model = tiny_model(21, false);
    let mut rng = Rng::new(99);
    let examples = (0..8)
        .map(|i| {
            let (q, start) = query(rng.tokens(6));
            SftExample {
                query: q,
                assistant_start: start,
                positives: vec![i],
                negative: Some(8 + i),
            }
        })
        .collect();
    let docs = (0..16).map(|_| doc(rng.tokens(6))).collect();
    let batch = SftBatch {
        examples,
        docs,
        pad_id: 0,
        frozen_docs: None,
    };
    let cfg = SftLossConfig::default();
    let mut opt = AdamW::new(model.trainable_vars(), AdamWConfig::default()).unwrap();
    let start = Instant::now();
    let mut history = Vec::new();
    for step in 0..150 {
        let o = sft_gradients(&mut model, &batch, &cfg, 40).unwrap();
        assert!(o.terms.is_finite(), "step {step}: {:?}", o.terms);
        history.push(o.terms);
        opt.step(&o.grads, 1e-2).unwrap();
        if o.terms.nce.unwrap() < 0.01 {
            break;
        }
    }
    let (steps, first, last) = (history.len(), history[0], history[history.len() - 1]);
    let (ranked, nce) = cosine_ranks_positive_first(&model, &batch);
    eprintln!(
        "overfit: {steps} steps in {:?}; first {first:?}; last {last:?}; final InfoNCE {nce:.4}, positives first: {ranked}",
        start.elapsed()
    );
    assert!(nce < 0.05, "final InfoNCE {nce}");
    assert!(ranked, "some query does not rank its positive first");
}

/// The micro-batch budget changes memory, not the result: one sequence per micro-batch and
/// everything in one micro-batch give the same gradients.
#[test]
fn micro_batch_budget_does_not_change_gradients() {
    let batch = small_batch(13);
    let cfg = SftLossConfig::default();
    let mut model = tiny_model(17, true);
    let one = sft_gradients(&mut model, &batch, &cfg, 1).unwrap();
    let all = sft_gradients(&mut model, &batch, &cfg, 100_000).unwrap();
    assert!((one.terms.total - all.terms.total).abs() < 1e-5 * all.terms.total.abs());
    for (name, var) in model.trainable_vars() {
        let (a, b) = (one.grads.get(&var).unwrap(), all.grads.get(&var).unwrap());
        let rel = norm(&(a - b).unwrap()) / norm(b);
        assert!(rel < 1e-5, "{name}: {rel:e}");
    }
}

#[test]
fn rejects_bad_batches() {
    let mut model = tiny_model(1, false);
    let cfg = SftLossConfig::default();
    let good = small_batch(2);
    let check = |batch: SftBatch, needle: &str, model: &mut Model| {
        let e = sft_gradients(model, &batch, &cfg, 64)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
        assert!(model.lora_enabled);
    };
    let mut b = good.clone();
    b.docs[2].pop(); // truncated: no embed token at the end
    check(b, "not <|embed_token|>", &mut model);
    let mut b = good.clone();
    b.examples[1].positives = vec![];
    check(b, "no positive", &mut model);
    let mut b = good.clone();
    b.examples[1].positives = vec![6];
    check(b, "out of range", &mut model);
    let mut b = good.clone();
    b.examples[0].negative = Some(1);
    check(b, "both a positive and the hard negative", &mut model);
    let mut b = good.clone();
    b.examples[3].assistant_start = b.examples[3].query.len();
    check(b, "assistant_start", &mut model);
    let e = sft_gradients(&mut model, &good, &cfg, 0).unwrap_err();
    assert!(e.to_string().contains("micro_tokens"), "{e}");
}
