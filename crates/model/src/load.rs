//! Loading a model + tokenizer from a GGUF file, an HF directory, or a fetched name.

use crate::error::{Error, Result};
use crate::fetch::{self, FetchOptions, ModelFormat};
use crate::model::Model;
use crate::tokenizer::TextTokenizer;
use crate::weights;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weight dtype after dequantization (f32 by default: fast on CPU and trainable).
    pub dtype: DType,
    /// Device (CPU unless built with a GPU backend).
    pub device: Device,
    /// Add `<|embed_token|>` to tokenizer and model (Search-R3 always does).
    pub add_embed_token: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            add_embed_token: true,
        }
    }
}

/// A model ready to run, with its tokenizer and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer and chat template.
    pub tokenizer: TextTokenizer,
    /// File or directory loaded.
    pub path: PathBuf,
    /// GGUF file or HF directory.
    pub format: ModelFormat,
    /// Short identifier (fetched name or file/dir name) for manifests and `/info`.
    pub id: String,
}

/// Resolves `spec` (a fetched name such as `smollm2`, a GGUF path, or an HF directory),
/// fetching known models on first use, and loads it.
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let (path, format) = fetch::ensure(spec, &FetchOptions::default())
        .map_err(|e| Error::file(spec, e.to_string()))?;
    let mut m = load_path(&path, format, opts)?;
    if fetch::known_models().iter().any(|k| k.name == spec) {
        m.id = spec.to_string();
    }
    Ok(m)
}

/// Loads a GGUF file or an HF directory from disk.
pub fn load_path(path: &Path, format: ModelFormat, opts: &LoadOptions) -> Result<LoadedModel> {
    let (config, w, mut tokenizer) = match format {
        ModelFormat::Gguf => {
            let (config, w, content) = weights::load_gguf(path, opts.dtype, &opts.device)?;
            let tok = TextTokenizer::from_gguf(&content, path)?;
            (config, w, tok)
        }
        ModelFormat::HfDir => {
            // Tokenizer first: a directory without one is unusable, and reading it is cheap.
            let tok = TextTokenizer::from_hf_dir(path)?;
            let (config, w) = weights::load_hf_dir(path, opts.dtype, &opts.device)?;
            (config, w, tok)
        }
    };
    let mut model = Model::new(config, w)?;
    if opts.add_embed_token {
        // A checkpoint whose tokenizer already knows the token (written by `adapter merge`)
        // stores the trained row; anything else gets a fresh, mean-initialised one.
        let stored = tokenizer
            .token_to_id(crate::tokenizer::EMBED_TOKEN)
            .filter(|&id| (id as usize) < model.config.vocab_size);
        let id = tokenizer.add_embed_token()?;
        match stored {
            Some(_) => model.adopt_embed_token(id),
            None => model.add_embed_token(id),
        }
        .map_err(|e| Error::file(path, e.to_string()))?;
    }
    let id = path
        .file_name()
        .map(|s| s.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_else(|| path.display().to_string());
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.to_path_buf(),
        format,
        id,
    })
}

/// For test suites that need a real model: returns the known model `name`, fetching it when
/// `CI` is set (where it must succeed), or `None` with a `SKIP` note on stderr when it is not
/// cached locally — tests then return early instead of failing on a machine without it.
pub fn known_model_for_tests(name: &str) -> Option<LoadedModel> {
    let known = fetch::known_models().iter().find(|k| k.name == name)?;
    let path = match fetch::cached_path(name) {
        Some(p) => p,
        None if std::env::var_os("CI").is_some() => fetch::fetch(name, &FetchOptions::default())
            .unwrap_or_else(|e| panic!("CI must be able to fetch `{name}`: {e}")),
        None => {
            eprintln!("SKIP: model `{name}` not fetched (run `search-r3 model fetch {name}`); CI fetches it");
            return None;
        }
    };
    let mut m = load_path(&path, known.format(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading `{name}`: {e}"));
    m.id = name.to_string();
    Some(m)
}
