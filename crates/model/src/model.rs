//! The decoder forward pass. One definition of the computation, two execution paths:
//!
//! * [`Path::Fast`] — inference: candle's fused kernels (`rms_norm`, `rope`,
//!   `softmax_last_dim`), which record no backward op;
//! * [`Path::Diff`] — training: the same math written with ops that have a backward
//!   (`rms_norm_slow`, rotate-half RoPE, `softmax`), so gradients reach LoRA factors and the
//!   `<|embed_token|>` row.
//!
//! Both read the same frozen [`Weights`]; trainable state lives in `Var`s beside them.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig, LoraTarget};
use crate::ops::frozen_linear;
use crate::weights::{LayerWeights, Weights};
use candle_core::{DType, Device, IndexOp, Tensor, Var, D};

/// Which implementation of the ops to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no autograd.
    Fast,
    /// Autograd-capable ops.
    Diff,
}

/// Trainable parameters of `<|embed_token|>`: its input-embedding row and, when the LM head is
/// untied, its output row. Initialised to the mean of the existing rows (the "mean resizing"
/// transformers uses), so the new token starts as an average, unremarkable token.
#[derive(Debug, Clone)]
pub struct EmbedTokenParams {
    /// Token id (usually the first id past the base vocabulary).
    pub id: u32,
    /// Input-embedding row `[1, d]`.
    pub row: Var,
    /// LM-head row `[1, d]` for untied models; tied models reuse `row`.
    pub head_row: Option<Var>,
}

/// A batch for one forward call: `b` rows of `t` new tokens each, attending over `s = past + t`
/// key positions (`past` = tokens already in the KV cache).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Rows.
    pub b: usize,
    /// New tokens per row.
    pub t: usize,
    /// Row-major `[b, t]` token ids.
    pub ids: Vec<u32>,
    /// Row-major `[b, t]` RoPE positions.
    pub positions: Vec<u32>,
    /// Row-major `[b, s]`: whether each key position holds a real token.
    pub key_mask: Vec<bool>,
}

impl Batch {
    /// Left-pads sequences to a common length (the layout generation needs: every row's last
    /// token is at the same index). Positions count real tokens only, as transformers derives
    /// them from the attention mask, so padding changes nothing for a row.
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32) -> Result<Batch> {
        Self::padded(seqs, pad_id, true)
    }

    /// Right-pads sequences (training layout: row `i`'s token `j` stays at index `j`).
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32) -> Result<Batch> {
        Self::padded(seqs, pad_id, false)
    }

    fn padded(seqs: &[Vec<u32>], pad_id: u32, left: bool) -> Result<Batch> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if seqs.is_empty() || seqs.iter().any(Vec::is_empty) {
            return Err(Error::Invalid("empty batch or empty sequence".into()));
        }
        let n = seqs.len() * t;
        let (mut ids, mut positions, mut key_mask) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for s in seqs {
            let pad = t - s.len();
            let (before, after) = if left { (pad, 0) } else { (0, pad) };
            ids.extend(
                std::iter::repeat_n(pad_id, before)
                    .chain(s.iter().copied())
                    .chain(std::iter::repeat_n(pad_id, after)),
            );
            key_mask.extend(
                std::iter::repeat_n(false, before)
                    .chain(std::iter::repeat_n(true, s.len()))
                    .chain(std::iter::repeat_n(false, after)),
            );
            // Padding slots get position 0; they are masked out as keys either way.
            positions.extend(
                std::iter::repeat_n(0, before)
                    .chain(0..s.len() as u32)
                    .chain(std::iter::repeat_n(0, after)),
            );
        }
        Ok(Batch {
            b: seqs.len(),
            t,
            ids,
            positions,
            key_mask,
        })
    }

    /// Key positions per row.
    pub fn s(&self) -> usize {
        self.key_mask.len() / self.b.max(1)
    }
}

/// Keys and values of every block for the tokens seen so far, `[b, kv_heads, s, hd]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached per row.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    /// True before the first forward call.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

/// A decoder LLM: frozen weights plus optional trainable LoRA and `<|embed_token|>` state.
#[derive(Debug, Clone)]
pub struct Model {
    /// Architecture.
    pub config: ModelConfig,
    /// Frozen base weights.
    pub weights: Weights,
    /// `<|embed_token|>` parameters, once added.
    pub embed_token: Option<EmbedTokenParams>,
    /// LoRA adapters, if any.
    pub lora: Option<Lora>,
    /// When false, the adapters are ignored (the frozen reference policy for KL terms, without
    /// a second copy of the weights).
    pub lora_enabled: bool,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

/// Per-forward options.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Also return each block's output (before the final norm), as transformers'
    /// `hidden_states[1..]`.
    pub capture_layers: bool,
}

/// Hidden states from a forward call.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Final-norm hidden states `[b, t, d]`.
    pub hidden: Tensor,
    /// Block outputs `[b, t, d]` when requested.
    pub layers: Vec<Tensor>,
}

impl Model {
    /// Wraps loaded weights.
    pub fn new(config: ModelConfig, weights: Weights) -> Result<Self> {
        let dtype = weights.embed.dtype();
        let device = weights.embed.device().clone();
        let hd = config.head_dim;
        // f32 like transformers' rotary embedding, so angles agree to the last bit or two.
        let inv_freq = (0..hd / 2)
            .map(|i| (1.0 / config.rope_theta.powf(2.0 * i as f64 / hd as f64)) as f32)
            .collect();
        Ok(Model {
            config,
            weights,
            embed_token: None,
            lora: None,
            lora_enabled: true,
            inv_freq,
            dtype,
            device,
        })
    }

    /// Element type of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Converts weights and trainable state to another dtype (tests use f64).
    pub fn to_dtype(&self, dtype: DType) -> Result<Model> {
        let mut m = Model::new(self.config.clone(), self.weights.to_dtype(dtype)?)?;
        if let Some(e) = &self.embed_token {
            let conv = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(dtype)?);
            m.embed_token = Some(EmbedTokenParams {
                id: e.id,
                row: conv(&e.row)?,
                head_row: e.head_row.as_ref().map(conv).transpose()?,
            });
        }
        if self.lora.is_some() {
            return Err(Error::Invalid(
                "convert the model before adding LoRA adapters".into(),
            ));
        }
        Ok(m)
    }

    /// Rows of the logits: the base vocabulary plus `<|embed_token|>` when it lies past it.
    pub fn output_vocab(&self) -> usize {
        match &self.embed_token {
            Some(e) => self.config.vocab_size.max(e.id as usize + 1),
            None => self.config.vocab_size,
        }
    }

    /// Adds `<|embed_token|>` with id `id` (idempotent for the same id). `id` may reuse one of
    /// the unused padding rows some checkpoints carry (Qwen) or be the next id past the table.
    pub fn add_embed_token(&mut self, id: u32) -> Result<()> {
        if let Some(e) = &self.embed_token {
            if e.id == id {
                return Ok(());
            }
            return Err(Error::Invalid(format!(
                "model already has <|embed_token|> with id {}, asked for {id}",
                e.id
            )));
        }
        if id as usize > self.config.vocab_size {
            return Err(Error::Invalid(format!(
                "<|embed_token|> id {id} leaves a gap after the {}-row embedding",
                self.config.vocab_size
            )));
        }
        let mean = |t: &Tensor| -> Result<Var> {
            let rows = t.narrow(0, 0, (id as usize).min(t.dim(0)?))?;
            Ok(Var::from_tensor(&rows.mean_keepdim(0)?)?)
        };
        let row = mean(&self.weights.embed)?;
        let head_row = match &self.weights.lm_head {
            Some(h) => Some(mean(h)?),
            None => None,
        };
        self.embed_token = Some(EmbedTokenParams { id, row, head_row });
        Ok(())
    }

    /// Attaches fresh LoRA adapters (replacing any).
    pub fn add_lora(&mut self, config: LoraConfig, seed: u64) -> Result<()> {
        let c = &self.config;
        let (d, q, kv, ff) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let dims = |t: LoraTarget| match t {
            LoraTarget::Q => (d, q),
            LoraTarget::K | LoraTarget::V => (d, kv),
            LoraTarget::O => (q, d),
            LoraTarget::Gate | LoraTarget::Up => (d, ff),
            LoraTarget::Down => (ff, d),
        };
        self.lora = Some(Lora::new(
            config,
            c.num_layers,
            dims,
            seed,
            self.dtype,
            &self.device,
        )?);
        Ok(())
    }

    /// Every trainable tensor with a stable name: LoRA factors and the embed-token rows.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        if let Some(e) = &self.embed_token {
            out.push(("embed_token.row".to_string(), e.row.clone()));
            if let Some(h) = &e.head_row {
                out.push(("embed_token.head_row".to_string(), h.clone()));
            }
        }
        if let Some(l) = &self.lora {
            out.extend(l.named_vars());
        }
        out
    }

    fn active_lora(&self) -> Option<&Lora> {
        self.lora.as_ref().filter(|_| self.lora_enabled)
    }

    /// Input embeddings `[n, d]` for flat ids; the embed-token row is substituted with a
    /// differentiable select so its gradient flows.
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let e = self.embed_token.as_ref();
        let vocab = self.config.vocab_size as u32;
        let safe: Vec<u32> = ids
            .iter()
            .map(|&i| if i >= vocab { 0 } else { i })
            .collect();
        if let Some(bad) = ids
            .iter()
            .find(|&&i| i >= vocab && Some(i) != e.map(|e| e.id))
        {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let idx = Tensor::new(safe.as_slice(), &self.device)?;
        let base = self.weights.embed.index_select(&idx, 0)?;
        match e {
            Some(e) if ids.contains(&e.id) => {
                let m: Vec<u8> = ids.iter().map(|&i| (i == e.id) as u8).collect();
                let m = Tensor::from_vec(m, (ids.len(), 1), &self.device)?
                    .broadcast_as(base.shape())?;
                let row = e.row.as_tensor().broadcast_as(base.shape())?;
                Ok(m.where_cond(&row, &base)?)
            }
            _ => Ok(base),
        }
    }

    /// Logits `[.., output_vocab]` from final-norm hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let d = *dims.last().expect("hidden has a feature dim");
        let h = hidden.reshape(((), d))?;
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        let mut logits = frozen_linear(&h, &head.t()?)?;
        if let Some(e) = &self.embed_token {
            let row = e.head_row.as_ref().unwrap_or(&e.row).as_tensor();
            let col = h.matmul(&row.t()?)?; // [n, 1]
            let v = self.config.vocab_size;
            if e.id as usize == v {
                logits = Tensor::cat(&[&logits, &col], 1)?;
            } else {
                let mut m = vec![0u8; v];
                m[e.id as usize] = 1;
                let m = Tensor::from_vec(m, (1, v), &self.device)?.broadcast_as(logits.shape())?;
                logits = m.where_cond(&col.broadcast_as(logits.shape())?, &logits)?;
            }
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty") = logits.dim(1)?;
        Ok(logits.reshape(out_dims)?)
    }

    /// Final-norm hidden states `[b, t, d]`.
    pub fn forward(
        &self,
        batch: &Batch,
        path: Path,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_with(batch, path, cache, ForwardOptions::default())?
            .hidden)
    }

    /// Forward pass with options.
    pub fn forward_with(
        &self,
        batch: &Batch,
        path: Path,
        mut cache: Option<&mut KvCache>,
        opts: ForwardOptions,
    ) -> Result<ForwardOutput> {
        let (b, t) = (batch.b, batch.t);
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let s = past + t;
        if batch.ids.len() != b * t
            || batch.positions.len() != b * t
            || batch.key_mask.len() != b * s
        {
            return Err(Error::Invalid(format!(
                "batch shape mismatch: b={b} t={t} past={past}: {} ids, {} positions, {} mask entries",
                batch.ids.len(),
                batch.positions.len(),
                batch.key_mask.len()
            )));
        }
        let d = self.config.hidden_size;
        let (cos, sin) = self.rope_tables(batch)?;
        let bias = self.attention_bias(batch, past)?;
        let mut x = self.embed(&batch.ids)?.reshape((b, t, d))?;
        if path == Path::Fast {
            // The embed-token row is a Var; without this the residual stream of every block
            // would be recorded for a backward pass that the fast path never runs.
            x = x.detach();
        }
        let mut layers = Vec::new();
        for (i, lw) in self.weights.layers.iter().enumerate() {
            let cache_i = cache.as_deref_mut();
            x = self.block(i, lw, &x, &cos, &sin, &bias, path, cache_i)?;
            if opts.capture_layers {
                layers.push(x.clone());
            }
        }
        let hidden = self.rms_norm(&x, &self.weights.norm, path)?;
        Ok(ForwardOutput { hidden, layers })
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, path: Path) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        Ok(match path {
            Path::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?,
            Path::Diff => candle_nn::ops::rms_norm_slow(x, w, eps)?,
        })
    }

    /// `cos`, `sin` of shape `[b, t, hd/2]`.
    fn rope_tables(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(batch.positions.len() * half);
        let mut sin = Vec::with_capacity(batch.positions.len() * half);
        for &p in &batch.positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (batch.b, batch.t, half);
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Additive attention bias `[b, 1, 1, t, s]`: 0 where query `i` (absolute index
    /// `past + i`) may see key `j` (causal and not padding), a large negative value elsewhere.
    /// A finite value (not -inf) keeps fully-masked padding rows finite.
    fn attention_bias(&self, batch: &Batch, past: usize) -> Result<Tensor> {
        let (b, t) = (batch.b, batch.t);
        let s = past + t;
        let neg = f32::MIN / 2.0;
        let mut v = Vec::with_capacity(b * t * s);
        for r in 0..b {
            let km = &batch.key_mask[r * s..(r + 1) * s];
            for i in 0..t {
                let qi = past + i;
                v.extend((0..s).map(|j| if j <= qi && km[j] { 0.0 } else { neg }));
            }
        }
        Ok(Tensor::from_vec(v, (b, 1, 1, t, s), &self.device)?.to_dtype(self.dtype)?)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
        Ok(match path {
            Path::Fast => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?,
            Path::Diff => {
                // x: [b, h, t, hd]; cos/sin: [b, t, hd/2] → [b, 1, t, hd]
                let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
                let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
                let hd = x.dim(D::Minus1)?;
                let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
                let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
                let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
                (x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        li: usize,
        w: &LayerWeights,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        path: Path,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, d) = x.dims3()?;
        let (h, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let lora = self.active_lora();
        let lo = |tgt: LoraTarget, inp: &Tensor, y: Tensor| -> Result<Tensor> {
            match (lora, path) {
                // The adapters are Vars: on the fast path their output must not start an
                // autograd graph that would keep every later activation alive.
                (Some(l), Path::Fast) => Ok(l.apply(li, tgt, inp, y)?.detach()),
                (Some(l), Path::Diff) => l.apply(li, tgt, inp, y),
                (None, _) => Ok(y),
            }
        };

        // Attention.
        let xn = self.rms_norm(x, &w.attn_norm, path)?.reshape((b * t, d))?;
        let mut qkv = frozen_linear(&xn, &w.wqkv_t)?;
        if let Some(bias) = &w.bqkv {
            qkv = qkv.broadcast_add(bias)?;
        }
        let q = lo(LoraTarget::Q, &xn, qkv.narrow(1, 0, h * hd)?)?;
        let k = lo(LoraTarget::K, &xn, qkv.narrow(1, h * hd, kvh * hd)?)?;
        let v = lo(LoraTarget::V, &xn, qkv.narrow(1, (h + kvh) * hd, kvh * hd)?)?;
        let mut q = q.reshape((b, t, h, hd))?;
        let mut k = k.reshape((b, t, kvh, hd))?;
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            q = self.rms_norm(&q, qn, path)?;
            k = self.rms_norm(&k, kn, path)?;
        }
        let q = self.rope(&q.transpose(1, 2)?.contiguous()?, cos, sin, path)?;
        let k = self.rope(&k.transpose(1, 2)?.contiguous()?, cos, sin, path)?;
        let v = v.reshape((b, t, kvh, hd))?.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(cache) => cache.append(li, k, v)?,
            None => (k, v),
        };
        let s = k.dim(2)?;
        // GQA without copying K/V: the `rep` query heads sharing one KV head are stacked
        // along the sequence axis, so one batched matmul per KV head covers them all.
        let rep = h / kvh;
        let qg = q.reshape((b, kvh, rep * t, hd))?;
        let scores = (qg.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.reshape((b, kvh, rep, t, s))?.broadcast_add(bias)?;
        let probs = match path {
            Path::Fast => candle_nn::ops::softmax_last_dim(&scores)?,
            Path::Diff => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        let attn = probs.reshape((b, kvh, rep * t, s))?.matmul(&v)?;
        let attn = attn
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, h * hd))?;
        let o = lo(LoraTarget::O, &attn, frozen_linear(&attn, &w.wo_t)?)?;
        let x = (x + o.reshape((b, t, d))?)?;

        // MLP (SwiGLU).
        let xn = self.rms_norm(&x, &w.ffn_norm, path)?.reshape((b * t, d))?;
        let ff = c.intermediate_size;
        let gu = frozen_linear(&xn, &w.w_gate_up_t)?;
        let gate = lo(LoraTarget::Gate, &xn, gu.narrow(1, 0, ff)?)?;
        let up = lo(LoraTarget::Up, &xn, gu.narrow(1, ff, ff)?)?;
        let act = (gate.silu()? * up)?;
        let down = lo(LoraTarget::Down, &act, frozen_linear(&act, &w.w_down_t)?)?;
        Ok((x + down.reshape((b, t, d))?)?)
    }

    /// Hidden state `[d]` of row `row` at index `idx` of a `[b, t, d]` output.
    pub fn pick(hidden: &Tensor, row: usize, idx: usize) -> Result<Tensor> {
        Ok(hidden.i((row, idx))?)
    }
}
