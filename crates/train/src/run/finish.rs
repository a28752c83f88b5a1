//! The end of a completed run, the same for both stages: the last state is saved as
//! `final.safetensors`, the best evaluated state (or the final one when nothing was
//! evaluated) becomes `adapter.safetensors`, and `manifest.json` records its sha256 and step
//! next to the stage's own fields and the caller's (base model, command line, ...).

use super::checkpoint::ADAPTER;
use super::log::MetricsLog;
use super::{BestEval, TrainOptions};
use crate::error::{file_err, Result};
use search_r3_model::files::{sha256_file, write_atomic};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// The manifest fields every stage writes about itself: its adapter `format`, the `config` and
/// its hash, the data hash and `data` sizes.
pub(crate) fn stage_fields(
    format: &str,
    config: &impl serde::Serialize,
    config_hash: &str,
    data_hash: &str,
    data: Value,
) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("format".into(), format.into());
    fields.insert(
        "config".into(),
        serde_json::to_value(config).expect("config serialises"),
    );
    fields.insert("config_hash".into(), config_hash.into());
    fields.insert("data_hash".into(), data_hash.into());
    fields.insert("data".into(), data);
    fields
}

/// Saves a trainable state to a path with safetensors metadata.
pub(crate) type SaveFn<'a> = dyn Fn(&Path, &HashMap<String, String>) -> Result<()> + 'a;

/// Writes the final outputs of a run that completed `steps` steps. `stage` holds the stage's
/// own manifest fields (`format`, `config`, hashes, data counts, ...).
pub(crate) fn finish(
    opts: &TrainOptions,
    save: &SaveFn,
    steps: usize,
    best: Option<BestEval>,
    stage: Map<String, Value>,
    log: &MetricsLog,
) -> Result<()> {
    let out = opts.out.as_path();
    let mut meta = opts.adapter_metadata.clone();
    meta.insert("step".into(), steps.to_string());
    let final_path = out.join("final.safetensors");
    save(&final_path, &meta)?;
    let best_path = out.join("best.safetensors");
    let (src, adapter_step) = match best {
        Some(b) if best_path.exists() => (best_path, b.step),
        _ => (final_path, steps),
    };
    let adapter = out.join(ADAPTER);
    std::fs::copy(&src, &adapter).map_err(|e| file_err(&adapter, e))?;
    let sha = sha256_file(&adapter).map_err(|e| file_err(&adapter, e))?;
    let mut manifest = Map::new();
    manifest.insert("version".into(), 1.into());
    manifest.insert("adapter".into(), ADAPTER.into());
    manifest.insert("adapter_sha256".into(), sha.into());
    manifest.insert("adapter_step".into(), adapter_step.into());
    manifest.insert("steps".into(), steps.into());
    manifest.insert(
        "best".into(),
        match best {
            Some(b) => json!({"step": b.step, "ndcg@10": b.score}),
            None => Value::Null,
        },
    );
    manifest.extend(stage);
    manifest.extend(opts.manifest.iter().map(|(k, v)| (k.clone(), v.clone())));
    let json = serde_json::to_vec_pretty(&Value::Object(manifest)).expect("manifest serialises");
    let path = out.join("manifest.json");
    write_atomic(&path, &json).map_err(|e| file_err(&path, e))?;
    log.plot();
    Ok(())
}
