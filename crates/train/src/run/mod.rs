//! The run machinery both training stages share, so each stage's loop only says what is
//! particular to it (nanoGPT-style: setup or resume, one step, measure, finish):
//!
//! * [`config`] — TOML run configs (unknown keys are errors naming the file) and their hash,
//!   the LoRA section both stages use;
//! * `data` — the seeded, stateless data order (epochs, cursor, samples), so a resumed run
//!   draws exactly what the straight run drew;
//! * `checkpoint` — checksummed checkpoint directories swapped in atomically, recovered after
//!   a crash between the two renames, and refused when they belong to the other stage;
//! * `log` — `metrics.jsonl` (truncated to the checkpoint on resume), `curves.png`, progress
//!   lines with an ETA;
//! * `finish` — the end of a run: `final.safetensors`, `adapter.safetensors` (the best
//!   evaluated state) and `manifest.json`.

pub(crate) mod checkpoint;
pub mod config;
pub(crate) mod data;
pub(crate) mod finish;
pub(crate) mod log;

use crate::error::Result;
use crate::optim::{AdamW, AdamWConfig};
use candle_core::Var;
use config::LoraSection;
use search_r3_model::state::save_trainable;
use search_r3_model::{Lora, Model};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

impl TrainOptions {
    /// Whether the interrupt flag is set (never for the last step: that one finishes the run).
    pub(crate) fn interrupted(&self, last: bool) -> bool {
        !last
            && self
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// Whether the run stops after `step`: interrupted (checked by the caller before its
    /// checkpoint, see [`TrainOptions::interrupted`]), or at [`TrainOptions::stop_after`].
    pub(crate) fn stop(&self, step: usize, last: bool, interrupted: bool) -> Option<Stop> {
        if interrupted {
            Some(Stop {
                early: true,
                interrupted: true,
            })
        } else if !last && self.stop_after == Some(step) {
            Some(Stop {
                early: true,
                interrupted: false,
            })
        } else {
            None
        }
    }
}

/// Prepares `model` for a run in `opts.out`: creates the directory and attaches fresh LoRA
/// adapters from `lora` (on resume the checkpoint's values overwrite them).
pub(crate) fn attach_adapters(
    model: &mut Model,
    lora: &LoraSection,
    opts: &TrainOptions,
) -> Result<()> {
    let out = opts.out.as_path();
    std::fs::create_dir_all(out).map_err(|e| crate::error::file_err(out, e))?;
    model.add_lora(lora.config(), lora.seed)?;
    model.lora_enabled = true;
    Ok(())
}

/// AdamW over the model's trainable tensors (their moments restored from the checkpoint on
/// resume), and those tensors for clipping.
pub(crate) fn optimizer(
    model: &Model,
    cfg: AdamWConfig,
    opts: &TrainOptions,
) -> Result<(AdamW, Vec<Var>)> {
    let named = model.trainable_vars();
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(named, cfg)?;
    if opts.resume {
        opt.load(&opts.out.join(checkpoint::CKPT).join(checkpoint::OPTIMIZER))?;
    }
    Ok((opt, vars))
}

/// The best evaluation so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestEval {
    /// Step it was measured after.
    pub step: usize,
    /// The score (nDCG@10 for the CLI's hook).
    pub score: f64,
}

impl BestEval {
    /// Records `score` at `step` when it beats `best` (or there is none); returns whether it
    /// did, so the caller saves the state that earned it.
    pub(crate) fn improve(best: &mut Option<BestEval>, step: usize, score: f64) -> bool {
        let better = best.is_none_or(|b| score > b.score);
        if better {
            *best = Some(BestEval { step, score });
        }
        better
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stop {
    /// Stopped before the configured steps, leaving a checkpoint to resume from.
    pub(crate) early: bool,
    /// That stop was an interrupt.
    pub(crate) interrupted: bool,
}

/// Saves the trainable state as an adapter for the plain base model: this stage's adapter
/// stacked onto `base` (the folded adapter the stage started from) when there is one.
pub(crate) fn save_stacked(
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

/// sha256 of what a stacked stage starts from besides its own adapter: the base model as the
/// adapter metadata names it, and the folded adapter's configuration and values.
pub(crate) fn policy_base_hash(
    base: Option<&Lora>,
    meta: &HashMap<String, String>,
) -> Result<String> {
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
