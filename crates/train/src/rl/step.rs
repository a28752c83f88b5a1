//! One stage-2 (GRPO) step of Search-R3: the policy reasons about each query G times, each
//! trajectory's embedding is ranked by the [`RetrievalEnv`], the DCG of the gold documents is
//! its reward, and the gradient combines
//!
//! * the GRPO objective on the trajectory tokens (reasoning + `<|embed_token|>`): clipped
//!   ratio against the sampling policy's log-probs, group-normalised advantages, k3 KL to the
//!   reference policy (the same weights with adapters off), averaged over tokens
//!   ([`grpo_loss`]); and
//! * an InfoNCE term that trains the embedding itself: each trajectory's embedding
//!   (differentiable, the hidden state at its emitted or forced embed token) against its gold
//!   document and the environment's highest-ranked non-gold documents as hard negatives, all
//!   from the index (constants), the other trajectories' candidates in the same micro-batch
//!   acting as in-batch negatives. `lambda_nce = 0` switches it off (the ablation).
//!
//! The policy-gradient term alone moves the embedding only through the reasoning tokens it
//! makes likelier; the InfoNCE term moves it directly, which the issue asks for ("the loss
//! trains the embedding itself") and GRPO's token objective cannot provide.

use super::env::RetrievalEnv;
use super::grpo::{
    group_advantages, grpo_loss, informative, GrpoLossConfig, GrpoStats, Reward, RewardConfig,
};
use crate::error::{invalid, Result};
use crate::forward::{embed_unit, encode, micro_batches, rows, scalar, with_reference};
use crate::losses::{info_nce, token_log_probs};
use crate::optim::GradAccumulator;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use search_r3_core::embedder::{think, Thought, ThoughtCloser};
use search_r3_model::{GenerationConfig, Model, Path, StopReason, TextTokenizer};
use serde::{Deserialize, Serialize};

/// A training query for stage 2: the reasoning prompt (everything before the model's first
/// reasoning token) and the positions of its relevant documents in the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct RlQuery {
    /// Prompt token ids (chat template with the reasoning instruction, assistant turn open).
    pub prompt: Vec<u32>,
    /// Relevant documents (environment positions), at least one.
    pub gold: Vec<usize>,
}

/// Constants of one stage-2 step (every one is in the `train rl` config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlStepConfig {
    /// Trajectories sampled per query (G).
    pub group_size: usize,
    /// Hard cap on generated tokens per trajectory.
    pub max_new_tokens: usize,
    /// Sampling temperature (1 samples the policy itself, which the ratio assumes).
    pub temperature: f64,
    /// Divide advantages by the group's standard deviation (GRPO); false only centres them.
    pub scale_advantages: bool,
    /// Weight of the embedding InfoNCE term (0 = off).
    pub lambda_nce: f64,
    /// Hard negatives per trajectory for that term.
    pub nce_negatives: usize,
    /// Its temperature.
    pub tau: f64,
    /// Retrieved documents per trajectory reported to the environment as touched.
    pub touch_top: usize,
    /// Padded tokens per differentiable forward.
    pub micro_tokens: usize,
    /// Leave groups whose rewards are all equal out of the GRPO token mean (DAPO's dynamic
    /// sampling; they carry no advantage, only dilution).
    pub drop_uniform_groups: bool,
    /// Reward terms.
    pub reward: RewardConfig,
    /// GRPO objective.
    pub loss: GrpoLossConfig,
}

impl Default for RlStepConfig {
    fn default() -> Self {
        RlStepConfig {
            group_size: 4,
            max_new_tokens: 96,
            temperature: 1.0,
            scale_advantages: true,
            lambda_nce: 0.5,
            nce_negatives: 7,
            tau: 0.05,
            touch_top: 10,
            micro_tokens: 2048,
            drop_uniform_groups: false,
            reward: RewardConfig::default(),
            loss: GrpoLossConfig::default(),
        }
    }
}

/// One sampled trajectory and what the environment made of it.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Index of its query in the batch.
    pub query: usize,
    /// Generated tokens (the stop token included).
    pub tokens: Vec<u32>,
    /// What is embedded: prompt + tokens when the trajectory emitted `<|embed_token|>`;
    /// otherwise prompt + tokens without a final EOS + the forced suffix (as inference does).
    /// Its last token is the embed token; the tokens sit at `prompt.len()..`.
    pub sequence: Vec<u32>,
    /// Their log-probabilities under the sampling policy.
    pub logprobs: Vec<f32>,
    /// Whether it ended with `<|embed_token|>`.
    pub emitted: bool,
    /// Unit-norm embedding: the hidden state at the (emitted or forced) embed token.
    pub embedding: Vec<f32>,
    /// Top `reward.top_k` documents for that embedding.
    pub ranking: Vec<usize>,
    /// Reward and its parts.
    pub reward: Reward,
    /// Group-normalised advantage.
    pub advantage: f64,
    /// Its group's rewards were all equal and `drop_uniform_groups` left it out of the loss.
    pub dropped: bool,
}

/// What a step saw, for logging.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RlStats {
    /// Mean total reward.
    pub reward: f64,
    /// Mean retrieval (DCG) reward.
    pub retrieval: f64,
    /// Share of trajectories that emitted the embed token.
    pub emitted: f64,
    /// Share of trajectories with total reward ≥ 0.5.
    pub reward_ge_half: f64,
    /// Mean generated tokens per trajectory.
    pub length: f64,
    /// Share of trajectories whose retrieval beat the query's no-thought embedding (with
    /// [`RewardConfig::gain`]).
    #[serde(default)]
    pub positive_gain: Option<f64>,
    /// Share of trajectories left out because their group's rewards were all equal.
    #[serde(default)]
    pub dropped_groups: f64,
    /// GRPO objective statistics (token-weighted over the batch).
    pub grpo: GrpoStats,
    /// The embedding InfoNCE value (mean over trajectories), when on.
    pub nce: Option<f64>,
    /// The loss whose gradient is returned.
    pub loss: f64,
}

/// Samples `group_size` trajectories per query, embeds and rewards them against `env`, and
/// computes group advantages. Trajectories are written and embedded by
/// [`search_r3_core::embedder::think`], as inference does: one that stops without
/// `<|embed_token|>` is closed by `closer` (the template's closing sentence) and embedded
/// there. `seed` makes the sampling reproducible.
pub fn rollout(
    model: &Model,
    tok: &TextTokenizer,
    env: &RetrievalEnv,
    queries: &[RlQuery],
    closer: &ThoughtCloser,
    cfg: &RlStepConfig,
    seed: u64,
) -> Result<Vec<Rollout>> {
    if model.embed_token.is_none() {
        invalid!("rollout: the model needs <|embed_token|>");
    }
    if cfg.group_size < 2 {
        invalid!("group_size must be at least 2 (advantages compare trajectories of a query)");
    }
    if let Some((i, _)) = queries.iter().enumerate().find(|(_, q)| q.gold.is_empty()) {
        invalid!("query {i} of the batch has no gold document");
    }
    let prompts: Vec<Vec<u32>> = queries
        .iter()
        .flat_map(|q| std::iter::repeat_n(q.prompt.clone(), cfg.group_size))
        .collect();
    let gen_cfg = GenerationConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        seed,
        ..Default::default()
    };
    let trajectories = think_all(model, tok, closer, &prompts, &gen_cfg, cfg.micro_tokens)?;
    // Under the gain reward, each query's no-thought embedding (its prompt closed at once)
    // is the baseline its trajectories must beat.
    let baselines: Vec<f64> = if cfg.reward.gain {
        let seqs: Vec<Vec<u32>> = queries
            .iter()
            .map(|q| closer.close(&q.prompt, &[]))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| crate::Error::Invalid(format!("closing a prompt: {e}")))?;
        let vecs = embed_unit(model, &seqs, tok.pad_id, cfg.micro_tokens)?;
        vecs.iter()
            .zip(queries)
            .map(|(v, q)| Ok(env.reward(v, &q.gold, cfg.reward.top_k)?.0))
            .collect::<Result<_>>()?
    } else {
        vec![0.0; queries.len()]
    };
    let mut out = Vec::with_capacity(trajectories.len());
    for (i, t) in trajectories.into_iter().enumerate() {
        let q = i / cfg.group_size;
        let (retrieval, ranking) = env.reward(&t.vector, &queries[q].gold, cfg.reward.top_k)?;
        let reasoning = reasoning_len(&t);
        out.push(Rollout {
            query: q,
            reward: cfg
                .reward
                .reward_against(retrieval, baselines[q], !t.forced, reasoning),
            tokens: t.tokens,
            sequence: t.sequence,
            logprobs: t.logprobs,
            emitted: !t.forced,
            embedding: t.vector,
            ranking,
            advantage: 0.0,
            dropped: false,
        });
    }
    for group in out.chunks_mut(cfg.group_size) {
        let rewards: Vec<f64> = group.iter().map(|r| r.reward.total).collect();
        let adv = group_advantages(&rewards, cfg.scale_advantages, 1e-4)?;
        let dropped = cfg.drop_uniform_groups && !informative(&rewards);
        for (r, a) in group.iter_mut().zip(adv) {
            r.advantage = a;
            r.dropped = dropped;
        }
    }
    Ok(out)
}

/// [`think`] with its error in this crate's terms.
pub(crate) fn think_all(
    model: &Model,
    tok: &TextTokenizer,
    closer: &ThoughtCloser,
    prompts: &[Vec<u32>],
    gen: &GenerationConfig,
    micro_tokens: usize,
) -> Result<Vec<Thought>> {
    think(
        model,
        tok,
        closer,
        prompts,
        gen,
        micro_tokens,
        search_r3_model::Cancel::NEVER,
    )
    .map_err(|e| crate::Error::Invalid(format!("reasoning: {e}")))
}

/// Reasoning tokens of a thought: what it generated, its stop token (EOS or the embed token)
/// excluded.
pub(crate) fn reasoning_len(t: &Thought) -> usize {
    t.tokens.len() - usize::from(t.stop != StopReason::Budget)
}

/// Documents whose vectors the step's rewards depended on: every gold document, then the top
/// `touch_top` of each trajectory's ranking (for [`RetrievalEnv::refresh`]).
pub fn touched_documents(
    queries: &[RlQuery],
    rollouts: &[Rollout],
    touch_top: usize,
) -> Vec<usize> {
    let mut out: Vec<usize> = queries
        .iter()
        .flat_map(|q| q.gold.iter().copied())
        .collect();
    for r in rollouts {
        out.extend(r.ranking.iter().take(touch_top));
    }
    out
}

/// The gradient of the stage-2 loss for `rollouts` (from [`rollout`] on the same queries):
/// `L = L_GRPO + λ_nce·L_InfoNCE`, each a mean (over trajectory tokens, resp. trajectories)
/// across the whole batch, computed in micro-batches of at most `micro_tokens`
/// padded tokens whose gradients are summed with their share of the mean.
pub fn rl_gradients(
    model: &mut Model,
    env: &RetrievalEnv,
    queries: &[RlQuery],
    rollouts: &[Rollout],
    cfg: &RlStepConfig,
    pad_id: u32,
) -> Result<(GradStore, RlStats)> {
    if rollouts.is_empty() {
        invalid!("rl_gradients: no rollouts");
    }
    let seqs: Vec<&Vec<u32>> = rollouts.iter().map(|r| &r.sequence).collect();
    let generated: usize = rollouts.iter().map(|r| r.tokens.len()).sum();
    if generated == 0 {
        invalid!("rl_gradients: the rollouts generated no tokens");
    }
    // Tokens of the trajectories the GRPO mean runs over (dropped groups left out).
    let counted = |r: &Rollout| if r.dropped { 0 } else { r.tokens.len() };
    let total_tokens: usize = rollouts.iter().map(counted).sum();
    let use_nce = cfg.lambda_nce > 0.0;

    let vars: Vec<Var> = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
    let mut sum = GradAccumulator::new(&vars);
    let mut acc = Accumulated::default();
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    for mb in micro_batches(&lens, cfg.micro_tokens) {
        let part: Vec<&Vec<u32>> = mb.iter().map(|&i| seqs[i]).collect();
        let (hidden, last, t) = encode(model, &part, pad_id, Path::Diff)?;
        // Trajectory tokens of each row, padded to the longest: position j of row k predicts
        // token j of the trajectory from the hidden state one step before it.
        let width = mb
            .iter()
            .map(|&i| rollouts[i].tokens.len())
            .max()
            .unwrap_or(0);
        let mb_tokens: usize = mb.iter().map(|&i| counted(&rollouts[i])).sum();
        let mut surrogate: Option<Tensor> = None;
        if mb_tokens > 0 {
            let (n, w) = (mb.len(), width);
            let mut pos = vec![0u32; n * w];
            let mut targets = vec![0u32; n * w];
            let mut old = vec![0f32; n * w];
            let mut mask = vec![0f32; n * w];
            for (k, &i) in mb.iter().enumerate().filter(|(_, &i)| !rollouts[i].dropped) {
                let r = &rollouts[i];
                let p = queries[r.query].prompt.len();
                for (j, (&tok, &lp)) in r.tokens.iter().zip(&r.logprobs).enumerate() {
                    pos[k * w + j] = (k * t + p + j - 1) as u32;
                    targets[k * w + j] = tok;
                    old[k * w + j] = lp;
                    mask[k * w + j] = 1.0;
                }
            }
            let dev = hidden.device();
            let logits = model.logits(&rows(&hidden, &pos)?)?.reshape((n, w, ()))?;
            let targets = Tensor::from_vec(targets, (n, w), dev)?;
            let logp = token_log_probs(&logits, &targets)?;
            let old = Tensor::from_vec(old, (n, w), dev)?.to_dtype(logp.dtype())?;
            let mask = Tensor::from_vec(mask, (n, w), dev)?;
            let reference = if cfg.loss.beta > 0.0 {
                Some(with_reference(model, |m| {
                    let (h, _, _) = encode(m, &part, pad_id, Path::Fast)?;
                    let l = m.logits(&rows(&h, &pos)?)?.reshape((n, w, ()))?;
                    Ok(token_log_probs(&l, &targets)?.detach())
                })?)
            } else {
                None
            };
            let adv: Vec<f64> = mb.iter().map(|&i| rollouts[i].advantage).collect();
            let (loss, st) = grpo_loss(&logp, &old, reference.as_ref(), &adv, &mask, &cfg.loss)?;
            let share = mb_tokens as f64 / total_tokens as f64;
            acc.add_grpo(&st, share);
            acc.loss += scalar(&loss)? * share;
            surrogate = Some((loss * share)?);
        }
        if use_nce {
            let q = rows(&hidden, &last)?;
            let (docs, positive, keep) = nce_candidates(env, queries, rollouts, &mb, cfg)?;
            let dev = q.device();
            let docs = Tensor::from_vec(docs, (keep.len() / mb.len(), q.dim(1)?), dev)?
                .to_dtype(q.dtype())?;
            let m = Tensor::from_vec(keep, (mb.len(), docs.dim(0)?), dev)?;
            let nce = info_nce(&q, &docs, &positive, cfg.tau, Some(&m))?;
            let share = mb.len() as f64 / rollouts.len() as f64;
            let v = scalar(&nce)? * share;
            acc.nce = Some(acc.nce.unwrap_or(0.0) + v);
            acc.loss += cfg.lambda_nce * v;
            let term = (nce * (cfg.lambda_nce * share))?;
            surrogate = Some(match surrogate {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        if let Some(s) = surrogate {
            sum.add(&s.backward()?)?;
        }
    }
    let grads = sum.sum();
    let n = rollouts.len() as f64;
    let stats = RlStats {
        reward: rollouts.iter().map(|r| r.reward.total).sum::<f64>() / n,
        retrieval: rollouts.iter().map(|r| r.reward.retrieval).sum::<f64>() / n,
        emitted: rollouts.iter().filter(|r| r.emitted).count() as f64 / n,
        reward_ge_half: rollouts.iter().filter(|r| r.reward.total >= 0.5).count() as f64 / n,
        length: generated as f64 / n,
        positive_gain: cfg.reward.gain.then(|| {
            rollouts
                .iter()
                .filter(|r| r.reward.retrieval > r.reward.baseline)
                .count() as f64
                / n
        }),
        dropped_groups: rollouts.iter().filter(|r| r.dropped).count() as f64 / n,
        grpo: acc.grpo,
        nce: acc.nce,
        loss: acc.loss,
    };
    Ok((grads, stats))
}

/// Running token-weighted sums of the micro-batches' statistics.
#[derive(Default)]
struct Accumulated {
    grpo: GrpoStats,
    nce: Option<f64>,
    loss: f64,
}

impl Accumulated {
    fn add_grpo(&mut self, st: &GrpoStats, share: f64) {
        self.grpo.surrogate += st.surrogate * share;
        self.grpo.kl += st.kl * share;
        self.grpo.clip_fraction += st.clip_fraction * share;
        self.grpo.ratio += st.ratio * share;
    }
}

/// InfoNCE candidates for the trajectories `batch` (indices into `rollouts`): per trajectory its first gold
/// document and its `nce_negatives` best-ranked non-gold documents (row-major vectors from the
/// index), the positive's column, and a keep-mask that removes each query's own other gold
/// documents from its denominator (they are relevant, not negatives).
fn nce_candidates(
    env: &RetrievalEnv,
    queries: &[RlQuery],
    rollouts: &[Rollout],
    batch: &[usize],
    cfg: &RlStepConfig,
) -> Result<(Vec<f32>, Vec<usize>, Vec<f32>)> {
    let mut ids: Vec<Vec<usize>> = Vec::with_capacity(batch.len());
    for &i in batch {
        let r = &rollouts[i];
        let gold = &queries[r.query].gold;
        let mut c = vec![gold[0]];
        c.extend(
            r.ranking
                .iter()
                .copied()
                .filter(|d| !gold.contains(d))
                .take(cfg.nce_negatives),
        );
        // Pad with the last candidate so every trajectory has the same count (masked below).
        while c.len() < cfg.nce_negatives + 1 {
            c.push(*c.last().expect("non-empty"));
        }
        ids.push(c);
    }
    let per = cfg.nce_negatives + 1;
    let all: Vec<usize> = ids.iter().flatten().copied().collect();
    let mut docs = Vec::new();
    for &d in &all {
        match env.stored(d) {
            Some(v) => docs.extend(v),
            None => invalid!("document {d} is not in the environment's index"),
        }
    }
    let positive: Vec<usize> = (0..batch.len()).map(|k| k * per).collect();
    let mut keep = vec![1f32; batch.len() * all.len()];
    for (k, &i) in batch.iter().enumerate() {
        let gold = &queries[rollouts[i].query].gold;
        for (j, d) in all.iter().enumerate() {
            // Another copy of the positive, or another relevant document: not a negative.
            let duplicate_of_own = j != positive[k] && (*d == all[positive[k]] || gold.contains(d));
            let padding = j / per == k && j % per > 0 && ids[k][..j % per].contains(d);
            if duplicate_of_own || padding {
                keep[k * all.len() + j] = 0.0;
            }
        }
    }
    Ok((docs, positive, keep))
}
