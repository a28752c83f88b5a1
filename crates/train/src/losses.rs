//! Stage-1 (SFT) loss terms of Search-R3, and the KL estimator the GRPO stage reuses.
//!
//! Every function here is batched, validates its inputs before touching a tensor op, and is
//! built only from candle ops that record a backward op (`log_softmax`, `exp`, `matmul`,
//! `gather`, `index_select`, `where_cond`, `relu`, `sqrt`, sums). candle's fused kernels
//! (`softmax_last_dim`, `rms_norm`, …) record none and would drop gradients without an error,
//! so they are never used on this path.
//!
//! Token-level terms take a `mask [b, t]` of non-negative weights (normally 1.0 on assistant
//! tokens, 0.0 elsewhere). Positions with weight 0 are removed *before* any arithmetic, so
//! their targets and logits may hold anything (padding ids, out-of-vocabulary ids, NaN) without
//! affecting the value or the gradient. The reduction is the weighted token mean
//! `Σ_i w_i·ℓ_i / Σ_i w_i`; a mask that selects no token is an error, because a silent zero
//! loss would hide a data-pipeline bug (e.g. an assistant span that was truncated away).

use crate::error::{invalid, Error, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::log_softmax;

/// Added to ‖x‖² before the square root when normalising embeddings, so an all-zero vector
/// yields a zero direction (cosine 0) instead of `0/0 = NaN`. Far below f32 rounding for any
/// embedding with a meaningful norm.
const NORM_EPS_SQ: f64 = 1e-24;

/// Smallest accepted InfoNCE temperature. The log-sum-exp keeps any τ finite in exact
/// arithmetic, but `1/τ` itself must stay far from f32's range limit (3.4e38) for `cos/τ` to be
/// finite; below 1e-12 the softmax is a hard arg-max anyway.
pub const MIN_TAU: f64 = 1e-12;

fn float_dtype(t: &Tensor, what: &str, func: &str) -> Result<()> {
    if !t.dtype().is_float() {
        invalid!("{func}: {what} must be a float tensor, got {:?}", t.dtype());
    }
    Ok(())
}

fn same_dtype(a: &Tensor, b: &Tensor, what: &str, func: &str) -> Result<()> {
    if a.dtype() != b.dtype() {
        invalid!(
            "{func}: {what} have different dtypes ({:?} vs {:?})",
            a.dtype(),
            b.dtype()
        );
    }
    Ok(())
}

/// The positions a mask selects, with their weights. Read on the host: the mask is tiny next
/// to the logits, and selecting rows up front means the log-softmax over the vocabulary is only
/// computed (and kept for backward) at assistant positions.
pub(crate) struct Selection {
    /// Flat indices `i·t + j` with non-zero weight.
    pub(crate) rows: Vec<u32>,
    /// Their weights.
    pub(crate) weights: Vec<f64>,
    /// `Σ weights`, > 0.
    pub(crate) total: f64,
}

fn select(mask: &Tensor, dims: &[usize], func: &str) -> Result<Selection> {
    if mask.dims() != dims {
        invalid!(
            "{func}: mask has shape {:?}, expected {:?}",
            mask.dims(),
            dims
        );
    }
    let w = mask.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if w.len() > u32::MAX as usize {
        invalid!("{func}: {} positions exceed the u32 index range", w.len());
    }
    let mut sel = Selection {
        rows: Vec::new(),
        weights: Vec::new(),
        total: 0.0,
    };
    for (i, &x) in w.iter().enumerate() {
        if !x.is_finite() || x < 0.0 {
            invalid!("{func}: mask weights must be finite and >= 0, got {x} at flat position {i}");
        }
        if x != 0.0 {
            sel.rows.push(i as u32);
            sel.weights.push(x);
            sel.total += x;
        }
    }
    if sel.rows.is_empty() {
        invalid!(
            "{func}: mask selects no token (all {} weights are 0)",
            w.len()
        );
    }
    Ok(sel)
}

impl Selection {
    /// The positions `mask` (of shape `dims`) selects; errors name `func`.
    pub(crate) fn new(mask: &Tensor, dims: &[usize], func: &str) -> Result<Selection> {
        select(mask, dims, func)
    }

    pub(crate) fn index(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.rows, self.rows.len(), device)?)
    }

    /// `Σ_i w_i·x_i / Σ_i w_i` for `x [k]`.
    pub(crate) fn weighted_mean(&self, x: &Tensor) -> Result<Tensor> {
        let w = Tensor::from_slice(&self.weights, self.weights.len(), x.device())?
            .to_dtype(x.dtype())?;
        Ok((x.mul(&w)?.sum_all()? / self.total)?)
    }
}

/// `[b, t, v]` logits → the `[k, v]` rows the selection keeps.
fn selected_rows(logits: &Tensor, sel: &Selection) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let flat = logits.reshape((b * t, v))?;
    Ok(flat.index_select(&sel.index(logits.device())?, 0)?)
}

fn logits_dims(logits: &Tensor, func: &str) -> Result<(usize, usize, usize)> {
    float_dtype(logits, "logits", func)?;
    let Ok((b, t, v)) = logits.dims3() else {
        invalid!(
            "{func}: logits must be [batch, seq, vocab], got shape {:?}",
            logits.dims()
        );
    };
    if b == 0 || t == 0 || v == 0 {
        invalid!("{func}: empty logits of shape {:?}", logits.dims());
    }
    Ok((b, t, v))
}

fn check_targets(targets: &Tensor, b: usize, t: usize, func: &str) -> Result<Vec<u32>> {
    if targets.dtype() != DType::U32 {
        invalid!(
            "{func}: targets must be u32 token ids, got {:?}",
            targets.dtype()
        );
    }
    if targets.dims() != [b, t] {
        invalid!(
            "{func}: targets have shape {:?}, expected [{b}, {t}] to match the logits",
            targets.dims()
        );
    }
    Ok(targets.flatten_all()?.to_vec1::<u32>()?)
}

/// Next-token cross-entropy over the masked (assistant) tokens:
///
/// `L_CE = Σ_{i,j} m_ij · (−log softmax(z_ij)[y_ij]) / Σ_{i,j} m_ij`
///
/// * `logits [b, t, v]` — model outputs, already aligned with `targets` (position `j` predicts
///   `targets[:, j]`; shifting by one is the caller's job).
/// * `targets [b, t]` u32 — ids; at positions with mask 0 they are never read, so padding or
///   garbage there is harmless (0 is the conventional filler).
/// * `mask [b, t]` — non-negative weights, any float dtype.
///
/// Returns a scalar in the logits' dtype.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    const F: &str = "cross_entropy";
    let (b, t, v) = logits_dims(logits, F)?;
    let ids = check_targets(targets, b, t, F)?;
    let sel = select(mask, &[b, t], F)?;
    let mut picked = Vec::with_capacity(sel.rows.len());
    for &r in &sel.rows {
        let y = ids[r as usize];
        if y as usize >= v {
            invalid!(
                "{F}: target id {y} at (batch {}, position {}) is outside the vocabulary of {v}",
                r as usize / t,
                r as usize % t
            );
        }
        picked.push(y);
    }
    let rows = selected_rows(logits, &sel)?;
    let logp = log_softmax(&rows, D::Minus1)?;
    let y = Tensor::from_vec(picked, (sel.rows.len(), 1), logits.device())?;
    let nll = logp.gather(&y, 1)?.squeeze(1)?.neg()?;
    sel.weighted_mean(&nll)
}

/// Per-token log-probabilities `log π(y_ij | context) = log softmax(z_ij)[y_ij]`, shape `[b, t]`.
///
/// The GRPO stage needs these per sampled token (policy ratio and [`kl_k3`]). Every target id
/// must be inside the vocabulary, masked or not (use 0 for padding); unlike the reduced losses
/// there is no mask to exclude positions here.
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const F: &str = "token_log_probs";
    let (b, t, v) = logits_dims(logits, F)?;
    let ids = check_targets(targets, b, t, F)?;
    if let Some((i, &y)) = ids.iter().enumerate().find(|(_, &y)| y as usize >= v) {
        invalid!(
            "{F}: target id {y} at (batch {}, position {}) is outside the vocabulary of {v}",
            i / t,
            i % t
        );
    }
    let logp = log_softmax(logits, D::Minus1)?;
    Ok(logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?)
}

/// KL divergence from the policy to the frozen reference, per token, exactly over the
/// vocabulary, averaged over the mask:
///
/// `L_KL = Σ_{i,j} m_ij · Σ_v p_θ(v) (log p_θ(v) − log p_ref(v)) / Σ_{i,j} m_ij`
///
/// with `p_θ = softmax(logits_ij)` and `p_ref = softmax(ref_logits_ij)`.
///
/// `ref_logits` must come from the *same* model with the adapters disabled, computed without
/// gradient tracking (the fast forward path is fine); it is detached here in any case, so the
/// reference never receives a gradient. When `logits == ref_logits` both log-softmaxes are the
/// same float computation, so the value is exactly 0; the gradient
/// `p_θ ⊙ ((log p_θ − log p_ref) − KL)` then vanishes up to rounding (`p_θ − p_θ·Σp_θ`).
pub fn kl_to_reference(logits: &Tensor, ref_logits: &Tensor, mask: &Tensor) -> Result<Tensor> {
    const F: &str = "kl_to_reference";
    let (b, t, _v) = logits_dims(logits, F)?;
    float_dtype(ref_logits, "ref_logits", F)?;
    if ref_logits.dims() != logits.dims() {
        invalid!(
            "{F}: ref_logits have shape {:?}, logits {:?}",
            ref_logits.dims(),
            logits.dims()
        );
    }
    same_dtype(logits, ref_logits, "logits and ref_logits", F)?;
    let sel = select(mask, &[b, t], F)?;
    let logp = log_softmax(&selected_rows(logits, &sel)?, D::Minus1)?;
    let logq = log_softmax(&selected_rows(&ref_logits.detach(), &sel)?, D::Minus1)?;
    // p = exp(log p) rather than a separate softmax: one fewer pass over the vocabulary and
    // the same values that enter log p.
    let p = logp.exp()?;
    let per_token = p.mul(&(logp - logq)?)?.sum(D::Minus1)?;
    sel.weighted_mean(&per_token)
}

/// The "k3" KL estimator (Schulman, 2020) used by GRPO, from the log-probabilities of the
/// *sampled* tokens only:
///
/// `k3 = exp(r) − r − 1`, `r = log π_ref(y) − log π_θ(y)`, averaged over the mask as in
/// [`cross_entropy`].
///
/// It is non-negative, unbiased for KL(π_θ ‖ π_ref) when `y ~ π_θ`, and needs no vocabulary-wide
/// softmax. `logp` and `ref_logp` are e.g. `[b, t]` from [`token_log_probs`] (any shape, equal
/// to `mask`'s); `ref_logp` is detached. Positions with mask 0 are replaced by `r = 0` before
/// the exponential, so `-inf` log-probs on padding cannot produce NaN in value or gradient.
pub fn kl_k3(logp: &Tensor, ref_logp: &Tensor, mask: &Tensor) -> Result<Tensor> {
    const F: &str = "kl_k3";
    float_dtype(logp, "logp", F)?;
    float_dtype(ref_logp, "ref_logp", F)?;
    same_dtype(logp, ref_logp, "logp and ref_logp", F)?;
    if ref_logp.dims() != logp.dims() {
        invalid!(
            "{F}: ref_logp has shape {:?}, logp {:?}",
            ref_logp.dims(),
            logp.dims()
        );
    }
    if logp.elem_count() == 0 {
        invalid!("{F}: empty input of shape {:?}", logp.dims());
    }
    let sel = select(mask, logp.dims(), F)?;
    let r = ref_logp.detach().sub(logp)?.flatten_all()?;
    // Select instead of multiplying by the mask: 0·inf would be NaN.
    let r = r.index_select(&sel.index(logp.device())?, 0)?;
    let k3 = ((r.exp()? - &r)? - 1.0)?;
    sel.weighted_mean(&k3)
}

/// Rows of `x [n, d]` divided by their L2 norm, differentiably (see [`NORM_EPS_SQ`]).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)? + NORM_EPS_SQ)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

fn embedding_dims(x: &Tensor, what: &str, func: &str) -> Result<(usize, usize)> {
    float_dtype(x, what, func)?;
    let Ok((n, d)) = x.dims2() else {
        invalid!(
            "{func}: {what} must be [rows, dim], got shape {:?}",
            x.dims()
        );
    };
    if n == 0 || d == 0 {
        invalid!("{func}: {what} is empty (shape {:?})", x.dims());
    }
    Ok((n, d))
}

/// InfoNCE with in-batch and hard negatives over cosine similarities:
///
/// `L = (1/b) Σ_i −log( exp(cos(q_i, d_{p(i)})/τ) / Σ_j exp(cos(q_i, d_j)/τ) )`
///
/// * `q [b, d]` — query embeddings; `docs [n, d]` — every candidate of the batch (all
///   positives, which act as in-batch negatives for the other queries, plus hard negatives).
///   Both are L2-normalised here, differentiably, so raw hidden states can be passed.
/// * `positive_index[i]` — the row of `docs` that is query `i`'s positive.
/// * `tau > 0` — temperature. Computed as a log-softmax (max-subtracted log-sum-exp), so even
///   a tiny τ gives finite values.
/// * `mask [b, n]` (optional) — 0 excludes `docs[j]` from query `i`'s denominator (its logit
///   becomes −∞): use it for false negatives, such as another query's positive that is also
///   relevant to query `i`, or a second positive of the same query. The entry at
///   `positive_index[i]` is always kept whatever the mask says.
pub fn info_nce(
    q: &Tensor,
    docs: &Tensor,
    positive_index: &[usize],
    tau: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    const F: &str = "info_nce";
    let (b, d) = embedding_dims(q, "q", F)?;
    let (n, dd) = embedding_dims(docs, "docs", F)?;
    same_dtype(q, docs, "q and docs", F)?;
    if dd != d {
        invalid!("{F}: q has dimension {d} but docs have {dd}");
    }
    if !(tau.is_finite() && tau > 0.0) {
        invalid!("{F}: temperature tau must be finite and > 0, got {tau}");
    }
    if tau < MIN_TAU {
        invalid!("{F}: temperature tau = {tau} is below {MIN_TAU}: cos/τ would overflow or lose all precision");
    }
    if positive_index.len() != b {
        invalid!(
            "{F}: {} positive indices for {b} queries",
            positive_index.len()
        );
    }
    if let Some((i, &p)) = positive_index.iter().enumerate().find(|(_, &p)| p >= n) {
        invalid!("{F}: positive_index[{i}] = {p} is out of range for {n} docs");
    }
    let bias = match mask {
        None => None,
        Some(m) => {
            if m.dims() != [b, n] {
                invalid!("{F}: mask has shape {:?}, expected [{b}, {n}]", m.dims());
            }
            let keep = m.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let mut bias = vec![0f64; b * n];
            for (i, row) in keep.iter().enumerate() {
                for (j, &k) in row.iter().enumerate() {
                    if k.is_nan() {
                        invalid!("{F}: mask[{i}][{j}] is NaN");
                    }
                    if k == 0.0 && j != positive_index[i] {
                        bias[i * n + j] = f64::NEG_INFINITY;
                    }
                }
            }
            // Added rather than multiplied: −∞ logits give exp = 0 and a zero gradient,
            // whereas multiplying a 0/1 mask into log-probs would produce 0·(−∞) = NaN.
            Some(Tensor::from_vec(bias, (b, n), q.device())?.to_dtype(q.dtype())?)
        }
    };
    let sim = l2_normalize(q)?.matmul(&l2_normalize(docs)?.t()?)?;
    let mut logits = (sim / tau)?;
    if let Some(bias) = bias {
        logits = logits.add(&bias)?;
    }
    let logp = log_softmax(&logits, D::Minus1)?;
    let pos: Vec<u32> = positive_index.iter().map(|&p| p as u32).collect();
    let pos = Tensor::from_vec(pos, (b, 1), q.device())?;
    Ok(logp.gather(&pos, 1)?.mean_all()?.neg()?)
}

/// Triplet margin loss on cosine similarity:
///
/// `L = (1/b) Σ_i max(0, θ − cos(q_i, d⁺_i) + cos(q_i, d⁻_i))`
///
/// `q`, `pos`, `neg` are `[b, d]` (raw embeddings; normalised here). `theta ≥ 0` is the margin.
/// Triplets that already satisfy the margin contribute exactly 0 and no gradient; at the kink
/// itself candle's `relu` passes the gradient (subgradient 1).
pub fn triplet(q: &Tensor, pos: &Tensor, neg: &Tensor, theta: f64) -> Result<Tensor> {
    const F: &str = "triplet";
    embedding_dims(q, "q", F)?;
    embedding_dims(pos, "pos", F)?;
    embedding_dims(neg, "neg", F)?;
    if pos.dims() != q.dims() || neg.dims() != q.dims() {
        invalid!(
            "{F}: q {:?}, pos {:?} and neg {:?} must have the same shape",
            q.dims(),
            pos.dims(),
            neg.dims()
        );
    }
    same_dtype(q, pos, "q and pos", F)?;
    same_dtype(q, neg, "q and neg", F)?;
    if !(theta.is_finite() && theta >= 0.0) {
        invalid!("{F}: margin theta must be finite and >= 0, got {theta}");
    }
    let qn = l2_normalize(q)?;
    let cos_pos = qn.mul(&l2_normalize(pos)?)?.sum(1)?;
    let cos_neg = qn.mul(&l2_normalize(neg)?)?.sum(1)?;
    let hinge = ((cos_neg - cos_pos)? + theta)?.relu()?;
    Ok(hinge.mean_all()?)
}

/// Weights and constants of the stage-1 objective
/// `L = λ_ce·L_CE + λ_kl·L_KL + λ_nce·L_InfoNCE + λ_tri·L_triplet`.
///
/// The paper sums the four terms with explicit τ and θ whose values were not published; the
/// defaults are our choices and should be recorded with every run:
///
/// * `lambda_ce = 1.0` — the format (`… The embedding is <|embed_token|>.`) must survive.
/// * `lambda_kl = 0.1` — a regulariser, not a target: at 1.0 it would pin the adapters to the
///   base model before the contrastive terms move them.
/// * `lambda_nce = 1.0` — the main representation signal.
/// * `lambda_tri = 0.5` — half weight because its hard negative already sits in InfoNCE's
///   denominator; it adds an absolute margin, not new information.
/// * `tau = 0.05` — upper end of the typical 0.02–0.05: cosine logits span ±20, sharp enough to
///   rank, while a small model starting from non-contrastive hidden states does not get the
///   1/τ = 50 gradient spikes of τ = 0.02.
/// * `theta = 0.2` — middle of the typical 0.1–0.3.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftLossConfig {
    /// Weight of the next-token cross-entropy on the assistant response.
    pub lambda_ce: f64,
    /// Weight of KL(π_θ ‖ π_ref) on the same tokens.
    pub lambda_kl: f64,
    /// Weight of InfoNCE.
    pub lambda_nce: f64,
    /// Weight of the triplet margin loss.
    pub lambda_tri: f64,
    /// InfoNCE temperature τ (> 0).
    pub tau: f64,
    /// Triplet margin θ (≥ 0).
    pub theta: f64,
}

impl Default for SftLossConfig {
    fn default() -> Self {
        Self {
            lambda_ce: 1.0,
            lambda_kl: 0.1,
            lambda_nce: 1.0,
            lambda_tri: 0.5,
            tau: 0.05,
            theta: 0.2,
        }
    }
}

/// The value of each stage-1 term (unweighted) and of the weighted total, for logging.
///
/// A term is `None` when it was not computed (its weight is 0 and the caller skipped it, e.g.
/// no reference forward when `lambda_kl = 0`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossTerms {
    /// Cross-entropy.
    pub ce: Option<f64>,
    /// KL to the reference.
    pub kl: Option<f64>,
    /// InfoNCE.
    pub nce: Option<f64>,
    /// Triplet.
    pub tri: Option<f64>,
    /// `Σ λ·term` over the terms with non-zero weight.
    pub total: f64,
}

impl LossTerms {
    /// Whether every reported value is finite (a NaN loss means the step must be skipped).
    pub fn is_finite(&self) -> bool {
        [self.ce, self.kl, self.nce, self.tri]
            .into_iter()
            .flatten()
            .all(f64::is_finite)
            && self.total.is_finite()
    }
}

impl SftLossConfig {
    /// Checks that weights are finite and ≥ 0 (at least one > 0), τ ≥ [`MIN_TAU`] and θ ≥ 0.
    pub fn validate(&self) -> Result<()> {
        let lambdas = [
            ("lambda_ce", self.lambda_ce),
            ("lambda_kl", self.lambda_kl),
            ("lambda_nce", self.lambda_nce),
            ("lambda_tri", self.lambda_tri),
        ];
        for (name, l) in lambdas {
            if !(l.is_finite() && l >= 0.0) {
                invalid!("loss config: {name} must be finite and >= 0, got {l}");
            }
        }
        if lambdas.iter().all(|(_, l)| *l == 0.0) {
            invalid!("loss config: every lambda is 0, nothing to train");
        }
        if !(self.tau.is_finite() && self.tau >= MIN_TAU) {
            invalid!(
                "loss config: tau must be finite and >= {MIN_TAU}, got {}",
                self.tau
            );
        }
        if !(self.theta.is_finite() && self.theta >= 0.0) {
            invalid!(
                "loss config: theta must be finite and >= 0, got {}",
                self.theta
            );
        }
        Ok(())
    }

    /// `total = λ_ce·ce + λ_kl·kl + λ_nce·nce + λ_tri·tri` as a differentiable scalar, and the
    /// values for logging.
    ///
    /// Each term is a scalar tensor or `None`. A term whose weight is non-zero must be given;
    /// a term whose weight is 0 is reported (if given) but kept out of the graph, so it costs
    /// no backward work.
    pub fn combine(
        &self,
        ce: Option<&Tensor>,
        kl: Option<&Tensor>,
        nce: Option<&Tensor>,
        tri: Option<&Tensor>,
    ) -> Result<(Tensor, LossTerms)> {
        self.validate()?;
        let named = [
            ("ce", self.lambda_ce, ce),
            ("kl", self.lambda_kl, kl),
            ("nce", self.lambda_nce, nce),
            ("tri", self.lambda_tri, tri),
        ];
        let mut total: Option<Tensor> = None;
        let mut values = [None; 4];
        for (slot, (name, lambda, term)) in values.iter_mut().zip(named) {
            let Some(term) = term else {
                if lambda != 0.0 {
                    invalid!("combine: term `{name}` has weight {lambda} but was not computed");
                }
                continue;
            };
            if term.rank() != 0 {
                invalid!(
                    "combine: term `{name}` must be a scalar, got shape {:?}",
                    term.dims()
                );
            }
            *slot = Some(scalar_f64(term)?);
            if lambda == 0.0 {
                continue;
            }
            let weighted = (term * lambda)?;
            total = Some(match total {
                None => weighted,
                Some(t) => {
                    same_dtype(&t, &weighted, "loss terms", "combine")?;
                    (t + weighted)?
                }
            });
        }
        let total = total.ok_or_else(|| Error::Invalid("combine: no term given".into()))?;
        let terms = LossTerms {
            ce: values[0],
            kl: values[1],
            nce: values[2],
            tri: values[3],
            total: scalar_f64(&total)?,
        };
        Ok((total, terms))
    }
}

fn scalar_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
