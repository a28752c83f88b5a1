//! The stage-1 (SFT) training loop: data order, batches, optimizer steps, logging,
//! checkpoints with exact resume, evaluation hooks and the final adapter + manifest.
//!
//! The loop works on token ids only ([`TrainData`]); turning text into prompts is the caller's
//! job (the CLI does it with the model's templates), so this crate needs no tokenizer.
//!
//! Output directory layout (`OUT`):
//!
//! * `metrics.jsonl` — one JSON object per optimizer step
//!   (`{"step", "lr", "loss": {ce, kl, nce, tri, total}, "grad_norm", "tokens", "seconds"}`),
//!   `{"step", "skipped": reason}` for a step whose gradient was not finite, and
//!   `{"step", "eval": {"ndcg@10": x}}` after each evaluation;
//! * `checkpoint/` — `adapter.safetensors`, `optimizer.safetensors`, `trainer_state.json`
//!   (step, data cursor, best eval, config and data hashes, sha256 of the two other files),
//!   replaced atomically (written to a temporary directory, then renamed);
//! * `best.safetensors` — the trainable state with the best eval nDCG@10 so far;
//! * `curves.png` — loss terms and eval nDCG, redrawn at every evaluation and at the end;
//! * at the end, `final.safetensors`, `adapter.safetensors` (the best-eval state, or the final
//!   one when no evaluation ran) and `manifest.json`.

use super::step::{sft_gradients, SftBatch, SftExample};
use crate::error::{invalid, Error, Result};
use crate::losses::{LossTerms, SftLossConfig};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule};
use crate::run::checkpoint::{self, ADAPTER, OPTIMIZER, SFT_CHECKPOINT};
use crate::run::config::{finite, positive, LoraSection, RunConfig};
use crate::run::data::{Cursor, Epochs, Stream};
use crate::run::finish::{finish, stage_fields};
use crate::run::log::{MetricsLog, Pace};
use crate::run::{self, BestEval, Stop, TrainOptions};
use candle_core::backprop::GradStore;
use candle_core::Var;
use search_r3_model::state::{load_trainable, save_trainable};
use search_r3_model::Model;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::Instant;

/// Every setting of a stage-1 run, read from TOML (unknown keys are errors). Defaults are
/// sized for SmolLM2-135M on a 2-core CPU.
///
/// An optimizer step uses `grad_accum_steps` contrastive batches of `queries_per_batch`
/// queries each; every batch contrasts its queries against the positives and hard negatives of
/// all its queries (in-batch negatives).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Optimizer steps of the run (default 200).
    pub steps: usize,
    /// Linear warmup steps (default 20).
    pub warmup_steps: usize,
    /// Peak learning rate after warmup (default 2e-4).
    pub lr: f64,
    /// Floor of the cosine decay, reached at `steps` (default 2e-5).
    pub min_lr: f64,
    /// Queries per contrastive batch, i.e. per `sft_gradients` call (default 16).
    pub queries_per_batch: usize,
    /// Contrastive batches whose gradients are averaged into one step (default 1).
    pub grad_accum_steps: usize,
    /// Hard negatives per query taken from its triple (at most what the triple holds;
    /// default 1; the first also feeds the triplet term).
    pub hard_negatives: usize,
    /// Padded tokens per differentiable micro-batch (bounds memory; default 2048).
    pub micro_tokens: usize,
    /// Global gradient-norm clip (default 1.0).
    pub clip_norm: f64,
    /// Document text truncation in tokens, applied when prompts are built (default 256).
    pub max_doc_tokens: usize,
    /// Query text truncation in tokens, applied when prompts are built (default 64).
    pub max_query_tokens: usize,
    /// Seed of the data order and negative sampling (default 0).
    pub seed: u64,
    /// Write a checkpoint every this many steps, and at the end (0 = only at the end;
    /// default 50).
    pub checkpoint_every: usize,
    /// Evaluate every this many steps, and at the end (0 = only at the end; default 50).
    pub eval_every: usize,
    /// Training queries held out for the evaluation (default 64; used by the caller that
    /// splits the data).
    pub eval_queries: usize,
    /// Documents in the evaluation corpus: the held-out queries' positives plus others up to
    /// this many (default 1000; used by the caller's eval hook).
    pub eval_docs: usize,
    /// Loss weights and constants.
    pub loss: SftLossConfig,
    /// LoRA adapters.
    pub lora: LoraSection,
    /// AdamW moments and weight decay.
    pub adamw: AdamWConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            warmup_steps: 20,
            lr: 2e-4,
            min_lr: 2e-5,
            queries_per_batch: 16,
            grad_accum_steps: 1,
            hard_negatives: 1,
            micro_tokens: 2048,
            clip_norm: 1.0,
            max_doc_tokens: 256,
            max_query_tokens: 64,
            seed: 0,
            checkpoint_every: 50,
            eval_every: 50,
            eval_queries: 64,
            eval_docs: 1000,
            loss: SftLossConfig::default(),
            lora: LoraSection::default(),
            adamw: AdamWConfig::default(),
        }
    }
}

impl RunConfig for SftConfig {
    fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        self.adamw.validate()?;
        self.schedule()?;
        positive(
            "sft",
            &[
                ("steps", self.steps),
                ("queries_per_batch", self.queries_per_batch),
                ("grad_accum_steps", self.grad_accum_steps),
                ("micro_tokens", self.micro_tokens),
                ("max_doc_tokens", self.max_doc_tokens),
                ("max_query_tokens", self.max_query_tokens),
            ],
        )?;
        self.lora.validate("sft")?;
        finite("sft", &[("clip_norm", self.clip_norm, false)])
    }
}

impl SftConfig {
    /// The learning-rate schedule of the run.
    pub fn schedule(&self) -> Result<LrSchedule> {
        LrSchedule::new(self.warmup_steps, self.steps, self.lr, self.min_lr)
    }
}

/// One training query as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainQuery {
    /// The query prompt, ending with `<|embed_token|>`.
    pub ids: Vec<u32>,
    /// Index of the first assistant-response token in `ids`.
    pub assistant_start: usize,
    /// Indices into [`TrainData::docs`] of its relevant documents (at least one).
    pub positives: Vec<usize>,
    /// Indices into [`TrainData::docs`] of its hard negatives (may be empty).
    pub negatives: Vec<usize>,
}

/// A tokenized training set: queries referring to a shared table of document prompts (a
/// document shared by several queries is stored and encoded once per batch).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainData {
    /// The queries, in a fixed order (the run shuffles them per epoch from its seed).
    pub queries: Vec<TrainQuery>,
    /// Document prompts, each ending with `<|embed_token|>`.
    pub docs: Vec<Vec<u32>>,
    /// Padding id.
    pub pad_id: u32,
}

impl TrainData {
    /// Checks indices and non-emptiness (prompt endings are checked by `sft_gradients`).
    pub fn validate(&self) -> Result<()> {
        if self.queries.is_empty() {
            invalid!("training data: no queries");
        }
        let n = self.docs.len();
        for (i, q) in self.queries.iter().enumerate() {
            if q.positives.is_empty() {
                invalid!("training data: query {i} has no positive document");
            }
            if let Some(&j) = q.positives.iter().chain(&q.negatives).find(|&&j| j >= n) {
                invalid!("training data: query {i} refers to document {j}, there are {n}");
            }
            if q.assistant_start == 0 || q.assistant_start >= q.ids.len() {
                invalid!(
                    "training data: query {i}: assistant_start {} outside 1..{}",
                    q.assistant_start,
                    q.ids.len()
                );
            }
        }
        Ok(())
    }

    /// sha256 (hex) of the tokenized data (every id, index and length, in order).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        let mut put = |x: u64| h.update(x.to_le_bytes());
        put(self.pad_id as u64);
        put(self.docs.len() as u64);
        for d in &self.docs {
            put(d.len() as u64);
            d.iter().for_each(|&t| put(t as u64));
        }
        put(self.queries.len() as u64);
        for q in &self.queries {
            put(q.ids.len() as u64);
            q.ids.iter().for_each(|&t| put(t as u64));
            put(q.assistant_start as u64);
            put(q.positives.len() as u64);
            q.positives.iter().for_each(|&t| put(t as u64));
            put(q.negatives.len() as u64);
            q.negatives.iter().for_each(|&t| put(t as u64));
        }
        hex::encode(h.finalize())
    }
}

/// A periodic evaluation of the model being trained, e.g. nDCG@10 on held-out queries.
/// Higher is better; the best-scoring trainable state is kept as `best.safetensors`.
pub trait EvalHook {
    /// Scores the current model after optimizer step `step` (adapters enabled).
    fn evaluate(&mut self, model: &Model, step: usize) -> Result<f64>;
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps completed (including resumed ones).
    pub step: usize,
    /// Whether the run stopped before `steps` ([`TrainOptions::stop_after`] or an interrupt),
    /// leaving a checkpoint to resume from.
    pub stopped_early: bool,
    /// Whether that stop was an interrupt.
    pub interrupted: bool,
    /// Steps skipped because the gradient was not finite (this invocation only).
    pub skipped_steps: usize,
    /// Loss terms of the last completed step.
    pub last_terms: Option<LossTerms>,
    /// Best eval score and its step.
    pub best: Option<BestEval>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainerState {
    format: String,
    step: usize,
    cursor: Cursor,
    config_hash: String,
    data_hash: String,
    best: Option<BestEval>,
    last_terms: Option<LossTerms>,
    /// sha256 of each other checkpoint file, by file name.
    files: BTreeMap<String, String>,
}

/// Builds one contrastive batch from the queries `idx` (ids into `data.queries`); `salt`
/// keys the positive / negative sampling. Returns the batch and its token count.
fn build_batch(
    data: &TrainData,
    idx: &[usize],
    hard_negatives: usize,
    seed: u64,
    salt: u64,
) -> (SftBatch, usize) {
    let mut doc_slot: HashMap<usize, usize> = HashMap::new();
    let mut docs: Vec<Vec<u32>> = Vec::new();
    let mut slot = |j: usize, docs: &mut Vec<Vec<u32>>| -> usize {
        *doc_slot.entry(j).or_insert_with(|| {
            docs.push(data.docs[j].clone());
            docs.len() - 1
        })
    };
    let mut picks = Vec::with_capacity(idx.len());
    for (s, &qi) in idx.iter().enumerate() {
        let q = &data.queries[qi];
        let mut rng = Stream::new(seed, salt, s as u64);
        let pos = q.positives[rng.below(q.positives.len())];
        let mut negs: Vec<usize> = q
            .negatives
            .iter()
            .copied()
            .filter(|j| !q.positives.contains(j))
            .collect();
        negs.dedup();
        rng.sample(&mut negs, hard_negatives);
        let p = slot(pos, &mut docs);
        let n: Vec<usize> = negs.iter().map(|&j| slot(j, &mut docs)).collect();
        picks.push((qi, p, n));
    }
    let examples = picks
        .into_iter()
        .map(|(qi, p, n)| {
            let q = &data.queries[qi];
            let mut positives = vec![p];
            for j in &q.positives {
                if let Some(&s) = doc_slot.get(j) {
                    if !positives.contains(&s) {
                        positives.push(s);
                    }
                }
            }
            SftExample {
                query: q.ids.clone(),
                assistant_start: q.assistant_start,
                positives,
                negative: n.first().copied(),
            }
        })
        .collect::<Vec<_>>();
    let tokens = examples.iter().map(|e| e.query.len()).sum::<usize>()
        + docs.iter().map(Vec::len).sum::<usize>();
    (
        SftBatch {
            examples,
            docs,
            pad_id: data.pad_id,
            frozen_docs: None,
        },
        tokens,
    )
}

fn mean_terms(terms: &[LossTerms]) -> LossTerms {
    let n = terms.len() as f64;
    let avg = |f: fn(&LossTerms) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = terms.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    LossTerms {
        ce: avg(|t| t.ce),
        kl: avg(|t| t.kl),
        nce: avg(|t| t.nce),
        tri: avg(|t| t.tri),
        total: terms.iter().map(|t| t.total).sum::<f64>() / n,
    }
}

fn terms_json(t: &LossTerms) -> serde_json::Value {
    serde_json::json!({"ce": t.ce, "kl": t.kl, "nce": t.nce, "tri": t.tri, "total": t.total})
}

/// Runs (or resumes) stage-1 training of `model` on `data`.
///
/// Fresh LoRA adapters are attached from `cfg.lora` (on resume they and the embed-token rows
/// are then overwritten from the checkpoint; the checkpoint must belong to the same base model,
/// config hash and data hash). Each step draws `grad_accum_steps` batches of
/// `queries_per_batch` queries from the current epoch's seeded order (a batch never spans two
/// epochs; the tail of an epoch that cannot fill a batch is skipped), computes
/// [`sft_gradients`], averages, clips to `clip_norm` and applies AdamW at the schedule's rate.
/// A step whose loss or gradient norm is not finite is skipped (logged, no update; the step
/// counter and data cursor still advance, so the run stays reproducible).
///
/// `eval` runs every `eval_every` steps and after the last step; its score is logged and the
/// best trainable state kept. See the module docs for the files written.
pub fn train_sft(
    model: &mut Model,
    data: &TrainData,
    cfg: &SftConfig,
    opts: &TrainOptions,
    mut eval: Option<&mut dyn EvalHook>,
) -> Result<TrainSummary> {
    // Setup, or resume from the checkpoint.
    cfg.validate()?;
    data.validate()?;
    let b = cfg.queries_per_batch;
    let n = data.queries.len();
    if n < b {
        invalid!("training data has {n} queries, fewer than queries_per_batch = {b}");
    }
    let out = opts.out.as_path();
    run::attach_adapters(model, &cfg.lora, opts)?;
    let mut state = start(model, data, cfg, opts)?;
    let (mut opt, vars) = run::optimizer(model, cfg.adamw, opts)?;
    let mut run = Run {
        data,
        cfg,
        log: MetricsLog::open(out, opts.resume.then_some(state.step))?,
        bar: progress_bar(opts.progress, cfg.steps, state.step),
        // indicatif draws nothing when stderr is a file; logs then get a plain line per step.
        plain: opts.progress && !std::io::stderr().is_terminal(),
        pace: Pace::new(state.step, cfg.steps),
        epochs: Epochs::new(n, cfg.seed, state.cursor),
        acc: GradAccumulator::new(&vars),
        vars,
        schedule: cfg.schedule()?,
        skipped: 0,
    };

    let mut stop = Stop::default();
    while state.step < cfg.steps {
        // One step: batches, gradient, update.
        run.step(model, &mut opt, &mut state)?;

        // Evaluate, checkpoint, stop.
        let last = state.step == cfg.steps;
        let step = state.step;
        let due = |every: usize| last || (every > 0 && step % every == 0);
        if let Some(hook) = eval.as_deref_mut() {
            if due(cfg.eval_every) {
                let score = hook.evaluate(model, step)?;
                run.log
                    .line(&json!({"step": step, "eval": {"ndcg@10": score}}))?;
                run.say(format!("step {step}: eval nDCG@10 {score:.4}"));
                if BestEval::improve(&mut state.best, step, score) {
                    save_trainable(model, &out.join("best.safetensors"), &opts.adapter_metadata)?;
                }
            }
        }
        let interrupted = opts.interrupted(last);
        if due(cfg.checkpoint_every) || interrupted {
            checkpoint::swap_in(out, |tmp| {
                save_trainable(model, &tmp.join(ADAPTER), &opts.adapter_metadata)?;
                opt.save(&tmp.join(OPTIMIZER))?;
                state.files = checkpoint::checksums(tmp)?;
                checkpoint::write_state(tmp, &SFT_CHECKPOINT, &state)
            })?;
        }
        if due(cfg.eval_every) || interrupted {
            run.log.plot();
        }
        if let Some(s) = opts.stop(step, last, interrupted) {
            if s.interrupted {
                run.bar.println(format!(
                    "interrupted: checkpoint written at step {step}; continue with --resume"
                ));
            }
            stop = s;
            break;
        }
    }
    run.bar.finish_and_clear();
    let summary = TrainSummary {
        step: state.step,
        stopped_early: stop.early,
        interrupted: stop.interrupted,
        skipped_steps: run.skipped,
        last_terms: state.last_terms,
        best: state.best,
    };
    if stop.early {
        return Ok(summary);
    }

    // Finish: final state, best adapter, manifest.
    let mut fields = stage_fields(
        "search-r3-sft-adapter",
        cfg,
        &state.config_hash,
        &state.data_hash,
        json!({"queries": n, "docs": data.docs.len()}),
    );
    fields.insert(
        "final".into(),
        json!({"step": state.step, "loss": state.last_terms.as_ref().map(terms_json)}),
    );
    let save = |path: &std::path::Path, meta: &HashMap<String, String>| {
        save_trainable(model, path, meta).map_err(Error::from)
    };
    finish(opts, &save, state.step, state.best, fields, &run.log)?;
    Ok(summary)
}

/// A running stage-1 loop: its inputs, data order, accumulator, schedule and log.
struct Run<'a> {
    data: &'a TrainData,
    cfg: &'a SftConfig,
    log: MetricsLog,
    bar: indicatif::ProgressBar,
    /// Plain progress lines instead of the bar (stderr is not a terminal).
    plain: bool,
    pace: Pace,
    epochs: Epochs,
    acc: GradAccumulator,
    vars: Vec<Var>,
    schedule: LrSchedule,
    /// Steps skipped (non-finite loss or gradient) in this invocation.
    skipped: usize,
}

impl Run<'_> {
    fn say(&self, line: String) {
        if self.plain {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// One optimizer step: the averaged, clipped gradient of `grad_accum_steps` batches and
    /// AdamW at the schedule's rate, logged; a step whose loss or gradient is not finite is
    /// logged and skipped (the step counter and data cursor still advance).
    fn step(&mut self, model: &mut Model, opt: &mut AdamW, state: &mut TrainerState) -> Result<()> {
        let t0 = Instant::now();
        let step = state.step;
        let lr = self.schedule.lr_at(step);
        let outcome = self.gradient(model, &mut state.cursor, step)?;
        state.step += 1;
        match outcome {
            Ok((grads, terms, norm, tokens)) => {
                opt.step(&grads, lr)?;
                state.last_terms = Some(terms);
                self.log.line(&json!({
                    "step": state.step, "lr": lr, "loss": terms_json(&terms),
                    "grad_norm": norm, "tokens": tokens,
                    "seconds": t0.elapsed().as_secs_f64(),
                }))?;
                self.bar.set_message(format!(
                    "loss {:.3} ce {} kl {} nce {} tri {} lr {lr:.1e}",
                    terms.total,
                    fmt_opt(terms.ce),
                    fmt_opt(terms.kl),
                    fmt_opt(terms.nce),
                    fmt_opt(terms.tri),
                ));
            }
            Err(why) => {
                self.skipped += 1;
                self.bar
                    .println(format!("step {}: skipped ({why})", state.step));
                self.log
                    .line(&json!({"step": state.step, "lr": lr, "skipped": why}))?;
            }
        }
        self.bar.set_position(state.step as u64);
        if self.plain {
            let loss = state
                .last_terms
                .as_ref()
                .map_or("-".into(), |t| format!("{:.3}", t.total));
            eprintln!(
                "step {}/{} loss {loss} lr {lr:.1e} {}",
                state.step,
                self.cfg.steps,
                self.pace.after(state.step)
            );
        }
        Ok(())
    }

    /// One step's averaged, clipped gradient over `grad_accum_steps` batches, with the mean
    /// loss terms, the norm before clipping and the tokens seen; `Err(reason)` when the loss
    /// or the gradient is not finite.
    fn gradient(
        &mut self,
        model: &mut Model,
        cursor: &mut Cursor,
        step: usize,
    ) -> Result<StepGradient> {
        let cfg = self.cfg;
        self.acc.reset();
        let mut terms = Vec::with_capacity(cfg.grad_accum_steps);
        let mut tokens = 0;
        let mut bad: Option<String> = None;
        for a in 0..cfg.grad_accum_steps {
            let idx = self
                .epochs
                .next_batch(cursor, cfg.queries_per_batch)
                .to_vec();
            let salt = (step * cfg.grad_accum_steps + a) as u64;
            let (batch, t) = build_batch(self.data, &idx, cfg.hard_negatives, cfg.seed, salt);
            tokens += t;
            let out = sft_gradients(model, &batch, &cfg.loss, cfg.micro_tokens)?;
            if !out.terms.is_finite() {
                bad.get_or_insert_with(|| format!("non-finite loss {:?}", out.terms));
            }
            terms.push(out.terms);
            self.acc.add(&out.grads)?;
        }
        let terms = mean_terms(&terms);
        let mut grads = self.acc.mean()?;
        if let Some(why) = bad {
            return Ok(Err(why));
        }
        match clip_grad_norm(&mut grads, &self.vars, cfg.clip_norm) {
            Ok(norm) => Ok(Ok((grads, terms, norm, tokens))),
            Err(Error::NonFinite { what, value }) => {
                Ok(Err(format!("non-finite {what} ({value})")))
            }
            Err(e) => Err(e),
        }
    }
}

/// A step's gradient, loss terms, norm before clipping and tokens, or why it is skipped.
type StepGradient = std::result::Result<(GradStore, LossTerms, f64, usize), String>;

/// The run's state at its first step: read from the checkpoint (which must match the config
/// and data; the adapter is loaded into `model`), or fresh.
fn start(
    model: &mut Model,
    data: &TrainData,
    cfg: &SftConfig,
    opts: &TrainOptions,
) -> Result<TrainerState> {
    let out = opts.out.as_path();
    let (config_hash, data_hash) = (cfg.hash(), data.hash());
    if !opts.resume {
        checkpoint::refuse_existing(out)?;
        return Ok(TrainerState {
            format: SFT_CHECKPOINT.format.into(),
            step: 0,
            cursor: Cursor::default(),
            config_hash,
            data_hash,
            best: None,
            last_terms: None,
            files: BTreeMap::new(),
        });
    }
    let (s, dir) = checkpoint::read_state(out, &SFT_CHECKPOINT, |s: &TrainerState| {
        (s.format.as_str(), &s.files)
    })?;
    checkpoint::check_hashes(
        &dir.join(SFT_CHECKPOINT.state_file),
        &[
            (&s.config_hash, &config_hash, "checkpoint was written with a different config (hash mismatch); resume with the same config"),
            (&s.data_hash, &data_hash, "checkpoint was written for different training data (hash mismatch)"),
        ],
    )?;
    load_trainable(model, &dir.join(ADAPTER))?;
    Ok(s)
}

fn progress_bar(show: bool, steps: usize, at: usize) -> indicatif::ProgressBar {
    let bar = if show {
        let pb = indicatif::ProgressBar::new(steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(at as u64);
    bar.reset_eta();
    bar
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}
