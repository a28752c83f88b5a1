//! The thought-stage loop (`train reason`): expert iteration over retrieval-selected thoughts,
//! training a query tower against frozen document vectors.
//!
//! Each round `r` of `rounds`:
//!
//! 1. **Think.** `queries_per_round` training queries (a seeded sample) each get `thoughts`
//!    sampled thoughts from the current policy (temperature, nucleus, at least
//!    `min_thought_tokens` and at most `thought_tokens` tokens), embedded at the
//!    `<|embed_token|>` that closes them — the same [`think`] inference uses. With a
//!    [`Teacher`] (O1 Embedder's setup), another model also writes `[teacher] thoughts` per
//!    query from its own prompt (what a relevant document would say, HyDE-style); each is
//!    re-tokenized as text by the student, cut to `thought_tokens`, closed and embedded by the
//!    policy exactly as its own thoughts are, and competes with them in the selection — a kept
//!    teacher thought is what the policy then learns to write (the CE term).
//! 2. **Select.** Each thought and the query's direct embedding are scored against the frozen
//!    documents ([`retrieval`]); the best thought is kept when it beats the direct embedding
//!    ([`select_thought`]), else the query trains direct only.
//! 3. **Train** `steps_per_round` AdamW steps on the round's pool with
//!    `λ_nce·InfoNCE(q, D) + λ_ce·CE(thought)`: `q` is the hidden state at the embed token after
//!    query + kept thought (or after the direct prompt when there is none, or when the thought
//!    is dropped with probability `thought_dropout`), `D` every frozen document (the query's
//!    other gold documents masked), CE the thought and its closing sentence. This is
//!    [`sft_gradients`] with [`SftBatch::frozen_docs`].
//! 4. **Evaluate** the held-out queries (nDCG@10 over the frozen documents) directly, with one
//!    greedy thought, and with `thoughts` sampled thoughts averaged with the direct embedding;
//!    the best `select_by` score keeps its adapter as `best.safetensors`.
//!
//! The documents never change: their vectors come from the document model (the caller's
//! index), so an index built with it stays valid for the trained query tower. The tower is
//! saved stacked onto the folded `base` adapter, loadable on the plain base model.
//!
//! Checkpoints (`OUT/checkpoint/`): adapter, optimizer, and `reason_state.json` with the step,
//! the round, the round's selection (pool and kept thought sequences) and the data cursor, so
//! a resumed run neither re-samples a round's thoughts nor draws a different batch.

use super::select::{retrieval, select_thought, Retrieval};
use crate::error::{invalid, Error, Result};
use crate::losses::SftLossConfig;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::rl::env::{exact_index, ndcg_at_10};
use crate::run::checkpoint::{self, ADAPTER, OPTIMIZER, REASON_CHECKPOINT};
use crate::run::config::{finite, positive, LoraSection, RunConfig};
use crate::run::data::{Cursor, Epochs, Stream};
use crate::run::finish::{finish, stage_fields};
use crate::run::log::{MetricsLog, Pace};
use crate::run::{self, BestEval, Stop, TrainOptions};
use crate::sft::{sft_gradients, SftBatch, SftExample};
use candle_core::{Device, Tensor, Var};
use search_r3_core::embedder::{think, ThoughtCloser};
use search_r3_index::mean_unit;
use search_r3_model::files::write_atomic;
use search_r3_model::state::{load_trainable, save_trainable};
use search_r3_model::{generate, Cancel, GenerationConfig, Lora, Model, TextTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// Every setting of a thought-stage run (TOML; unknown keys are errors). Defaults are sized
/// for SmolLM2-135M on a 2-core CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReasonConfig {
    /// Expert-iteration rounds (default 2).
    pub rounds: usize,
    /// Training queries that think in each round (a seeded sample; default 256).
    pub queries_per_round: usize,
    /// Thoughts sampled per query, in selection and in the averaged eval mode (default 4).
    pub thoughts: usize,
    /// Most tokens of a thought (default 32; LREM found 16–32-token reasoning best).
    pub thought_tokens: usize,
    /// Fewest tokens of a thought: stop tokens are masked until then (default 12).
    pub min_thought_tokens: usize,
    /// Sampling temperature of the thoughts (default 0.8).
    pub temperature: f64,
    /// Nucleus cut of the sampling (default 0.95).
    pub top_p: f64,
    /// Rows generated together (default 32).
    pub generation_batch: usize,
    /// Optimizer steps per round (default 24).
    pub steps_per_round: usize,
    /// Queries per step (default 16).
    pub queries_per_step: usize,
    /// Probability that a kept thought is dropped and the query trains direct (default 0.1).
    pub thought_dropout: f64,
    /// Weight of the InfoNCE term (default 0.8, O1 Embedder).
    pub lambda_nce: f64,
    /// Weight of the cross-entropy on the thought tokens (default 0.2, O1 Embedder).
    pub lambda_ce: f64,
    /// InfoNCE temperature (default 0.05).
    pub tau: f64,
    /// Peak learning rate (default 1e-4).
    pub lr: f64,
    /// Floor of the cosine decay (default 1e-5).
    pub min_lr: f64,
    /// Linear warmup steps (default 4).
    pub warmup_steps: usize,
    /// Global gradient-norm clip (default 1.0).
    pub clip_norm: f64,
    /// Padded tokens per micro-batch (default 1024).
    pub micro_tokens: usize,
    /// Query text truncation in tokens, applied when prompts are built (default 64).
    pub max_query_tokens: usize,
    /// Training-split queries held out for evaluation (default 64).
    pub eval_queries: usize,
    /// Documents the queries are contrasted against when the CLI encodes them itself: every
    /// query's gold documents plus seeded random others up to this many (0 = the whole corpus;
    /// default 0). With `--index` the index's vectors of the whole corpus are used.
    pub env_docs: usize,
    /// Document truncation in tokens when the CLI encodes them (default 512, as `eval`).
    pub max_doc_tokens: usize,
    /// Checkpoint every this many steps, at round ends and at the end (default 8).
    pub checkpoint_every: usize,
    /// The held-out score that picks the best adapter: `direct`, `greedy` or `mean`
    /// (default `mean`).
    pub select_by: String,
    /// Seed of the samples, the data order and the dropout (default 0).
    pub seed: u64,
    /// LoRA of the query tower.
    pub lora: LoraSection,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Teacher thoughts (`[teacher]`; absent: the policy's own thoughts only). Needs a teacher
    /// model from the caller (`train reason --teacher`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherSection>,
}

/// How the teacher writes its candidate thoughts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherSection {
    /// Thoughts the teacher writes per query (default 4).
    pub thoughts: usize,
    /// Most tokens the teacher writes, in its own tokenizer (default 64); the student keeps at
    /// most `thought_tokens` of its own tokens of the text.
    pub max_tokens: usize,
    /// Sampling temperature (default 0.7).
    pub temperature: f64,
    /// The teacher's system prompt.
    pub system: String,
    /// The teacher's user prompt; `{text}` is replaced by the query.
    pub user: String,
}

impl Default for TeacherSection {
    fn default() -> Self {
        TeacherSection {
            thoughts: 4,
            max_tokens: 64,
            temperature: 0.7,
            system: "You help a search engine find scientific documents.".into(),
            user: "Query: {text}\nWrite what a relevant document would say: its key terms, \
                   entities and findings, in one or two short sentences."
                .into(),
        }
    }
}

/// The model that writes teacher thoughts, and its prompt for each training query.
pub struct Teacher<'a> {
    /// The teacher model (any architecture the runtime loads; its own tokenizer).
    pub model: &'a Model,
    /// Its tokenizer.
    pub tok: &'a TextTokenizer,
    /// Row `i` is the prompt (chat template, generation prompt open) of `ReasonData::queries[i]`.
    pub prompts: Vec<Vec<u32>>,
    /// What identifies the teacher's output (model, weights, prompt): part of the data hash, so
    /// a resume with another teacher is refused.
    pub id: String,
}

impl Default for ReasonConfig {
    fn default() -> Self {
        ReasonConfig {
            rounds: 2,
            queries_per_round: 256,
            thoughts: 4,
            thought_tokens: 32,
            min_thought_tokens: 12,
            temperature: 0.8,
            top_p: 0.95,
            generation_batch: 32,
            steps_per_round: 24,
            queries_per_step: 16,
            thought_dropout: 0.1,
            lambda_nce: 0.8,
            lambda_ce: 0.2,
            tau: 0.05,
            lr: 1e-4,
            min_lr: 1e-5,
            warmup_steps: 4,
            clip_norm: 1.0,
            micro_tokens: 1024,
            max_query_tokens: 64,
            eval_queries: 64,
            env_docs: 0,
            max_doc_tokens: 512,
            checkpoint_every: 8,
            select_by: "mean".into(),
            seed: 0,
            lora: LoraSection::default(),
            adamw: AdamWConfig::default(),
            teacher: None,
        }
    }
}

impl RunConfig for ReasonConfig {
    fn validate(&self) -> Result<()> {
        self.adamw.validate()?;
        self.schedule()?;
        positive(
            "train reason",
            &[
                ("rounds", self.rounds),
                ("queries_per_round", self.queries_per_round),
                ("thoughts", self.thoughts),
                ("thought_tokens", self.thought_tokens),
                ("generation_batch", self.generation_batch),
                ("steps_per_round", self.steps_per_round),
                ("queries_per_step", self.queries_per_step),
                ("micro_tokens", self.micro_tokens),
                ("max_query_tokens", self.max_query_tokens),
                ("max_doc_tokens", self.max_doc_tokens),
            ],
        )?;
        finite(
            "train reason",
            &[
                ("temperature", self.temperature, false),
                ("lambda_nce", self.lambda_nce, true),
                ("lambda_ce", self.lambda_ce, true),
                ("tau", self.tau, false),
                ("clip_norm", self.clip_norm, false),
            ],
        )?;
        if self.min_thought_tokens > self.thought_tokens {
            invalid!(
                "train reason: min_thought_tokens = {} exceeds thought_tokens = {}",
                self.min_thought_tokens,
                self.thought_tokens
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            invalid!("train reason: top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.thought_dropout) {
            invalid!(
                "train reason: thought_dropout must be in [0, 1], got {}",
                self.thought_dropout
            );
        }
        if !["direct", "greedy", "mean"].contains(&self.select_by.as_str()) {
            invalid!(
                "train reason: select_by must be direct, greedy or mean, got `{}`",
                self.select_by
            );
        }
        if let Some(t) = &self.teacher {
            positive(
                "train reason [teacher]",
                &[("thoughts", t.thoughts), ("max_tokens", t.max_tokens)],
            )?;
            finite(
                "train reason [teacher]",
                &[("temperature", t.temperature, true)],
            )?;
            if t.temperature == 0.0 && t.thoughts > 1 {
                invalid!("train reason [teacher]: temperature 0 (greedy) writes one thought, not thoughts = {}", t.thoughts);
            }
            if !t.user.contains("{text}") {
                invalid!(
                    "train reason [teacher]: user must contain {{text}} (where the query goes)"
                );
            }
        }
        self.lora.validate("train reason")
    }
}

impl ReasonConfig {
    /// The learning-rate schedule over all rounds' steps.
    pub fn schedule(&self) -> Result<LrSchedule> {
        LrSchedule::new(self.warmup_steps, self.steps(), self.lr, self.min_lr)
    }

    /// Optimizer steps of the whole run.
    pub fn steps(&self) -> usize {
        self.rounds * self.steps_per_round
    }

    fn generation(&self, temperature: f64, seed: u64) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.thought_tokens,
            min_new_tokens: self.min_thought_tokens,
            temperature,
            top_p: (temperature > 0.0).then_some(self.top_p),
            seed,
            ..Default::default()
        }
    }
}

/// One query of the thought stage, as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonQuery {
    /// The reasoning prompt, assistant turn open (what thoughts are sampled from).
    pub prompt: Vec<u32>,
    /// The direct prompt, ending with `<|embed_token|>`.
    pub direct: Vec<u32>,
    /// Index in `direct` of its first assistant token (the CE span of a direct example).
    pub direct_start: usize,
    /// Rows of [`ReasonData::docs`] that are relevant.
    pub gold: Vec<usize>,
}

/// What the thought stage trains and evaluates on.
pub struct ReasonData {
    /// Training queries.
    pub queries: Vec<ReasonQuery>,
    /// Held-out queries (from the training split).
    pub eval: Vec<ReasonQuery>,
    /// Frozen unit document vectors from the document model.
    pub docs: Vec<Vec<f32>>,
    /// Padding id.
    pub pad_id: u32,
}

impl ReasonData {
    /// Checks that every query has gold documents in range and non-empty prompts.
    pub fn validate(&self) -> Result<()> {
        if self.queries.is_empty() {
            invalid!("train reason: no training queries");
        }
        let d = self.docs.first().map_or(0, Vec::len);
        if d == 0 || self.docs.iter().any(|v| v.len() != d) {
            invalid!("train reason: the document vectors are empty or of different widths");
        }
        for (i, q) in self.queries.iter().chain(&self.eval).enumerate() {
            if q.gold.is_empty() || q.gold.iter().any(|&g| g >= self.docs.len()) {
                invalid!("train reason: query {i} has no gold document or one out of range");
            }
            if q.prompt.is_empty() || q.direct_start == 0 || q.direct_start >= q.direct.len() {
                invalid!("train reason: query {i} has an empty prompt or a bad direct span");
            }
        }
        Ok(())
    }

    /// sha256 of the queries, judgements and document vectors (a resume must see the same).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for q in self.queries.iter().chain(&self.eval) {
            for part in [&q.prompt, &q.direct] {
                part.iter().for_each(|t| h.update(t.to_le_bytes()));
                h.update([0xff]);
            }
            q.gold
                .iter()
                .for_each(|g| h.update((*g as u64).to_le_bytes()));
            h.update([0xfe]);
        }
        h.update((self.eval.len() as u64).to_le_bytes());
        for v in &self.docs {
            v.iter().for_each(|x| h.update(x.to_le_bytes()));
        }
        hex::encode(h.finalize())
    }
}

/// Held-out nDCG@10 over the frozen documents in the three inference modes, and the mean
/// tokens each reasoning mode wrote per query.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReasonEval {
    /// No reasoning.
    pub direct: f64,
    /// One greedy thought.
    pub greedy: f64,
    /// `thoughts` sampled thoughts averaged with the direct embedding.
    pub mean: f64,
    /// Tokens per query of the greedy thought.
    pub greedy_tokens: f64,
    /// Tokens per query of all sampled thoughts together.
    pub mean_tokens: f64,
}

impl ReasonEval {
    fn score(&self, by: &str) -> f64 {
        match by {
            "direct" => self.direct,
            "greedy" => self.greedy,
            _ => self.mean,
        }
    }
}

/// What a round's selection found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// Queries that thought.
    pub queries: usize,
    /// Queries whose best thought beat the direct embedding (their thought is trained on).
    pub kept: usize,
    /// Share of all sampled thoughts that beat the direct embedding.
    pub thoughts_beating_direct: f64,
    /// Mean nDCG (whole ranking) of the direct embeddings.
    pub direct_ndcg: f64,
    /// Mean nDCG of each query's best thought.
    pub best_thought_ndcg: f64,
    /// Mean generated tokens per thought.
    pub tokens: f64,
    /// Share of thoughts closed by the template (the model did not write the token).
    pub forced: f64,
    /// Of the kept thoughts, how many the teacher wrote.
    #[serde(default)]
    pub kept_teacher: usize,
    /// Mean nDCG of each query's best teacher thought (0 without a teacher).
    #[serde(default)]
    pub best_teacher_ndcg: f64,
}

/// One candidate thought of the selection, the policy's or the teacher's.
struct Candidate {
    text: String,
    /// Prompt + thought + closing, ending with `<|embed_token|>`.
    sequence: Vec<u32>,
    /// Unit vector at the end of `sequence` under the current policy.
    vector: Vec<f32>,
    /// The thought's tokens (the student's).
    tokens: usize,
    forced: bool,
    teacher: bool,
}

/// How a thought-stage run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasonSummary {
    /// Optimizer steps completed.
    pub step: usize,
    /// Stopped before the last step (`stop_after` or an interrupt).
    pub stopped_early: bool,
    /// The stop was an interrupt.
    pub interrupted: bool,
    /// The evaluation before any training.
    pub start_eval: Option<ReasonEval>,
    /// Each completed round's selection and end-of-round evaluation.
    pub rounds: Vec<(Selection, Option<ReasonEval>)>,
    /// The best `select_by` score and its step.
    pub best: Option<BestEval>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReasonState {
    format: String,
    step: usize,
    round: usize,
    cursor: Cursor,
    config_hash: String,
    data_hash: String,
    base_hash: String,
    best: Option<BestEval>,
    start_eval: Option<ReasonEval>,
    rounds: Vec<(Selection, Option<ReasonEval>)>,
    /// The current round's queries (empty until its selection ran).
    pool: Vec<usize>,
    /// The kept thought sequence (prompt + thought + closing) of each pool entry.
    kept: Vec<Option<Vec<u32>>>,
    files: BTreeMap<String, String>,
}

/// The hash a resume must match: the data's, and the teacher's identity and prompts.
fn run_data_hash(data: &ReasonData, teacher: Option<&Teacher>) -> String {
    let Some(t) = teacher else {
        return data.hash();
    };
    let mut h = Sha256::new();
    h.update(data.hash().as_bytes());
    h.update(t.id.as_bytes());
    for p in &t.prompts {
        p.iter().for_each(|x| h.update(x.to_le_bytes()));
        h.update([0xff]);
    }
    hex::encode(h.finalize())
}

/// Runs (or resumes) the thought stage on `model` (the query tower; `base` is the folded
/// document adapter it starts from and is saved stacked onto). `teacher` writes candidate
/// thoughts beside the policy; it is required exactly when `cfg.teacher` is set.
#[allow(clippy::too_many_arguments)]
pub fn train_reason(
    model: &mut Model,
    tok: &TextTokenizer,
    closer: &ThoughtCloser,
    data: &ReasonData,
    teacher: Option<&Teacher>,
    cfg: &ReasonConfig,
    base: Option<&Lora>,
    opts: &TrainOptions,
) -> Result<ReasonSummary> {
    cfg.validate()?;
    data.validate()?;
    match (&cfg.teacher, teacher) {
        (Some(_), None) => invalid!("train reason: the config has a [teacher] section but no teacher model was given (--teacher)"),
        (None, Some(_)) => invalid!("train reason: a teacher model was given but the config has no [teacher] section"),
        (Some(_), Some(t)) if t.prompts.len() != data.queries.len() => invalid!(
            "train reason: {} teacher prompts for {} training queries",
            t.prompts.len(),
            data.queries.len()
        ),
        _ => {}
    }
    if model.lora.is_some() {
        invalid!("train_reason: the model already has LoRA adapters; fold them in and pass them as `base`");
    }
    if data.queries.len() < cfg.queries_per_step {
        invalid!(
            "train reason: {} training queries, fewer than queries_per_step = {}",
            data.queries.len(),
            cfg.queries_per_step
        );
    }
    let out = opts.out.as_path();
    let base_hash = run::policy_base_hash(base, &opts.adapter_metadata)?;
    run::attach_adapters(model, &cfg.lora, opts)?;
    let mut state = start(model, run_data_hash(data, teacher), cfg, base_hash, opts)?;
    let (opt, vars) = run::optimizer(model, cfg.adamw, opts)?;
    let d = data.docs[0].len();
    let flat: Vec<f32> = data.docs.iter().flatten().copied().collect();
    let mut run = Run {
        tok,
        closer,
        data,
        teacher,
        cfg,
        base,
        opts,
        docs: Tensor::from_vec(flat, (data.docs.len(), d), &Device::Cpu)?,
        log: MetricsLog::open(out, opts.resume.then_some(state.step))?,
        opt,
        vars,
        schedule: cfg.schedule()?,
        pace: Pace::new(state.step, cfg.steps()),
    };
    if state.step == 0 && state.start_eval.is_none() && !data.eval.is_empty() {
        state.start_eval = Some(run.evaluate(model, 0, &mut state.best)?);
    }

    let mut stop = Stop::default();
    while state.round < cfg.rounds {
        if state.pool.is_empty() {
            let (pool, kept, sel) = run.select(model, state.round)?;
            state.pool = pool;
            state.kept = kept;
            state.rounds.push((sel, None));
            state.cursor = Cursor::default();
            run.checkpoint(model, &mut state)?;
        }
        let end = (state.round + 1) * cfg.steps_per_round;
        let mut epochs = Epochs::new(
            state.pool.len(),
            cfg.seed ^ state.round as u64,
            state.cursor,
        );
        while state.step < end {
            run.step(model, &mut state, &mut epochs)?;
            let (step, last_of_round) = (state.step, state.step == end);
            let last = step == cfg.steps();
            if last_of_round {
                let e = if data.eval.is_empty() {
                    None
                } else {
                    Some(run.evaluate(model, step, &mut state.best)?)
                };
                state.rounds.last_mut().expect("round selected").1 = e;
                state.round += 1;
                state.pool.clear();
                state.kept.clear();
            }
            let interrupted = opts.interrupted(last);
            let due = cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0;
            if last_of_round || due || interrupted {
                run.checkpoint(model, &mut state)?;
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
        if stop.early {
            break;
        }
    }
    let summary = ReasonSummary {
        step: state.step,
        stopped_early: stop.early,
        interrupted: stop.interrupted,
        start_eval: state.start_eval,
        rounds: state.rounds.clone(),
        best: state.best,
    };
    if stop.early {
        return Ok(summary);
    }

    let mut fields = stage_fields(
        "search-r3-reason-adapter",
        cfg,
        &state.config_hash,
        &state.data_hash,
        json!({"queries": data.queries.len(), "held_out": data.eval.len(), "docs": data.docs.len()}),
    );
    fields.insert("stacked_on_base_adapter".into(), base.is_some().into());
    fields.insert("start_eval".into(), json!(state.start_eval));
    fields.insert("rounds".into(), json!(state.rounds));
    let save =
        |path: &Path, meta: &HashMap<String, String>| run::save_stacked(model, base, path, meta);
    finish(opts, &save, state.step, state.best, fields, &run.log)?;
    Ok(summary)
}

/// A running thought-stage loop.
struct Run<'a> {
    tok: &'a TextTokenizer,
    closer: &'a ThoughtCloser,
    data: &'a ReasonData,
    teacher: Option<&'a Teacher<'a>>,
    cfg: &'a ReasonConfig,
    base: Option<&'a Lora>,
    opts: &'a TrainOptions,
    /// The frozen documents `[n, d]`.
    docs: Tensor,
    log: MetricsLog,
    opt: AdamW,
    vars: Vec<Var>,
    schedule: LrSchedule,
    pace: Pace,
}

impl Run<'_> {
    /// `n` sampled thoughts for each of `queries`, in generation batches, each with its
    /// vector; row `i·n + j` is thought `j` of query `i`.
    fn thoughts(
        &self,
        model: &Model,
        queries: &[&ReasonQuery],
        n: usize,
        temperature: f64,
        seed_key: u64,
    ) -> Result<Vec<search_r3_core::embedder::Thought>> {
        let rows: Vec<Vec<u32>> = queries
            .iter()
            .flat_map(|q| std::iter::repeat_n(q.prompt.clone(), n))
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for (c, chunk) in rows.chunks(self.cfg.generation_batch).enumerate() {
            let seed = Stream::new(self.cfg.seed, seed_key, c as u64).next();
            let gen = self.cfg.generation(temperature, seed);
            out.extend(
                think(
                    model,
                    self.tok,
                    self.closer,
                    chunk,
                    &gen,
                    self.cfg.micro_tokens,
                    search_r3_model::Cancel::NEVER,
                )
                .map_err(|e| Error::Invalid(format!("thinking: {e}")))?,
            );
        }
        Ok(out)
    }

    /// The teacher's candidate thoughts for the training queries `pool` (in order), each
    /// re-tokenized as text by the student, cut to `thought_tokens`, closed and embedded by
    /// `model`. Thoughts shorter than `min_thought_tokens` student tokens are dropped.
    fn teach(
        &self,
        t: &Teacher,
        model: &Model,
        pool: &[usize],
        round: usize,
    ) -> Result<Vec<Vec<Candidate>>> {
        let (cfg, data) = (self.cfg, self.data);
        let tc = cfg
            .teacher
            .as_ref()
            .expect("validated: a teacher has its section");
        let n = tc.thoughts;
        let rows: Vec<Vec<u32>> = pool
            .iter()
            .flat_map(|&i| std::iter::repeat_n(t.prompts[i].clone(), n))
            .collect();
        let mut texts = Vec::with_capacity(rows.len());
        for (c, chunk) in rows.chunks(cfg.generation_batch).enumerate() {
            let gen = GenerationConfig {
                max_new_tokens: tc.max_tokens,
                temperature: tc.temperature,
                top_p: (tc.temperature > 0.0).then_some(cfg.top_p),
                seed: Stream::new(cfg.seed, 0x7eac ^ round as u64, c as u64).next(),
                stop_at_embed_token: false,
                ..Default::default()
            };
            for g in generate(t.model, t.tok, chunk, &gen, Cancel::NEVER)? {
                texts.push(t.tok.decode(&g.tokens, true)?.trim().to_string());
            }
        }
        let mut seqs = Vec::new();
        let mut owner = Vec::new();
        let mut kept_texts = Vec::new();
        for (r, text) in texts.into_iter().enumerate() {
            let mut ids = self.tok.encode(&text)?;
            ids.truncate(cfg.thought_tokens);
            if ids.len() < cfg.min_thought_tokens.max(1) {
                continue;
            }
            let q = &data.queries[pool[r / n]];
            seqs.push(
                self.closer
                    .close(&q.prompt, &ids)
                    .map_err(|e| Error::Invalid(format!("closing a teacher thought: {e}")))?,
            );
            owner.push((r / n, ids.len()));
            kept_texts.push(self.tok.decode(&ids, true)?.trim().to_string());
        }
        let vectors = crate::forward::embed_unit(model, &seqs, data.pad_id, cfg.micro_tokens)?;
        let mut out: Vec<Vec<Candidate>> = (0..pool.len()).map(|_| Vec::new()).collect();
        for ((((i, tokens), sequence), vector), text) in
            owner.into_iter().zip(seqs).zip(vectors).zip(kept_texts)
        {
            out[i].push(Candidate {
                text,
                sequence,
                vector,
                tokens,
                forced: false,
                teacher: true,
            });
        }
        Ok(out)
    }

    /// Direct unit embeddings of `queries`.
    fn direct(&self, model: &Model, queries: &[&ReasonQuery]) -> Result<Vec<Vec<f32>>> {
        let seqs: Vec<Vec<u32>> = queries.iter().map(|q| q.direct.clone()).collect();
        crate::forward::embed_unit(model, &seqs, self.data.pad_id, self.cfg.micro_tokens)
    }

    /// Round `round`'s selection: its queries, the kept thought of each, and the report.
    #[allow(clippy::type_complexity)]
    fn select(
        &mut self,
        model: &Model,
        round: usize,
    ) -> Result<(Vec<usize>, Vec<Option<Vec<u32>>>, Selection)> {
        let (cfg, data) = (self.cfg, self.data);
        let t0 = Instant::now();
        let mut pool: Vec<usize> = (0..data.queries.len()).collect();
        Stream::new(cfg.seed, 0x5e1e, round as u64).sample(&mut pool, cfg.queries_per_round);
        let qs: Vec<&ReasonQuery> = pool.iter().map(|&i| &data.queries[i]).collect();
        self.say(format!(
            "round {}/{}: {} queries think ({} thoughts each)",
            round + 1,
            cfg.rounds,
            qs.len(),
            cfg.thoughts
        ));
        let thoughts = self.thoughts(
            model,
            &qs,
            cfg.thoughts,
            cfg.temperature,
            0x7407 ^ round as u64,
        )?;
        let direct = self.direct(model, &qs)?;
        let k = cfg.thoughts;
        let mut thoughts = thoughts.into_iter();
        let mut per_query: Vec<Vec<Candidate>> = (0..qs.len())
            .map(|_| {
                thoughts
                    .by_ref()
                    .take(k)
                    .map(|t| Candidate {
                        tokens: t.tokens.len(),
                        text: t.text,
                        sequence: t.sequence,
                        vector: t.vector,
                        forced: t.forced,
                        teacher: false,
                    })
                    .collect()
            })
            .collect();
        if let Some(t) = self.teacher {
            for (mine, taught) in per_query
                .iter_mut()
                .zip(self.teach(t, model, &pool, round)?)
            {
                mine.extend(taught);
            }
        }
        let mut kept = Vec::with_capacity(qs.len());
        let mut sel = Selection {
            queries: qs.len(),
            ..Default::default()
        };
        let mut beating = 0usize;
        let mut samples: Vec<String> = Vec::with_capacity(qs.len());
        for (i, q) in qs.iter().enumerate() {
            let d = retrieval(&direct[i], &data.docs, &q.gold);
            let mine = &per_query[i];
            let scores: Vec<Retrieval> = mine
                .iter()
                .map(|t| retrieval(&t.vector, &data.docs, &q.gold))
                .collect();
            beating += scores
                .iter()
                .filter(|s| super::select::beats(s, &d))
                .count();
            sel.direct_ndcg += d.ndcg;
            let best_of = |teacher: bool| {
                mine.iter()
                    .zip(&scores)
                    .filter(|(c, _)| c.teacher == teacher)
                    .map(|(_, s)| s.ndcg)
                    .fold(0.0, f64::max)
            };
            sel.best_thought_ndcg += best_of(false);
            sel.best_teacher_ndcg += best_of(true);
            let pick = select_thought(&d, &scores);
            sel.kept += pick.is_some() as usize;
            sel.kept_teacher += pick.is_some_and(|j| mine[j].teacher) as usize;
            samples.push(
                json!({"query": pool[i], "direct_ndcg": d.ndcg,
                "thoughts": mine.iter().zip(&scores).map(|(t, s)| json!({
                    "text": t.text, "ndcg": s.ndcg, "best_rank": s.best_rank,
                    "gold_cos": s.gold_cos, "forced": t.forced,
                    "source": if t.teacher { "teacher" } else { "policy" }})).collect::<Vec<_>>(),
                "kept": pick})
                .to_string(),
            );
            kept.push(pick.map(|j| mine[j].sequence.clone()));
        }
        let all: Vec<&Candidate> = per_query.iter().flatten().collect();
        let (nq, nt) = (qs.len().max(1) as f64, all.len().max(1) as f64);
        sel.direct_ndcg /= nq;
        sel.best_thought_ndcg /= nq;
        sel.best_teacher_ndcg /= nq;
        sel.thoughts_beating_direct = beating as f64 / nt;
        sel.tokens = all.iter().map(|t| t.tokens as f64).sum::<f64>() / nt;
        sel.forced = all.iter().filter(|t| t.forced).count() as f64 / nt;
        // Every thought and its score, for reading what the policy writes.
        let path = self
            .opts
            .out
            .join(format!("thoughts-round{}.jsonl", round + 1));
        write_atomic(&path, (samples.join("\n") + "\n").as_bytes())
            .map_err(|e| crate::error::file_err(&path, e))?;
        let step = round * cfg.steps_per_round;
        self.log
            .line(&json!({"step": step, "selection": sel, "round": round,
            "seconds": t0.elapsed().as_secs_f64()}))?;
        self.say(format!(
            "round {}: kept {}/{} thoughts ({} the teacher's; {:.0}% of all thoughts beat direct); nDCG direct {:.4}, best thought {:.4}; {:.1} tokens/thought; {:.0}s",
            round + 1,
            sel.kept,
            sel.queries,
            sel.kept_teacher,
            100.0 * sel.thoughts_beating_direct,
            sel.direct_ndcg,
            sel.best_thought_ndcg,
            sel.tokens,
            t0.elapsed().as_secs_f64()
        ));
        Ok((pool, kept, sel))
    }

    /// One optimizer step on the round's pool.
    fn step(
        &mut self,
        model: &mut Model,
        state: &mut ReasonState,
        epochs: &mut Epochs,
    ) -> Result<()> {
        let (cfg, data) = (self.cfg, self.data);
        let t0 = Instant::now();
        let step = state.step;
        let picks: Vec<usize> = epochs
            .next_batch(
                &mut state.cursor,
                cfg.queries_per_step.min(state.pool.len()),
            )
            .to_vec();
        let mut drop = Stream::new(cfg.seed, 0xd509, step as u64);
        let mut with_thought = 0;
        let examples: Vec<SftExample> = picks
            .iter()
            .map(|&p| {
                let q = &data.queries[state.pool[p]];
                let dropped = (drop.next() as f64 / u64::MAX as f64) < cfg.thought_dropout;
                match (&state.kept[p], dropped) {
                    (Some(seq), false) => {
                        with_thought += 1;
                        SftExample {
                            query: seq.clone(),
                            assistant_start: q.prompt.len(),
                            positives: q.gold.clone(),
                            negative: None,
                        }
                    }
                    _ => SftExample {
                        query: q.direct.clone(),
                        assistant_start: q.direct_start,
                        positives: q.gold.clone(),
                        negative: None,
                    },
                }
            })
            .collect();
        let tokens: usize = examples.iter().map(|e| e.query.len()).sum();
        let batch = SftBatch {
            examples,
            docs: vec![],
            pad_id: data.pad_id,
            frozen_docs: Some(self.docs.clone()),
        };
        let loss = SftLossConfig {
            lambda_ce: cfg.lambda_ce,
            lambda_kl: 0.0,
            lambda_nce: cfg.lambda_nce,
            lambda_tri: 0.0,
            tau: cfg.tau,
            ..SftLossConfig::default()
        };
        let out = sft_gradients(model, &batch, &loss, cfg.micro_tokens)?;
        let mut grads = out.grads;
        let lr = self.schedule.lr_at(step);
        state.step += 1;
        let norm = if out.terms.is_finite() {
            match clip_grad_norm(&mut grads, &self.vars, cfg.clip_norm) {
                Ok(x) => Ok(x),
                Err(Error::NonFinite { what, value }) => {
                    Err(format!("non-finite {what} ({value})"))
                }
                Err(e) => return Err(e),
            }
        } else {
            Err(format!("non-finite loss {}", out.terms.total))
        };
        match norm {
            Ok(norm) => {
                self.opt.step(&grads, lr)?;
                self.log.line(&json!({
                    "step": state.step, "lr": lr, "round": state.round,
                    "loss": {"total": out.terms.total, "nce": out.terms.nce, "ce": out.terms.ce},
                    "with_thought": with_thought, "grad_norm": norm, "tokens": tokens,
                    "seconds": t0.elapsed().as_secs_f64(),
                }))?;
            }
            Err(why) => {
                self.say(format!("step {}: skipped ({why})", state.step));
                self.log
                    .line(&json!({"step": state.step, "lr": lr, "skipped": why}))?;
            }
        }
        self.say(format!(
            "step {}/{} loss {:.4} (nce {:.4} ce {:.4}) {} of {} with a thought, lr {lr:.1e} {}",
            state.step,
            cfg.steps(),
            out.terms.total,
            out.terms.nce.unwrap_or(f64::NAN),
            out.terms.ce.unwrap_or(f64::NAN),
            with_thought,
            picks.len(),
            self.pace.after(state.step)
        ));
        Ok(())
    }

    /// Held-out nDCG@10 in the three modes; keeps `best.safetensors` by `select_by`.
    fn evaluate(
        &mut self,
        model: &Model,
        step: usize,
        best: &mut Option<BestEval>,
    ) -> Result<ReasonEval> {
        let (cfg, data) = (self.cfg, self.data);
        let t0 = Instant::now();
        let qs: Vec<&ReasonQuery> = data.eval.iter().collect();
        let direct = self.direct(model, &qs)?;
        let greedy = self.thoughts(model, &qs, 1, 0.0, 0xe7a1)?;
        let k = cfg.thoughts;
        let sampled = self.thoughts(model, &qs, k, cfg.temperature, 0xe7a2)?;
        let index = exact_index(&data.docs)?;
        let ndcg = |v: &[f32], gold: &[usize]| ndcg_at_10(&index, v, gold);
        let mut e = ReasonEval {
            direct: 0.0,
            greedy: 0.0,
            mean: 0.0,
            greedy_tokens: 0.0,
            mean_tokens: 0.0,
        };
        for (i, q) in qs.iter().enumerate() {
            e.direct += ndcg(&direct[i], &q.gold)?;
            e.greedy += ndcg(&greedy[i].vector, &q.gold)?;
            e.greedy_tokens += greedy[i].tokens.len() as f64;
            let mine = &sampled[i * k..(i + 1) * k];
            let mut parts: Vec<&[f32]> = mine.iter().map(|t| t.vector.as_slice()).collect();
            parts.push(&direct[i]);
            let avg = mean_unit(&parts).expect("parts of one width");
            e.mean += ndcg(&avg, &q.gold)?;
            e.mean_tokens += mine.iter().map(|t| t.tokens.len() as f64).sum::<f64>();
        }
        let n = qs.len().max(1) as f64;
        for x in [
            &mut e.direct,
            &mut e.greedy,
            &mut e.mean,
            &mut e.greedy_tokens,
            &mut e.mean_tokens,
        ] {
            *x /= n;
        }
        self.log.line(
            &json!({"step": step, "eval": {"ndcg@10": e.score(&cfg.select_by),
            "direct": e.direct, "greedy": e.greedy, "mean": e.mean,
            "greedy_tokens": e.greedy_tokens, "mean_tokens": e.mean_tokens}}),
        )?;
        self.say(format!(
            "step {step}: held-out nDCG@10 direct {:.4}, greedy thought {:.4} ({:.1} tokens), mean of {k} + direct {:.4} ({:.1} tokens); {:.0}s",
            e.direct,
            e.greedy,
            e.greedy_tokens,
            e.mean,
            e.mean_tokens,
            t0.elapsed().as_secs_f64()
        ));
        if BestEval::improve(best, step, e.score(&cfg.select_by)) {
            let path = self.opts.out.join("best.safetensors");
            run::save_stacked(model, self.base, &path, &self.opts.adapter_metadata)?;
        }
        Ok(e)
    }

    fn checkpoint(&self, model: &Model, state: &mut ReasonState) -> Result<()> {
        let meta = &self.opts.adapter_metadata;
        checkpoint::swap_in(&self.opts.out, |tmp| {
            save_trainable(model, &tmp.join(ADAPTER), meta)?;
            self.opt.save(&tmp.join(OPTIMIZER))?;
            state.files = checkpoint::checksums(tmp)?;
            checkpoint::write_state(tmp, &REASON_CHECKPOINT, state)
        })
    }

    fn say(&self, line: String) {
        if self.opts.progress {
            eprintln!("{line}");
        }
    }
}

/// The run's state at its first step: restored from the checkpoint (same config, data and
/// base required; the adapter is loaded into `model`), or fresh.
fn start(
    model: &mut Model,
    data_hash: String,
    cfg: &ReasonConfig,
    base_hash: String,
    opts: &TrainOptions,
) -> Result<ReasonState> {
    let out = opts.out.as_path();
    if !opts.resume {
        checkpoint::refuse_existing(out)?;
        return Ok(ReasonState {
            format: REASON_CHECKPOINT.format.into(),
            step: 0,
            round: 0,
            cursor: Cursor::default(),
            config_hash: cfg.hash(),
            data_hash,
            base_hash,
            best: None,
            start_eval: None,
            rounds: vec![],
            pool: vec![],
            kept: vec![],
            files: BTreeMap::new(),
        });
    }
    let (s, dir) = checkpoint::read_state(out, &REASON_CHECKPOINT, |s: &ReasonState| {
        (s.format.as_str(), &s.files)
    })?;
    checkpoint::check_hashes(
        &dir.join(REASON_CHECKPOINT.state_file),
        &[
            (&s.config_hash, &cfg.hash(), "checkpoint was written with a different config (hash mismatch); resume with the same config"),
            (&s.data_hash, &data_hash, "checkpoint was written for different data, document vectors or teacher (hash mismatch)"),
            (&s.base_hash, &base_hash, "checkpoint was written on a different base model or document adapter; resume with the same --model and --adapter"),
        ],
    )?;
    load_trainable(model, &dir.join(ADAPTER))?;
    Ok(s)
}
