//! One stage-1 (SFT) gradient computation with gradient caching.
//!
//! The stage-1 objective of Search-R3 over a batch of `b` queries and `n` documents is
//!
//! ```text
//! L = λ_ce·L_CE + λ_kl·L_KL + λ_nce·L_InfoNCE(q, D) + λ_tri·L_triplet(q, d⁺, d⁻)
//! ```
//!
//! where `q_i` / `d_j` are the final-norm hidden states at the `<|embed_token|>` that ends each
//! prompt, and `L_CE`, `L_KL` are token means over the assistant span of the query prompts.
//!
//! InfoNCE couples every query with every document, so a naive backward keeps the autograd
//! graph of all `b + n` sequences alive at once (candle keeps every intermediate: ~7 MB per
//! token for SmolLM2-135M with LoRA). GradCache (Gao et al., 2021, "Scaling Deep Contrastive
//! Learning Batch Size under Memory Limited Setup") splits the chain rule at the
//! representations:
//!
//! ```text
//! ∂L/∂θ = Σ_i (∂L_c/∂q_i)·(∂q_i/∂θ) + Σ_j (∂L_c/∂d_j)·(∂d_j/∂θ) + ∂(λ_ce·L_CE + λ_kl·L_KL)/∂θ
//! ```
//!
//! with `L_c = λ_nce·L_InfoNCE + λ_tri·L_triplet`:
//!
//! 1. encode every prompt without a graph ([`Path::Fast`]) → `q [b, d]`, `D [n, d]`;
//! 2. make them leaf `Var`s, evaluate `L_c` and backpropagate it → cached `g_q = ∂L_c/∂q`,
//!    `g_D = ∂L_c/∂D` (a graph over `[b+n, d]` only);
//! 3. re-encode in micro-batches on [`Path::Diff`] and backpropagate the surrogate
//!    `Σ rep ⊙ g` (whose gradient w.r.t. θ is exactly the first two sums above), plus, for
//!    query micro-batches, their share `k_m/N` of the token-mean `λ_ce·L_CE + λ_kl·L_KL`
//!    (`k_m` assistant tokens in the micro-batch, `N` in the whole batch);
//! 4. sum the parameter gradients over micro-batches.
//!
//! Peak graph memory is one micro-batch; the result equals the one-graph gradient up to the
//! float difference between the fast and differentiable forward paths (~1e-5 in f32).

use crate::error::{invalid, Result};
use crate::forward::{encode, micro_batches, rows, scalar, with_reference};
use crate::losses::{cross_entropy, info_nce, kl_to_reference, triplet, LossTerms, SftLossConfig};
use crate::optim::GradAccumulator;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use search_r3_model::{Model, Path};

/// One training query: its chat prompt and its relevance judgements.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    /// Token ids of the whole query prompt (system, user, assistant), ending with
    /// `<|embed_token|>`.
    pub query: Vec<u32>,
    /// Index in `query` of the first assistant-response token (e.g. `The` of
    /// `The embedding is <|embed_token|>`). Every token from here to the end, the embed token
    /// included, is a next-token target of `L_CE` and `L_KL`.
    pub assistant_start: usize,
    /// Indices into [`SftBatch::docs`] of the relevant documents. The first is the InfoNCE /
    /// triplet positive; the others are masked out of this query's InfoNCE denominator (they
    /// are not negatives).
    pub positives: Vec<usize>,
    /// Index into [`SftBatch::docs`] of a hard negative, if the example has one (used by the
    /// triplet term; it is in every query's InfoNCE denominator anyway).
    pub negative: Option<usize>,
}

/// A stage-1 batch: queries and the documents they are contrasted against.
#[derive(Debug, Clone)]
pub struct SftBatch {
    /// The queries.
    pub examples: Vec<SftExample>,
    /// Document prompts (each ending with `<|embed_token|>`): positives and hard negatives of
    /// every example; each document is an in-batch negative for every query that does not list
    /// it among its positives.
    pub docs: Vec<Vec<u32>>,
    /// Padding id (never attended to, never a target).
    pub pad_id: u32,
    /// Documents given as fixed vectors `[n, d]` instead of prompts (then `docs` must be
    /// empty): a query tower trained against a frozen document index (`train reason`). They
    /// are constants of the loss — no document is encoded, no gradient flows into them — and
    /// indices in the examples refer to their rows.
    pub frozen_docs: Option<Tensor>,
}

/// Result of [`sft_gradients`].
#[derive(Debug)]
pub struct StepOutput {
    /// `∂L/∂θ` for every var of [`Model::trainable_vars`] that received one.
    pub grads: GradStore,
    /// Value of each term and of the weighted total.
    pub terms: LossTerms,
}

/// Validated, precomputed per-batch bookkeeping.
struct Plan {
    /// InfoNCE positive per query (`positives[0]`).
    positive_index: Vec<usize>,
    /// `[b, n]` InfoNCE keep-mask: 0 on a query's secondary positives.
    nce_mask: Vec<f32>,
    /// Queries with a hard negative, and that negative.
    triplets: Vec<(usize, usize)>,
}

fn plan(model: &Model, batch: &SftBatch) -> Result<Plan> {
    const F: &str = "sft_gradients";
    let (b, n) = (batch.examples.len(), doc_count(batch)?);
    if b == 0 {
        invalid!("{F}: batch has no examples");
    }
    let embed_id = model.embed_token.as_ref().map(|e| e.id);
    let check_prompt = |seq: &[u32], what: String| -> Result<()> {
        match (seq.last(), embed_id) {
            (None, _) => invalid!("{F}: {what} is empty"),
            (Some(&last), Some(id)) if last != id => {
                invalid!("{F}: {what} ends with token {last}, not <|embed_token|> ({id}); truncated prompt?")
            }
            _ => Ok(()),
        }
    };
    for (j, d) in batch.docs.iter().enumerate() {
        check_prompt(d, format!("doc {j}"))?;
    }
    let mut positive_index = Vec::with_capacity(b);
    let mut nce_mask = vec![1f32; b * n];
    let mut triplets = Vec::new();
    for (i, ex) in batch.examples.iter().enumerate() {
        check_prompt(&ex.query, format!("query {i}"))?;
        if ex.assistant_start == 0 || ex.assistant_start >= ex.query.len() {
            invalid!(
                "{F}: query {i}: assistant_start {} must be in 1..{} (a token before the span and at least one span token)",
                ex.assistant_start,
                ex.query.len()
            );
        }
        let Some(&first) = ex.positives.first() else {
            invalid!("{F}: query {i} has no positive document");
        };
        for &p in &ex.positives {
            if p >= n {
                invalid!("{F}: query {i}: positive {p} is out of range for {n} docs");
            }
            if p != first {
                nce_mask[i * n + p] = 0.0;
            }
        }
        if let Some(neg) = ex.negative {
            if neg >= n {
                invalid!("{F}: query {i}: negative {neg} is out of range for {n} docs");
            }
            if ex.positives.contains(&neg) {
                invalid!("{F}: query {i}: doc {neg} is both a positive and the hard negative");
            }
            triplets.push((i, neg));
        }
        positive_index.push(first);
    }
    Ok(Plan {
        positive_index,
        nce_mask,
        triplets,
    })
}

/// How many documents the batch holds: its prompts, or the rows of its frozen vectors.
fn doc_count(batch: &SftBatch) -> Result<usize> {
    match &batch.frozen_docs {
        None => Ok(batch.docs.len()),
        Some(_) if !batch.docs.is_empty() => {
            invalid!("sft_gradients: a batch has either document prompts or frozen document vectors, not both")
        }
        Some(t) => Ok(t.dims2()?.0),
    }
}

/// Embeddings `[len, d]` of `seqs`, without a graph, in micro-batches; row `k` is `seqs[k]`.
fn embed_all(model: &Model, seqs: &[&Vec<u32>], pad_id: u32, budget: usize) -> Result<Tensor> {
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let mut reps: Vec<Option<Tensor>> = vec![None; seqs.len()];
    for mb in micro_batches(&lens, budget) {
        let part: Vec<&Vec<u32>> = mb.iter().map(|&i| seqs[i]).collect();
        let (hidden, last, _) = encode(model, &part, pad_id, Path::Fast)?;
        let r = rows(&hidden, &last)?.detach();
        for (k, &i) in mb.iter().enumerate() {
            reps[i] = Some(r.get(k)?);
        }
    }
    let reps: Vec<Tensor> = reps
        .into_iter()
        .map(|r| r.expect("every row encoded"))
        .collect();
    Ok(Tensor::stack(&reps, 0)?)
}

/// The full stage-1 gradient of one batch, computed with gradient caching (see the module
/// docs):
///
/// `L = λ_ce·L_CE + λ_kl·L_KL + λ_nce·L_InfoNCE + λ_tri·L_triplet`
///
/// * `L_InfoNCE = (1/b) Σ_i −log( exp(cos(q_i, d_{p(i)})/τ) / Σ_j exp(cos(q_i, d_j)/τ) )` over
///   all `n` documents, `p(i)` = the example's first positive, its other positives excluded from
///   the denominator;
/// * `L_triplet = (1/|T|) Σ_{i∈T} max(0, θ − cos(q_i, d⁺_i) + cos(q_i, d⁻_i))` over the queries
///   `T` that have a hard negative (skipped when `T` is empty or `λ_tri = 0`);
/// * `L_CE`, `L_KL` — token means over every position `j` whose next token `j+1` lies in the
///   assistant span (targets `query[j+1]`, the final `<|embed_token|>` included), KL against
///   the same model with its adapters disabled (fast path, detached).
///
/// `micro_tokens` bounds the padded tokens (`rows × longest row`) per differentiable
/// re-encoding; a longer single sequence still gets its own micro-batch. A term whose weight
/// is 0 is neither computed nor reported. The model's `lora_enabled` flag is toggled for the
/// reference forward and restored before returning.
///
/// It is one function on purpose: its four blocks are the four GradCache steps of the module
/// docs, and they share the cached representations and their gradients; split, each part would
/// take most of the others' locals as arguments.
///
/// Every prompt must end with the model's `<|embed_token|>` (checked when the model has one:
/// a prompt cut short by truncation is an error, not a silently wrong embedding); indices and
/// `assistant_start` are validated before any forward pass.
pub fn sft_gradients(
    model: &mut Model,
    batch: &SftBatch,
    cfg: &SftLossConfig,
    micro_tokens: usize,
) -> Result<StepOutput> {
    const F: &str = "sft_gradients";
    cfg.validate()?;
    if micro_tokens == 0 {
        invalid!("{F}: micro_tokens must be > 0");
    }
    let plan = plan(model, batch)?;
    let (b, n) = (batch.examples.len(), doc_count(batch)?);
    let use_nce = cfg.lambda_nce > 0.0;
    let use_tri = cfg.lambda_tri > 0.0 && !plan.triplets.is_empty();
    let contrastive = use_nce || use_tri;
    let token_terms = cfg.lambda_ce > 0.0 || cfg.lambda_kl > 0.0;
    if contrastive && n == 0 {
        invalid!("{F}: contrastive terms need documents, the batch has none");
    }
    let queries: Vec<&Vec<u32>> = batch.examples.iter().map(|e| &e.query).collect();
    let docs: Vec<&Vec<u32>> = batch.docs.iter().collect();

    // Steps 1–2: representations without a graph, then the contrastive loss on leaf vars.
    let mut nce_value = None;
    let mut tri_value = None;
    let (mut g_q, mut g_d) = (None, None);
    if contrastive {
        let q = Var::from_tensor(&embed_all(model, &queries, batch.pad_id, micro_tokens)?)?;
        let d = match &batch.frozen_docs {
            Some(t) => Var::from_tensor(&t.to_dtype(q.dtype())?)?,
            None => Var::from_tensor(&embed_all(model, &docs, batch.pad_id, micro_tokens)?)?,
        };
        let mut loss: Option<Tensor> = None;
        let mut add = |term: Tensor| -> Result<()> {
            loss = Some(match loss.take() {
                None => term,
                Some(l) => (l + term)?,
            });
            Ok(())
        };
        if use_nce {
            let mask = Tensor::from_slice(&plan.nce_mask, (b, n), q.device())?;
            let nce = info_nce(
                q.as_tensor(),
                d.as_tensor(),
                &plan.positive_index,
                cfg.tau,
                Some(&mask),
            )?;
            nce_value = Some(scalar(&nce)?);
            add((nce * cfg.lambda_nce)?)?;
        }
        if use_tri {
            let dev = q.device();
            let qi: Vec<u32> = plan.triplets.iter().map(|&(i, _)| i as u32).collect();
            let pi: Vec<u32> = plan
                .triplets
                .iter()
                .map(|&(i, _)| plan.positive_index[i] as u32)
                .collect();
            let ni: Vec<u32> = plan.triplets.iter().map(|&(_, j)| j as u32).collect();
            let sel = |x: &Var, idx: &[u32]| -> Result<Tensor> {
                let idx = Tensor::from_slice(idx, idx.len(), dev)?;
                Ok(x.as_tensor().index_select(&idx, 0)?)
            };
            let tri = triplet(&sel(&q, &qi)?, &sel(&d, &pi)?, &sel(&d, &ni)?, cfg.theta)?;
            tri_value = Some(scalar(&tri)?);
            add((tri * cfg.lambda_tri)?)?;
        }
        let loss = loss.expect("at least one contrastive term");
        let grads = loss.backward()?;
        // A var the loss does not reach (e.g. every doc masked away) has gradient zero.
        let grad_of = |v: &Var| -> Result<Tensor> {
            Ok(match grads.get(v) {
                Some(g) => g.detach(),
                None => v.zeros_like()?,
            })
        };
        g_q = Some(grad_of(&q)?);
        if batch.frozen_docs.is_none() {
            g_d = Some(grad_of(&d)?);
        }
    }

    // Token-level targets: position j predicts query[j+1]; mask the assistant span.
    let total_tokens: usize = batch
        .examples
        .iter()
        .map(|e| e.query.len() - e.assistant_start)
        .sum();

    // Step 3: differentiable re-encoding in micro-batches, gradients summed.
    let vars: Vec<Var> = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut sum = GradAccumulator::new(&vars);
    let mut ce_value = 0f64;
    let mut kl_value = 0f64;
    let mut accumulate = |surrogate: Tensor| -> Result<()> { sum.add(&surrogate.backward()?) };

    if contrastive || token_terms {
        let lens: Vec<usize> = queries.iter().map(|s| s.len()).collect();
        for mb in micro_batches(&lens, micro_tokens) {
            let part: Vec<&Vec<u32>> = mb.iter().map(|&i| queries[i]).collect();
            let (hidden, last, t) = encode(model, &part, batch.pad_id, Path::Diff)?;
            let mut surrogate: Option<Tensor> = None;
            if let Some(g_q) = &g_q {
                let idx: Vec<u32> = mb.iter().map(|&i| i as u32).collect();
                let g = g_q.index_select(&Tensor::from_slice(&idx, idx.len(), g_q.device())?, 0)?;
                surrogate = Some(rows(&hidden, &last)?.mul(&g)?.sum_all()?);
            }
            if token_terms {
                // Flat positions whose next token is an assistant token, and those tokens.
                let mut pos = Vec::new();
                let mut targets = Vec::new();
                for (k, &i) in mb.iter().enumerate() {
                    let ex = &batch.examples[i];
                    for j in ex.assistant_start - 1..ex.query.len() - 1 {
                        pos.push((k * t + j) as u32);
                        targets.push(ex.query[j + 1]);
                    }
                }
                let k = pos.len();
                let share = k as f64 / total_tokens as f64;
                // Logits only at the selected positions: [1, k, v] instead of [b, t, v].
                let logits = model.logits(&rows(&hidden, &pos)?)?.unsqueeze(0)?;
                let targets = Tensor::from_vec(targets, (1, k), logits.device())?;
                let ones = Tensor::ones((1, k), DType::F32, logits.device())?;
                let mut micro_loss: Option<Tensor> = None;
                let mut add = |term: Tensor, lambda: f64| -> Result<()> {
                    let term = (term * (lambda * share))?;
                    micro_loss = Some(match micro_loss.take() {
                        None => term,
                        Some(l) => (l + term)?,
                    });
                    Ok(())
                };
                if cfg.lambda_ce > 0.0 {
                    let ce = cross_entropy(&logits, &targets, &ones)?;
                    ce_value += scalar(&ce)? * share;
                    add(ce, cfg.lambda_ce)?;
                }
                if cfg.lambda_kl > 0.0 {
                    let ref_logits = with_reference(model, |m| {
                        let (h, _, _) = encode(m, &part, batch.pad_id, Path::Fast)?;
                        Ok(m.logits(&rows(&h, &pos)?)?.detach())
                    })?
                    .unsqueeze(0)?;
                    let kl = kl_to_reference(&logits, &ref_logits, &ones)?;
                    kl_value += scalar(&kl)? * share;
                    add(kl, cfg.lambda_kl)?;
                }
                let micro_loss = micro_loss.expect("a token term is on");
                surrogate = Some(match surrogate {
                    None => micro_loss,
                    Some(s) => (s + micro_loss)?,
                });
            }
            if let Some(s) = surrogate {
                accumulate(s)?;
            }
        }
    }
    if let Some(g_d) = &g_d {
        let lens: Vec<usize> = docs.iter().map(|s| s.len()).collect();
        for mb in micro_batches(&lens, micro_tokens) {
            let part: Vec<&Vec<u32>> = mb.iter().map(|&i| docs[i]).collect();
            let (hidden, last, _) = encode(model, &part, batch.pad_id, Path::Diff)?;
            let idx: Vec<u32> = mb.iter().map(|&i| i as u32).collect();
            let g = g_d.index_select(&Tensor::from_slice(&idx, idx.len(), g_d.device())?, 0)?;
            accumulate(rows(&hidden, &last)?.mul(&g)?.sum_all()?)?;
        }
    }

    let grads = sum.sum();
    let ce = (cfg.lambda_ce > 0.0).then_some(ce_value);
    let kl = (cfg.lambda_kl > 0.0).then_some(kl_value);
    let total = [
        (cfg.lambda_ce, ce),
        (cfg.lambda_kl, kl),
        (cfg.lambda_nce, nce_value),
        (cfg.lambda_tri, tri_value),
    ]
    .iter()
    .map(|(l, v)| l * v.unwrap_or(0.0))
    .sum();
    Ok(StepOutput {
        grads,
        terms: LossTerms {
            ce,
            kl,
            nce: nce_value,
            tri: tri_value,
            total,
        },
    })
}
