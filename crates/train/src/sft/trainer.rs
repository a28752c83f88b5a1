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

use crate::error::{file_err, invalid, write_atomic, Error, Result};
use crate::losses::{LossTerms, SftLossConfig};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule};
use crate::sft::{sft_gradients, SftBatch, SftExample};
use search_r3_model::state::{load_trainable, save_trainable};
use search_r3_model::{Batch, LoraConfig, LoraTarget, Model, Path as FwdPath};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// LoRA settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// Rank `r` (default 16).
    pub rank: usize,
    /// Scale numerator `α`; the update is scaled by `α/r` (default 32).
    pub alpha: f64,
    /// Adapted projections (default all seven: q, k, v, o, gate, up, down).
    pub targets: Vec<LoraTarget>,
    /// Seed of the adapters' `A` initialisation (default 0; `B` starts at zero).
    pub seed: u64,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: LoraTarget::ALL.to_vec(),
            seed: 0,
        }
    }
}

impl LoraSection {
    /// The model-side adapter configuration.
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
        }
    }
}

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

impl SftConfig {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        config_from_toml(text, origin, Self::validate)
    }

    /// Reads a TOML file (see [`SftConfig::from_toml`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        self.adamw.validate()?;
        self.schedule()?;
        for (name, v) in [
            ("steps", self.steps),
            ("queries_per_batch", self.queries_per_batch),
            ("grad_accum_steps", self.grad_accum_steps),
            ("micro_tokens", self.micro_tokens),
            ("max_doc_tokens", self.max_doc_tokens),
            ("max_query_tokens", self.max_query_tokens),
            ("lora.rank", self.lora.rank),
        ] {
            if v == 0 {
                invalid!("sft config: `{name}` must be > 0");
            }
        }
        if self.lora.targets.is_empty() {
            invalid!("sft config: `lora.targets` is empty");
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            invalid!("sft config: `lora.alpha` must be finite and > 0");
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            invalid!("sft config: `clip_norm` must be finite and > 0");
        }
        Ok(())
    }

    /// The learning-rate schedule of the run.
    pub fn schedule(&self) -> Result<LrSchedule> {
        LrSchedule::new(self.warmup_steps, self.steps, self.lr, self.min_lr)
    }

    /// sha256 (hex) of the canonical JSON of the config; a checkpoint only resumes under the
    /// same hash.
    pub fn hash(&self) -> String {
        config_hash(self)
    }
}

/// A run config from TOML text: unknown keys and out-of-range values are errors that name
/// `origin`.
pub(crate) fn config_from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
    validate: impl Fn(&T) -> Result<()>,
) -> Result<T> {
    let at = |msg: String| Error::File {
        path: PathBuf::from(origin),
        msg,
    };
    let c: T = toml::from_str(text).map_err(|e| at(e.to_string()))?;
    validate(&c).map_err(|e| at(e.to_string()))?;
    Ok(c)
}

/// sha256 (hex) of a config's canonical JSON.
pub(crate) fn config_hash<T: Serialize>(c: &T) -> String {
    sha256_hex(&serde_json::to_vec(c).expect("config serialises"))
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

/// Run-level options that are not hyper-parameters (they do not enter the config hash).
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Output directory.
    pub out: PathBuf,
    /// Continue from `out/checkpoint` instead of starting afresh.
    pub resume: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Stop (as if interrupted) after this optimizer step, once its checkpoint (if due) is
    /// written; no final adapter or manifest is written. For tests and time-boxed sessions.
    pub stop_after: Option<usize>,
    /// Extra safetensors metadata for every saved adapter (base model id, sha256, ...).
    pub adapter_metadata: HashMap<String, String>,
    /// Extra top-level fields of `manifest.json` (base model, templates hash, command line, ...).
    pub manifest: serde_json::Map<String, serde_json::Value>,
    /// Set (by a Ctrl-C handler) to stop after the current step: its checkpoint is written,
    /// so `--resume` continues exactly where the run stopped.
    pub interrupt: Option<Arc<AtomicBool>>,
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

/// The best evaluation so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestEval {
    /// Step it was measured after.
    pub step: usize,
    /// The score (nDCG@10 for the CLI's hook).
    pub score: f64,
}

/// Position in the data stream: the next batch starts at `pos` of epoch `epoch`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cursor {
    pub(crate) epoch: u64,
    pub(crate) pos: usize,
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

const STATE_FORMAT: &str = "search-r3-sft-checkpoint-1";
pub(crate) const CKPT: &str = "checkpoint";
const CKPT_OLD: &str = ".checkpoint.old";
pub(crate) const ADAPTER: &str = "adapter.safetensors";
pub(crate) const OPTIMIZER: &str = "optimizer.safetensors";
pub(crate) const STATE: &str = "trainer_state.json";
pub(crate) const METRICS: &str = "metrics.jsonl";
/// Loss and eval curves, redrawn at every eval and at the end.
pub const CURVES: &str = "curves.png";

/// SplitMix64 finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stateless random stream keyed by `(seed, a, b)`: the data order and sampling depend only
/// on the seed and the position, so a resumed run draws exactly what the straight run drew.
pub(crate) struct Stream(u64);

impl Stream {
    pub(crate) fn new(seed: u64, a: u64, b: u64) -> Self {
        Stream(mix(
            mix(mix(seed) ^ a) ^ b.wrapping_mul(0xA24B_AED4_963E_E407)
        ))
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Query order of `epoch` (Fisher–Yates from the seed).
pub(crate) fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Stream::new(seed, 0x0e0c, epoch);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
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
        // Partial Fisher–Yates: a uniform sample of `hard_negatives`, in sampled order.
        let k = hard_negatives.min(negs.len());
        for i in 0..k {
            let j = i + rng.below(negs.len() - i);
            negs.swap(i, j);
        }
        negs.truncate(k);
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
        },
        tokens,
    )
}

/// Unit-norm embeddings of prompts (each ending with `<|embed_token|>`): the final-norm
/// hidden state at the last token, on the fast (no-graph) path, in length-sorted batches of at
/// most `budget` padded tokens. Row `i` is `seqs[i]`.
pub fn embed_sequences(
    model: &Model,
    seqs: &[Vec<u32>],
    pad_id: u32,
    budget: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].len());
    let mut out = vec![Vec::new(); seqs.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && (end + 1 - start) * seqs[order[end]].len() <= budget.max(1) {
            end += 1;
        }
        let part: Vec<Vec<u32>> = order[start..end].iter().map(|&i| seqs[i].clone()).collect();
        if part.iter().any(Vec::is_empty) {
            invalid!("embed_sequences: empty prompt");
        }
        let batch = Batch::right_padded(&part, pad_id)?;
        let hidden = model.forward(&batch, FwdPath::Fast, None)?;
        let (b, t, d) = hidden.dims3()?;
        let flat = hidden
            .reshape((b * t, d))?
            .to_dtype(candle_core::DType::F32)?;
        let last: Vec<u32> = part
            .iter()
            .enumerate()
            .map(|(k, s)| (k * t + s.len() - 1) as u32)
            .collect();
        let idx = candle_core::Tensor::from_slice(&last, last.len(), flat.device())?;
        let rows: Vec<Vec<f32>> = flat.index_select(&idx, 0)?.to_vec2()?;
        for (k, v) in rows.into_iter().enumerate() {
            out[order[start + k]] = unit(v);
        }
        start = end;
    }
    Ok(out)
}

/// `v / ‖v‖` (norm accumulated in f64); a zero vector stays zero.
pub(crate) fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / n) as f32);
    }
    v
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256 (hex) of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    Ok(sha256_hex(&bytes))
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

/// Appends one JSON line to the metrics log.
pub(crate) fn log_line(file: &mut std::fs::File, path: &Path, v: &serde_json::Value) -> Result<()> {
    writeln!(file, "{v}")
        .and_then(|_| file.flush())
        .map_err(|e| file_err(path, e))
}

fn write_checkpoint(
    out: &Path,
    model: &Model,
    opt: &AdamW,
    state: &mut TrainerState,
    meta: &HashMap<String, String>,
) -> Result<()> {
    swap_in_checkpoint(out, |tmp| {
        save_trainable(model, &tmp.join(ADAPTER), meta)?;
        opt.save(&tmp.join(OPTIMIZER))?;
        state.files = checksums(tmp, &[ADAPTER, OPTIMIZER])?;
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        std::fs::write(tmp.join(STATE), json).map_err(|e| file_err(&tmp.join(STATE), e))
    })
}

/// sha256 of each named file of `dir`, by name.
pub(crate) fn checksums(dir: &Path, names: &[&str]) -> Result<BTreeMap<String, String>> {
    names
        .iter()
        .map(|f| Ok((f.to_string(), sha256_file(&dir.join(f))?)))
        .collect()
}

/// Fills a fresh temporary directory with `fill` and swaps it in as `out/checkpoint`: the old
/// checkpoint is renamed aside, the new one renamed in, the old one removed, so a crash at any
/// point leaves one complete checkpoint ([`checkpoint_dir`] recovers the aside one).
pub(crate) fn swap_in_checkpoint(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = out.join(format!(".checkpoint.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    fill(&tmp)?;
    let dst = out.join(CKPT);
    let old = out.join(CKPT_OLD);
    if dst.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| file_err(&old, e))?;
        }
        std::fs::rename(&dst, &old).map_err(|e| file_err(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| file_err(&dst, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| file_err(&old, e))?;
    }
    Ok(())
}

/// `out/checkpoint`, after moving back the previous checkpoint when a crash between the two
/// renames of a swap left only that one.
pub(crate) fn checkpoint_dir(out: &Path) -> Result<PathBuf> {
    let dir = out.join(CKPT);
    let old = out.join(CKPT_OLD);
    if !dir.exists() && old.exists() {
        std::fs::rename(&old, &dir).map_err(|e| file_err(&dir, e))?;
    }
    Ok(dir)
}

/// Checks that every file a checkpoint state lists has the recorded sha256.
pub(crate) fn verify_checksums(
    dir: &Path,
    state_path: &Path,
    names: &[&str],
    recorded: &BTreeMap<String, String>,
) -> Result<()> {
    for f in names {
        let path = dir.join(f);
        let Some(want) = recorded.get(*f) else {
            return Err(file_err(
                state_path,
                format!("no checksum recorded for {f}"),
            ));
        };
        let got = sha256_file(&path)?;
        if &got != want {
            return Err(file_err(
                &path,
                format!(
                    "corrupted checkpoint file: sha256 {got} does not match the recorded {want}"
                ),
            ));
        }
    }
    Ok(())
}

/// How a training stage's checkpoint is recognised.
pub(crate) struct CheckpointKind {
    /// Its state file in `checkpoint/`.
    pub(crate) state_file: &'static str,
    /// The `format` its state must carry.
    pub(crate) format: &'static str,
    /// The error when there is no such state to resume from.
    pub(crate) missing: &'static str,
    /// The other stage's state file, and the error naming it (a run directory of the other
    /// stage is not "no checkpoint").
    pub(crate) foreign: (&'static str, &'static str),
}

/// Reads and verifies `out/checkpoint/<state file>`: its format, and the checksums of the
/// adapter and optimizer files it lists (`header` gives a state's format and checksums).
/// Returns the state and the checkpoint directory.
pub(crate) fn read_checkpoint_state<T: serde::de::DeserializeOwned>(
    out: &Path,
    kind: &CheckpointKind,
    header: impl Fn(&T) -> (&str, &BTreeMap<String, String>),
) -> Result<(T, PathBuf)> {
    let dir = checkpoint_dir(out)?;
    let state_path = dir.join(kind.state_file);
    if dir.join(kind.foreign.0).exists() {
        return Err(file_err(&dir, kind.foreign.1));
    }
    if !state_path.exists() {
        return Err(file_err(&state_path, kind.missing));
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| file_err(&state_path, e))?;
    let state: T = serde_json::from_str(&text)
        .map_err(|e| file_err(&state_path, format!("corrupted checkpoint state: {e}")))?;
    let (format, files) = header(&state);
    if format != kind.format {
        return Err(file_err(
            &state_path,
            format!("unknown checkpoint format `{format}`"),
        ));
    }
    verify_checksums(&dir, &state_path, &[ADAPTER, OPTIMIZER], files)?;
    Ok((state, dir))
}

/// Reads and verifies the stage-1 checkpoint state.
fn read_checkpoint(out: &Path) -> Result<TrainerState> {
    let kind = CheckpointKind {
        state_file: STATE,
        format: STATE_FORMAT,
        missing: "no checkpoint to resume from (run without --resume to start afresh)",
        foreign: (
            crate::rl_trainer::RL_STATE,
            "this is a stage-2 (train rl) checkpoint; give train sft another output directory",
        ),
    };
    let (state, _) =
        read_checkpoint_state(out, &kind, |s: &TrainerState| (s.format.as_str(), &s.files))?;
    Ok(state)
}

/// Keeps the lines of `metrics.jsonl` whose `step` is at most `step` (a resumed run rewrites
/// what came after its checkpoint); unparsable lines (a write cut by a crash) are dropped.
pub(crate) fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(file_err(path, e)),
    };
    let mut kept = String::new();
    for line in text.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            .is_some_and(|s| s as usize <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes())
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
    cfg.validate()?;
    data.validate()?;
    let b = cfg.queries_per_batch;
    let n = data.queries.len();
    if n < b {
        invalid!("training data has {n} queries, fewer than queries_per_batch = {b}");
    }
    let schedule = cfg.schedule()?;
    let config_hash = cfg.hash();
    let data_hash = data.hash();
    let out = opts.out.as_path();
    std::fs::create_dir_all(out).map_err(|e| file_err(out, e))?;
    let metrics_path = out.join(METRICS);

    model.add_lora(cfg.lora.config(), cfg.lora.seed)?;
    model.lora_enabled = true;
    let mut state = if opts.resume {
        let s = read_checkpoint(out)?;
        let dir = out.join(CKPT);
        if s.config_hash != config_hash {
            return Err(file_err(
                &dir.join(STATE),
                "checkpoint was written with a different config (hash mismatch); resume with the same config",
            ));
        }
        if s.data_hash != data_hash {
            return Err(file_err(
                &dir.join(STATE),
                "checkpoint was written for different training data (hash mismatch)",
            ));
        }
        load_trainable(model, &dir.join(ADAPTER))?;
        truncate_metrics(&metrics_path, s.step)?;
        s
    } else {
        if out.join(CKPT).exists() {
            return Err(file_err(
                &out.join(CKPT),
                "a checkpoint already exists here: pass --resume to continue, or choose another output directory",
            ));
        }
        std::fs::write(&metrics_path, b"").map_err(|e| file_err(&metrics_path, e))?;
        TrainerState {
            format: STATE_FORMAT.into(),
            step: 0,
            cursor: Cursor { epoch: 0, pos: 0 },
            config_hash,
            data_hash: data_hash.clone(),
            best: None,
            last_terms: None,
            files: BTreeMap::new(),
        }
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

    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(cfg.steps as u64);
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
    bar.set_position(state.step as u64);
    bar.reset_eta();

    let mut order = epoch_order(n, cfg.seed, state.cursor.epoch);
    let mut acc = GradAccumulator::new(&vars);
    let mut skipped = 0;
    let mut stopped_early = false;
    let mut interrupted = false;
    // indicatif draws nothing when stderr is a file; logs then get a plain line per step.
    let plain = opts.progress && !std::io::stderr().is_terminal();
    let started = Instant::now();
    let first_step = state.step;
    while state.step < cfg.steps {
        let t0 = Instant::now();
        let step = state.step;
        acc.reset();
        let mut terms = Vec::with_capacity(cfg.grad_accum_steps);
        let mut tokens = 0;
        let mut bad: Option<String> = None;
        for a in 0..cfg.grad_accum_steps {
            if state.cursor.pos + b > n {
                state.cursor = Cursor {
                    epoch: state.cursor.epoch + 1,
                    pos: 0,
                };
                order = epoch_order(n, cfg.seed, state.cursor.epoch);
            }
            let idx = &order[state.cursor.pos..state.cursor.pos + b];
            state.cursor.pos += b;
            let salt = (step * cfg.grad_accum_steps + a) as u64;
            let (batch, t) = build_batch(data, idx, cfg.hard_negatives, cfg.seed, salt);
            tokens += t;
            let out = sft_gradients(model, &batch, &cfg.loss, cfg.micro_tokens)?;
            if !out.terms.is_finite() {
                bad.get_or_insert_with(|| format!("non-finite loss {:?}", out.terms));
            }
            terms.push(out.terms);
            acc.add(&out.grads)?;
        }
        let terms = mean_terms(&terms);
        let lr = schedule.lr_at(step);
        let mut grads = acc.mean()?;
        let norm = if bad.is_none() {
            match clip_grad_norm(&mut grads, &vars, cfg.clip_norm) {
                Ok(x) => Some(x),
                Err(Error::NonFinite { what, value }) => {
                    bad = Some(format!("non-finite {what} ({value})"));
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        state.step += 1;
        match (&bad, norm) {
            (None, Some(norm)) => {
                opt.step(&grads, lr)?;
                state.last_terms = Some(terms);
                log_line(
                    &mut metrics,
                    &metrics_path,
                    &serde_json::json!({
                        "step": state.step, "lr": lr, "loss": terms_json(&terms),
                        "grad_norm": norm, "tokens": tokens,
                        "seconds": t0.elapsed().as_secs_f64(),
                    }),
                )?;
                bar.set_message(format!(
                    "loss {:.3} ce {} kl {} nce {} tri {} lr {lr:.1e}",
                    terms.total,
                    fmt_opt(terms.ce),
                    fmt_opt(terms.kl),
                    fmt_opt(terms.nce),
                    fmt_opt(terms.tri),
                ));
            }
            _ => {
                skipped += 1;
                let why = bad.unwrap_or_else(|| "no gradient".into());
                bar.println(format!("step {}: skipped ({why})", state.step));
                log_line(
                    &mut metrics,
                    &metrics_path,
                    &serde_json::json!({"step": state.step, "lr": lr, "skipped": why}),
                )?;
            }
        }
        bar.set_position(state.step as u64);
        if plain {
            let done = state.step - first_step;
            let per = started.elapsed().as_secs_f64() / done as f64;
            let eta = per * (cfg.steps - state.step) as f64;
            let loss = state
                .last_terms
                .as_ref()
                .map_or("-".into(), |t| format!("{:.3}", t.total));
            eprintln!(
                "step {}/{} loss {loss} lr {lr:.1e} {per:.1}s/step eta {}",
                state.step,
                cfg.steps,
                fmt_duration(eta)
            );
        }
        let last = state.step == cfg.steps;
        let step_now = state.step;
        let due = |every: usize| last || (every > 0 && step_now % every == 0);
        if let Some(hook) = eval.as_deref_mut() {
            if due(cfg.eval_every) {
                let score = hook.evaluate(model, state.step)?;
                log_line(
                    &mut metrics,
                    &metrics_path,
                    &serde_json::json!({"step": state.step, "eval": {"ndcg@10": score}}),
                )?;
                let line = format!("step {}: eval nDCG@10 {score:.4}", state.step);
                if plain {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
                if state.best.is_none_or(|b| score > b.score) {
                    state.best = Some(BestEval {
                        step: state.step,
                        score,
                    });
                    save_trainable(model, &out.join("best.safetensors"), &opts.adapter_metadata)?;
                }
            }
        }
        let stop = opts
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
            && !last;
        if due(cfg.checkpoint_every) || stop {
            write_checkpoint(out, model, &opt, &mut state, &opts.adapter_metadata)?;
        }
        if due(cfg.eval_every) || stop {
            plot_curves(&metrics_path, out);
        }
        if stop {
            bar.println(format!(
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
    bar.finish_and_clear();
    let summary = TrainSummary {
        step: state.step,
        stopped_early,
        interrupted,
        skipped_steps: skipped,
        last_terms: state.last_terms,
        best: state.best,
    };
    if stopped_early {
        return Ok(summary);
    }

    // Final outputs.
    let mut meta = opts.adapter_metadata.clone();
    meta.insert("step".into(), state.step.to_string());
    let final_path = out.join("final.safetensors");
    save_trainable(model, &final_path, &meta)?;
    let best_path = out.join("best.safetensors");
    let (src, adapter_step) = match state.best {
        Some(b) if best_path.exists() => (best_path, b.step),
        _ => (final_path, state.step),
    };
    let adapter = out.join(ADAPTER);
    std::fs::copy(&src, &adapter).map_err(|e| file_err(&adapter, e))?;
    let mut manifest = serde_json::Map::new();
    manifest.insert("format".into(), "search-r3-sft-adapter".into());
    manifest.insert("version".into(), 1.into());
    manifest.insert("adapter".into(), ADAPTER.into());
    manifest.insert("adapter_sha256".into(), sha256_file(&adapter)?.into());
    manifest.insert("adapter_step".into(), adapter_step.into());
    manifest.insert("steps".into(), state.step.into());
    manifest.insert(
        "config".into(),
        serde_json::to_value(cfg).expect("config serialises"),
    );
    manifest.insert("config_hash".into(), state.config_hash.clone().into());
    manifest.insert("data_hash".into(), data_hash.into());
    manifest.insert(
        "data".into(),
        serde_json::json!({"queries": n, "docs": data.docs.len()}),
    );
    manifest.insert(
        "final".into(),
        serde_json::json!({"step": state.step, "loss": state.last_terms.as_ref().map(terms_json)}),
    );
    manifest.insert(
        "best".into(),
        match state.best {
            Some(b) => serde_json::json!({"step": b.step, "ndcg@10": b.score}),
            None => serde_json::Value::Null,
        },
    );
    for (k, v) in &opts.manifest {
        manifest.insert(k.clone(), v.clone());
    }
    let json = serde_json::to_vec_pretty(&serde_json::Value::Object(manifest))
        .expect("manifest serialises");
    write_atomic(&out.join("manifest.json"), &json)?;
    Ok(summary)
}

/// Redraws `curves.png` next to the metrics; a plotting failure must not end a training run,
/// so it is only reported.
pub(crate) fn plot_curves(metrics: &Path, out: &Path) {
    let title = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(e) = crate::plot::plot_metrics(metrics, &out.join(CURVES), &title) {
        eprintln!(
            "warning: could not draw {}: {e}",
            out.join(CURVES).display()
        );
    }
}

pub(crate) fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}
