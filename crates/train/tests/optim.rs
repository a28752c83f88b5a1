//! Schedule, clipping, accumulation and AdamW (hand-computed steps, agreement with
//! candle_nn's AdamW, bit-exact resume).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use common::*;
use search_r3_train::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule};
use search_r3_train::Error;
use std::collections::HashMap;

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b} (tolerance {tol})");
}

fn store(pairs: &[(&Var, Vec<f64>)]) -> GradStore {
    let mut g = GradStore::default();
    for (var, data) in pairs {
        g.insert(
            var,
            t_f64(data.clone(), var.dims())
                .to_dtype(var.dtype())
                .unwrap(),
        );
    }
    g
}

// ---------------------------------------------------------------- schedule

#[test]
fn lr_schedule_boundaries() {
    let s = LrSchedule::new(10, 110, 1e-3, 1e-5).unwrap();
    close(s.lr_at(0), 1e-4, 1e-18); // first warmup step: peak · 1/10
    close(s.lr_at(4), 5e-4, 1e-18);
    close(s.lr_at(9), 1e-3, 1e-18); // end of warmup reaches the peak
    close(s.lr_at(10), 1e-3, 1e-18); // cosine starts at the peak (p = 0)
                                     // Middle of the decay, p = 1/2: cos(π/2) = 0 → halfway between peak and floor.
    close(s.lr_at(60), 1e-5 + 0.5 * (1e-3 - 1e-5), 1e-15);
    // p = 1/4: min + ½(peak − min)(1 + cos(π/4)).
    close(
        s.lr_at(35),
        1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + std::f64::consts::FRAC_1_SQRT_2),
        1e-15,
    );
    close(s.lr_at(110), 1e-5, 1e-18); // end
    close(s.lr_at(10_000), 1e-5, 1e-18); // beyond the end
    let lrs: Vec<f64> = (10..=110).map(|i| s.lr_at(i)).collect();
    assert!(
        lrs.windows(2).all(|w| w[1] <= w[0]),
        "decay must be monotone"
    );

    let no_warmup = LrSchedule::new(0, 4, 2.0, 0.0).unwrap();
    assert_eq!(
        (0..6).map(|i| no_warmup.lr_at(i)).collect::<Vec<_>>()[..3],
        [2.0, 1.0 + (std::f64::consts::PI / 4.0).cos(), 1.0]
    );
    assert_eq!(no_warmup.lr_at(4), 0.0);
    let all_warmup = LrSchedule::new(4, 4, 1.0, 0.1).unwrap();
    assert_eq!(all_warmup.lr_at(3), 1.0);
    assert_eq!(all_warmup.lr_at(4), 0.1);

    assert!(LrSchedule::new(11, 10, 1e-3, 0.0).is_err());
    assert!(LrSchedule::new(0, 10, 1e-3, 1e-2).is_err());
    assert!(LrSchedule::new(0, 10, f64::NAN, 0.0).is_err());
    assert!(LrSchedule::new(0, 10, 1e-3, -1e-5).is_err());
}

// ---------------------------------------------------------------- clipping

#[test]
fn clip_scales_to_max_norm_and_reports_the_original_norm() {
    let a = var_f64(vec![0.0, 0.0], &[2]);
    let b = Var::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let unused = var_f64(vec![0.0], &[1]);
    // Global norm √(3² + 4² + 12²) = 13 across an f64 and an f32 var.
    let mut g = store(&[(&a, vec![3.0, 4.0]), (&b, vec![12.0])]);
    let norm = clip_grad_norm(&mut g, &[a.clone(), b.clone(), unused.clone()], 1.3).unwrap();
    close(norm, 13.0, 1e-12);
    let scale = 1.3 / (13.0 + 1e-6);
    let ga = flat(g.get(&a).unwrap());
    close(ga[0], 3.0 * scale, 1e-12);
    close(ga[1], 4.0 * scale, 1e-12);
    close(flat(g.get(&b).unwrap())[0], 12.0 * scale, 1e-5);
    assert_eq!(g.get(&b).unwrap().dtype(), DType::F32);
    assert!(g.get(&unused).is_none());

    // Below the limit: untouched.
    let mut g = store(&[(&a, vec![0.3, 0.4])]);
    let norm = clip_grad_norm(&mut g, std::slice::from_ref(&a), 1.0).unwrap();
    close(norm, 0.5, 1e-15);
    assert_eq!(flat(g.get(&a).unwrap()), vec![0.3, 0.4]);

    assert_eq!(
        clip_grad_norm(&mut GradStore::default(), std::slice::from_ref(&a), 1.0).unwrap(),
        0.0
    );
    assert!(matches!(
        clip_grad_norm(&mut GradStore::default(), std::slice::from_ref(&a), 0.0),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn clip_refuses_non_finite_norms_and_leaves_gradients_alone() {
    let a = var_f64(vec![0.0, 0.0], &[2]);
    let b = var_f64(vec![0.0], &[1]);
    for bad in [f64::NAN, f64::INFINITY] {
        let mut g = store(&[(&a, vec![3.0, 4.0]), (&b, vec![bad])]);
        match clip_grad_norm(&mut g, &[a.clone(), b.clone()], 1.0) {
            Err(Error::NonFinite { what, .. }) => assert_eq!(what, "gradient norm"),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert_eq!(flat(g.get(&a).unwrap()), vec![3.0, 4.0]);
    }
}

// ---------------------------------------------------------------- accumulation

#[test]
fn accumulator_means_over_micro_batches() {
    let a = var_f64(vec![0.0, 0.0], &[2]);
    let b = var_f64(vec![0.0], &[1]);
    let mut acc = GradAccumulator::new(&[a.clone(), b.clone()]);
    assert!(acc.mean().is_err());
    acc.add(&store(&[(&a, vec![1.0, 2.0]), (&b, vec![6.0])]))
        .unwrap();
    acc.add(&store(&[(&a, vec![3.0, -2.0])])).unwrap(); // b absent: counts as zero
    assert_eq!(acc.micro_batches(), 2);
    let m = acc.mean().unwrap();
    assert_eq!(flat(m.get(&a).unwrap()), vec![2.0, 0.0]);
    assert_eq!(flat(m.get(&b).unwrap()), vec![3.0]);
    acc.reset();
    assert_eq!(acc.micro_batches(), 0);
    acc.add(&store(&[(&a, vec![5.0, 5.0])])).unwrap();
    let m = acc.mean().unwrap();
    assert_eq!(flat(m.get(&a).unwrap()), vec![5.0, 5.0]);
    assert!(m.get(&b).is_none());
}

#[test]
fn accumulated_micro_batches_equal_the_full_batch_gradient() {
    // Mean-reduced loss over 4 items vs two micro-batches of 2: same gradient.
    let mut r = rng(11);
    let w = var_f64(uniform(&mut r, 3, 1.0), &[3, 1]);
    let x = t_f64(uniform(&mut r, 4 * 3, 1.0), &[4, 3]);
    let loss = |x: &Tensor| {
        x.matmul(w.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let full = flat(loss(&x).backward().unwrap().get(&w).unwrap());
    let mut acc = GradAccumulator::new(std::slice::from_ref(&w));
    for i in 0..2 {
        acc.add(&loss(&x.narrow(0, 2 * i, 2).unwrap()).backward().unwrap())
            .unwrap();
    }
    let mean = flat(acc.mean().unwrap().get(&w).unwrap());
    for (f, m) in full.iter().zip(&mean) {
        close(*f, *m, 1e-14);
    }
}

// ---------------------------------------------------------------- AdamW

#[test]
fn adamw_two_steps_match_hand_computation() {
    let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-8, 0.01);
    let cfg = AdamWConfig {
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
    };
    let theta0 = [1.0, -2.0, 0.5];
    let w = var_f64(theta0.to_vec(), &[3]);
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg).unwrap();
    let g1 = [0.5, -0.25, 0.0];
    let g2 = [-1.0, 0.5, 2.0];
    opt.step(&store(&[(&w, g1.to_vec())]), lr).unwrap();
    opt.step(&store(&[(&w, g2.to_vec())]), lr / 2.0).unwrap();
    assert_eq!(opt.steps(), 2);

    let got = flat(w.as_tensor());
    for i in 0..3 {
        // Step 1 from zero moments: m̂ = g, v̂ = g², so the update is lr·g/(|g| + ε).
        let m1 = (1.0 - b1) * g1[i];
        let v1 = (1.0 - b2) * g1[i] * g1[i];
        let t1 = theta0[i] * (1.0 - lr * wd) - lr * g1[i] / (g1[i].abs() + eps);
        // Step 2 with lr/2 and bias corrections 1 − β².
        let lr2 = lr / 2.0;
        let m2 = b1 * m1 + (1.0 - b1) * g2[i];
        let v2 = b2 * v1 + (1.0 - b2) * g2[i] * g2[i];
        let m_hat = m2 / (1.0 - b1 * b1);
        let v_hat = v2 / (1.0 - b2 * b2);
        let t2 = t1 * (1.0 - lr2 * wd) - lr2 * m_hat / (v_hat.sqrt() + eps);
        close(got[i], t2, 1e-12);
    }
}

#[test]
fn adamw_agrees_with_candle_nn() {
    // candle_nn's AdamW uses the same update (with the bias corrections arranged differently),
    // it just hides its moments. Agreement to rounding over several steps cross-checks ours.
    let mut r = rng(12);
    let init = uniform(&mut r, 8, 1.0);
    let ours = var_f64(init.clone(), &[2, 4]);
    let theirs = var_f64(init, &[2, 4]);
    let cfg = AdamWConfig {
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    let mut a = AdamW::new(vec![("p".into(), ours.clone())], cfg).unwrap();
    let mut b = candle_nn::AdamW::new(
        vec![theirs.clone()],
        candle_nn::ParamsAdamW {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        },
    )
    .unwrap();
    for _ in 0..5 {
        let g = uniform(&mut r, 8, 2.0);
        a.step(&store(&[(&ours, g.clone())]), 0.01).unwrap();
        b.step(&store(&[(&theirs, g)])).unwrap();
    }
    for (x, y) in flat(ours.as_tensor()).iter().zip(flat(theirs.as_tensor())) {
        close(*x, y, 1e-12);
    }
}

#[test]
fn adamw_skips_vars_without_gradient() {
    let a = var_f64(vec![1.0], &[1]);
    let b = var_f64(vec![1.0], &[1]);
    let mut opt = AdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    opt.step(&store(&[(&a, vec![1.0])]), 0.1).unwrap();
    assert_eq!(
        flat(b.as_tensor()),
        vec![1.0],
        "no gradient: no update, no decay"
    );
    let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    assert_eq!(state["adamw.t.a"].to_scalar::<i64>().unwrap(), 1);
    assert_eq!(state["adamw.t.b"].to_scalar::<i64>().unwrap(), 0);
    assert_eq!(state["adamw.steps"].to_scalar::<i64>().unwrap(), 1);
}

fn f32_var(data: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu).unwrap()).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn adamw_resume_from_file_is_bit_exact() {
    let mut r = rng(13);
    let a0: Vec<f32> = uniform(&mut r, 6, 1.0).iter().map(|&x| x as f32).collect();
    let b0: Vec<f32> = uniform(&mut r, 4, 1.0).iter().map(|&x| x as f32).collect();
    let grads: Vec<(Vec<f64>, Vec<f64>)> = (0..3)
        .map(|_| (uniform(&mut r, 6, 1.0), uniform(&mut r, 4, 1.0)))
        .collect();
    let lrs = [1e-2, 5e-3, 2e-3];
    let cfg = AdamWConfig::default();

    // Uninterrupted: three steps.
    let (a, b) = (f32_var(&a0, &[2, 3]), f32_var(&b0, &[4]));
    let mut opt = AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
    for (g, lr) in grads.iter().zip(lrs) {
        opt.step(&store(&[(&a, g.0.clone()), (&b, g.1.clone())]), lr)
            .unwrap();
    }

    // Interrupted after two steps: parameters and optimizer state go to disk.
    let dir = tempfile::tempdir().unwrap();
    let (params_path, state_path) = (
        dir.path().join("params.safetensors"),
        dir.path().join("opt.safetensors"),
    );
    {
        let (a, b) = (f32_var(&a0, &[2, 3]), f32_var(&b0, &[4]));
        let mut opt =
            AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
        for (g, lr) in grads.iter().zip(lrs).take(2) {
            opt.step(&store(&[(&a, g.0.clone()), (&b, g.1.clone())]), lr)
                .unwrap();
        }
        let params = HashMap::from([
            ("a".to_string(), a.as_tensor().clone()),
            ("b".to_string(), b.as_tensor().clone()),
        ]);
        candle_core::safetensors::save(&params, &params_path).unwrap();
        opt.save(&state_path).unwrap();
    }

    // A fresh process: load both, take the third step.
    let params = candle_core::safetensors::load(&params_path, &Device::Cpu).unwrap();
    let (ra, rb) = (
        Var::from_tensor(&params["a"]).unwrap(),
        Var::from_tensor(&params["b"]).unwrap(),
    );
    let mut resumed = AdamW::new(
        vec![("a".into(), ra.clone()), ("b".into(), rb.clone())],
        cfg,
    )
    .unwrap();
    resumed.load(&state_path).unwrap();
    assert_eq!(resumed.steps(), 2);
    resumed
        .step(
            &store(&[(&ra, grads[2].0.clone()), (&rb, grads[2].1.clone())]),
            lrs[2],
        )
        .unwrap();
    assert_eq!(resumed.steps(), 3);
    assert_eq!(bits(ra.as_tensor()), bits(a.as_tensor()));
    assert_eq!(bits(rb.as_tensor()), bits(b.as_tensor()));
    // And the moments themselves.
    let s1: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    let s2: HashMap<String, Tensor> = resumed.state_tensors().unwrap().into_iter().collect();
    for k in ["adamw.m.a", "adamw.v.a", "adamw.m.b", "adamw.v.b"] {
        assert_eq!(bits(&s1[k]), bits(&s2[k]), "{k}");
    }
}

#[test]
fn adamw_load_state_rejects_mismatched_state() {
    let a = var_f64(vec![1.0, 2.0], &[2]);
    let mut opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap();
    opt.step(&store(&[(&a, vec![1.0, 1.0])]), 0.1).unwrap();
    let good: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();

    let other = var_f64(vec![1.0, 2.0], &[2]);
    let mut fresh = AdamW::new(vec![("a".into(), other)], AdamWConfig::default()).unwrap();
    let expect_err = |fresh: &mut AdamW, map: &HashMap<String, Tensor>, needle: &str| {
        match fresh.load_state(map) {
            Err(Error::Invalid(msg)) => assert!(msg.contains(needle), "`{msg}` lacks `{needle}`"),
            other => panic!("expected Invalid with `{needle}`, got {other:?}"),
        }
        assert_eq!(fresh.steps(), 0, "a failed load must change nothing");
    };
    let mut missing = good.clone();
    missing.remove("adamw.v.a");
    expect_err(&mut fresh, &missing, "missing `adamw.v.a`");
    let mut wrong_shape = good.clone();
    wrong_shape.insert("adamw.m.a".into(), t_f64(vec![0.0; 3], &[3]));
    expect_err(&mut fresh, &wrong_shape, "m.a");
    let mut extra = good.clone();
    extra.insert("adamw.m.ghost".into(), t_f64(vec![0.0], &[1]));
    expect_err(&mut fresh, &extra, "adamw.m.ghost");

    // Unrelated keys (a whole checkpoint) are fine.
    let mut with_params = good.clone();
    with_params.insert("lora.0.q_proj.a".into(), t_f64(vec![0.0], &[1]));
    fresh.load_state(&with_params).unwrap();
    assert_eq!(fresh.steps(), 1);

    assert!(AdamW::new(
        vec![("a".into(), a.clone()), ("a".into(), a.clone())],
        AdamWConfig::default()
    )
    .is_err());
    for bad in [
        AdamWConfig {
            beta1: 1.0,
            ..AdamWConfig::default()
        },
        AdamWConfig {
            eps: 0.0,
            ..AdamWConfig::default()
        },
        AdamWConfig {
            weight_decay: -0.1,
            ..AdamWConfig::default()
        },
    ] {
        assert!(AdamW::new(vec![("a".into(), a.clone())], bad).is_err());
    }
    assert!(opt.step(&GradStore::default(), f64::NAN).is_err());
    let b = var_f64(vec![0.0; 3], &[3]);
    let mut opt_b = AdamW::new(vec![("b".into(), b.clone())], AdamWConfig::default()).unwrap();
    let mut g = GradStore::default();
    g.insert(&b, t_f64(vec![1.0, 1.0], &[2]));
    assert!(opt_b.step(&g, 0.1).is_err());
}
