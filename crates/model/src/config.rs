//! Architecture hyper-parameters, read from GGUF metadata or an HF `config.json`.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;

/// Decoder families this runtime implements. They share one block definition and differ only
/// in the switches recorded in [`ModelConfig`] (q/k/v biases, q/k norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama / SmolLM / Mistral-style blocks.
    Llama,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3: per-head RMSNorm on queries and keys, no biases.
    Qwen3,
}

impl Arch {
    /// Parses the architecture string used by GGUF (`general.architecture`) or HF (`model_type`).
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" | "mistral" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            _ => None,
        }
    }

    /// The name used in GGUF metadata keys.
    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// Everything the forward pass needs to know about the architecture.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Block family.
    pub arch: Arch,
    /// Model width `d`.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Rows of the input embedding as stored (before `<|embed_token|>` is added).
    pub vocab_size: usize,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// Whether the LM head reuses the input embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    /// Trained context length (informational; nothing is truncated silently).
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    /// Width of the fused q|k|v projection output.
    pub fn qkv_out(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Checks internal consistency so that bad files fail at load, not in the middle of a matmul.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::file(path, m));
        if self.hidden_size == 0
            || self.num_layers == 0
            || self.num_heads == 0
            || self.head_dim == 0
        {
            return bad(format!("config has zero-sized dimensions: {self:?}"));
        }
        // Far beyond any real checkpoint; refusing here keeps size arithmetic from overflowing
        // and allocation requests from aborting the process on a corrupt header.
        const LIMIT: usize = 1 << 20;
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v > LIMIT {
                return bad(format!(
                    "{name} = {v} is implausibly large (corrupt header?)"
                ));
            }
        }
        if self.vocab_size > 1 << 24 {
            return bad(format!(
                "vocab_size = {} is implausibly large",
                self.vocab_size
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        Ok(())
    }

    /// Reads the configuration from GGUF metadata. `vocab_size` comes from the embedding tensor
    /// because not every converter writes `<arch>.vocab_size`.
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let arch_name = md_str(ct, "general.architecture", path)?;
        let arch = Arch::parse(&arch_name).ok_or_else(|| Error::UnknownArchitecture {
            path: path.to_path_buf(),
            arch: arch_name.clone(),
        })?;
        let a = arch.as_str();
        let hidden_size = md_usize(ct, &format!("{a}.embedding_length"), path)?;
        let num_heads = md_usize(ct, &format!("{a}.attention.head_count"), path)?;
        let num_kv_heads =
            md_usize_opt(ct, &format!("{a}.attention.head_count_kv"), path)?.unwrap_or(num_heads);
        let head_dim = match md_usize_opt(ct, &format!("{a}.attention.key_length"), path)? {
            Some(h) => h,
            None => hidden_size.checked_div(num_heads).unwrap_or(0),
        };
        let emb = ct.tensor_infos.get("token_embd.weight").ok_or_else(|| {
            Error::file(path, "missing tensor `token_embd.weight` (token embedding)")
        })?;
        let vocab_size = emb.shape.dims()[0];
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: md_usize(ct, &format!("{a}.feed_forward_length"), path)?,
            num_layers: md_usize(ct, &format!("{a}.block_count"), path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: md_f64_opt(ct, &format!("{a}.rope.freq_base"), path)?.unwrap_or(10_000.0),
            rms_norm_eps: md_f64_opt(ct, &format!("{a}.attention.layer_norm_rms_epsilon"), path)?
                .unwrap_or(1e-6),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            qkv_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
            qk_norm: ct.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
            max_position_embeddings: md_usize_opt(ct, &format!("{a}.context_length"), path)?
                .unwrap_or(2048),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_json(json: &serde_json::Value, path: &Path) -> Result<Self> {
        let get = |k: &str| json.get(k).filter(|v| !v.is_null());
        let req_usize = |k: &str| -> Result<usize> {
            get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::file(
                        path,
                        format!("field `{k}`: expected a non-negative integer"),
                    )
                })
        };
        let arch_name = get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::file(path, "field `model_type`: expected a string"))?;
        let arch = Arch::parse(arch_name).ok_or_else(|| Error::UnknownArchitecture {
            path: path.to_path_buf(),
            arch: arch_name.to_string(),
        })?;
        if let Some(rs) = get("rope_scaling") {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            if kind != "default" {
                return Err(Error::file(
                    path,
                    format!("field `rope_scaling`: rope type `{kind}` is not implemented (only plain RoPE)"),
                ));
            }
        }
        let hidden_size = req_usize("hidden_size")?;
        let num_heads = req_usize("num_attention_heads")?;
        let num_kv_heads = get("num_key_value_heads")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(num_heads);
        let head_dim = get("head_dim")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        let f = |k: &str, d: f64| get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let cfg = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: req_usize("intermediate_size")?,
            num_layers: req_usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize("vocab_size")?,
            rope_theta: f("rope_theta", 10_000.0),
            rms_norm_eps: f("rms_norm_eps", 1e-6),
            tie_word_embeddings: get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                _ => get("attention_bias")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false),
            },
            qk_norm: arch == Arch::Qwen3,
            max_position_embeddings: get("max_position_embeddings")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(2048),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Option<&'a gguf_file::Value> {
    ct.metadata.get(key)
}

fn md_str(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<String> {
    md(ct, key)
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| {
            Error::file(
                path,
                format!("GGUF metadata `{key}`: missing or not a string"),
            )
        })
}

fn md_usize_opt(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<Option<usize>> {
    use gguf_file::Value as V;
    Ok(match md(ct, key) {
        None => None,
        Some(V::U8(v)) => Some(*v as usize),
        Some(V::U16(v)) => Some(*v as usize),
        Some(V::U32(v)) => Some(*v as usize),
        Some(V::U64(v)) => Some(*v as usize),
        Some(V::I32(v)) if *v >= 0 => Some(*v as usize),
        Some(V::I64(v)) if *v >= 0 => Some(*v as usize),
        Some(other) => {
            return Err(Error::file(
                path,
                format!("GGUF metadata `{key}`: expected a non-negative integer, got {other:?}"),
            ))
        }
    })
}

fn md_usize(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    md_usize_opt(ct, key, path)?
        .ok_or_else(|| Error::file(path, format!("GGUF metadata `{key}`: missing")))
}

fn md_f64_opt(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<Option<f64>> {
    use gguf_file::Value as V;
    Ok(match md(ct, key) {
        None => None,
        Some(V::F32(v)) => Some(*v as f64),
        Some(V::F64(v)) => Some(*v),
        Some(other) => {
            return Err(Error::file(
                path,
                format!("GGUF metadata `{key}`: expected a float, got {other:?}"),
            ))
        }
    })
}
