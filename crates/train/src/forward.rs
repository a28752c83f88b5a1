//! The forward passes both stages' gradients are built from: right-padded batches on either
//! path ([`Path::Fast`] without a graph, [`Path::Diff`] with one), the hidden-state rows at
//! each sequence's last token (its `<|embed_token|>`), micro-batches bounded by padded tokens,
//! and the frozen reference policy (the same model with its adapters switched off).
//!
//! Inference embeddings come from `search_r3_core::embedder::embed_at_token`; these are the
//! training-side passes, whose rows stay tensors so gradients can flow through them.

use crate::error::Result;
use candle_core::{DType, Tensor};
use search_r3_core::embedder::embed_at_token;
use search_r3_index::l2_normalize;
use search_r3_model::{Batch, Model, Path};

/// Groups sequence indices into micro-batches of at most `budget` padded tokens
/// (`rows × longest row`; a single longer sequence gets a micro-batch of its own). Sequences
/// are sorted by length first so that rows of a micro-batch waste little padding.
pub(crate) fn micro_batches(lens: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so `lens[i]` is the new longest row.
        if !cur.is_empty() && (cur.len() + 1) * lens[i] > budget {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Forward of `seqs` (right-padded): the hidden states `[b, t, d]` and the flat index
/// `i·t + len_i − 1` of each row's last real token.
pub(crate) fn encode(
    model: &Model,
    seqs: &[&Vec<u32>],
    pad_id: u32,
    path: Path,
) -> Result<(Tensor, Vec<u32>, usize)> {
    let owned: Vec<Vec<u32>> = seqs.iter().map(|s| (*s).clone()).collect();
    let batch = Batch::right_padded(&owned, pad_id)?;
    let hidden = model.forward(&batch, path, None)?;
    let t = batch.t;
    let last = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| (i * t + s.len() - 1) as u32)
        .collect();
    Ok((hidden, last, t))
}

/// Rows `idx` of `hidden [b, t, d]` viewed as `[b·t, d]` (differentiable).
pub(crate) fn rows(hidden: &Tensor, idx: &[u32]) -> Result<Tensor> {
    let (b, t, d) = hidden.dims3()?;
    let idx = Tensor::from_slice(idx, idx.len(), hidden.device())?;
    Ok(hidden.reshape((b * t, d))?.index_select(&idx, 0)?)
}

/// Runs `f` with the adapters disabled (the frozen reference policy), restoring the flag
/// whatever `f` returns.
pub(crate) fn with_reference<T>(
    model: &mut Model,
    f: impl FnOnce(&Model) -> Result<T>,
) -> Result<T> {
    let saved = model.lora_enabled;
    model.lora_enabled = false;
    let out = f(model);
    model.lora_enabled = saved;
    out
}

/// A scalar tensor's value as f64.
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Unit-norm embeddings of prompts (each ending with `<|embed_token|>`), computed by the one
/// function serving and indexing use ([`search_r3_core::embedder::embed_at_token`]), so the
/// RL environment's vectors are the served ones. Row `i` is `seqs[i]`.
pub(crate) fn embed_unit(
    model: &Model,
    seqs: &[Vec<u32>],
    pad_id: u32,
    budget: usize,
) -> Result<Vec<Vec<f32>>> {
    let raw = embed_at_token(model, seqs, pad_id, budget, search_r3_model::Cancel::NEVER)
        .map_err(|e| crate::Error::Invalid(format!("embedding: {e}")))?;
    Ok(raw.into_iter().map(l2_normalize).collect())
}
