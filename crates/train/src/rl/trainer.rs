//! The stage-2 (GRPO) training loop: rollouts against the [`RetrievalEnv`], the GRPO +
//! InfoNCE gradient, AdamW, a local index refresh after every update, and — every few steps —
//! the environment's cost/accuracy measurements and a held-out evaluation with reasoning.
//!
//! The loop works on token ids ([`RlData`]); the CLI builds them with the model's templates.
//! The policy is the model with a fresh LoRA on top of whatever the caller folded into its
//! weights (the stage-1 adapter): "adapters off" is then the stage-1 policy, which is what the
//! KL term keeps the policy close to. Saved adapters are stacked onto that base adapter
//! ([`Lora::stack`]) so they load on the plain base model like any other adapter.
//!
//! Output directory layout (`OUT`):
//!
//! * `metrics.jsonl` — per step `{"step", "lr", "reward": {mean, retrieval, ge_half},
//!   "emitted", "length", "loss": {total, grpo, nce}, "kl", "clip_fraction", "ratio",
//!   "grad_norm", "refresh": {reencoded, fraction}, "seconds"}`; every `measure_every` steps
//!   `{"step", "env": {<policy>: {reencoded_per_step, drift_mean_cos, drift_min_cos, stale,
//!   spearman, kendall, mean_abs_diff}}}` for the run's environment and each baseline; every
//!   `eval_every` steps (and at step 0, the starting policy) `{"step", "eval": {"ndcg@10",
//!   "reward", "reward_ge_half", "emitted", "length"}}`;
//! * `checkpoint/` — `adapter.safetensors` (this stage's adapter only), `optimizer.safetensors`,
//!   `env/` and `baseline-<i>/` (index, vectors, per-document versions), `rl_state.json`;
//!   swapped in atomically;
//! * `best.safetensors`, `final.safetensors`, `adapter.safetensors` (the best-eval state),
//!   `manifest.json`, `curves.png`.

use crate::env::{exact_index, exact_reward, ProbeQuery, RefreshPolicy, RetrievalEnv};
use crate::error::{file_err, invalid, write_atomic, Error, Result};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::rl::{
    reason_and_embed, rl_gradients, rollout, touched_documents, RlQuery, RlStats, RlStepConfig,
};
use crate::trainer::{
    checksums, config_from_toml, config_hash, embed_sequences, epoch_order, fmt_duration, log_line,
    plot_curves, read_checkpoint_state, sha256_file, swap_in_checkpoint, truncate_metrics,
    BestEval, CheckpointKind, Cursor, LoraSection, Stream, TrainOptions, ADAPTER, CKPT, METRICS,
    OPTIMIZER, STATE,
};
use search_r3_core::metrics::evaluate_query;
use search_r3_index::{IndexKind, VectorIndex};
use search_r3_model::lora::Lora;
use search_r3_model::state::{load_trainable, save_trainable};
use search_r3_model::{GenerationConfig, Model, TextTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Every setting of a stage-2 run, read from TOML (unknown keys are errors). Defaults are
/// sized for SmolLM2-135M on a 2-core CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlConfig {
    /// Optimizer steps (default 60).
    pub steps: usize,
    /// Linear warmup steps (default 5).
    pub warmup_steps: usize,
    /// Peak learning rate (default 1e-4).
    pub lr: f64,
    /// Floor of the cosine decay (default 1e-5).
    pub min_lr: f64,
    /// Queries per step; each gets `rollout.group_size` trajectories (default 8).
    pub queries_per_step: usize,
    /// Global gradient-norm clip (default 1.0).
    pub clip_norm: f64,
    /// Seed of the query order, the sampling and the probe (default 0).
    pub seed: u64,
    /// Checkpoint every this many steps and at the end (0 = only at the end; default 10).
    pub checkpoint_every: usize,
    /// Held-out evaluation every this many steps, at step 0 and at the end (0 = never;
    /// default 10).
    pub eval_every: usize,
    /// Environment measurements every this many steps and at the end (0 = never; default 10).
    /// Each costs one encoding of the corpus (shared with an evaluation due at that step).
    pub measure_every: usize,
    /// Documents in the random drift probe (default 256).
    pub probe_docs: usize,
    /// Document text truncation in tokens (used by the caller that builds prompts; default 128).
    pub max_doc_tokens: usize,
    /// Query text truncation in tokens (used by the caller; default 64).
    pub max_query_tokens: usize,
    /// Documents in the environment corpus: every training and held-out query's gold
    /// documents, then random others up to this many (used by the caller; default 800).
    pub env_docs: usize,
    /// Training queries held out for the evaluation (used by the caller; default 48).
    pub eval_queries: usize,
    /// The environment's index (default `hnsw`, whose graph gives the refresh neighbourhoods).
    pub index: IndexKind,
    /// How the environment is refreshed after each update (default local, 40 documents,
    /// 8 neighbours each).
    pub refresh: RefreshPolicy,
    /// Refresh policies run beside the environment on the same updates and measured the same
    /// way, for the cost/accuracy comparison (default: `never`). They do not affect training.
    pub baselines: Vec<RefreshPolicy>,
    /// Rollouts, reward and loss.
    pub rollout: RlStepConfig,
    /// This stage's LoRA adapters.
    pub lora: LoraSection,
    /// AdamW moments and weight decay.
    pub adamw: AdamWConfig,
}

impl Default for RlConfig {
    fn default() -> Self {
        RlConfig {
            steps: 60,
            warmup_steps: 5,
            lr: 1e-4,
            min_lr: 1e-5,
            queries_per_step: 8,
            clip_norm: 1.0,
            seed: 0,
            checkpoint_every: 10,
            eval_every: 10,
            measure_every: 10,
            probe_docs: 256,
            max_doc_tokens: 128,
            max_query_tokens: 64,
            env_docs: 800,
            eval_queries: 48,
            index: IndexKind::Hnsw,
            refresh: RefreshPolicy::Local {
                budget: 40,
                neighbors: 8,
            },
            baselines: vec![RefreshPolicy::Never],
            rollout: RlStepConfig::default(),
            lora: LoraSection::default(),
            adamw: AdamWConfig::default(),
        }
    }
}

impl RlConfig {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        config_from_toml(text, origin, Self::validate)
    }

    /// Reads a TOML file (see [`RlConfig::from_toml`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        self.adamw.validate()?;
        self.schedule()?;
        let r = &self.rollout;
        for (name, v) in [
            ("steps", self.steps),
            ("queries_per_step", self.queries_per_step),
            ("max_doc_tokens", self.max_doc_tokens),
            ("max_query_tokens", self.max_query_tokens),
            ("env_docs", self.env_docs),
            ("lora.rank", self.lora.rank),
            ("rollout.max_new_tokens", r.max_new_tokens),
            ("rollout.micro_tokens", r.micro_tokens),
            ("rollout.reward.top_k", r.reward.top_k),
        ] {
            if v == 0 {
                invalid!("rl config: `{name}` must be > 0");
            }
        }
        if r.group_size < 2 {
            invalid!("rl config: `rollout.group_size` must be at least 2 (advantages compare a query's trajectories)");
        }
        for (name, v, zero_ok) in [
            ("clip_norm", self.clip_norm, false),
            ("lora.alpha", self.lora.alpha, false),
            ("rollout.temperature", r.temperature, false),
            ("rollout.tau", r.tau, false),
            ("rollout.lambda_nce", r.lambda_nce, true),
            ("rollout.loss.beta", r.loss.beta, true),
            ("rollout.loss.clip_low", r.loss.clip_low, true),
            ("rollout.loss.clip_high", r.loss.clip_high, true),
        ] {
            if !(v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0))) {
                let want = if zero_ok { ">= 0" } else { "> 0" };
                invalid!("rl config: `{name}` must be finite and {want}, got {v}");
            }
        }
        if self.lora.targets.is_empty() {
            invalid!("rl config: `lora.targets` is empty");
        }
        let mut names = std::collections::BTreeSet::new();
        for p in std::iter::once(&self.refresh).chain(&self.baselines) {
            if let RefreshPolicy::Local { budget: 0, .. } = p {
                invalid!("rl config: a local refresh budget of 0 never refreshes; use policy = \"never\"");
            }
            // Measurements are reported by policy name.
            if !names.insert(policy_name(p)) {
                invalid!(
                    "rl config: refresh policy `{}` appears twice among `refresh` and `baselines`",
                    policy_name(p)
                );
            }
        }
        Ok(())
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Result<LrSchedule> {
        LrSchedule::new(self.warmup_steps, self.steps, self.lr, self.min_lr)
    }

    /// sha256 of the canonical JSON; a checkpoint resumes only under the same hash.
    pub fn hash(&self) -> String {
        config_hash(self)
    }
}

/// A tokenized stage-2 task: reasoning prompts with their gold documents in the environment
/// corpus, and that corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct RlData {
    /// Training queries.
    pub queries: Vec<RlQuery>,
    /// Held-out queries for the evaluation (may be empty: no evaluation).
    pub eval: Vec<RlQuery>,
    /// Document prompts of the environment corpus, each ending with `<|embed_token|>`.
    pub docs: Vec<Vec<u32>>,
    /// Padding id.
    pub pad_id: u32,
    /// Appended to a trajectory that stops without `<|embed_token|>` (ends with the token).
    pub forced_suffix: Vec<u32>,
}

impl RlData {
    /// Checks indices and non-emptiness.
    pub fn validate(&self) -> Result<()> {
        if self.queries.is_empty() {
            invalid!("rl data: no training queries");
        }
        if self.docs.is_empty() {
            invalid!("rl data: the environment corpus is empty");
        }
        if self.forced_suffix.is_empty() {
            invalid!("rl data: empty forced suffix");
        }
        let n = self.docs.len();
        for (set, qs) in [("training", &self.queries), ("held-out", &self.eval)] {
            for (i, q) in qs.iter().enumerate() {
                if q.gold.is_empty() {
                    invalid!("rl data: {set} query {i} has no gold document");
                }
                if let Some(&d) = q.gold.iter().find(|&&d| d >= n) {
                    invalid!("rl data: {set} query {i} refers to document {d}, there are {n}");
                }
                if q.prompt.is_empty() {
                    invalid!("rl data: {set} query {i} has an empty prompt");
                }
            }
        }
        Ok(())
    }

    /// sha256 of every id, index and length, in order.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut put = |x: u64| h.update(x.to_le_bytes());
        put(self.pad_id as u64);
        for list in [&self.docs, &vec![self.forced_suffix.clone()]] {
            put(list.len() as u64);
            for d in list.iter() {
                put(d.len() as u64);
                d.iter().for_each(|&t| put(t as u64));
            }
        }
        for qs in [&self.queries, &self.eval] {
            put(qs.len() as u64);
            for q in qs.iter() {
                put(q.prompt.len() as u64);
                q.prompt.iter().for_each(|&t| put(t as u64));
                put(q.gold.len() as u64);
                q.gold.iter().for_each(|&d| put(d as u64));
            }
        }
        hex::encode(h.finalize())
    }
}

/// Held-out scores of the policy with greedy reasoning (see [`evaluate_reasoning`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RlEval {
    /// Mean nDCG@10 (trec_eval semantics, binary gold).
    pub ndcg10: f64,
    /// Mean retrieval (DCG) reward.
    pub reward: f64,
    /// Share of queries whose retrieval reward is at least 0.5.
    pub reward_ge_half: f64,
    /// Share of queries whose reasoning ended with `<|embed_token|>` written by the model.
    pub emitted: f64,
    /// Mean reasoning tokens.
    pub length: f64,
}

/// Scores `queries` with greedy reasoning (at most `cfg.max_new_tokens`) against `docs`, fresh
/// unit vectors of the corpus (row = document position), searched exactly; the reward looks at
/// the top `cfg.reward.top_k`.
pub fn evaluate_reasoning(
    model: &Model,
    tok: &TextTokenizer,
    queries: &[RlQuery],
    forced_suffix: &[u32],
    docs: &[Vec<f32>],
    cfg: &RlStepConfig,
) -> Result<RlEval> {
    let (max_new_tokens, top_k, micro_tokens) =
        (cfg.max_new_tokens, cfg.reward.top_k, cfg.micro_tokens);
    if queries.is_empty() {
        invalid!("evaluate_reasoning: no queries");
    }
    let index = exact_index(docs)?;
    let gen = GenerationConfig {
        max_new_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    let mut sums = [0.0f64; 5];
    // Each generating row holds a KV cache; 16 at a time keeps memory flat.
    for chunk in queries.chunks(16) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|q| q.prompt.clone()).collect();
        let trajectories =
            reason_and_embed(model, tok, &prompts, forced_suffix, &gen, micro_tokens)?;
        for (q, t) in chunk.iter().zip(trajectories) {
            let probe = ProbeQuery {
                embedding: t.embedding,
                gold: q.gold.clone(),
            };
            let reward = exact_reward(&index, &probe, top_k)?;
            let hits: Vec<(String, f64)> = index
                .search(&probe.embedding, top_k.max(10))
                .map_err(|e| Error::Invalid(format!("index: {e}")))?
                .into_iter()
                .map(|h| (h.key.to_string(), h.score as f64))
                .collect();
            let judged: HashMap<String, i32> = q.gold.iter().map(|d| (d.to_string(), 1)).collect();
            let ndcg = evaluate_query(&judged, &hits)
                .get("ndcg@10")
                .copied()
                .unwrap_or(0.0);
            for (s, v) in sums.iter_mut().zip([
                ndcg,
                reward,
                f64::from(reward >= 0.5),
                f64::from(t.emitted),
                t.reasoning_len as f64,
            ]) {
                *s += v;
            }
        }
    }
    let n = queries.len() as f64;
    Ok(RlEval {
        ndcg10: sums[0] / n,
        reward: sums[1] / n,
        reward_ge_half: sums[2] / n,
        emitted: sums[3] / n,
        length: sums[4] / n,
    })
}

/// What a stage-2 run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RlSummary {
    /// Optimizer steps completed (including resumed ones).
    pub step: usize,
    /// Whether the run stopped before `steps` (leaving a checkpoint to resume from).
    pub stopped_early: bool,
    /// Whether that stop was an interrupt.
    pub interrupted: bool,
    /// Steps skipped because the gradient was not finite (this invocation only).
    pub skipped_steps: usize,
    /// Statistics of the last completed step.
    pub last: Option<RlStats>,
    /// Evaluation of the starting policy (step 0), when evaluations are on.
    pub start_eval: Option<RlEval>,
    /// Best held-out nDCG@10 and its step.
    pub best: Option<BestEval>,
}

/// Re-encoded fractions summed since the last measurement, per environment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Window {
    steps: usize,
    fraction: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RlState {
    format: String,
    step: usize,
    cursor: Cursor,
    config_hash: String,
    data_hash: String,
    /// What the policy was built on: the base model (adapter metadata) and the folded
    /// stage-1 adapter's values.
    base_hash: String,
    best: Option<BestEval>,
    start_eval: Option<RlEval>,
    last: Option<RlStats>,
    window: Window,
    files: BTreeMap<String, String>,
}

const RL_FORMAT: &str = "search-r3-rl-checkpoint-1";
pub(crate) const RL_STATE: &str = "rl_state.json";
const ENV_DIR: &str = "env";

fn baseline_dir(i: usize) -> String {
    format!("baseline-{i}")
}

/// A short name for a refresh policy in metrics and tables.
pub fn policy_name(p: &RefreshPolicy) -> String {
    match p {
        RefreshPolicy::Never => "never".into(),
        RefreshPolicy::Full => "full".into(),
        RefreshPolicy::Local { budget, neighbors } => format!("local-{budget}x{neighbors}"),
    }
}

/// Saves the trainable state as an adapter for the plain base model: this stage's adapter
/// stacked onto `base` (the folded stage-1 adapter) when there is one.
fn save_adapter(
    model: &Model,
    base: Option<&Lora>,
    path: &Path,
    meta: &HashMap<String, String>,
) -> Result<()> {
    match (base, &model.lora) {
        (Some(b), Some(mine)) => {
            let mut m = model.clone();
            m.lora = Some(b.stack(mine)?);
            save_trainable(&m, path, meta)?;
        }
        _ => save_trainable(model, path, meta)?,
    }
    Ok(())
}

/// Runs (or resumes) stage-2 training of `model` on `data`.
///
/// `model` must carry no LoRA adapters (fold the stage-1 adapter in with
/// [`Model::merge_lora`] and pass it as `base`, so that saved adapters apply to the base
/// model). A fresh adapter from `cfg.lora` is attached and trained with the embed-token row.
/// The environment encodes `data.docs` with the starting policy (on resume it is restored from
/// the checkpoint, vectors, graph and staleness included, so the resumed run continues exactly
/// as the straight one). Each step draws `queries_per_step` queries from the seeded epoch
/// order, rolls out, computes [`rl_gradients`], clips, applies AdamW, and refreshes the
/// environment (and the baselines) with the documents the step touched. A step whose loss or
/// gradient is not finite is skipped (logged; no update, no refresh).
pub fn train_rl(
    model: &mut Model,
    tok: &TextTokenizer,
    data: &RlData,
    cfg: &RlConfig,
    base: Option<&Lora>,
    opts: &TrainOptions,
) -> Result<RlSummary> {
    cfg.validate()?;
    data.validate()?;
    if model.lora.is_some() {
        invalid!("train_rl: the model already has LoRA adapters; fold them in with merge_lora and pass them as `base`");
    }
    let b = cfg.queries_per_step;
    let n = data.queries.len();
    if n < b {
        invalid!("rl data has {n} training queries, fewer than queries_per_step = {b}");
    }
    let schedule = cfg.schedule()?;
    let out = opts.out.as_path();
    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    let metrics_path = out.join(METRICS);
    let micro = cfg.rollout.micro_tokens;
    let pad = data.pad_id;

    let base_hash = policy_base_hash(base, &opts.adapter_metadata)?;
    model.add_lora(cfg.lora.config(), cfg.lora.seed)?;
    model.lora_enabled = true;
    let envs = 1 + cfg.baselines.len();
    let (mut state, mut env, mut baselines) = if opts.resume {
        let (s, dir) = read_rl_checkpoint(out)?;
        let state_path = dir.join(RL_STATE);
        if s.config_hash != cfg.hash() {
            return Err(file_err(
                &state_path,
                "checkpoint was written with a different config (hash mismatch); resume with the same config",
            ));
        }
        if s.data_hash != data.hash() {
            return Err(file_err(
                &state_path,
                "checkpoint was written for different data (hash mismatch)",
            ));
        }
        if s.base_hash != base_hash {
            return Err(file_err(
                &state_path,
                "checkpoint was written on a different base model or stage-1 adapter; resume with the same --model and --adapter",
            ));
        }
        load_trainable(model, &dir.join(ADAPTER))?;
        let env = RetrievalEnv::load(&dir.join(ENV_DIR), data.docs.clone(), pad, micro)?;
        let baselines = (0..cfg.baselines.len())
            .map(|i| RetrievalEnv::load(&dir.join(baseline_dir(i)), data.docs.clone(), pad, micro))
            .collect::<Result<Vec<_>>>()?;
        truncate_metrics(&metrics_path, s.step)?;
        (s, env, baselines)
    } else {
        if out.join(CKPT).exists() {
            return Err(file_err(
                &out.join(CKPT),
                "a checkpoint already exists here: pass --resume to continue, or choose another output directory",
            ));
        }
        std::fs::write(&metrics_path, b"").map_err(|e| file_err(&metrics_path, e))?;
        let env = RetrievalEnv::new(model, data.docs.clone(), pad, micro, cfg.index, cfg.refresh)?;
        let start = stored_vectors(&env);
        let baselines = cfg
            .baselines
            .iter()
            .map(|&p| {
                RetrievalEnv::from_vectors(data.docs.clone(), &start, pad, micro, cfg.index, p)
            })
            .collect::<Result<Vec<_>>>()?;
        let state = RlState {
            format: RL_FORMAT.into(),
            step: 0,
            cursor: Cursor { epoch: 0, pos: 0 },
            config_hash: cfg.hash(),
            data_hash: data.hash(),
            base_hash: base_hash.clone(),
            best: None,
            start_eval: None,
            last: None,
            window: Window {
                steps: 0,
                fraction: vec![0.0; envs],
            },
            files: BTreeMap::new(),
        };
        (state, env, baselines)
    };
    let named = model.trainable_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(named, cfg.adamw)?;
    if opts.resume {
        opt.load(&out.join(CKPT).join(OPTIMIZER))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| file_err(&metrics_path, e))?;
    let probe = probe_docs(data.docs.len(), cfg.probe_docs, cfg.seed);
    let say = |line: String| {
        if opts.progress {
            eprintln!("{line}");
        }
    };

    let evaluate = |model: &Model, docs: &[Vec<f32>]| {
        evaluate_reasoning(
            model,
            tok,
            &data.eval,
            &data.forced_suffix,
            docs,
            &cfg.rollout,
        )
    };
    let best_eval = |model: &Model,
                     step: usize,
                     e: &RlEval,
                     best: &mut Option<BestEval>,
                     metrics: &mut std::fs::File|
     -> Result<()> {
        log_line(
            metrics,
            &metrics_path,
            &json!({"step": step, "eval": {
                "ndcg@10": e.ndcg10, "reward": e.reward, "reward_ge_half": e.reward_ge_half,
                "emitted": e.emitted, "length": e.length}}),
        )?;
        say(format!(
            "step {step}: eval nDCG@10 {:.4} reward {:.3} (>= 0.5: {:.0}%) emitted {:.0}% length {:.1}",
            e.ndcg10,
            e.reward,
            100.0 * e.reward_ge_half,
            100.0 * e.emitted,
            e.length
        ));
        if best.is_none_or(|b| e.ndcg10 > b.score) {
            *best = Some(BestEval {
                step,
                score: e.ndcg10,
            });
            save_adapter(
                model,
                base,
                &out.join("best.safetensors"),
                &opts.adapter_metadata,
            )?;
        }
        Ok(())
    };

    if state.step == 0 && cfg.eval_every > 0 && !data.eval.is_empty() && state.start_eval.is_none()
    {
        // The starting policy, on the vectors the environment was just built with.
        let e = evaluate(model, &stored_vectors(&env))?;
        best_eval(model, 0, &e, &mut state.best, &mut metrics)?;
        state.start_eval = Some(e);
    }

    let mut order = epoch_order(n, cfg.seed, state.cursor.epoch);
    let mut skipped = 0;
    let (mut stopped_early, mut interrupted) = (false, false);
    let started = Instant::now();
    let first_step = state.step;
    while state.step < cfg.steps {
        let t0 = Instant::now();
        let step = state.step;
        if state.cursor.pos + b > n {
            state.cursor = Cursor {
                epoch: state.cursor.epoch + 1,
                pos: 0,
            };
            order = epoch_order(n, cfg.seed, state.cursor.epoch);
        }
        let batch: Vec<RlQuery> = order[state.cursor.pos..state.cursor.pos + b]
            .iter()
            .map(|&i| data.queries[i].clone())
            .collect();
        state.cursor.pos += b;
        let seed = Stream::new(cfg.seed, 0x5eed, step as u64).next();
        let rollouts = rollout(
            model,
            tok,
            &env,
            &batch,
            &data.forced_suffix,
            &cfg.rollout,
            seed,
        )?;
        let (mut grads, stats) = rl_gradients(model, &env, &batch, &rollouts, &cfg.rollout, pad)?;
        let lr = schedule.lr_at(step);
        let norm = if stats.loss.is_finite() {
            match clip_grad_norm(&mut grads, &vars, cfg.clip_norm) {
                Ok(x) => Ok(x),
                Err(Error::NonFinite { what, value }) => {
                    Err(format!("non-finite {what} ({value})"))
                }
                Err(e) => return Err(e),
            }
        } else {
            Err(format!("non-finite loss {}", stats.loss))
        };
        state.step += 1;
        match norm {
            Ok(norm) => {
                opt.step(&grads, lr)?;
                let touched = touched_documents(&batch, &rollouts, cfg.rollout.touch_top);
                let report = env.refresh(model, &touched)?;
                state.window.fraction[0] += report.fraction;
                for (k, e) in baselines.iter_mut().enumerate() {
                    state.window.fraction[k + 1] += e.refresh(model, &touched)?.fraction;
                }
                state.window.steps += 1;
                state.last = Some(stats);
                log_line(
                    &mut metrics,
                    &metrics_path,
                    &json!({
                        "step": state.step, "lr": lr,
                        "reward": {"mean": stats.reward, "retrieval": stats.retrieval,
                                   "ge_half": stats.reward_ge_half},
                        "emitted": stats.emitted, "length": stats.length,
                        "loss": {"total": stats.loss, "grpo": stats.grpo.surrogate, "nce": stats.nce},
                        "kl": stats.grpo.kl, "clip_fraction": stats.grpo.clip_fraction,
                        "ratio": stats.grpo.ratio, "grad_norm": norm,
                        "refresh": {"reencoded": report.reencoded, "fraction": report.fraction},
                        "seconds": t0.elapsed().as_secs_f64(),
                    }),
                )?;
            }
            Err(why) => {
                skipped += 1;
                say(format!("step {}: skipped ({why})", state.step));
                log_line(
                    &mut metrics,
                    &metrics_path,
                    &json!({"step": state.step, "lr": lr, "skipped": why}),
                )?;
            }
        }
        if opts.progress {
            let done = state.step - first_step;
            let per = started.elapsed().as_secs_f64() / done as f64;
            let eta = per * (cfg.steps - state.step) as f64;
            let line = format!(
                "step {}/{} reward {:.3} retrieval {:.3} emitted {:.0}% length {:.1} kl {:.4} loss {:.3} lr {lr:.1e} {per:.1}s/step eta {}",
                state.step,
                cfg.steps,
                stats.reward,
                stats.retrieval,
                100.0 * stats.emitted,
                stats.length,
                stats.grpo.kl,
                stats.loss,
                fmt_duration(eta)
            );
            // A line per step, terminal or log: a bar would hide these numbers.
            eprintln!("{line}");
        }

        let last = state.step == cfg.steps;
        let step_now = state.step;
        let due = |every: usize| every > 0 && (last || step_now % every == 0);
        let eval_due = due(cfg.eval_every) && !data.eval.is_empty();
        let measure_due = due(cfg.measure_every);
        if eval_due || measure_due {
            let fresh = env.encode_all(model)?;
            if measure_due {
                let probe_queries = reembed(model, &batch, &rollouts, pad, micro)?;
                let mut report = serde_json::Map::new();
                let window = std::mem::replace(
                    &mut state.window,
                    Window {
                        steps: 0,
                        fraction: vec![0.0; envs],
                    },
                );
                for (k, e) in std::iter::once(&env).chain(&baselines).enumerate() {
                    let drift = e.drift_against(&fresh, &probe)?;
                    let fid =
                        e.fidelity_against(&fresh, &probe_queries, cfg.rollout.reward.top_k)?;
                    let per_step = window.fraction[k] / window.steps.max(1) as f64;
                    report.insert(
                        policy_name(&e.policy()),
                        json!({
                            "reencoded_per_step": per_step, "drift_mean_cos": drift.mean_cos,
                            "drift_min_cos": drift.min_cos, "stale": drift.stale as f64 / probe.len().max(1) as f64,
                            "spearman": fid.spearman, "kendall": fid.kendall,
                            "mean_abs_diff": fid.mean_abs_diff,
                        }),
                    );
                    say(format!(
                        "step {}: env {}: re-encoded {:.1}%/step, drift cos {:.4} (min {:.4}), fidelity spearman {} kendall {}",
                        state.step,
                        policy_name(&e.policy()),
                        100.0 * per_step,
                        drift.mean_cos,
                        drift.min_cos,
                        fid.spearman.map_or("-".into(), |v| format!("{v:.3}")),
                        fid.kendall.map_or("-".into(), |v| format!("{v:.3}")),
                    ));
                }
                log_line(
                    &mut metrics,
                    &metrics_path,
                    &json!({"step": state.step, "env": report}),
                )?;
            }
            if eval_due {
                let e = evaluate(model, &fresh)?;
                best_eval(model, state.step, &e, &mut state.best, &mut metrics)?;
            }
        }
        let stop = opts
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
            && !last;
        let ckpt_due = last || (cfg.checkpoint_every > 0 && step_now % cfg.checkpoint_every == 0);
        if ckpt_due || stop {
            write_rl_checkpoint(
                out,
                model,
                &opt,
                &env,
                &baselines,
                &mut state,
                &opts.adapter_metadata,
            )?;
        }
        if eval_due || measure_due || stop {
            plot_curves(&metrics_path, out);
        }
        if stop {
            say(format!(
                "interrupted: checkpoint written at step {}; continue with --resume",
                state.step
            ));
            (stopped_early, interrupted) = (true, true);
            break;
        }
        if opts.stop_after == Some(state.step) && !last {
            stopped_early = true;
            break;
        }
    }
    let summary = RlSummary {
        step: state.step,
        stopped_early,
        interrupted,
        skipped_steps: skipped,
        last: state.last,
        start_eval: state.start_eval,
        best: state.best,
    };
    if stopped_early {
        return Ok(summary);
    }

    let mut meta = opts.adapter_metadata.clone();
    meta.insert("step".into(), state.step.to_string());
    let final_path = out.join("final.safetensors");
    save_adapter(model, base, &final_path, &meta)?;
    let best_path = out.join("best.safetensors");
    let (src, adapter_step) = match state.best {
        Some(b) if best_path.exists() => (best_path, b.step),
        _ => (final_path, state.step),
    };
    let adapter = out.join(ADAPTER);
    std::fs::copy(&src, &adapter).map_err(|e| file_err(&adapter, e))?;
    let mut manifest = serde_json::Map::new();
    manifest.insert("format".into(), "search-r3-rl-adapter".into());
    manifest.insert("version".into(), 1.into());
    manifest.insert("adapter".into(), ADAPTER.into());
    manifest.insert("adapter_sha256".into(), sha256_file(&adapter)?.into());
    manifest.insert("adapter_step".into(), adapter_step.into());
    manifest.insert("stacked_on_base_adapter".into(), base.is_some().into());
    manifest.insert("steps".into(), state.step.into());
    manifest.insert(
        "config".into(),
        serde_json::to_value(cfg).expect("config serialises"),
    );
    manifest.insert("config_hash".into(), state.config_hash.clone().into());
    manifest.insert("data_hash".into(), data.hash().into());
    manifest.insert(
        "data".into(),
        json!({"queries": n, "held_out": data.eval.len(), "docs": data.docs.len()}),
    );
    manifest.insert("start_eval".into(), json!(state.start_eval));
    manifest.insert(
        "best".into(),
        match state.best {
            Some(b) => json!({"step": b.step, "ndcg@10": b.score}),
            None => serde_json::Value::Null,
        },
    );
    manifest.insert(
        "environment".into(),
        json!({"reencoded_total": env.reencoded_total(), "updates": env.version(),
               "policy": cfg.refresh}),
    );
    for (k, v) in &opts.manifest {
        manifest.insert(k.clone(), v.clone());
    }
    let json = serde_json::to_vec_pretty(&serde_json::Value::Object(manifest))
        .expect("manifest serialises");
    write_atomic(&out.join("manifest.json"), &json)?;
    plot_curves(&metrics_path, out);
    Ok(summary)
}

/// sha256 of what the stage-2 policy starts from besides this stage's adapter: the base model
/// as the adapter metadata names it, and the folded stage-1 adapter's configuration and values.
fn policy_base_hash(base: Option<&Lora>, meta: &HashMap<String, String>) -> Result<String> {
    let mut h = Sha256::new();
    for key in ["base_model", "base_model_sha256"] {
        h.update(meta.get(key).map_or("", String::as_str).as_bytes());
        h.update([0]);
    }
    if let Some(lora) = base {
        h.update(serde_json::to_vec(&lora.config).expect("lora config serialises"));
        for (name, var) in lora.named_vars() {
            h.update(name.as_bytes());
            let values: Vec<f32> = var
                .as_tensor()
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            values.iter().for_each(|v| h.update(v.to_le_bytes()));
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The environment's stored vectors, by document.
fn stored_vectors(env: &RetrievalEnv) -> Vec<Vec<f32>> {
    (0..env.len())
        .map(|d| env.stored(d).expect("every document is indexed"))
        .collect()
}

/// A seeded random sample of `k` document positions out of `n` (all when `k >= n`).
fn probe_docs(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    let mut rng = Stream::new(seed, 0x9b0e, 0);
    let k = k.min(n);
    for i in 0..k {
        let j = i + rng.below(n - i);
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

/// The step's trajectories embedded by the updated policy: the queries whose rewards the next
/// update would see, for the fidelity measurement.
fn reembed(
    model: &Model,
    batch: &[RlQuery],
    rollouts: &[crate::rl::Rollout],
    pad: u32,
    micro: usize,
) -> Result<Vec<ProbeQuery>> {
    let seqs: Vec<Vec<u32>> = rollouts.iter().map(|r| r.sequence.clone()).collect();
    let vecs = embed_sequences(model, &seqs, pad, micro)?;
    Ok(rollouts
        .iter()
        .zip(vecs)
        .map(|(r, embedding)| ProbeQuery {
            embedding,
            gold: batch[r.query].gold.clone(),
        })
        .collect())
}

fn write_rl_checkpoint(
    out: &Path,
    model: &Model,
    opt: &AdamW,
    env: &RetrievalEnv,
    baselines: &[RetrievalEnv],
    state: &mut RlState,
    meta: &HashMap<String, String>,
) -> Result<()> {
    swap_in_checkpoint(out, |tmp| {
        save_trainable(model, &tmp.join(ADAPTER), meta)?;
        opt.save(&tmp.join(OPTIMIZER))?;
        env.save(&tmp.join(ENV_DIR))?;
        for (i, e) in baselines.iter().enumerate() {
            e.save(&tmp.join(baseline_dir(i)))?;
        }
        state.files = checksums(tmp, &[ADAPTER, OPTIMIZER])?;
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        std::fs::write(tmp.join(RL_STATE), json).map_err(|e| file_err(&tmp.join(RL_STATE), e))
    })
}

/// Reads and verifies the stage-2 checkpoint state (the environments verify their own files
/// when loaded).
fn read_rl_checkpoint(out: &Path) -> Result<(RlState, PathBuf)> {
    let kind = CheckpointKind {
        state_file: RL_STATE,
        format: RL_FORMAT,
        missing: "no stage-2 checkpoint to resume from (run without --resume to start afresh)",
        foreign: (
            STATE,
            "this is a stage-1 (train sft) checkpoint; give train rl another output directory",
        ),
    };
    read_checkpoint_state(out, &kind, |s: &RlState| (s.format.as_str(), &s.files))
}
