//! Base weights, loaded once and frozen. Both forward paths read these same tensors; the
//! q|k|v and gate|up projections are fused at load so the fast path does one matmul where the
//! checkpoint stores two or three (the differentiable path slices the fused output, which
//! autograd handles like any other op).

use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One transformer block's frozen weights. Projections are stored transposed (`[in, out]`,
/// contiguous): candle's gemm then streams the weight without a strided repack, which measured
/// up to 1.8× faster for the down projection at prefill shapes.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[d]`.
    pub attn_norm: Tensor,
    /// Fused q|k|v projection, transposed: `[d, (h + 2·kv)·hd]` (rotate-half RoPE convention).
    pub wqkv_t: Tensor,
    /// Fused q|k|v bias (Qwen2).
    pub bqkv: Option<Tensor>,
    /// Per-head query norm `[hd]` (Qwen3).
    pub q_norm: Option<Tensor>,
    /// Per-head key norm `[hd]` (Qwen3).
    pub k_norm: Option<Tensor>,
    /// Attention output projection, transposed: `[h·hd, d]`.
    pub wo_t: Tensor,
    /// RMSNorm before the MLP, `[d]`.
    pub ffn_norm: Tensor,
    /// Fused gate|up projection, transposed: `[d, 2·ff]`.
    pub w_gate_up_t: Tensor,
    /// Down projection, transposed: `[ff, d]`.
    pub w_down_t: Tensor,
}

/// All frozen weights of a decoder.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embedding `[vocab, d]`.
    pub embed: Tensor,
    /// Blocks, in order.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm `[d]`.
    pub norm: Tensor,
    /// Untied LM head `[vocab, d]`; `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
}

/// The pieces of a checkpoint, independent of how a format names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Embed,
    Norm,
    LmHead,
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

fn gguf_name(p: Part, i: usize) -> String {
    let l = |s: &str| format!("blk.{i}.{s}");
    match p {
        Part::Embed => "token_embd.weight".into(),
        Part::Norm => "output_norm.weight".into(),
        Part::LmHead => "output.weight".into(),
        Part::AttnNorm => l("attn_norm.weight"),
        Part::Q => l("attn_q.weight"),
        Part::K => l("attn_k.weight"),
        Part::V => l("attn_v.weight"),
        Part::QBias => l("attn_q.bias"),
        Part::KBias => l("attn_k.bias"),
        Part::VBias => l("attn_v.bias"),
        Part::QNorm => l("attn_q_norm.weight"),
        Part::KNorm => l("attn_k_norm.weight"),
        Part::O => l("attn_output.weight"),
        Part::FfnNorm => l("ffn_norm.weight"),
        Part::Gate => l("ffn_gate.weight"),
        Part::Up => l("ffn_up.weight"),
        Part::Down => l("ffn_down.weight"),
    }
}

fn hf_name(p: Part, i: usize) -> String {
    let l = |s: &str| format!("model.layers.{i}.{s}");
    match p {
        Part::Embed => "model.embed_tokens.weight".into(),
        Part::Norm => "model.norm.weight".into(),
        Part::LmHead => "lm_head.weight".into(),
        Part::AttnNorm => l("input_layernorm.weight"),
        Part::Q => l("self_attn.q_proj.weight"),
        Part::K => l("self_attn.k_proj.weight"),
        Part::V => l("self_attn.v_proj.weight"),
        Part::QBias => l("self_attn.q_proj.bias"),
        Part::KBias => l("self_attn.k_proj.bias"),
        Part::VBias => l("self_attn.v_proj.bias"),
        Part::QNorm => l("self_attn.q_norm.weight"),
        Part::KNorm => l("self_attn.k_norm.weight"),
        Part::O => l("self_attn.o_proj.weight"),
        Part::FfnNorm => l("post_attention_layernorm.weight"),
        Part::Gate => l("mlp.gate_proj.weight"),
        Part::Up => l("mlp.up_proj.weight"),
        Part::Down => l("mlp.down_proj.weight"),
    }
}

/// A source of named tensors (a GGUF file or a set of safetensors shards).
trait TensorSource {
    fn path(&self) -> &Path;
    fn name(&self, p: Part, layer: usize) -> String;
    fn load(&mut self, name: &str) -> Result<Option<Tensor>>;
    /// Post-processing a format needs (GGUF llama q/k un-permutation).
    fn fix(&self, _p: Part, t: Tensor, _cfg: &ModelConfig) -> Result<Tensor> {
        Ok(t)
    }
}

struct Loader<'a, S: TensorSource> {
    src: &'a mut S,
    cfg: &'a ModelConfig,
    dtype: DType,
}

impl<S: TensorSource> Loader<'_, S> {
    fn opt(&mut self, p: Part, layer: usize, shape: &[usize]) -> Result<Option<Tensor>> {
        let name = self.src.name(p, layer);
        let Some(t) = self.src.load(&name)? else {
            return Ok(None);
        };
        if t.dims() != shape {
            return Err(Error::Shape {
                path: self.src.path().to_path_buf(),
                name,
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        let t = self.src.fix(p, t.to_dtype(self.dtype)?, self.cfg)?;
        Ok(Some(t))
    }

    fn req(&mut self, p: Part, layer: usize, shape: &[usize]) -> Result<Tensor> {
        self.opt(p, layer, shape)?.ok_or_else(|| {
            Error::file(
                self.src.path(),
                format!("missing tensor `{}`", self.src.name(p, layer)),
            )
        })
    }

    fn weights(&mut self) -> Result<Weights> {
        let c = self.cfg.clone();
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.num_heads * hd, c.num_kv_heads * hd);
        let embed = self.req(Part::Embed, 0, &[c.vocab_size, d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(self.req(Part::LmHead, 0, &[c.vocab_size, d])?)
        };
        let norm = self.req(Part::Norm, 0, &[d])?;
        // No pre-reservation: a corrupt layer count fails at the first missing tensor instead.
        let mut layers = Vec::new();
        for i in 0..c.num_layers {
            let q = self.req(Part::Q, i, &[q_out, d])?;
            let k = self.req(Part::K, i, &[kv_out, d])?;
            let v = self.req(Part::V, i, &[kv_out, d])?;
            let bqkv = if c.qkv_bias {
                let bq = self.req(Part::QBias, i, &[q_out])?;
                let bk = self.req(Part::KBias, i, &[kv_out])?;
                let bv = self.req(Part::VBias, i, &[kv_out])?;
                Some(Tensor::cat(&[bq, bk, bv], 0)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(self.req(Part::QNorm, i, &[hd])?),
                    Some(self.req(Part::KNorm, i, &[hd])?),
                )
            } else {
                (None, None)
            };
            let gate = self.req(Part::Gate, i, &[c.intermediate_size, d])?;
            let up = self.req(Part::Up, i, &[c.intermediate_size, d])?;
            layers.push(LayerWeights {
                attn_norm: self.req(Part::AttnNorm, i, &[d])?,
                wqkv_t: transpose(&Tensor::cat(&[q, k, v], 0)?)?,
                bqkv,
                q_norm,
                k_norm,
                wo_t: transpose(&self.req(Part::O, i, &[d, q_out])?)?,
                ffn_norm: self.req(Part::FfnNorm, i, &[d])?,
                w_gate_up_t: transpose(&Tensor::cat(&[gate, up], 0)?)?,
                w_down_t: transpose(&self.req(Part::Down, i, &[d, c.intermediate_size])?)?,
            });
        }
        Ok(Weights {
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}

fn transpose(t: &Tensor) -> Result<Tensor> {
    Ok(t.t()?.contiguous()?)
}

/// Undoes llama.cpp's q/k row permutation so that GGUF llama weights use the same
/// rotate-half RoPE convention as HF checkpoints (and transformers' GGUF loader).
fn unpermute_rows(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let hd = rows / n_heads;
    let rest: usize = dims[1..].iter().product();
    let t = t
        .reshape((n_heads, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

struct GgufSource {
    path: PathBuf,
    file: std::fs::File,
    content: gguf_file::Content,
    device: Device,
}

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }
    fn name(&self, p: Part, layer: usize) -> String {
        gguf_name(p, layer)
    }
    fn load(&mut self, name: &str) -> Result<Option<Tensor>> {
        if !self.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let q = self
            .content
            .tensor(&mut self.file, name, &self.device)
            .map_err(|e| Error::file(&self.path, format!("reading tensor `{name}`: {e}")))?;
        let t = q
            .dequantize(&self.device)
            .map_err(|e| Error::file(&self.path, format!("dequantizing tensor `{name}`: {e}")))?;
        Ok(Some(t))
    }
    fn fix(&self, p: Part, t: Tensor, cfg: &ModelConfig) -> Result<Tensor> {
        // llama.cpp permutes q/k only for the llama architecture; qwen2/qwen3 are stored as is.
        match (cfg.arch, p) {
            (Arch::Llama, Part::Q | Part::QBias) => unpermute_rows(&t, cfg.num_heads),
            (Arch::Llama, Part::K | Part::KBias) => unpermute_rows(&t, cfg.num_kv_heads),
            _ => Ok(t),
        }
    }
}

/// Opens and validates a GGUF file: header parse (bounded by candle against the file size),
/// then every tensor's byte range is checked against the file length so a truncated download
/// is reported by name rather than as a short read deep inside dequantization.
pub fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(&mut file)
    }))
    .map_err(|_| Error::file(path, "not a valid GGUF file (header parser panicked)"))?
    .map_err(|e| Error::file(path, format!("not a valid GGUF file: {e}")))?;
    for (name, info) in &content.tensor_infos {
        // Checked arithmetic: a corrupt dimension must not wrap around and pass the check.
        let dims = info.shape.dims();
        let elems = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e as u64 <= file_len.saturating_mul(8))
            .ok_or_else(|| Error::file(path, format!("tensor `{name}`: dimensions {dims:?} are impossibly large (corrupt header?)")))?;
        let bs = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(bs) {
            return Err(Error::file(
                path,
                format!("tensor `{name}`: {elems} elements is not a multiple of the {:?} block size {bs}", info.ggml_dtype),
            ));
        }
        let end = ((elems / bs) as u64)
            .checked_mul(info.ggml_dtype.type_size() as u64)
            .and_then(|b| b.checked_add(info.offset))
            .and_then(|b| b.checked_add(content.tensor_data_offset));
        match end {
            Some(end) if end <= file_len => {}
            Some(end) => {
                return Err(Error::file(
                    path,
                    format!("truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes"),
                ))
            }
            None => {
                return Err(Error::file(path, format!("tensor `{name}`: offset/size overflow (corrupt header?)")))
            }
        }
    }
    Ok((file, content))
}

/// Loads the config and weights of a GGUF file, dequantized to `dtype`.
pub(crate) fn load_gguf(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ModelConfig, Weights, gguf_file::Content)> {
    let (file, content) = open_gguf(path)?;
    let cfg = ModelConfig::from_gguf(&content, path)?;
    let mut src = GgufSource {
        path: path.to_path_buf(),
        file,
        content,
        device: device.clone(),
    };
    let weights = Loader {
        src: &mut src,
        cfg: &cfg,
        dtype,
    }
    .weights()?;
    Ok((cfg, weights, src.content))
}

struct SafetensorsSource {
    dir: PathBuf,
    /// tensor name → shard path
    routing: HashMap<String, PathBuf>,
    shards: HashMap<PathBuf, candle_core::safetensors::MmapedSafetensors>,
    device: Device,
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn name(&self, p: Part, layer: usize) -> String {
        hf_name(p, layer)
    }
    fn load(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(shard) = self.routing.get(name) else {
            return Ok(None);
        };
        let st = &self.shards[shard];
        let t = st
            .load(name, &self.device)
            .map_err(|e| Error::file(shard, format!("reading tensor `{name}`: {e}")))?;
        Ok(Some(t))
    }
}

/// Lists the safetensors shards of an HF directory: the index file when present (so a stray
/// extra file cannot shadow real weights), otherwise every `*.safetensors`.
fn safetensors_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "field `weight_map`: expected an object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|s| dir.join(s))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.exists() {
                return Err(Error::file(
                    f,
                    "shard listed in model.safetensors.index.json is missing",
                ));
            }
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(
            dir,
            "no *.safetensors weights in this directory",
        ));
    }
    Ok(files)
}

/// Loads `config.json` and the (possibly sharded) safetensors weights of an HF directory.
pub(crate) fn load_hf_dir(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(ModelConfig, Weights)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?;
    let mut cfg = ModelConfig::from_hf_json(&json, &cfg_path)?;
    let mut routing = HashMap::new();
    let mut shards = HashMap::new();
    for f in safetensors_shards(dir)? {
        // SAFETY: the file is mapped read-only; as with every mmap-based loader, it must not be
        // truncated by another process while the model is loading.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&f) }
            .map_err(|e| Error::file(&f, format!("not a valid safetensors file: {e}")))?;
        for (name, _) in st.tensors() {
            routing.insert(name, f.clone());
        }
        shards.insert(f, st);
    }
    // Tied checkpoints sometimes still ship `lm_head.weight`; untied ones must.
    if !cfg.tie_word_embeddings && !routing.contains_key("lm_head.weight") {
        return Err(Error::file(
            dir,
            "config says tie_word_embeddings=false but no `lm_head.weight` tensor was found",
        ));
    }
    // The stored embedding may be padded beyond config.vocab_size; trust the tensor.
    if let Some(f) = routing.get("model.embed_tokens.weight") {
        let shape = shards[f]
            .get("model.embed_tokens.weight")
            .map_err(|e| Error::file(f, e.to_string()))?
            .shape()
            .to_vec();
        if shape.len() == 2 && shape[1] == cfg.hidden_size {
            cfg.vocab_size = shape[0];
        }
    }
    let mut src = SafetensorsSource {
        dir: dir.to_path_buf(),
        routing,
        shards,
        device: device.clone(),
    };
    let weights = Loader {
        src: &mut src,
        cfg: &cfg,
        dtype,
    }
    .weights()?;
    Ok((cfg, weights))
}

impl Weights {
    /// Converts every tensor (used by tests that run the model in f64).
    pub fn to_dtype(&self, dtype: DType) -> Result<Weights> {
        let c = |t: &Tensor| t.to_dtype(dtype);
        let o = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_dtype(dtype)).transpose();
        Ok(Weights {
            embed: c(&self.embed)?,
            norm: c(&self.norm)?,
            lm_head: o(&self.lm_head)?,
            layers: self
                .layers
                .iter()
                .map(|l| {
                    Ok(LayerWeights {
                        attn_norm: c(&l.attn_norm)?,
                        wqkv_t: c(&l.wqkv_t)?,
                        bqkv: o(&l.bqkv)?,
                        q_norm: o(&l.q_norm)?,
                        k_norm: o(&l.k_norm)?,
                        wo_t: c(&l.wo_t)?,
                        ffn_norm: c(&l.ffn_norm)?,
                        w_gate_up_t: c(&l.w_gate_up_t)?,
                        w_down_t: c(&l.w_down_t)?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}
