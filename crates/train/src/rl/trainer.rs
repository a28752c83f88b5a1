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

use super::env::{exact_index, exact_reward, ndcg_at_10, ProbeQuery, RefreshPolicy, RetrievalEnv};
use super::step::{
    reasoning_len, rl_gradients, rollout, think_all, touched_documents, RlQuery, RlStats,
    RlStepConfig, Rollout,
};
use crate::error::{invalid, Error, Result};
use crate::forward::embed_unit;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::run::checkpoint::{self, ADAPTER, OPTIMIZER, RL_CHECKPOINT};
use crate::run::config::{finite, positive, LoraSection, RunConfig};
use crate::run::data::{Cursor, Epochs, Stream};
use crate::run::finish::{finish, stage_fields};
use crate::run::log::{MetricsLog, Pace};
use crate::run::{self, BestEval, Stop, TrainOptions};
use candle_core::Var;
use search_r3_core::embedder::ThoughtCloser;
use search_r3_index::IndexKind;
use search_r3_model::state::{load_trainable, save_trainable};
use search_r3_model::{GenerationConfig, Lora, Model, TextTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
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

impl RunConfig for RlConfig {
    fn validate(&self) -> Result<()> {
        self.adamw.validate()?;
        self.schedule()?;
        let r = &self.rollout;
        positive(
            "rl",
            &[
                ("steps", self.steps),
                ("queries_per_step", self.queries_per_step),
                ("max_doc_tokens", self.max_doc_tokens),
                ("max_query_tokens", self.max_query_tokens),
                ("env_docs", self.env_docs),
                ("rollout.max_new_tokens", r.max_new_tokens),
                ("rollout.micro_tokens", r.micro_tokens),
                ("rollout.reward.top_k", r.reward.top_k),
            ],
        )?;
        self.lora.validate("rl")?;
        if r.group_size < 2 {
            invalid!("rl config: `rollout.group_size` must be at least 2 (advantages compare a query's trajectories)");
        }
        finite(
            "rl",
            &[
                ("clip_norm", self.clip_norm, false),
                ("rollout.temperature", r.temperature, false),
                ("rollout.tau", r.tau, false),
                ("rollout.lambda_nce", r.lambda_nce, true),
                ("rollout.loss.beta", r.loss.beta, true),
                ("rollout.loss.clip_low", r.loss.clip_low, true),
                ("rollout.loss.clip_high", r.loss.clip_high, true),
            ],
        )?;
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
}

impl RlConfig {
    /// The learning-rate schedule.
    pub fn schedule(&self) -> Result<LrSchedule> {
        LrSchedule::new(self.warmup_steps, self.steps, self.lr, self.min_lr)
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
    /// Closes a trajectory that stops without `<|embed_token|>` (as inference does).
    pub closer: ThoughtCloser,
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
        for list in [&self.docs, &vec![self.closer.suffix().to_vec()]] {
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
    closer: &ThoughtCloser,
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
        let trajectories = think_all(model, tok, closer, &prompts, &gen, micro_tokens)?;
        for (q, t) in chunk.iter().zip(trajectories) {
            let probe = ProbeQuery {
                embedding: t.vector.clone(),
                gold: q.gold.clone(),
            };
            let reward = exact_reward(&index, &probe, top_k)?;
            let ndcg = ndcg_at_10(&index, &probe.embedding, &q.gold)?;
            for (s, v) in sums.iter_mut().zip([
                ndcg,
                reward,
                f64::from(reward >= 0.5),
                f64::from(!t.forced),
                reasoning_len(&t) as f64,
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

impl Window {
    /// An empty window over `envs` environments.
    fn new(envs: usize) -> Self {
        Window {
            steps: 0,
            fraction: vec![0.0; envs],
        }
    }
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
    // Setup, or resume from the checkpoint (environment included).
    cfg.validate()?;
    data.validate()?;
    if model.lora.is_some() {
        invalid!("train_rl: the model already has LoRA adapters; fold them in with merge_lora and pass them as `base`");
    }
    let n = data.queries.len();
    if n < cfg.queries_per_step {
        invalid!(
            "rl data has {n} training queries, fewer than queries_per_step = {}",
            cfg.queries_per_step
        );
    }
    let out = opts.out.as_path();
    let base_hash = run::policy_base_hash(base, &opts.adapter_metadata)?;
    run::attach_adapters(model, &cfg.lora, opts)?;
    let (mut state, env, baselines) = start(model, data, cfg, base_hash, opts)?;
    let (opt, vars) = run::optimizer(model, cfg.adamw, opts)?;
    let mut run = Run {
        tok,
        data,
        cfg,
        base,
        opts,
        log: MetricsLog::open(out, opts.resume.then_some(state.step))?,
        probe: probe_docs(data.docs.len(), cfg.probe_docs, cfg.seed),
        env,
        baselines,
        opt,
        vars,
        schedule: cfg.schedule()?,
        epochs: Epochs::new(n, cfg.seed, state.cursor),
        pace: Pace::new(state.step, cfg.steps),
        skipped: 0,
    };
    if state.step == 0 && cfg.eval_every > 0 && !data.eval.is_empty() && state.start_eval.is_none()
    {
        // The starting policy, on the vectors the environment was just built with.
        let docs = stored_vectors(&run.env);
        state.start_eval = Some(run.evaluate(model, 0, &docs, &mut state.best)?);
    }

    let mut stop = Stop::default();
    while state.step < cfg.steps {
        // One step: rollouts, gradient, update, refresh.
        let (batch, rollouts) = run.step(model, &mut state)?;

        // Measure the environment, evaluate, checkpoint, stop.
        let last = state.step == cfg.steps;
        let step = state.step;
        let due = |every: usize| every > 0 && (last || step % every == 0);
        let eval_due = due(cfg.eval_every) && !data.eval.is_empty();
        let measure_due = due(cfg.measure_every);
        if eval_due || measure_due {
            let fresh = run.env.encode_all(model)?;
            if measure_due {
                let queries = reembed(
                    model,
                    &batch,
                    &rollouts,
                    data.pad_id,
                    cfg.rollout.micro_tokens,
                )?;
                let window =
                    std::mem::replace(&mut state.window, Window::new(1 + run.baselines.len()));
                run.measure(step, &fresh, &queries, &window)?;
            }
            if eval_due {
                run.evaluate(model, step, &fresh, &mut state.best)?;
            }
        }
        let interrupted = opts.interrupted(last);
        if last || due(cfg.checkpoint_every) || interrupted {
            run.checkpoint(model, &mut state)?;
        }
        if eval_due || measure_due || interrupted {
            run.log.plot();
        }
        if let Some(s) = opts.stop(step, last, interrupted) {
            if s.interrupted {
                run.say(format!(
                    "interrupted: checkpoint written at step {step}; continue with --resume"
                ));
            }
            stop = s;
            break;
        }
    }
    let summary = RlSummary {
        step: state.step,
        stopped_early: stop.early,
        interrupted: stop.interrupted,
        skipped_steps: run.skipped,
        last: state.last,
        start_eval: state.start_eval,
        best: state.best,
    };
    if stop.early {
        return Ok(summary);
    }

    // Finish: final state, best adapter (stacked on the stage-1 adapter), manifest.
    let mut fields = stage_fields(
        "search-r3-rl-adapter",
        cfg,
        &state.config_hash,
        &state.data_hash,
        json!({"queries": n, "held_out": data.eval.len(), "docs": data.docs.len()}),
    );
    fields.insert("stacked_on_base_adapter".into(), base.is_some().into());
    fields.insert("start_eval".into(), json!(state.start_eval));
    fields.insert(
        "environment".into(),
        json!({"reencoded_total": run.env.reencoded_total(), "updates": run.env.version(),
               "policy": cfg.refresh}),
    );
    let save =
        |path: &Path, meta: &HashMap<String, String>| run::save_stacked(model, base, path, meta);
    finish(opts, &save, state.step, state.best, fields, &run.log)?;
    Ok(summary)
}

/// A running stage-2 loop: its inputs, the environments, the optimizer and the log.
struct Run<'a> {
    tok: &'a TextTokenizer,
    data: &'a RlData,
    cfg: &'a RlConfig,
    base: Option<&'a Lora>,
    opts: &'a TrainOptions,
    log: MetricsLog,
    /// Documents whose drift is measured.
    probe: Vec<usize>,
    /// The environment the rewards come from.
    env: RetrievalEnv,
    /// Refresh policies measured beside it on the same updates.
    baselines: Vec<RetrievalEnv>,
    opt: AdamW,
    vars: Vec<Var>,
    schedule: LrSchedule,
    epochs: Epochs,
    pace: Pace,
    /// Steps skipped (non-finite loss or gradient) in this invocation.
    skipped: usize,
}

impl Run<'_> {
    /// One optimizer step: draws the step's queries, rolls out, computes the gradient, clips,
    /// updates and refreshes the environments with the documents the step touched (a step
    /// whose loss or gradient is not finite is logged and skipped: no update, no refresh).
    /// Returns the queries and their rollouts for the measurements.
    fn step(
        &mut self,
        model: &mut Model,
        state: &mut RlState,
    ) -> Result<(Vec<RlQuery>, Vec<Rollout>)> {
        let (cfg, data) = (self.cfg, self.data);
        let t0 = Instant::now();
        let step = state.step;
        let batch: Vec<RlQuery> = self
            .epochs
            .next_batch(&mut state.cursor, cfg.queries_per_step)
            .iter()
            .map(|&i| data.queries[i].clone())
            .collect();
        let seed = Stream::new(cfg.seed, 0x5eed, step as u64).next();
        let rollouts = rollout(
            model,
            self.tok,
            &self.env,
            &batch,
            &data.closer,
            &cfg.rollout,
            seed,
        )?;
        let (mut grads, stats) = rl_gradients(
            model,
            &self.env,
            &batch,
            &rollouts,
            &cfg.rollout,
            data.pad_id,
        )?;
        let lr = self.schedule.lr_at(step);
        let norm = if stats.loss.is_finite() {
            match clip_grad_norm(&mut grads, &self.vars, cfg.clip_norm) {
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
                self.opt.step(&grads, lr)?;
                let touched = touched_documents(&batch, &rollouts, cfg.rollout.touch_top);
                let report = self.env.refresh(model, &touched)?;
                state.window.fraction[0] += report.fraction;
                for (k, e) in self.baselines.iter_mut().enumerate() {
                    state.window.fraction[k + 1] += e.refresh(model, &touched)?.fraction;
                }
                state.window.steps += 1;
                state.last = Some(stats);
                self.log.line(&json!({
                    "step": state.step, "lr": lr,
                    "reward": {"mean": stats.reward, "retrieval": stats.retrieval,
                               "ge_half": stats.reward_ge_half},
                    "emitted": stats.emitted, "length": stats.length,
                    "positive_gain": stats.positive_gain, "dropped_groups": stats.dropped_groups,
                    "loss": {"total": stats.loss, "grpo": stats.grpo.surrogate, "nce": stats.nce},
                    "kl": stats.grpo.kl, "clip_fraction": stats.grpo.clip_fraction,
                    "ratio": stats.grpo.ratio, "grad_norm": norm,
                    "refresh": {"reencoded": report.reencoded, "fraction": report.fraction},
                    "seconds": t0.elapsed().as_secs_f64(),
                }))?;
            }
            Err(why) => {
                self.skipped += 1;
                self.say(format!("step {}: skipped ({why})", state.step));
                self.log
                    .line(&json!({"step": state.step, "lr": lr, "skipped": why}))?;
            }
        }
        // A line per step, terminal or log: a bar would hide these numbers.
        self.say(format!(
            "step {}/{} reward {:.3} retrieval {:.3}{} emitted {:.0}% length {:.1} kl {:.4} loss {:.3} lr {lr:.1e} {}",
            state.step,
            cfg.steps,
            stats.reward,
            stats.retrieval,
            stats
                .positive_gain
                .map_or(String::new(), |g| format!(" gain>0 {:.0}%", 100.0 * g)),
            100.0 * stats.emitted,
            stats.length,
            stats.grpo.kl,
            stats.loss,
            self.pace.after(state.step)
        ));
        Ok((batch, rollouts))
    }

    /// Swaps in a checkpoint of the adapter, the optimizer, the environments and `state`.
    fn checkpoint(&self, model: &Model, state: &mut RlState) -> Result<()> {
        let meta = &self.opts.adapter_metadata;
        checkpoint::swap_in(&self.opts.out, |tmp| {
            save_trainable(model, &tmp.join(ADAPTER), meta)?;
            self.opt.save(&tmp.join(OPTIMIZER))?;
            self.env.save(&tmp.join(ENV_DIR))?;
            for (i, e) in self.baselines.iter().enumerate() {
                e.save(&tmp.join(baseline_dir(i)))?;
            }
            state.files = checkpoint::checksums(tmp)?;
            checkpoint::write_state(tmp, &RL_CHECKPOINT, state)
        })
    }

    fn say(&self, line: String) {
        if self.opts.progress {
            eprintln!("{line}");
        }
    }

    /// Held-out evaluation with greedy reasoning on `docs` (fresh vectors of the corpus):
    /// logged, reported, and the adapter kept as `best.safetensors` when it is the best.
    fn evaluate(
        &mut self,
        model: &Model,
        step: usize,
        docs: &[Vec<f32>],
        best: &mut Option<BestEval>,
    ) -> Result<RlEval> {
        let d = self.data;
        let e = evaluate_reasoning(model, self.tok, &d.eval, &d.closer, docs, &self.cfg.rollout)?;
        self.log.line(&json!({"step": step, "eval": {
            "ndcg@10": e.ndcg10, "reward": e.reward, "reward_ge_half": e.reward_ge_half,
            "emitted": e.emitted, "length": e.length}}))?;
        self.say(format!(
            "step {step}: eval nDCG@10 {:.4} reward {:.3} (>= 0.5: {:.0}%) emitted {:.0}% length {:.1}",
            e.ndcg10,
            e.reward,
            100.0 * e.reward_ge_half,
            100.0 * e.emitted,
            e.length
        ));
        if BestEval::improve(best, step, e.ndcg10) {
            let path = self.opts.out.join("best.safetensors");
            run::save_stacked(model, self.base, &path, &self.opts.adapter_metadata)?;
        }
        Ok(e)
    }

    /// The environment's cost and accuracy against `fresh` vectors, for the run's policy and
    /// each baseline: re-encoded share per step over `window`, drift on the probe documents,
    /// reward fidelity on `queries`.
    fn measure(
        &mut self,
        step: usize,
        fresh: &[Vec<f32>],
        queries: &[ProbeQuery],
        window: &Window,
    ) -> Result<()> {
        let mut report = serde_json::Map::new();
        for (k, e) in std::iter::once(&self.env)
            .chain(&self.baselines)
            .enumerate()
        {
            let drift = e.drift_against(fresh, &self.probe)?;
            let fid = e.fidelity_against(fresh, queries, self.cfg.rollout.reward.top_k)?;
            let per_step = window.fraction[k] / window.steps.max(1) as f64;
            report.insert(
                policy_name(&e.policy()),
                json!({
                    "reencoded_per_step": per_step, "drift_mean_cos": drift.mean_cos,
                    "drift_min_cos": drift.min_cos,
                    "stale": drift.stale as f64 / self.probe.len().max(1) as f64,
                    "spearman": fid.spearman, "kendall": fid.kendall,
                    "mean_abs_diff": fid.mean_abs_diff,
                }),
            );
            self.say(format!(
                "step {step}: env {}: re-encoded {:.1}%/step, drift cos {:.4} (min {:.4}), fidelity spearman {} kendall {}",
                policy_name(&e.policy()),
                100.0 * per_step,
                drift.mean_cos,
                drift.min_cos,
                fid.spearman.map_or("-".into(), |v| format!("{v:.3}")),
                fid.kendall.map_or("-".into(), |v| format!("{v:.3}")),
            ));
        }
        self.log.line(&json!({"step": step, "env": report}))
    }
}

/// The run's state and environments at its first step: restored from the checkpoint (which
/// must match the config, the data and the policy's base; the adapter is loaded into `model`),
/// or fresh, the environment encoding the corpus with the starting policy and the baselines
/// starting from the same vectors.
fn start(
    model: &mut Model,
    data: &RlData,
    cfg: &RlConfig,
    base_hash: String,
    opts: &TrainOptions,
) -> Result<(RlState, RetrievalEnv, Vec<RetrievalEnv>)> {
    let out = opts.out.as_path();
    let (pad, micro) = (data.pad_id, cfg.rollout.micro_tokens);
    if !opts.resume {
        checkpoint::refuse_existing(out)?;
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
            format: RL_CHECKPOINT.format.into(),
            step: 0,
            cursor: Cursor::default(),
            config_hash: cfg.hash(),
            data_hash: data.hash(),
            base_hash,
            best: None,
            start_eval: None,
            last: None,
            window: Window::new(1 + cfg.baselines.len()),
            files: BTreeMap::new(),
        };
        return Ok((state, env, baselines));
    }
    let (s, dir) = checkpoint::read_state(out, &RL_CHECKPOINT, |s: &RlState| {
        (s.format.as_str(), &s.files)
    })?;
    checkpoint::check_hashes(
        &dir.join(RL_CHECKPOINT.state_file),
        &[
            (&s.config_hash, &cfg.hash(), "checkpoint was written with a different config (hash mismatch); resume with the same config"),
            (&s.data_hash, &data.hash(), "checkpoint was written for different data (hash mismatch)"),
            (&s.base_hash, &base_hash, "checkpoint was written on a different base model or stage-1 adapter; resume with the same --model and --adapter"),
        ],
    )?;
    load_trainable(model, &dir.join(ADAPTER))?;
    let env = RetrievalEnv::load(&dir.join(ENV_DIR), data.docs.clone(), pad, micro)?;
    let baselines = (0..cfg.baselines.len())
        .map(|i| RetrievalEnv::load(&dir.join(baseline_dir(i)), data.docs.clone(), pad, micro))
        .collect::<Result<Vec<_>>>()?;
    Ok((s, env, baselines))
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
    Stream::new(seed, 0x9b0e, 0).sample(&mut all, k);
    all
}

/// The step's trajectories embedded by the updated policy: the queries whose rewards the next
/// update would see, for the fidelity measurement.
fn reembed(
    model: &Model,
    batch: &[RlQuery],
    rollouts: &[Rollout],
    pad: u32,
    micro: usize,
) -> Result<Vec<ProbeQuery>> {
    let seqs: Vec<Vec<u32>> = rollouts.iter().map(|r| r.sequence.clone()).collect();
    let vecs = embed_unit(model, &seqs, pad, micro)?;
    Ok(rollouts
        .iter()
        .zip(vecs)
        .map(|(r, embedding)| ProbeQuery {
            embedding,
            gold: batch[r.query].gold.clone(),
        })
        .collect())
}
