//! Loss terms against hand-computed values, their edge cases, and autograd against finite
//! differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use search_r3_train::losses::MIN_TAU;
use search_r3_train::losses::{
    cross_entropy, info_nce, kl_k3, kl_to_reference, token_log_probs, triplet, SftLossConfig,
};
use search_r3_train::Error;

const SQRT_HALF: f64 = std::f64::consts::FRAC_1_SQRT_2;

fn lse(xs: &[f64]) -> f64 {
    xs.iter().map(|x| x.exp()).sum::<f64>().ln()
}

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b} (tolerance {tol})");
}

fn u32s(data: Vec<u32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(Error::Invalid(msg)) => {
            assert!(msg.contains(needle), "message `{msg}` lacks `{needle}`")
        }
        other => panic!("expected Invalid containing `{needle}`, got {other:?}"),
    }
}

// ---------------------------------------------------------------- cross-entropy

/// Two sequences × two positions, vocabulary 3; position (0, 1) is masked out and carries a
/// garbage id and NaN logits.
fn ce_case() -> (Var, Tensor, Tensor) {
    let logits = var_f64(
        vec![
            1.0,
            2.0,
            3.0, //
            f64::NAN,
            f64::NAN,
            f64::NAN, //
            0.5,
            -1.0,
            0.0, //
            2.0,
            2.0,
            -3.0,
        ],
        &[2, 2, 3],
    );
    let targets = u32s(vec![2, 999, 0, 1], &[2, 2]);
    let mask = t_f64(vec![1.0, 0.0, 1.0, 1.0], &[2, 2]);
    (logits, targets, mask)
}

#[test]
fn cross_entropy_matches_hand_values_and_ignores_masked_positions() {
    let (logits, targets, mask) = ce_case();
    let loss = cross_entropy(&logits, &targets, &mask).unwrap();
    // −log softmax(z)[y] = lse(z) − z_y for the three unmasked tokens, then their mean.
    let nll00 = lse(&[1.0, 2.0, 3.0]) - 3.0;
    let nll10 = lse(&[0.5, -1.0, 0.0]) - 0.5;
    let nll11 = lse(&[2.0, 2.0, -3.0]) - 2.0;
    close(scalar(&loss), (nll00 + nll10 + nll11) / 3.0, 1e-12);

    // The NaN row must receive an exactly-zero gradient (not NaN), the others a live one.
    let grads = loss.backward().unwrap();
    let g = flat(grads.get(&logits).unwrap());
    assert!(
        g[3..6].iter().all(|x| *x == 0.0),
        "masked row gradient {:?}",
        &g[3..6]
    );
    assert!(g.iter().all(|x| x.is_finite()));
    // d/dz (lse(z) − z_y) = softmax(z) − onehot(y), divided by the 3 tokens.
    let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
    let s: f64 = e.iter().sum();
    close(g[0], e[0] / s / 3.0, 1e-12);
    close(g[2], (e[2] / s - 1.0) / 3.0, 1e-12);
}

#[test]
fn cross_entropy_weights_tokens_by_mask_value() {
    let logits = t_f64(vec![0.0, 1.0, 1.0, 0.0], &[1, 2, 2]);
    let targets = u32s(vec![0, 0], &[1, 2]);
    let mask = t_f64(vec![3.0, 1.0], &[1, 2]);
    let loss = scalar(&cross_entropy(&logits, &targets, &mask).unwrap());
    let a = lse(&[0.0, 1.0]) - 0.0;
    let b = lse(&[1.0, 0.0]) - 1.0;
    close(loss, (3.0 * a + b) / 4.0, 1e-12);
}

#[test]
fn cross_entropy_rejects_bad_inputs() {
    let (logits, targets, mask) = ce_case();
    // An out-of-vocabulary id *under* the mask is an error (it would be a tokenizer bug).
    let bad = u32s(vec![3, 0, 0, 1], &[2, 2]);
    is_invalid(
        cross_entropy(&logits, &bad, &mask),
        "outside the vocabulary",
    );
    is_invalid(
        cross_entropy(&logits, &targets, &t_f64(vec![0.0; 4], &[2, 2])),
        "selects no token",
    );
    is_invalid(
        cross_entropy(&logits, &targets, &t_f64(vec![1.0; 2], &[1, 2])),
        "mask has shape",
    );
    is_invalid(
        cross_entropy(
            &logits,
            &targets,
            &t_f64(vec![1.0, -1.0, 1.0, 1.0], &[2, 2]),
        ),
        ">= 0",
    );
    is_invalid(
        cross_entropy(&logits, &targets.to_dtype(DType::F64).unwrap(), &mask),
        "u32",
    );
    is_invalid(
        cross_entropy(&logits, &u32s(vec![0; 2], &[1, 2]), &mask),
        "targets have shape",
    );
    is_invalid(
        cross_entropy(&t_f64(vec![0.0; 4], &[2, 2]), &targets, &mask),
        "[batch, seq, vocab]",
    );
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let mut r = rng(1);
    let logits = var_f64(uniform(&mut r, 2 * 3 * 5, 2.0), &[2, 3, 5]);
    let targets = u32s(vec![4, 0, 2, 1, 3, 77], &[2, 3]);
    let mask = t_f64(vec![1.0, 1.0, 0.5, 0.0, 1.0, 0.0], &[2, 3]);
    let worst = grad_check(&[logits], |x| {
        cross_entropy(&x[0], &targets, &mask).unwrap()
    });
    eprintln!("worst relative error {worst:.2e}");
    assert!(worst <= 1e-4, "worst relative error {worst}");
}

#[test]
fn token_log_probs_gathers_log_softmax() {
    let logits = t_f64(vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[1, 2, 3]);
    let targets = u32s(vec![1, 2], &[1, 2]);
    let lp = flat(&token_log_probs(&logits, &targets).unwrap());
    close(lp[0], 2.0 - lse(&[1.0, 2.0, 3.0]), 1e-12);
    close(lp[1], -(3f64.ln()), 1e-12);
    is_invalid(
        token_log_probs(&logits, &u32s(vec![1, 3], &[1, 2])),
        "outside the vocabulary",
    );
}

// ---------------------------------------------------------------- KL

#[test]
fn kl_matches_hand_value() {
    // p = softmax(0, ln 2) = (1/3, 2/3); q = softmax(0, 0) = (1/2, 1/2).
    let logits = t_f64(vec![0.0, 2f64.ln(), 9.0, 9.0], &[1, 2, 2]);
    let reference = t_f64(vec![0.0, 0.0, -4.0, 1.0], &[1, 2, 2]);
    let mask = t_f64(vec![1.0, 0.0], &[1, 2]);
    let kl = scalar(&kl_to_reference(&logits, &reference, &mask).unwrap());
    let expected =
        (1.0 / 3.0) * ((1.0 / 3.0) / 0.5f64).ln() + (2.0 / 3.0) * ((2.0 / 3.0) / 0.5f64).ln();
    close(kl, expected, 1e-12);
}

#[test]
fn kl_is_exactly_zero_with_vanishing_gradient_when_logits_equal() {
    let mut r = rng(2);
    let data = uniform(&mut r, 2 * 3 * 7, 3.0);
    let logits = var_f64(data.clone(), &[2, 3, 7]);
    let reference = var_f64(data, &[2, 3, 7]);
    let mask = t_f64(vec![1.0, 1.0, 0.0, 1.0, 0.0, 1.0], &[2, 3]);
    let kl = kl_to_reference(&logits, &reference, &mask).unwrap();
    assert_eq!(scalar(&kl), 0.0);
    let grads = kl.backward().unwrap();
    // Analytically p ⊙ (0 − 0) = 0; numerically p − p·Σp, i.e. f64 rounding.
    let g = flat(grads.get(&logits).unwrap());
    assert!(g.iter().all(|x| x.abs() < 1e-15), "gradient {g:?}");
    assert!(
        grads.get(&reference).is_none(),
        "the reference must be detached"
    );

    // Same tensor on both sides, and f32: still exactly zero.
    let f32_logits = logits.as_tensor().to_dtype(DType::F32).unwrap();
    let kl32 = kl_to_reference(&f32_logits, &f32_logits, &mask).unwrap();
    assert_eq!(scalar(&kl32), 0.0);
}

#[test]
fn kl_gradient_matches_finite_differences_and_reaches_only_the_policy() {
    let mut r = rng(3);
    let logits = var_f64(uniform(&mut r, 2 * 2 * 6, 2.0), &[2, 2, 6]);
    let reference = var_f64(uniform(&mut r, 2 * 2 * 6, 2.0), &[2, 2, 6]);
    let mask = t_f64(vec![1.0, 0.0, 1.0, 1.0], &[2, 2]);
    let worst = grad_check(std::slice::from_ref(&logits), |x| {
        kl_to_reference(&x[0], &reference, &mask).unwrap()
    });
    eprintln!("worst relative error {worst:.2e}");
    assert!(worst <= 1e-4, "worst relative error {worst}");

    let kl = kl_to_reference(&logits, &reference, &mask).unwrap();
    assert!(scalar(&kl) > 0.0);
    let grads = kl.backward().unwrap();
    assert_live_grads(&grads, &[("logits", &logits)]);
    assert!(grads.get(&reference).is_none());
}

#[test]
fn kl_k3_matches_hand_values() {
    // r = ln 0.25 − ln 0.5 = −ln 2 → e^r − r − 1 = 0.5 + ln 2 − 1;
    // r = ln 0.5 − ln 0.25 = ln 2 → 2 − ln 2 − 1; the third token is masked and −inf.
    let logp = t_f64(vec![0.5f64.ln(), 0.25f64.ln(), f64::NEG_INFINITY], &[1, 3]);
    let ref_logp = t_f64(vec![0.25f64.ln(), 0.5f64.ln(), f64::NEG_INFINITY], &[1, 3]);
    let mask = t_f64(vec![1.0, 1.0, 0.0], &[1, 3]);
    let k3 = scalar(&kl_k3(&logp, &ref_logp, &mask).unwrap());
    let ln2 = 2f64.ln();
    close(k3, ((0.5 + ln2 - 1.0) + (2.0 - ln2 - 1.0)) / 2.0, 1e-12);

    // Equal log-probs: exactly 0, and d/dlogp (e^r − r − 1) = 1 − e^r = 0 exactly.
    let lp = var_f64(vec![-0.3, -2.0, -1.1], &[1, 3]);
    let k = kl_k3(&lp, &lp.as_tensor().clone(), &t_f64(vec![1.0; 3], &[1, 3])).unwrap();
    assert_eq!(scalar(&k), 0.0);
    let g = flat(k.backward().unwrap().get(&lp).unwrap());
    assert!(g.iter().all(|x| *x == 0.0), "{g:?}");
}

#[test]
fn kl_k3_gradient_is_finite_with_masked_infinities() {
    let logp = var_f64(vec![-0.7, f64::NEG_INFINITY, -1.9, -0.2], &[2, 2]);
    let ref_logp = var_f64(vec![-1.0, f64::NEG_INFINITY, -0.5, -0.2], &[2, 2]);
    let mask = t_f64(vec![1.0, 0.0, 1.0, 1.0], &[2, 2]);
    let k = kl_k3(&logp, &ref_logp, &mask).unwrap();
    assert!(scalar(&k).is_finite());
    let grads = k.backward().unwrap();
    let g = flat(grads.get(&logp).unwrap());
    assert!(g.iter().all(|x| x.is_finite()), "{g:?}");
    assert_eq!(g[1], 0.0);
    assert!(grads.get(&ref_logp).is_none(), "ref_logp must be detached");

    let mut r = rng(4);
    let lp = var_f64(
        uniform(&mut r, 6, 1.0).iter().map(|x| x - 1.5).collect(),
        &[2, 3],
    );
    let rl = t_f64(
        uniform(&mut r, 6, 1.0).iter().map(|x| x - 1.5).collect(),
        &[2, 3],
    );
    let m = t_f64(vec![1.0, 1.0, 0.0, 1.0, 2.0, 1.0], &[2, 3]);
    let worst = grad_check(&[lp], |x| kl_k3(&x[0], &rl, &m).unwrap());
    eprintln!("worst relative error {worst:.2e}");
    assert!(worst <= 1e-4, "worst relative error {worst}");
}

// ---------------------------------------------------------------- InfoNCE

/// Two queries × three documents in 2-D, deliberately not unit length:
/// q0 = (1, 0), q1 = (0, 2); d0 = (1, 1), d1 = (0, 3), d2 = (−1, 0).
/// cos(q0, ·) = (1/√2, 0, −1), cos(q1, ·) = (1/√2, 1, 0). Positives: q0 → d0, q1 → d1.
fn nce_case() -> (Var, Var) {
    let q = var_f64(vec![1.0, 0.0, 0.0, 2.0], &[2, 2]);
    let docs = var_f64(vec![1.0, 1.0, 0.0, 3.0, -1.0, 0.0], &[3, 2]);
    (q, docs)
}

#[test]
fn info_nce_matches_hand_value() {
    let (q, docs) = nce_case();
    let tau = 0.5;
    let loss = scalar(&info_nce(&q, &docs, &[0, 1], tau, None).unwrap());
    // −log(e^{s+/τ} / Σ e^{s_j/τ}) = lse(s/τ) − s+/τ.
    let l0 = lse(&[SQRT_HALF / tau, 0.0, -1.0 / tau]) - SQRT_HALF / tau;
    let l1 = lse(&[SQRT_HALF / tau, 1.0 / tau, 0.0]) - 1.0 / tau;
    close(loss, (l0 + l1) / 2.0, 1e-12);
}

#[test]
fn info_nce_mask_removes_false_negatives_but_never_the_positive() {
    let (q, docs) = nce_case();
    let tau = 0.5;
    // Exclude d0 from q1 (a false negative), and try to exclude q0's own positive: ignored.
    let mask = t_f64(vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0], &[2, 3]);
    let loss = info_nce(&q, &docs, &[0, 1], tau, Some(&mask)).unwrap();
    let l0 = lse(&[SQRT_HALF / tau, 0.0, -1.0 / tau]) - SQRT_HALF / tau;
    let l1 = lse(&[1.0 / tau, 0.0]) - 1.0 / tau;
    close(scalar(&loss), (l0 + l1) / 2.0, 1e-12);
    let grads = loss.backward().unwrap();
    assert_live_grads(&grads, &[("q", &q), ("docs", &docs)]);
}

#[test]
fn info_nce_tau_edges() {
    let (q, docs) = nce_case();
    for tau in [0.0, -0.1, f64::NAN, f64::INFINITY, MIN_TAU / 2.0] {
        is_invalid(info_nce(&q, &docs, &[0, 1], tau, None), "tau");
    }
    // Tiny τ in f32: plain exp would overflow at cos/τ = 1e6; log-sum-exp stays finite and
    // tends to the hard margin max_j(s_j) − s+ per query, here (0 + (1 − 1)) / τ … i.e. q0's
    // positive is its best match (loss → 0) and so is q1's.
    let q32 = q.as_tensor().to_dtype(DType::F32).unwrap();
    let d32 = docs.as_tensor().to_dtype(DType::F32).unwrap();
    let qv = Var::from_tensor(&q32).unwrap();
    let dv = Var::from_tensor(&d32).unwrap();
    for tau in [1e-3, 1e-6, MIN_TAU] {
        let loss = info_nce(&qv, &dv, &[0, 1], tau, None).unwrap();
        let v = scalar(&loss);
        assert!((0.0..1e-6).contains(&v), "tau {tau}: loss {v}");
        let grads = loss.backward().unwrap();
        for g in [grads.get(&qv).unwrap(), grads.get(&dv).unwrap()] {
            assert!(flat(g).iter().all(|x| x.is_finite()), "tau {tau}");
        }
    }
    // Tiny τ with a *wrong* ranking: the loss is large (≈ (1 − 1/√2)/τ for q1 → d0) but finite.
    let loss = scalar(&info_nce(&qv, &dv, &[0, 0], 1e-6, None).unwrap());
    close(loss, (1.0 - SQRT_HALF) / 1e-6 / 2.0, 1e-3 * loss);
}

#[test]
fn info_nce_rejects_bad_inputs() {
    let (q, docs) = nce_case();
    is_invalid(info_nce(&q, &docs, &[0, 3], 0.1, None), "out of range");
    is_invalid(info_nce(&q, &docs, &[0], 0.1, None), "positive indices");
    let wide = t_f64(vec![0.0; 9], &[3, 3]);
    is_invalid(info_nce(&q, &wide, &[0, 1], 0.1, None), "dimension");
    let empty = Tensor::zeros((0, 2), DType::F64, &Device::Cpu).unwrap();
    is_invalid(info_nce(&empty, &docs, &[], 0.1, None), "empty");
    let mask = t_f64(vec![1.0; 4], &[2, 2]);
    is_invalid(
        info_nce(&q, &docs, &[0, 1], 0.1, Some(&mask)),
        "mask has shape",
    );
    let d32 = docs.as_tensor().to_dtype(DType::F32).unwrap();
    is_invalid(info_nce(&q, &d32, &[0, 1], 0.1, None), "dtypes");
}

#[test]
fn info_nce_gradient_matches_finite_differences() {
    let mut r = rng(5);
    let q = var_f64(uniform(&mut r, 3 * 4, 1.0), &[3, 4]);
    let docs = var_f64(uniform(&mut r, 5 * 4, 1.0), &[5, 4]);
    let pos = [2, 0, 4];
    let worst = grad_check(&[q.clone(), docs.clone()], |x| {
        info_nce(&x[0], &x[1], &pos, 0.1, None).unwrap()
    });
    eprintln!("worst relative error {worst:.2e}");
    assert!(worst <= 1e-4, "worst relative error {worst}");
    let mask = t_f64(
        vec![
            1.0, 0.0, 1.0, 1.0, 1.0, //
            1.0, 1.0, 1.0, 0.0, 1.0, //
            0.0, 0.0, 1.0, 1.0, 0.0,
        ],
        &[3, 5],
    );
    let worst = grad_check(&[q.clone(), docs.clone()], |x| {
        info_nce(&x[0], &x[1], &pos, 0.1, Some(&mask)).unwrap()
    });
    assert!(worst <= 1e-4, "worst relative error (masked) {worst}");

    let loss = info_nce(&q, &docs, &pos, 0.1, None).unwrap();
    assert_live_grads(&loss.backward().unwrap(), &[("q", &q), ("docs", &docs)]);
}

// ---------------------------------------------------------------- triplet

/// q0 = (1, 0): cos(q0, d+) = cos((1,0),(2,2)) = 1/√2, cos(q0, d−) = cos((1,0),(0,1)) = 0.
/// q1 = (0, 3): cos(q1, d+) = cos((0,3),(1,0)) = 0, cos(q1, d−) = cos((0,3),(1,1)) = 1/√2.
fn triplet_case() -> (Var, Var, Var) {
    (
        var_f64(vec![1.0, 0.0, 0.0, 3.0], &[2, 2]),
        var_f64(vec![2.0, 2.0, 1.0, 0.0], &[2, 2]),
        var_f64(vec![0.0, 1.0, 1.0, 1.0], &[2, 2]),
    )
}

#[test]
fn triplet_matches_hand_values_for_several_margins() {
    let (q, p, n) = triplet_case();
    let at = |theta: f64| scalar(&triplet(&q, &p, &n, theta).unwrap());
    // θ = 0.2: max(0, 0.2 − 1/√2 + 0) = 0 and max(0, 0.2 − 0 + 1/√2).
    close(at(0.2), (0.0 + (0.2 + SQRT_HALF)) / 2.0, 1e-12);
    // θ = 0: max(0, −1/√2) = 0 and 1/√2.
    close(at(0.0), SQRT_HALF / 2.0, 1e-12);
    // θ = 5: both active: (5 − 1/√2) and (5 + 1/√2) average to 5.
    close(at(5.0), 5.0, 1e-12);
    for theta in [-0.1, f64::NAN, f64::INFINITY] {
        is_invalid(triplet(&q, &p, &n, theta), "theta");
    }
}

#[test]
fn triplet_is_exactly_zero_with_zero_gradient_when_margins_hold() {
    // cos(q, d+) = 1, cos(q, d−) = 0 and −1 for the two rows: margins 1 and 2 exceed θ = 0.3.
    let q = var_f64(vec![1.0, 0.0, 0.0, 1.0], &[2, 2]);
    let p = var_f64(vec![3.0, 0.0, 0.0, 0.5], &[2, 2]);
    let n = var_f64(vec![0.0, 1.0, 0.0, -2.0], &[2, 2]);
    let loss = triplet(&q, &p, &n, 0.3).unwrap();
    assert_eq!(scalar(&loss), 0.0);
    let grads = loss.backward().unwrap();
    for v in [&q, &p, &n] {
        if let Some(g) = grads.get(v) {
            assert!(flat(g).iter().all(|x| *x == 0.0), "{:?}", flat(g));
        }
    }
}

#[test]
fn triplet_gradient_matches_finite_differences() {
    let mut r = rng(6);
    let q = var_f64(uniform(&mut r, 4 * 3, 1.0), &[4, 3]);
    let p = var_f64(uniform(&mut r, 4 * 3, 1.0), &[4, 3]);
    let n = var_f64(uniform(&mut r, 4 * 3, 1.0), &[4, 3]);
    // A margin of 2 keeps every hinge active (cosines differ by at most 2, and random
    // vectors never reach that bound), so no finite difference straddles the kink.
    let worst = grad_check(&[q.clone(), p.clone(), n.clone()], |x| {
        triplet(&x[0], &x[1], &x[2], 2.0).unwrap()
    });
    eprintln!("worst relative error {worst:.2e}");
    assert!(worst <= 1e-4, "worst relative error {worst}");
    let loss = triplet(&q, &p, &n, 2.0).unwrap();
    assert_live_grads(
        &loss.backward().unwrap(),
        &[("q", &q), ("pos", &p), ("neg", &n)],
    );
}

#[test]
fn triplet_rejects_shape_mismatch() {
    let (q, p, _) = triplet_case();
    let n = t_f64(vec![0.0; 3], &[1, 3]);
    is_invalid(triplet(&q, &p, &n, 0.2), "same shape");
}

// ---------------------------------------------------------------- combined objective

#[test]
fn config_defaults_and_serde() {
    let c = SftLossConfig::default();
    assert_eq!(
        (
            c.lambda_ce,
            c.lambda_kl,
            c.lambda_nce,
            c.lambda_tri,
            c.tau,
            c.theta
        ),
        (1.0, 0.1, 1.0, 0.5, 0.05, 0.2)
    );
    c.validate().unwrap();
    let partial: SftLossConfig = serde_json::from_str(r#"{"tau": 0.02}"#).unwrap();
    assert_eq!(partial.tau, 0.02);
    assert_eq!(partial.lambda_kl, 0.1);
    let back: SftLossConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(serde_json::from_str::<SftLossConfig>(r#"{"temperature": 0.02}"#).is_err());
    for bad in [
        SftLossConfig {
            tau: 0.0,
            ..c.clone()
        },
        SftLossConfig {
            theta: -1.0,
            ..c.clone()
        },
        SftLossConfig {
            lambda_kl: f64::NAN,
            ..c.clone()
        },
        SftLossConfig {
            lambda_ce: 0.0,
            lambda_kl: 0.0,
            lambda_nce: 0.0,
            lambda_tri: 0.0,
            ..c.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn combine_weights_terms_and_skips_zero_weights() {
    let c = SftLossConfig::default();
    let v: Vec<Var> = [2.0, 0.4, 1.5, 0.3]
        .iter()
        .map(|&x| Var::from_tensor(&Tensor::new(x, &Device::Cpu).unwrap()).unwrap())
        .collect();
    let (total, terms) = c
        .combine(Some(&v[0]), Some(&v[1]), Some(&v[2]), Some(&v[3]))
        .unwrap();
    let expected = 1.0 * 2.0 + 0.1 * 0.4 + 1.0 * 1.5 + 0.5 * 0.3;
    close(scalar(&total), expected, 1e-12);
    assert_eq!(terms.total, scalar(&total));
    assert_eq!(
        (terms.ce, terms.kl, terms.nce, terms.tri),
        (Some(2.0), Some(0.4), Some(1.5), Some(0.3))
    );
    assert!(terms.is_finite());
    let grads = total.backward().unwrap();
    for (var, lambda) in v.iter().zip([1.0, 0.1, 1.0, 0.5]) {
        close(scalar(grads.get(var).unwrap()), lambda, 1e-15);
    }

    // λ_kl = 0: the KL term may be omitted, or given and reported but kept out of the graph.
    let no_kl = SftLossConfig {
        lambda_kl: 0.0,
        ..c.clone()
    };
    let (_, terms) = no_kl
        .combine(Some(&v[0]), None, Some(&v[2]), Some(&v[3]))
        .unwrap();
    assert_eq!(terms.kl, None);
    let (total, terms) = no_kl
        .combine(Some(&v[0]), Some(&v[1]), Some(&v[2]), Some(&v[3]))
        .unwrap();
    assert_eq!(terms.kl, Some(0.4));
    assert!(total.backward().unwrap().get(&v[1]).is_none());

    is_invalid(
        c.combine(Some(&v[0]), None, Some(&v[2]), Some(&v[3])),
        "not computed",
    );
    let vector = t_f64(vec![1.0, 2.0], &[2]);
    is_invalid(
        c.combine(Some(&vector), Some(&v[1]), Some(&v[2]), Some(&v[3])),
        "scalar",
    );
}

#[test]
fn full_stage1_objective_reaches_every_input() {
    // A miniature stage-1 step: the four terms on random inputs, combined with the defaults,
    // must give every trainable input a finite, non-zero gradient.
    let mut r = rng(7);
    let logits = var_f64(uniform(&mut r, 2 * 3 * 5, 2.0), &[2, 3, 5]);
    let ref_logits = t_f64(uniform(&mut r, 2 * 3 * 5, 2.0), &[2, 3, 5]);
    let targets = u32s(vec![1, 2, 3, 0, 4, 0], &[2, 3]);
    let mask = t_f64(vec![0.0, 1.0, 1.0, 1.0, 1.0, 0.0], &[2, 3]);
    let q = var_f64(uniform(&mut r, 2 * 4, 1.0), &[2, 4]);
    let docs = var_f64(uniform(&mut r, 4 * 4, 1.0), &[4, 4]);
    let c = SftLossConfig {
        theta: 2.0,
        ..SftLossConfig::default()
    };
    let ce = cross_entropy(&logits, &targets, &mask).unwrap();
    let kl = kl_to_reference(&logits, &ref_logits, &mask).unwrap();
    let nce = info_nce(&q, &docs, &[0, 1], c.tau, None).unwrap();
    let pos = docs.as_tensor().narrow(0, 0, 2).unwrap();
    let neg = docs.as_tensor().narrow(0, 2, 2).unwrap();
    let tri = triplet(&q, &pos, &neg, c.theta).unwrap();
    let (total, terms) = c
        .combine(Some(&ce), Some(&kl), Some(&nce), Some(&tri))
        .unwrap();
    assert!(terms.is_finite());
    let grads = total.backward().unwrap();
    assert_live_grads(&grads, &[("logits", &logits), ("q", &q), ("docs", &docs)]);
}

#[test]
#[should_panic(expected = "finite difference")]
fn grad_check_catches_a_dropped_gradient() {
    // The failure mode of BRIEF §4: an op that records no backward. `detach` stands in for a
    // fused kernel here; the checker must notice the missing 2x term.
    let x = var_f64(vec![0.3, -1.2], &[2]);
    grad_check(&[x], |t| {
        (t[0].detach().sqr().unwrap().sum_all().unwrap() + t[0].sum_all().unwrap()).unwrap()
    });
}
