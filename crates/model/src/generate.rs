//! Batched generation with a KV cache: greedy or sampled (temperature, top-k, top-p, seed),
//! stopping at EOS, at `<|embed_token|>`, or at a token budget.

use crate::error::{Error, Result};
use crate::model::{Batch, KvCache, Model, Path};
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, IndexOp, Tensor};
use rand::{Rng, SeedableRng};

/// Asked between forward passes whether the result is still wanted: a server stops a batch
/// whose clients have all gone instead of holding its model worker to the end.
#[derive(Clone, Copy)]
pub struct Cancel<'a>(Option<&'a (dyn Fn() -> bool + Sync)>);

impl<'a> Cancel<'a> {
    /// Never cancels (offline work: indexing, evaluation, training).
    pub const NEVER: Cancel<'static> = Cancel(None);

    /// Cancels once `cancelled` returns true.
    pub fn when(cancelled: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Cancel(Some(cancelled))
    }

    /// `Err(Error::Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        match self.0 {
            Some(f) if f() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Cancel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Cancel(when)"
        } else {
            "Cancel::NEVER"
        })
    }
}

/// Decoding settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationConfig {
    /// Budget of new tokens per sequence.
    pub max_new_tokens: usize,
    /// Stop tokens (EOS, `<|embed_token|>`) are masked out until this many tokens are written
    /// (HF's `min_new_tokens`): a reasoning mode that must write something cannot stop at once.
    #[serde(default)]
    pub min_new_tokens: usize,
    /// Sampling temperature; `0` means greedy.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// Seed; each row draws from its own stream (`seed`, row index), so a row's sample does not
    /// depend on what else is in the batch.
    pub seed: u64,
    /// Stop when the model writes one of the tokenizer's EOS ids.
    pub stop_at_eos: bool,
    /// Stop when the model writes `<|embed_token|>`.
    pub stop_at_embed_token: bool,
    /// Return the final-norm hidden state at the stop position (the last token of the output,
    /// e.g. the embed token). Costs one extra decoding step.
    pub return_hidden: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 128,
            min_new_tokens: 0,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_at_eos: true,
            stop_at_embed_token: true,
            return_hidden: false,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An EOS token was written (it is the last token of the output).
    Eos,
    /// `<|embed_token|>` was written (it is the last token of the output).
    EmbedToken,
    /// The budget ran out.
    Budget,
}

/// One generated continuation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids, the stop token included.
    pub tokens: Vec<u32>,
    /// Decoded text of `tokens` (special tokens kept).
    pub text: String,
    /// Why it stopped.
    pub stop: StopReason,
    /// Final-norm hidden state `[d]` at the last output token, if requested.
    pub hidden: Option<Tensor>,
    /// Log-probability of each new token under the sampling distribution's source logits
    /// (temperature 1, no truncation): what RL needs as old-policy log-probs.
    pub logprobs: Vec<f32>,
}

/// Generates continuations of `prompts` (token ids) in one left-padded batch; `cancel` is
/// checked before every forward pass.
pub fn generate(
    model: &Model,
    tok: &TextTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    cancel: Cancel,
) -> Result<Vec<Generation>> {
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if cfg.max_new_tokens == 0 {
        return Err(Error::Invalid("max_new_tokens must be at least 1".into()));
    }
    let n = prompts.len();
    let embed_id = model.embed_token.as_ref().map(|e| e.id);
    let mut rngs: Vec<rand::rngs::StdRng> = (0..n)
        .map(|r| {
            rand::rngs::StdRng::seed_from_u64(
                cfg.seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )
        })
        .collect();

    cancel.check()?;
    let first = Batch::left_padded(prompts, tok.pad_id)?;
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut cache = KvCache::new();
    let hidden = model.forward(&first, Path::Fast, Some(&mut cache))?;
    let mut last_hidden = hidden.i((.., first.t - 1))?; // [n, d]
    let mut key_mask = first.key_mask;

    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut logprobs: Vec<Vec<f32>> = vec![Vec::new(); n];
    let mut stop: Vec<Option<StopReason>> = vec![None; n];
    let mut hidden_out: Vec<Option<Tensor>> = vec![None; n];

    loop {
        let logits = model.logits(&last_hidden)?.to_dtype(DType::F32)?;
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut step_ids = vec![tok.pad_id; n];
        // Rows that stop at this step and want the hidden state of their stop token: it is fed
        // below like any other token, and its output is read after the forward.
        let mut capture = vec![false; n];
        for r in 0..n {
            if stop[r].is_some() {
                continue;
            }
            let (id, lp) = if out[r].len() < cfg.min_new_tokens {
                let mut masked = logits[r].clone();
                for &s in tok.eos_ids.iter().chain(embed_id.as_ref()) {
                    if let Some(l) = masked.get_mut(s as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                pick_token(&masked, cfg, &mut rngs[r])
            } else {
                pick_token(&logits[r], cfg, &mut rngs[r])
            };
            out[r].push(id);
            logprobs[r].push(lp);
            step_ids[r] = id;
            let reason = if cfg.stop_at_embed_token && Some(id) == embed_id {
                Some(StopReason::EmbedToken)
            } else if cfg.stop_at_eos && tok.eos_ids.contains(&id) {
                Some(StopReason::Eos)
            } else if out[r].len() >= cfg.max_new_tokens {
                Some(StopReason::Budget)
            } else {
                None
            };
            if let Some(reason) = reason {
                stop[r] = Some(reason);
                capture[r] = cfg.return_hidden;
            }
        }
        let active = stop.iter().any(Option::is_none);
        if !active && !capture.contains(&true) {
            break;
        }
        // Feed one token per row.
        let positions = next_pos.clone();
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let s_old = key_mask.len() / n;
        let mut km = Vec::with_capacity(n * (s_old + 1));
        for r in 0..n {
            km.extend_from_slice(&key_mask[r * s_old..(r + 1) * s_old]);
            km.push(true);
        }
        let batch = Batch {
            b: n,
            t: 1,
            ids: step_ids,
            positions,
            key_mask: km,
        };
        cancel.check()?;
        let h = model.forward(&batch, Path::Fast, Some(&mut cache))?;
        key_mask = batch.key_mask;
        last_hidden = h.i((.., 0))?;
        for r in (0..n).filter(|&r| capture[r]) {
            hidden_out[r] = Some(last_hidden.i(r)?);
        }
        if !active {
            break;
        }
    }

    (0..n)
        .map(|r| {
            Ok(Generation {
                text: tok.decode(&out[r], false)?,
                tokens: std::mem::take(&mut out[r]),
                stop: stop[r].unwrap_or(StopReason::Budget),
                hidden: hidden_out[r].take(),
                logprobs: std::mem::take(&mut logprobs[r]),
            })
        })
        .collect()
}

fn log_softmax_at(logits: &[f32], id: usize) -> f32 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| ((l - m) as f64).exp()).sum();
    ((logits[id] - m) as f64 - z.ln()) as f32
}

/// Greedy argmax (first maximum, as `torch.argmax`) or a draw from the tempered, truncated
/// distribution. Returns the token and its log-probability at temperature 1.
fn pick_token(logits: &[f32], cfg: &GenerationConfig, rng: &mut impl Rng) -> (u32, f32) {
    let id = if cfg.temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best
    } else {
        sample(logits, cfg, rng)
    };
    (id as u32, log_softmax_at(logits, id))
}

fn sample(logits: &[f32], cfg: &GenerationConfig, rng: &mut impl Rng) -> usize {
    let t = cfg.temperature;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = cfg.top_k {
        idx.truncate(k.max(1));
    }
    let m = logits[idx[0]] as f64;
    let mut p: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / t).exp())
        .collect();
    let z: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= z);
    if let Some(top_p) = cfg.top_p {
        let mut acc = 0.0;
        let mut keep = p.len();
        for (j, x) in p.iter().enumerate() {
            acc += x;
            if acc >= top_p {
                keep = j + 1;
                break;
            }
        }
        p.truncate(keep);
        idx.truncate(keep);
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (j, x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return idx[j];
        }
    }
    *idx.last().expect("at least one candidate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(sample(&logits, &cfg, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_nucleus_only() {
        // p ≈ [0.665, 0.245, 0.09]: top_p 0.6 keeps only the first.
        let logits = [2.0f32, 1.0, 0.0];
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_p: Some(0.6),
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50 {
            assert_eq!(sample(&logits, &cfg, &mut rng), 0);
        }
    }

    #[test]
    fn sampling_frequencies_follow_softmax() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let cfg = GenerationConfig {
            temperature: 1.0,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ones = (0..20_000)
            .filter(|_| sample(&logits, &cfg, &mut rng) == 1)
            .count();
        let f = ones as f64 / 20_000.0;
        assert!((f - 0.75).abs() < 0.015, "frequency {f}");
    }

    #[test]
    fn greedy_takes_first_maximum_and_reports_logprob() {
        let logits = [1.0f32, 5.0, 5.0];
        let (id, lp) = pick_token(
            &logits,
            &GenerationConfig::default(),
            &mut rand::rngs::StdRng::seed_from_u64(0),
        );
        assert_eq!(id, 1);
        let expect = (5.0f64 - (1f64.exp() + 2.0 * 5f64.exp()).ln()) as f32;
        assert!((lp - expect).abs() < 1e-6);
    }
}
