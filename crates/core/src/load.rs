//! Loading a model + adapter + templates into an [`Embedder`], and its identity.
//!
//! [`load_embedder`] is the one way a command gets an embedder: it loads the model, folds an
//! adapter into its weights with [`merge_adapter`] (which refuses an adapter trained on another
//! base model), picks the templates, and returns the [`ModelIdentity`] (model sha256, adapter
//! sha256, template hash) that an index records and checks on open.

use crate::embedder::{Embedder, ReasonMode};
use crate::searcher::SearchError;
use crate::templates::Templates;
use search_r3_model::{fetch, files, load_model, state, LoadOptions, LoadedModel, Lora, Model};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Which model, adapter and templates produced an index's vectors.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    /// What `--model` said (fetched name, GGUF path or HF dir), so `search` can reload it.
    pub spec: String,
    /// sha256 of the GGUF file, or of `config.json` + weights for an HF dir.
    pub sha256: String,
    /// sha256 of the adapter file, if any.
    pub adapter: Option<String>,
    /// sha256 of the adapter's query tower ([`QUERY_ADAPTER`]), if it has one. Not part of
    /// [`ModelIdentity::compat_map`]: document vectors do not depend on it.
    pub query_adapter: Option<String>,
    /// Hash of the templates.
    pub template_hash: String,
}

impl ModelIdentity {
    /// The fields an index must match to be used with this model.
    pub fn compat_map(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("model_sha256".into(), json!(self.sha256));
        m.insert(
            "adapter_sha256".into(),
            json!(self.adapter.clone().unwrap_or_default()),
        );
        m.insert("template_hash".into(), json!(self.template_hash));
        m
    }
}

fn sha256_file(path: &Path) -> Result<String, SearchError> {
    files::sha256_file(path).map_err(|e| SearchError::Model(search_r3_model::Error::io(path, e)))
}

/// sha256 identifying a model on disk (a fetched model's verified hash is reused).
pub(crate) fn model_sha256(loaded: &LoadedModel) -> Result<String, SearchError> {
    if let Some(k) = fetch::known_models().iter().find(|k| k.name == loaded.id) {
        return Ok(k.sha256.to_string());
    }
    if loaded.path.is_file() {
        return sha256_file(&loaded.path);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(&loaded.path)
        .map_err(|e| SearchError::Other(format!("{}: {e}", loaded.path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || p.ends_with("config.json"))
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for p in names {
        h.update(sha256_file(&p)?.as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Options for loading the embedder.
#[derive(Debug, Clone, Default)]
pub struct EmbedderOptions {
    /// Trainable-state file (LoRA + embed-token rows) to apply, or a `train sft` output
    /// directory (its `adapter.safetensors`).
    pub adapter: Option<PathBuf>,
    /// Template file overriding the built-in one for the model's family.
    pub templates: Option<PathBuf>,
    /// Document truncation in tokens (default 512).
    pub max_doc_tokens: Option<usize>,
    /// How reasoning embeds a query; default: the adapter directory's `manifest.json`
    /// `reasoning_mode` (the mode measured best for it), else one greedy thought.
    pub reason_mode: Option<ReasonMode>,
}

/// The reasoning mode an adapter directory ships as its default (`reasoning_mode` in its
/// `manifest.json`), if it names one.
pub fn shipped_reason_mode(adapter: &Path) -> Result<Option<ReasonMode>, SearchError> {
    let path = adapter.join("manifest.json");
    if !adapter.is_dir() || !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| SearchError::Other(format!("{}: {e}", path.display())))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| SearchError::Other(format!("{}: not JSON: {e}", path.display())))?;
    match v.get("reasoning_mode") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(m)) => ReasonMode::parse(m)
            .map(Some)
            .map_err(|e| SearchError::Other(format!("{}: `reasoning_mode`: {e}", path.display()))),
        Some(other) => Err(SearchError::Other(format!(
            "{}: `reasoning_mode` must be a string like \"mean:4\", found {other}",
            path.display()
        ))),
    }
}

/// The adapter file an `--adapter` argument names: a training run's directory stands for its
/// shipped `adapter.safetensors`, anything else is the file itself.
pub fn adapter_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("adapter.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// The query tower's file in an adapter directory: the trainable state for the plain base
/// model that queries run through (`train reason` writes it), beside the document side's
/// `adapter.safetensors`.
pub const QUERY_ADAPTER: &str = "query.safetensors";

/// An adapter applied to a model by [`merge_adapter`].
pub struct MergedAdapter {
    /// The file read (see [`adapter_file`]).
    pub file: PathBuf,
    /// sha256 of that file.
    pub sha256: String,
    /// The adapter's LoRA factors as loaded, before they were folded into the weights (a
    /// stage-2 run saves its adapter stacked onto them).
    pub lora: Option<Lora>,
}

/// Loads the trainable state (LoRA + embed-token rows) at `path` (a file or a training run's
/// directory) into `model`, refuses it when its metadata names a base model other than the one
/// with sha256 `base_sha256` (loaded from `base_spec`), and folds the LoRA factors into the
/// weights.
pub fn merge_adapter(
    model: &mut Model,
    path: &Path,
    base_spec: &str,
    base_sha256: &str,
) -> Result<MergedAdapter, SearchError> {
    let file = adapter_file(path);
    let md = state::load_trainable(model, &file)?;
    // Shapes alone would accept an adapter trained on another model of the same size.
    if let Some(base) = md.get("base_model_sha256").filter(|b| **b != base_sha256) {
        return Err(SearchError::Model(search_r3_model::Error::file(
            &file,
            format!(
                "adapter was trained on base model `{}` (sha256 {base}), not on `{base_spec}` \
                 (sha256 {base_sha256})",
                md.get("base_model").map(String::as_str).unwrap_or("?")
            ),
        )));
    }
    let lora = model.lora.clone();
    // Folded adapters cost nothing per token (one matmul per projection instead of three).
    model.merge_lora()?;
    let sha256 = sha256_file(&file)?;
    Ok(MergedAdapter { file, sha256, lora })
}

/// Loads model (+adapter) and templates into an [`Embedder`], with its identity.
pub fn load_embedder(
    spec: &str,
    opts: &EmbedderOptions,
) -> Result<(Embedder, ModelIdentity), SearchError> {
    let mut loaded = load_model(spec, &LoadOptions::default())?;
    let sha256 = model_sha256(&loaded)?;
    // A query tower starts from the plain base model too (its file holds the whole stack).
    let query_file = opts
        .adapter
        .as_ref()
        .filter(|p| p.is_dir())
        .map(|p| p.join(QUERY_ADAPTER))
        .filter(|f| f.exists());
    let mut query_tower = None;
    let mut query_adapter = None;
    if let Some(f) = &query_file {
        let mut q = loaded.model.clone();
        query_adapter = Some(merge_adapter(&mut q, f, spec, &sha256)?.sha256);
        query_tower = Some(q);
    }
    // Inference only from here on, so the adapter is folded into the weights.
    let adapter = match &opts.adapter {
        Some(p) => Some(merge_adapter(&mut loaded.model, p, spec, &sha256)?.sha256),
        None => None,
    };
    let templates = match &opts.templates {
        Some(p) => Templates::from_file(p)?,
        None => Templates::for_arch(loaded.model.config.arch),
    };
    let identity = ModelIdentity {
        spec: spec.to_string(),
        sha256,
        adapter,
        query_adapter,
        template_hash: templates.hash(),
    };
    let mut e = Embedder::new(loaded, templates, opts.max_doc_tokens.unwrap_or(512))?;
    e.query_tower = query_tower;
    e.reason_mode = match (opts.reason_mode, &opts.adapter) {
        (Some(m), _) => m,
        (None, Some(a)) => shipped_reason_mode(a)?.unwrap_or(ReasonMode::GREEDY),
        (None, None) => ReasonMode::GREEDY,
    };
    Ok((e, identity))
}
