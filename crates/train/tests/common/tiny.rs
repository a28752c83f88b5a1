//! A tiny random decoder built in memory (no files, no tokenizer), for tests of the training
//! code: 2 blocks, d=32, 4 heads / 2 KV heads of width 8, ff=64, 64 tokens + `<|embed_token|>`.

use candle_core::{DType, Device, Tensor};
use search_r3_model::weights::{LayerWeights, Weights};
use search_r3_model::{Arch, LoraConfig, LoraTarget, Model, ModelConfig, TextTokenizer};

/// Ordinary vocabulary size.
pub const VOCAB: usize = 64;
/// Id of `<|embed_token|>`.
pub const EMBED: u32 = VOCAB as u32;
/// Model width.
pub const D: usize = 32;
/// "The embedding is": fixed assistant tokens before the embed token.
pub const ASSISTANT: [u32; 3] = [60, 61, 62];

/// A tiny xorshift generator: the tests' data depends only on the seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next raw value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// A tensor of uniform values scaled by `scale`.
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.uniform() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
    /// Random ordinary tokens (below the fixed assistant ids).
    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % 60) as u32).collect()
    }
}

/// The base model (embed token added, no adapters), drawing its weights from `rng`.
pub fn tiny_base(rng: &mut Rng) -> Model {
    let (h, kv, hd, ff, layers) = (4, 2, 8, 64, 2);
    let config = ModelConfig {
        arch: Arch::Llama,
        hidden_size: D,
        intermediate_size: ff,
        num_layers: layers,
        num_heads: h,
        num_kv_heads: kv,
        head_dim: hd,
        vocab_size: VOCAB,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        qkv_bias: false,
        qk_norm: false,
        max_position_embeddings: 256,
    };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let inv = |n: usize| 1.0 / (n as f32).sqrt();
    let layer_weights = (0..layers)
        .map(|_| LayerWeights {
            attn_norm: ones(D),
            wqkv_t: rng.tensor(&[D, (h + 2 * kv) * hd], inv(D)),
            bqkv: None,
            q_norm: None,
            k_norm: None,
            wo_t: rng.tensor(&[h * hd, D], inv(h * hd)),
            ffn_norm: ones(D),
            w_gate_up_t: rng.tensor(&[D, 2 * ff], inv(D)),
            w_down_t: rng.tensor(&[ff, D], inv(ff)),
        })
        .collect();
    let weights = Weights {
        embed: rng.tensor(&[VOCAB, D], 1.0),
        layers: layer_weights,
        norm: ones(D),
        lm_head: None,
    };
    let mut model = Model::new(config, weights).unwrap();
    model.add_embed_token(EMBED).unwrap();
    model
}

/// [`tiny_base`] from `seed` with rank-4 LoRA (α 8) on `targets`, initialised from `lora_seed`;
/// B = 0, so it computes what the base computes until B moves.
pub fn tiny_with_lora(seed: u64, targets: &[LoraTarget], lora_seed: u64) -> Model {
    let mut m = tiny_base(&mut Rng::new(seed));
    m.add_lora(
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: targets.to_vec(),
        },
        lora_seed,
    )
    .unwrap();
    m
}

/// Word-level tokenizer over the tiny vocabulary (`t0` … `t63`) plus `<|embed_token|>`,
/// written to `dir/tokenizer.json`.
pub fn tokenizer(dir: &std::path::Path) -> TextTokenizer {
    let mut vocab = serde_json::Map::new();
    for i in 0..VOCAB {
        vocab.insert(format!("t{i}"), i.into());
    }
    vocab.insert("<|embed_token|>".into(), EMBED.into());
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": EMBED, "content": "<|embed_token|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    let mut tok = TextTokenizer::from_hf_dir(dir).unwrap();
    assert_eq!(tok.add_embed_token().unwrap(), EMBED);
    tok
}

/// What closes a thought in the tiny vocabulary: "t60 t61 t62 <|embed_token|>" (the tiny
/// `The embedding is <|embed_token|>`).
#[allow(dead_code)]
pub fn closer() -> search_r3_core::embedder::ThoughtCloser {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    search_r3_core::embedder::ThoughtCloser::new(&tok, "t60 t61 t62 <|embed_token|>").unwrap()
}
