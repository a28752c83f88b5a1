//! Helpers shared by the integration tests: seeded random inputs and a finite-difference
//! gradient check in f64.
#![allow(dead_code)]

pub mod tiny;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A seeded generator, so every failure reproduces.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`.
pub fn uniform(rng: &mut StdRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// An f64 var of the given shape.
pub fn var_f64(data: Vec<f64>, shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
}

/// A plain f64 tensor.
pub fn t_f64(data: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Scalar value of a tensor as f64.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Flat f64 contents.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Compares autograd with central finite differences for every element of every input.
///
/// `f` maps the inputs to a scalar loss; it is called once on the vars (for autograd) and
/// then on perturbed plain tensors. The check is `|fd − ad| ≤ 1e-4·max(|fd|, |ad|) + 1e-8`:
/// relative 1e-4 where the gradient is sizeable, with an absolute floor for entries whose
/// true gradient is ~0 (there the finite difference is rounding noise of order ε/h).
/// Returns the largest relative error seen, for the test's message.
pub fn grad_check<F>(inputs: &[Var], f: F) -> f64
where
    F: Fn(&[Tensor]) -> Tensor,
{
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = f(&tensors);
    let grads = loss.backward().unwrap();
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for (k, var) in inputs.iter().enumerate() {
        let base = flat(var.as_tensor());
        let ad = grads
            .get(var)
            .map(flat)
            .unwrap_or_else(|| vec![0.0; base.len()]);
        for e in 0..base.len() {
            let eval = |delta: f64| {
                let mut data = base.clone();
                data[e] += delta;
                let mut xs = tensors.clone();
                xs[k] = t_f64(data, var.dims());
                scalar(&f(&xs))
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let err = (fd - ad[e]).abs();
            let size = fd.abs().max(ad[e].abs());
            assert!(
                err <= 1e-4 * size + 1e-8,
                "input {k} element {e}: finite difference {fd} vs autograd {}",
                ad[e]
            );
            if size > 1e-6 {
                worst = worst.max(err / size);
            }
        }
    }
    worst
}

/// Asserts that every var received a gradient that is finite everywhere and not all zero.
pub fn assert_live_grads(grads: &candle_core::backprop::GradStore, vars: &[(&str, &Var)]) {
    for (name, var) in vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("`{name}` received no gradient"));
        let g = flat(g);
        assert!(
            g.iter().all(|x| x.is_finite()),
            "`{name}` has a non-finite gradient: {g:?}"
        );
        assert!(
            g.iter().any(|x| *x != 0.0),
            "`{name}` has an all-zero gradient"
        );
    }
}

pub fn trainable(model: &search_r3_model::Model) -> Vec<(String, Vec<f32>)> {
    model
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Every trainable tensor of `a` and `b` agrees to 1e-6.
pub fn assert_same_trainable(a: &search_r3_model::Model, b: &search_r3_model::Model) {
    let (ta, tb) = (trainable(a), trainable(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let diff = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{na}: max diff {diff}");
    }
}

/// metrics.jsonl without the wall-clock field.
pub fn metric_lines(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// Unit-norm embeddings at each prompt's last token, by the one embedding function the
/// system uses everywhere (`search_r3_core::embedder::embed_at_token`).
pub fn embed_unit(
    model: &search_r3_model::Model,
    seqs: &[Vec<u32>],
    pad_id: u32,
    budget: usize,
) -> search_r3_train::Result<Vec<Vec<f32>>> {
    let raw = search_r3_core::embedder::embed_at_token(
        model,
        seqs,
        pad_id,
        budget,
        search_r3_model::Cancel::NEVER,
    )
    .map_err(|e| search_r3_train::Error::Invalid(e.to_string()))?;
    Ok(raw.into_iter().map(search_r3_index::l2_normalize).collect())
}
