//! Saving and restoring the trainable state (LoRA factors and `<|embed_token|>` rows) as one
//! safetensors file whose metadata records what it belongs to, so it cannot be attached to an
//! incompatible model by accident.

use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::model::Model;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

const FORMAT: &str = "search-r3-trainable";
const VERSION: &str = "1";

/// Writes the model's trainable tensors to `path` atomically (temp file + rename), with
/// `extra` merged into the safetensors metadata (base-model id, sha256, …).
pub fn save_trainable(model: &Model, path: &Path, extra: &HashMap<String, String>) -> Result<()> {
    let vars = model.trainable_vars();
    let mut md = extra.clone();
    md.insert("format".into(), FORMAT.into());
    md.insert("version".into(), VERSION.into());
    md.insert(
        "config".into(),
        serde_json::to_string(&model.config).expect("config serialises"),
    );
    if let Some(e) = &model.embed_token {
        md.insert("embed_token_id".into(), e.id.to_string());
    }
    if let Some(l) = &model.lora {
        md.insert(
            "lora".into(),
            serde_json::to_string(&l.config).expect("lora config serialises"),
        );
    }
    let tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    safetensors::serialize_to_file(tensors, Some(md), tmp.path())
        .map_err(|e| Error::file(tmp.path(), format!("writing safetensors: {e}")))?;
    // A temporary file is private (0600); an adapter is a shareable artifact like any other
    // output, so it gets the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Reads the metadata of a trainable-state file.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Restores trainable state saved by [`save_trainable`] into `model`: adds LoRA adapters with
/// the recorded configuration and overwrites the embed-token rows. Refuses files made for a
/// different architecture or embed-token id.
pub fn load_trainable(model: &mut Model, path: &Path) -> Result<HashMap<String, String>> {
    let md = read_metadata(path)?;
    if md.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::file(
            path,
            format!("not a {FORMAT} file (metadata `format` missing or different)"),
        ));
    }
    let cfg_json = md
        .get("config")
        .ok_or_else(|| Error::file(path, "metadata `config` missing"))?;
    let cfg: crate::config::ModelConfig = serde_json::from_str(cfg_json)
        .map_err(|e| Error::file(path, format!("metadata `config`: {e}")))?;
    let mine = &model.config;
    if (
        cfg.arch,
        cfg.hidden_size,
        cfg.num_layers,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
    ) != (
        mine.arch,
        mine.hidden_size,
        mine.num_layers,
        mine.intermediate_size,
        mine.num_heads,
        mine.num_kv_heads,
    ) {
        return Err(Error::file(
            path,
            format!(
                "made for a different base model ({:?}, d={}, {} layers); this model is {:?}, d={}, {} layers",
                cfg.arch, cfg.hidden_size, cfg.num_layers, mine.arch, mine.hidden_size, mine.num_layers
            ),
        ));
    }
    if let (Some(want), Some(e)) = (md.get("embed_token_id"), &model.embed_token) {
        if want != &e.id.to_string() {
            return Err(Error::file(
                path,
                format!(
                    "made with <|embed_token|> id {want}, this model assigns id {}",
                    e.id
                ),
            ));
        }
    }
    // Build the new adapters on a scratch copy and validate every tensor before touching
    // `model`, so a bad file leaves the model exactly as it was.
    let mut scratch = model.clone();
    match md.get("lora") {
        Some(l) => {
            let lc: LoraConfig = serde_json::from_str(l)
                .map_err(|e| Error::file(path, format!("metadata `lora`: {e}")))?;
            scratch.add_lora(lc, 0)?;
        }
        None => scratch.lora = None,
    }
    let tensors = candle_core::safetensors::load(path, model.device())
        .map_err(|e| Error::file(path, format!("reading tensors: {e}")))?;
    let vars = scratch.trainable_vars();
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::file(path, format!("missing tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::file(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, this model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        values.push(t.to_dtype(model.dtype())?);
    }
    if let Some(extra) = tensors.keys().find(|k| !vars.iter().any(|(n, _)| n == *k)) {
        return Err(Error::file(
            path,
            format!("unexpected tensor `{extra}` (not a trainable tensor of this model)"),
        ));
    }
    // The embed-token vars are shared between `scratch` and `model`; LoRA vars are new.
    for ((_, var), value) in vars.iter().zip(&values) {
        var.set(value)?;
    }
    model.lora = scratch.lora;
    Ok(md)
}
