//! Stage-2 pieces against values computed by hand: the DCG reward on crafted rankings, the
//! format and length terms, group advantages (including a group with equal rewards), and the
//! clipped GRPO objective with its k3 KL penalty — values and gradients.

use candle_core::{Device, Tensor, Var};
use search_r3_train::rl::grpo::{
    dcg_reward, group_advantages, grpo_loss, GrpoLossConfig, RewardConfig,
};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn dcg_reward_on_crafted_rankings() {
    assert_eq!(dcg_reward(&[Some(1)], 10).unwrap(), 1.0);
    assert!(close(dcg_reward(&[Some(3)], 10).unwrap(), 0.5, 1e-15));
    // Averaged over gold documents; a missing one counts 0.
    assert!(close(dcg_reward(&[Some(1), None], 10).unwrap(), 0.5, 1e-15));
    // Rank 7 is outside the top 5.
    let want = (1.0 / 3f64.log2() + 0.0) / 2.0;
    assert!(close(
        dcg_reward(&[Some(2), Some(7)], 5).unwrap(),
        want,
        1e-15
    ));
    assert!(close(
        dcg_reward(&[Some(5)], 5).unwrap(),
        1.0 / 6f64.log2(),
        1e-15
    ));
    assert_eq!(dcg_reward(&[Some(6)], 5).unwrap(), 0.0);
    assert!(dcg_reward(&[], 5)
        .unwrap_err()
        .to_string()
        .contains("no gold"));
    assert!(dcg_reward(&[Some(0)], 5)
        .unwrap_err()
        .to_string()
        .contains("1-based"));
}

#[test]
fn format_and_length_terms() {
    let cfg = RewardConfig {
        reasoning_budget: 64,
        over_budget_penalty: 0.5,
        missing_embed_penalty: 0.3,
        length_penalty: 0.0,
        ..RewardConfig::default()
    };
    let ok = cfg.reward(0.6, true, 10);
    assert_eq!((ok.format, ok.length, ok.total), (0.0, 0.0, 0.6));
    // Missing embed token: the forced embedding's retrieval counts, minus the penalty.
    let m = cfg.reward(0.9, false, 10);
    assert!(
        close(m.format, -0.3, 1e-15) && close(m.total, 0.6, 1e-15),
        "{m:?}"
    );
    let both = cfg.reward(0.9, false, 70);
    assert!(close(both.total, 0.1, 1e-15), "{both:?}");
    let over = cfg.reward(0.6, true, 65);
    assert!(close(over.total, 0.1, 1e-15), "{over:?}");
    assert_eq!(
        cfg.reward(0.6, true, 64).total,
        0.6,
        "the budget itself is allowed"
    );
    let shaped = RewardConfig {
        length_penalty: 0.1,
        ..cfg
    }
    .reward(0.6, true, 32);
    assert!(close(shaped.length, -0.05, 1e-15) && close(shaped.total, 0.55, 1e-15));
}

#[test]
fn group_advantages_by_hand() {
    // mean 0.5, sample std sqrt(1/3).
    let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], true, 1e-4).unwrap();
    let s = (1.0f64 / 3.0).sqrt() + 1e-4;
    for (x, want) in a.iter().zip([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]) {
        assert!(close(*x, want, 1e-12), "{a:?}");
    }
    assert!(close(a[0], 0.8658, 1e-3));
    // Equal rewards: no signal, exactly zero (no 0/0).
    assert_eq!(
        group_advantages(&[0.3; 4], true, 1e-4).unwrap(),
        vec![0.0; 4]
    );
    assert_eq!(
        group_advantages(&[0.0; 3], true, 0.0).unwrap(),
        vec![0.0; 3]
    );
    // Centred only (Dr. GRPO).
    assert_eq!(
        group_advantages(&[2.0, 0.0], false, 1e-4).unwrap(),
        vec![1.0, -1.0]
    );
    assert!(group_advantages(&[1.0], true, 1e-4).is_err());
    assert!(group_advantages(&[1.0, f64::NAN], true, 1e-4).is_err());
}

/// Ratios ρ = [[1.0, 1.5, 0.7], [0.5, 1.1, ·]], advantages [1, −2], clip 0.2:
/// row 0 — ρ=1.0 inside (ρÂ = 1.0), ρ=1.5 clipped at 1.2, ρ=0.7 unclipped for Â>0 (0.7);
/// row 1 — ρ=0.5 clipped at 0.8 (0.8·−2 = −1.6), ρ=1.1 inside (−2.2); the last token is
/// masked and holds NaN, which must not leak.
fn case() -> (Var, Tensor, Tensor, Vec<f64>) {
    let dev = Device::Cpu;
    let logp = [[-1.0f64, -2.0, -0.5], [-1.5, -0.3, f64::NAN]];
    let rho = [[1.0f64, 1.5, 0.7], [0.5, 1.1, 1.0]];
    let mut old = [[0.0f64; 3]; 2];
    for i in 0..2 {
        for j in 0..3 {
            old[i][j] = logp[i][j] - rho[i][j].ln();
        }
    }
    let flat = |x: [[f64; 3]; 2]| x.iter().flatten().copied().collect::<Vec<_>>();
    let lp = Var::from_tensor(&Tensor::from_vec(flat(logp), (2, 3), &dev).unwrap()).unwrap();
    let old = Tensor::from_vec(flat(old), (2, 3), &dev).unwrap();
    let mask = Tensor::from_vec(vec![1f64, 1., 1., 1., 1., 0.], (2, 3), &dev).unwrap();
    (lp, old, mask, vec![1.0, -2.0])
}

/// ∂loss/∂v, flattened.
fn grad(loss: &Tensor, v: &Var) -> Vec<f64> {
    loss.backward()
        .unwrap()
        .get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn clipped_objective_value_and_gradient_by_hand() {
    let (lp, old, mask, adv) = case();
    let cfg = GrpoLossConfig {
        clip_low: 0.2,
        clip_high: 0.2,
        beta: 0.0,
    };
    let (loss, st) = grpo_loss(lp.as_tensor(), &old, None, &adv, &mask, &cfg).unwrap();
    let v = loss.to_scalar::<f64>().unwrap();
    // −(1.0 + 1.2 + 0.7 − 1.6 − 2.2)/5 = 0.18
    assert!(close(v, 0.18, 1e-12), "{v}");
    assert!(close(st.surrogate, -0.18, 1e-12));
    assert!(close(st.clip_fraction, 0.4, 1e-12));
    assert!(close(st.ratio, (1.0 + 1.5 + 0.7 + 0.5 + 1.1) / 5.0, 1e-12));
    let g = grad(&loss, &lp);
    // ∂/∂logp of −ρÂ/5 is −ρÂ/5 on unclipped tokens; clipped and masked tokens get 0.
    let want = [-0.2, 0.0, -0.14, 0.0, 0.44, 0.0];
    for (x, w) in g.iter().zip(want) {
        assert!(close(*x, w, 1e-12), "{g:?}");
    }
}

#[test]
fn kl_penalty_by_hand_and_asymmetric_clip() {
    let (lp, old, mask, adv) = case();
    // π_ref(y) = 2·π_θ(y) everywhere: q = ln 2, k3 = 2 − ln 2 − 1, ∂k3/∂logp = −(e^q − 1) = −1.
    let reference = (lp.as_tensor() + 2f64.ln()).unwrap();
    let cfg = GrpoLossConfig {
        clip_low: 0.2,
        clip_high: 0.2,
        beta: 0.1,
    };
    let (loss, st) = grpo_loss(lp.as_tensor(), &old, Some(&reference), &adv, &mask, &cfg).unwrap();
    let k3 = 1.0 - 2f64.ln();
    assert!(close(st.kl, k3, 1e-12), "{st:?}");
    assert!(close(
        loss.to_scalar::<f64>().unwrap(),
        0.18 + 0.1 * k3,
        1e-12
    ));
    let g = grad(&loss, &lp);
    let want = [-0.2 - 0.02, -0.02, -0.14 - 0.02, -0.02, 0.44 - 0.02, 0.0];
    for (x, w) in g.iter().zip(want) {
        assert!(close(*x, w, 1e-12), "{g:?}");
    }
    // A wider upper range (DAPO's clip-higher) lets ρ = 1.5 through for Â > 0.
    let wide = GrpoLossConfig {
        clip_high: 0.6,
        beta: 0.0,
        ..cfg
    };
    let (loss, st) = grpo_loss(lp.as_tensor(), &old, None, &adv, &mask, &wide).unwrap();
    assert!(close(st.clip_fraction, 0.2, 1e-12));
    assert!(close(
        loss.to_scalar::<f64>().unwrap(),
        -(1.0 + 1.5 + 0.7 - 1.6 - 2.2) / 5.0,
        1e-12
    ));
}

#[test]
fn bad_inputs_are_refused() {
    let (lp, old, mask, _) = case();
    let cfg = GrpoLossConfig::default();
    let reference = lp.as_tensor().clone();
    let err = |r: search_r3_train::Result<_>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err(grpo_loss(
        lp.as_tensor(),
        &old,
        Some(&reference),
        &[1.0],
        &mask,
        &cfg
    ))
    .contains("advantages"));
    assert!(err(grpo_loss(
        lp.as_tensor(),
        &old,
        None,
        &[1.0, 1.0],
        &mask,
        &cfg
    ))
    .contains("reference"));
    let bad = GrpoLossConfig {
        clip_low: 1.0,
        ..cfg
    };
    assert!(err(grpo_loss(
        lp.as_tensor(),
        &old,
        Some(&reference),
        &[1.0, 1.0],
        &mask,
        &bad
    ))
    .contains("clip"));
    let zeros = mask.zeros_like().unwrap();
    assert!(err(grpo_loss(
        lp.as_tensor(),
        &old,
        Some(&reference),
        &[1.0, 1.0],
        &zeros,
        &cfg
    ))
    .contains("no token"));
}

#[test]
fn gain_reward_pays_only_the_improvement_over_no_thought() {
    use search_r3_train::rl::grpo::RewardConfig;
    let off = RewardConfig::default();
    let on = RewardConfig { gain: true, ..off };
    // DCG 1/log2(3) against a no-thought baseline of 1/log2(2) = 1: a loss of 0.369.
    let r = 1.0 / 3f64.log2();
    let g = on.reward_against(r, 1.0, true, 10);
    assert!((g.total - (r - 1.0)).abs() < 1e-12 && g.baseline == 1.0 && g.retrieval == r);
    // A tie earns nothing; an improvement earns the difference; format terms still apply.
    assert_eq!(on.reward_against(0.5, 0.5, true, 10).total, 0.0);
    assert!((on.reward_against(0.8, 0.5, true, 10).total - 0.3).abs() < 1e-12);
    assert!((on.reward_against(0.8, 0.5, false, 10).total - (0.3 - 0.5)).abs() < 1e-12);
    // Off, the baseline is ignored (the stage-2 reward as shipped).
    let plain = off.reward_against(0.8, 0.5, true, 10);
    assert_eq!((plain.total, plain.baseline), (0.8, 0.0));
    assert_eq!(off.reward(0.8, true, 10), plain);
}

#[test]
fn uniform_groups_are_recognised_for_dropping() {
    use search_r3_train::rl::grpo::{group_advantages, informative};
    // All gains zero (every thought tied with no thought): no signal, dropped.
    assert!(!informative(&[0.0, 0.0, 0.0, 0.0]));
    assert!(!informative(&[0.25; 3]));
    assert!(informative(&[0.0, 0.0, 0.1, 0.0]));
    // Its advantages are all zero either way; Dr. GRPO only centres the others.
    assert_eq!(
        group_advantages(&[0.3; 4], true, 1e-4).unwrap(),
        vec![0.0; 4]
    );
    let a = group_advantages(&[0.0, 0.0, 0.4, 0.0], false, 1e-4).unwrap();
    assert_eq!(a, vec![-0.1, -0.1, 0.30000000000000004, -0.1]);
}
