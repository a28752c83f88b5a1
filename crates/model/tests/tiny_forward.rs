//! The forward pass on tiny random models: the fast and differentiable paths agree (with LoRA
//! active), the KV cache matches a full forward, gradients reach every trainable tensor and no
//! base weight, and autograd matches finite differences in f64.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::max_abs_diff;
use common::tiny::*;
use common::tiny_run::*;
use search_r3_model::fetch::ModelFormat;
use search_r3_model::{Batch, Model, Path};
use std::collections::HashMap;

// ---------------------------------------------------------------------------------------------
// 4. Fast and differentiable paths agree (with LoRA active).
// ---------------------------------------------------------------------------------------------

#[test]
fn fast_and_diff_paths_agree_with_lora() {
    let dir = tmp();
    for (k, spec) in [Spec::llama(), Spec::qwen2(), Spec::qwen3()]
        .iter()
        .enumerate()
    {
        let (gguf, _, _) = write_both(dir.path(), spec, 10 + k as u64);
        let mut m = load(&gguf, ModelFormat::Gguf).model;
        let id = m.embed_token.as_ref().unwrap().id;
        let s = seqs_with_embed(id);
        let base = hidden(&m, &s, Path::Fast);
        m.add_lora(all_targets(2), 7).unwrap();
        // Fresh adapters (B = 0) leave the model unchanged.
        let fresh = hidden(&m, &s, Path::Fast);
        assert_eq!(max_abs_diff(&flat(&base), &flat(&fresh)), 0.0);
        randomize_lora_b(&m, 8);
        let fast = hidden(&m, &s, Path::Fast);
        let diffp = hidden(&m, &s, Path::Diff);
        assert!(
            real_positions_diff(&fast, &base, &s) > 1e-3,
            "{}: LoRA has no effect",
            spec.arch
        );
        let d = real_positions_diff(&fast, &diffp, &s);
        assert!(d <= 1e-5, "{}: Fast vs Diff differ by {d}", spec.arch);
        // The fast path records no autograd graph (it would keep every activation alive);
        // the differentiable one does.
        assert!(
            !fast.track_op(),
            "{}: fast path output tracks a graph",
            spec.arch
        );
        assert!(
            diffp.track_op(),
            "{}: diff path output lost its graph",
            spec.arch
        );
        // lora_enabled = false gives back the base model on both paths.
        m.lora_enabled = false;
        for p in [Path::Fast, Path::Diff] {
            let off = hidden(&m, &s, p);
            let d = real_positions_diff(&off, &base, &s);
            assert!(
                d <= 1e-5,
                "{}: disabled LoRA still changes the output ({d})",
                spec.arch
            );
        }
    }
}

/// Feeding a left-padded batch in pieces through the KV cache gives the hidden states of one
/// full forward call.
#[test]
fn kv_cache_steps_match_full_forward() {
    let dir = tmp();
    for (k, spec) in [Spec::llama(), Spec::qwen2(), Spec::qwen3()]
        .iter()
        .enumerate()
    {
        let (gguf, _, _) = write_both(dir.path(), spec, 15 + k as u64);
        let m = load(&gguf, ModelFormat::Gguf).model;
        let full_seqs = vec![
            vec![1u32, 5, 9, 27, 40, 12, 63, 2],
            vec![3, 60, 44, 7, 50, 8],
        ];
        for path in [Path::Fast, Path::Diff] {
            let full = hidden(&m, &full_seqs, path);
            let t_full = 8;
            // Prefix: all but the last 3 tokens of every row, then one token per step.
            let prefix: Vec<Vec<u32>> = full_seqs
                .iter()
                .map(|s| s[..s.len() - 3].to_vec())
                .collect();
            let first = Batch::left_padded(&prefix, 0).unwrap();
            let mut cache = search_r3_model::KvCache::new();
            let h0 = m.forward(&first, path, Some(&mut cache)).unwrap();
            let mut key_mask = first.key_mask.clone();
            let t0 = first.t;
            // Left padding of the full batch = left padding of the prefix batch (same 3-token
            // suffixes), so position i of the prefix batch is position i of the full batch.
            assert_eq!(t0 + 3, t_full);
            // Padding outputs depend on the key count (their queries see no real key), so only
            // real positions are compared.
            let d = real_positions_diff(&h0, &full.narrow(1, 0, t0).unwrap(), &prefix);
            assert!(d <= 1e-5, "{} {path:?}: prefix differs by {d}", spec.arch);
            for step in 0..3 {
                let ids: Vec<u32> = full_seqs.iter().map(|s| s[s.len() - 3 + step]).collect();
                let positions: Vec<u32> = full_seqs
                    .iter()
                    .map(|s| (s.len() - 3 + step) as u32)
                    .collect();
                let b = full_seqs.len();
                let s_now = t0 + step + 1;
                let mut km = Vec::with_capacity(b * s_now);
                for r in 0..b {
                    km.extend_from_slice(&key_mask[r * (s_now - 1)..(r + 1) * (s_now - 1)]);
                    km.push(true);
                }
                key_mask = km.clone();
                let batch = Batch {
                    b,
                    t: 1,
                    ids,
                    positions,
                    key_mask: km,
                };
                let h = m.forward(&batch, path, Some(&mut cache)).unwrap();
                assert_eq!(cache.len(), s_now);
                for r in 0..b {
                    let a = flat(&Model::pick(&h, r, 0).unwrap());
                    let want = flat(&Model::pick(&full, r, t0 + step).unwrap());
                    let d = max_abs_diff(&a, &want);
                    assert!(
                        d <= 1e-5,
                        "{} {path:?}: step {step} row {r} differs by {d}",
                        spec.arch
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Gradients reach every trainable tensor and no base weight.
// ---------------------------------------------------------------------------------------------

/// `sum(hidden · R) + sum(logits[row 0, last] · R2)`: touches every hidden state and, through
/// the logits, the LM-head row of `<|embed_token|>`.
fn probe_loss(model: &Model, seqs: &[Vec<u32>], seed: u64) -> Tensor {
    let h = hidden(model, seqs, Path::Diff);
    let dt = model.dtype();
    let mut rng = Rng::new(seed);
    let (b, t, d) = h.dims3().unwrap();
    // Padding positions are excluded, as every real loss does: their queries see no key, the
    // -big mask swamps the scores, so their outputs do not depend on the scores at all
    // (a constant function, whose autograd gradient through softmax is not zero).
    let mut r = rng.vec(b * t * d, 1.0);
    for (row, s) in seqs.iter().enumerate() {
        for x in &mut r[row * t * d..(row * t + t - s.len()) * d] {
            *x = 0.0;
        }
    }
    let r = Tensor::from_vec(r, h.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    let last = Model::pick(&h, 0, t - 1).unwrap().unsqueeze(0).unwrap();
    let logits = model.logits(&last).unwrap();
    let r2 = Tensor::from_vec(
        rng.vec(logits.elem_count(), 1.0),
        logits.shape(),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dt)
    .unwrap();
    let a = (h * r).unwrap().sum_all().unwrap();
    let b = (logits * r2).unwrap().sum_all().unwrap();
    (a + b).unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_no_base_weight_does() {
    let dir = tmp();
    for (k, spec) in [Spec::qwen2(), Spec::llama()].iter().enumerate() {
        let (gguf, _, _) = write_both(dir.path(), spec, 20 + k as u64);
        let mut m = load(&gguf, ModelFormat::Gguf).model;
        m.add_lora(all_targets(2), 3).unwrap();
        randomize_lora_b(&m, 4);
        let id = m.embed_token.as_ref().unwrap().id;
        let s = seqs_with_embed(id);
        let loss = probe_loss(&m, &s, 5);
        let grads = loss.backward().unwrap();

        let vars = m.trainable_vars();
        // 2 layers × 7 targets × (A, B) + embed row (+ head row when untied).
        let want = 2 * 7 * 2 + 1 + usize::from(!spec.tied);
        assert_eq!(
            vars.len(),
            want,
            "{}: trainable vars {:?}",
            spec.arch,
            names(&vars)
        );
        if !spec.tied {
            assert!(vars.iter().any(|(n, _)| n == "embed_token.head_row"));
        }
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", spec.arch));
            assert_eq!(g.dims(), v.dims(), "{name}");
            let g = flat(g);
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{}: non-finite gradient for {name}",
                spec.arch
            );
            let mx = g.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            assert!(mx > 0.0, "{}: all-zero gradient for {name}", spec.arch);
        }
        for (name, t) in base_tensors(&m) {
            assert!(
                grads.get(&t).is_none(),
                "{}: base weight {name} received a gradient",
                spec.arch
            );
        }
    }
}

fn names(v: &[(String, Var)]) -> Vec<&str> {
    v.iter().map(|(n, _)| n.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// 6. Finite differences in f64.
// ---------------------------------------------------------------------------------------------

#[test]
fn finite_differences_match_autograd_in_f64() {
    let dir = tmp();
    let spec = Spec::qwen2();
    let (gguf, _, _) = write_both(dir.path(), &spec, 30);
    let m32 = load(&gguf, ModelFormat::Gguf).model;
    let mut m = m32.to_dtype(DType::F64).unwrap();
    assert_eq!(m.dtype(), DType::F64);
    assert!(m.embed_token.is_some());
    m.add_lora(all_targets(2), 31).unwrap();
    randomize_lora_b(&m, 32);
    let mut rng = Rng::new(33);
    let vars: HashMap<String, Var> = m.trainable_vars().into_iter().collect();
    // Move the embed-token rows away from the mean so their gradients are generic.
    for n in ["embed_token.row", "embed_token.head_row"] {
        let v = &vars[n];
        let cur = v.as_tensor().clone();
        let noise = Tensor::from_vec(rng.vec(cur.elem_count(), 0.5), cur.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        v.set(&(cur + noise).unwrap()).unwrap();
    }
    let id = m.embed_token.as_ref().unwrap().id;
    let s = seqs_with_embed(id);
    let loss_val = |m: &Model| probe_loss(m, &s, 34).to_scalar::<f64>().unwrap();

    let loss = probe_loss(&m, &s, 34);
    let grads = loss.backward().unwrap();
    let eps = 1e-5;
    let mut worst = 0.0f64;
    for name in [
        "lora.layers.0.q_proj.lora_a",
        "lora.layers.1.k_proj.lora_a",
        "lora.layers.0.down_proj.lora_b",
        "lora.layers.1.v_proj.lora_b",
        "embed_token.row",
        "embed_token.head_row",
    ] {
        let v = vars.get(name).unwrap_or_else(|| panic!("no var {name}"));
        let g = flat64(
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no grad {name}")),
        );
        let orig = flat64(v.as_tensor());
        for _ in 0..5 {
            let j = rng.below(orig.len());
            let at = |x: f64| {
                let mut d = orig.clone();
                d[j] = x;
                v.set(&Tensor::from_vec(d, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_val(&m)
            };
            let fd = (at(orig[j] + eps) - at(orig[j] - eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(orig.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let ag = g[j];
            let rel = (fd - ag).abs() / fd.abs().max(ag.abs()).max(1e-6);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-4,
                "{name}[{j}]: finite difference {fd:.9e} vs autograd {ag:.9e} (rel {rel:.2e})"
            );
        }
    }
    eprintln!("worst relative error: {worst:.2e}");
}
