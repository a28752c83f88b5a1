//! Stage 2 (GRPO) building blocks, each a pure function so it can be checked by hand:
//!
//! * the retrieval reward — DCG of the gold documents' ranks, `1/log2(1 + rank)` inside the
//!   top-k and 0 outside, averaged over the query's relevant documents;
//! * the format terms — a penalty when a trajectory never emits `<|embed_token|>`, another
//!   when its reasoning runs past the budget, and optional length shaping;
//! * optionally the *gain* over not reasoning as the retrieval term (TongSearch-QR, s3), so
//!   reasoning is paid only where it helps;
//! * group-normalised advantages (Shao et al., 2024, DeepSeekMath §4.1.2):
//!   `Â_i = (r_i − mean(r)) / (std(r) + ε)` over the G trajectories of one query, or only
//!   centred (Dr. GRPO, Liu et al., 2025); groups whose rewards are all equal can be dropped
//!   (DAPO's dynamic sampling);
//! * the clipped surrogate with a k3 KL penalty, averaged over *tokens* of the whole batch
//!   (every reasoning token weighs the same, however long its trajectory — the "token-level"
//!   averaging of DAPO, Yu et al., 2025), per token:
//!   `ℓ = −min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â) + β·k3`, `ρ = π_θ(y)/π_old(y)`.

use crate::error::{invalid, Result};
use crate::losses::Selection;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// DCG reward of one trajectory: `(1/|gold|) Σ_g 1/log2(1 + rank_g)` over the gold documents,
/// where `rank_g` is 1-based and a document ranked below `top_k` (or not retrieved: `None`)
/// contributes 0. A query needs at least one gold document.
pub fn dcg_reward(gold_ranks: &[Option<usize>], top_k: usize) -> Result<f64> {
    if gold_ranks.is_empty() {
        invalid!("dcg_reward: the query has no gold documents");
    }
    let mut sum = 0.0;
    for r in gold_ranks.iter().flatten() {
        if *r == 0 {
            invalid!("dcg_reward: ranks are 1-based, got 0");
        }
        if *r <= top_k {
            sum += 1.0 / ((1 + r) as f64).log2();
        }
    }
    Ok(sum / gold_ranks.len() as f64)
}

/// Format and length terms added to the retrieval reward.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Only the first `top_k` ranks earn reward.
    pub top_k: usize,
    /// Subtracted when a trajectory does not emit `<|embed_token|>` itself. Its retrieval
    /// reward still counts (measured on the embedding forced by appending the template's
    /// closing sentence, as inference does): replacing it with a constant would leave a policy
    /// that never emits the token — the untrained one — with equal rewards and no signal.
    pub missing_embed_penalty: f64,
    /// Reasoning tokens allowed before the over-budget penalty applies.
    pub reasoning_budget: usize,
    /// Subtracted once when the reasoning is longer than `reasoning_budget`.
    pub over_budget_penalty: f64,
    /// Length shaping: subtracts `length_penalty · tokens / reasoning_budget` (0 = off).
    pub length_penalty: f64,
    /// Pay only for the *gain* over not reasoning (TongSearch-QR; s3's "gain beyond
    /// baseline"): the retrieval term becomes the trajectory's DCG minus the DCG of the same
    /// query embedded with no thought at all, so a thought that merely ties earns nothing and
    /// one that hurts is punished (default false).
    pub gain: bool,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            top_k: 100,
            missing_embed_penalty: 0.5,
            reasoning_budget: 64,
            over_budget_penalty: 0.5,
            length_penalty: 0.0,
            gain: false,
        }
    }
}

/// One trajectory's reward and its parts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reward {
    /// DCG reward of its embedding (counted only when the embed token was emitted).
    pub retrieval: f64,
    /// Format term: minus the missing-embed-token and over-budget penalties that apply.
    pub format: f64,
    /// Length shaping term (≤ 0).
    pub length: f64,
    /// The no-thought DCG subtracted under [`RewardConfig::gain`] (0 otherwise).
    pub baseline: f64,
    /// `retrieval − baseline + format + length`.
    pub total: f64,
}

impl RewardConfig {
    /// Combines a trajectory's retrieval reward with its format and length terms.
    pub fn reward(&self, retrieval: f64, emitted_embed: bool, reasoning_tokens: usize) -> Reward {
        self.reward_against(retrieval, 0.0, emitted_embed, reasoning_tokens)
    }

    /// [`RewardConfig::reward`] relative to `baseline`, the DCG reward of the query's
    /// no-thought embedding; the baseline is subtracted only when [`RewardConfig::gain`] is on.
    pub fn reward_against(
        &self,
        retrieval: f64,
        baseline: f64,
        emitted_embed: bool,
        reasoning_tokens: usize,
    ) -> Reward {
        let baseline = if self.gain { baseline } else { 0.0 };
        let budget = self.reasoning_budget.max(1) as f64;
        let mut format = 0.0;
        if !emitted_embed {
            format -= self.missing_embed_penalty;
        }
        if reasoning_tokens > self.reasoning_budget {
            format -= self.over_budget_penalty;
        }
        let length = -self.length_penalty * reasoning_tokens as f64 / budget;
        Reward {
            retrieval,
            format,
            length,
            baseline,
            total: retrieval - baseline + format + length,
        }
    }
}

/// Whether a group's rewards differ at all. A group whose trajectories all earned the same
/// reward has zero advantages; DAPO's dynamic sampling drops such groups so they do not dilute
/// the token mean of the informative ones.
pub fn informative(rewards: &[f64]) -> bool {
    let (lo, hi) = rewards
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &r| {
            (l.min(r), h.max(r))
        });
    hi - lo > 1e-12
}

/// GRPO advantages of one group: `(r_i − mean) / (std + eps)` with the sample (n − 1)
/// standard deviation, as TRL computes it; `scale = false` only centres (Dr. GRPO). A group
/// whose rewards are all equal carries no signal and gets all-zero advantages; a group of one
/// is refused (nothing to compare with).
pub fn group_advantages(rewards: &[f64], scale: bool, eps: f64) -> Result<Vec<f64>> {
    let g = rewards.len();
    if g < 2 {
        invalid!("group_advantages: a group needs at least 2 trajectories, got {g}");
    }
    if let Some(r) = rewards.iter().find(|r| !r.is_finite()) {
        invalid!("group_advantages: non-finite reward {r}");
    }
    let mean = rewards.iter().sum::<f64>() / g as f64;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (g - 1) as f64;
    let std = var.sqrt();
    Ok(rewards
        .iter()
        .map(|r| {
            let c = r - mean;
            if c == 0.0 || !scale {
                c
            } else {
                c / (std + eps)
            }
        })
        .collect())
}

/// Constants of the GRPO objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoLossConfig {
    /// Lower clip range: ρ below `1 − clip_low` stops pushing a negative-advantage token down.
    pub clip_low: f64,
    /// Upper clip range: ρ above `1 + clip_high` stops pushing a positive-advantage token up.
    pub clip_high: f64,
    /// Weight β of the k3 KL penalty to the reference policy (0 = off).
    pub beta: f64,
}

impl Default for GrpoLossConfig {
    fn default() -> Self {
        GrpoLossConfig {
            clip_low: 0.2,
            clip_high: 0.2,
            beta: 0.04,
        }
    }
}

/// What the GRPO objective saw, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpoStats {
    /// Token-weighted mean of the surrogate `min(ρÂ, clip(ρ)Â)`.
    pub surrogate: f64,
    /// Token-weighted mean k3 KL to the reference (0 when no reference was given).
    pub kl: f64,
    /// Share of tokens whose ratio was clipped (they get no policy gradient).
    pub clip_fraction: f64,
    /// Token-weighted mean ratio ρ.
    pub ratio: f64,
}

/// The GRPO loss over a batch of trajectories (to minimise) and its statistics.
///
/// * `logp [b, t]` — `log π_θ` of the sampled tokens (differentiable, from
///   [`crate::losses::token_log_probs`]);
/// * `old_logp [b, t]` — the same under the policy that sampled them, stored at rollout;
/// * `ref_logp [b, t]` — under the reference policy (adapters off), when `beta > 0`;
/// * `advantages [b]` — one per trajectory (from [`group_advantages`]), shared by its tokens;
/// * `mask [b, t]` — 1 on the trajectory's own tokens (reasoning + embed token), 0 on prompt
///   and padding; masked positions are dropped before any arithmetic.
///
/// Per token, `−min(ρÂ, clip(ρ)Â)` equals `−ρÂ` where the ratio is inside the trust region
/// for the advantage's sign, and the constant `−clip(ρ)Â` (no gradient) outside it; it is
/// computed that way so a clipped token contributes an exact zero gradient.
pub fn grpo_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    advantages: &[f64],
    mask: &Tensor,
    cfg: &GrpoLossConfig,
) -> Result<(Tensor, GrpoStats)> {
    const F: &str = "grpo_loss";
    let Ok((b, t)) = logp.dims2() else {
        invalid!("{F}: logp must be [batch, tokens], got {:?}", logp.dims());
    };
    for (what, x) in [("old_logp", Some(old_logp)), ("ref_logp", ref_logp)] {
        if let Some(x) = x {
            if x.dims() != logp.dims() {
                invalid!(
                    "{F}: {what} has shape {:?}, logp {:?}",
                    x.dims(),
                    logp.dims()
                );
            }
        }
    }
    if advantages.len() != b {
        invalid!("{F}: {} advantages for {b} trajectories", advantages.len());
    }
    if !(cfg.clip_low >= 0.0 && cfg.clip_low < 1.0 && cfg.clip_high >= 0.0) {
        invalid!(
            "{F}: clip ranges must satisfy 0 <= clip_low < 1 and clip_high >= 0, got {} and {}",
            cfg.clip_low,
            cfg.clip_high
        );
    }
    if cfg.beta > 0.0 && ref_logp.is_none() {
        invalid!("{F}: beta = {} needs the reference log-probs", cfg.beta);
    }
    let sel = Selection::new(mask, &[b, t], F)?;
    let dev = logp.device();
    let dtype = logp.dtype();
    let idx = sel.index(dev)?;
    let pick = |x: &Tensor| -> Result<Tensor> { Ok(x.flatten_all()?.index_select(&idx, 0)?) };
    let lp = pick(logp)?;
    let old = pick(&old_logp.detach())?;
    let ratio = (&lp - &old)?.exp()?;
    let adv: Vec<f64> = sel
        .rows
        .iter()
        .map(|&i| advantages[i as usize / t])
        .collect();

    // Which tokens sit outside the trust region for their advantage's sign.
    let rho = ratio.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let (lo, hi) = (1.0 - cfg.clip_low, 1.0 + cfg.clip_high);
    let mut clipped = Vec::with_capacity(rho.len());
    let mut clip_value = Vec::with_capacity(rho.len());
    for (&r, &a) in rho.iter().zip(&adv) {
        let c = (a > 0.0 && r > hi) || (a < 0.0 && r < lo);
        clipped.push(c as u8);
        clip_value.push(r.clamp(lo, hi) * a);
    }
    let n = rho.len();
    let adv_t = Tensor::from_vec(adv, n, dev)?.to_dtype(dtype)?;
    let clipped_t = Tensor::from_vec(clipped.clone(), n, dev)?;
    let const_t = Tensor::from_vec(clip_value, n, dev)?.to_dtype(dtype)?;
    let surrogate = clipped_t.where_cond(&const_t, &ratio.mul(&adv_t)?)?;
    let mut per_token = surrogate.neg()?;
    let mut kl = None;
    if let Some(r) = ref_logp {
        // k3 = exp(q) − q − 1 with q = log π_ref − log π_θ (non-negative, unbiased under π_θ).
        let q = (pick(&r.detach())? - &lp)?;
        let k3 = ((q.exp()? - &q)? - 1.0)?;
        if cfg.beta > 0.0 {
            per_token = (per_token + (&k3 * cfg.beta)?)?;
        }
        kl = Some(k3);
    }
    let loss = sel.weighted_mean(&per_token)?;
    let mean = |x: &Tensor| -> Result<f64> {
        Ok(sel
            .weighted_mean(&x.detach())?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    let clip_fraction = clipped
        .iter()
        .zip(&sel.weights)
        .map(|(&c, w)| c as f64 * w)
        .sum::<f64>()
        / sel.total;
    let stats = GrpoStats {
        surrogate: mean(&surrogate)?,
        kl: kl.as_ref().map(mean).transpose()?.unwrap_or(0.0),
        clip_fraction,
        ratio: mean(&ratio)?,
    };
    Ok((loss, stats))
}
