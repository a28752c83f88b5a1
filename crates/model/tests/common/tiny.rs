//! Tiny random models that the tests write themselves: a [`Spec`] (d=16, 2 blocks, 4 query
//! heads, 2 KV heads, ff=32; llama, qwen2 and qwen3 flavours), seeded random weights under HF
//! names, a 64-token byte-level BPE vocabulary, and writers for GGUF files (q/k permuted as
//! llama.cpp does) and HF directories (optionally sharded).
//!
//! Weights come from a seeded xorshift generator, so every run sees the same numbers.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path as FsPath;

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers.
// ---------------------------------------------------------------------------------------------

/// xorshift64* with a seed mixer: deterministic random numbers.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        // xorshift64*
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

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Tiny model specification and random weights (HF names, PyTorch [out, in] layout).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Spec {
    pub arch: &'static str,
    pub d: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ff: usize,
    /// Rows of the stored embedding (may exceed the tokenizer's vocabulary, as Qwen pads).
    pub vocab: usize,
    pub tied: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub rope_theta: f64,
    pub eps: f64,
    pub ctx: usize,
}

impl Spec {
    pub fn llama() -> Spec {
        Spec {
            arch: "llama",
            d: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            ff: 32,
            vocab: VOCAB,
            tied: true,
            qkv_bias: false,
            qk_norm: false,
            rope_theta: 100_000.0,
            eps: 1e-5,
            ctx: 256,
        }
    }

    pub fn qwen2() -> Spec {
        Spec {
            arch: "qwen2",
            tied: false,
            qkv_bias: true,
            rope_theta: 1_000_000.0,
            eps: 1e-6,
            ctx: 512,
            ..Spec::llama()
        }
    }

    /// Qwen3: per-head q/k norms and a head width that is not d / heads.
    pub fn qwen3() -> Spec {
        Spec {
            arch: "qwen3",
            head_dim: 8,
            tied: true,
            qk_norm: true,
            rope_theta: 1_000_000.0,
            eps: 1e-6,
            ..Spec::llama()
        }
    }
}

/// Tensor name → (shape, row-major data).
pub type Raw = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

pub fn random_weights(spec: &Spec, seed: u64) -> Raw {
    let mut rng = Rng::new(seed);
    let mut w = Raw::new();
    let (d, hd) = (spec.d, spec.head_dim);
    let (q_out, kv_out) = (spec.heads * hd, spec.kv_heads * hd);
    let put = |w: &mut Raw, name: String, shape: Vec<usize>, data: Vec<f32>| {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        w.insert(name, (shape, data));
    };
    let lin = |rng: &mut Rng, out: usize, inp: usize| rng.vec(out * inp, 1.7 / (inp as f32).sqrt());
    let norm = |rng: &mut Rng, n: usize| {
        rng.vec(n, 0.3)
            .into_iter()
            .map(|x| 1.0 + x)
            .collect::<Vec<_>>()
    };
    put(
        &mut w,
        "model.embed_tokens.weight".into(),
        vec![spec.vocab, d],
        rng.vec(spec.vocab * d, 1.0),
    );
    if !spec.tied {
        put(
            &mut w,
            "lm_head.weight".into(),
            vec![spec.vocab, d],
            rng.vec(spec.vocab * d, 0.5),
        );
    }
    put(
        &mut w,
        "model.norm.weight".into(),
        vec![d],
        norm(&mut rng, d),
    );
    for i in 0..spec.layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        put(
            &mut w,
            p("input_layernorm.weight"),
            vec![d],
            norm(&mut rng, d),
        );
        put(
            &mut w,
            p("self_attn.q_proj.weight"),
            vec![q_out, d],
            lin(&mut rng, q_out, d),
        );
        put(
            &mut w,
            p("self_attn.k_proj.weight"),
            vec![kv_out, d],
            lin(&mut rng, kv_out, d),
        );
        put(
            &mut w,
            p("self_attn.v_proj.weight"),
            vec![kv_out, d],
            lin(&mut rng, kv_out, d),
        );
        if spec.qkv_bias {
            put(
                &mut w,
                p("self_attn.q_proj.bias"),
                vec![q_out],
                rng.vec(q_out, 0.8),
            );
            put(
                &mut w,
                p("self_attn.k_proj.bias"),
                vec![kv_out],
                rng.vec(kv_out, 0.8),
            );
            put(
                &mut w,
                p("self_attn.v_proj.bias"),
                vec![kv_out],
                rng.vec(kv_out, 0.8),
            );
        }
        if spec.qk_norm {
            put(
                &mut w,
                p("self_attn.q_norm.weight"),
                vec![hd],
                norm(&mut rng, hd),
            );
            put(
                &mut w,
                p("self_attn.k_norm.weight"),
                vec![hd],
                norm(&mut rng, hd),
            );
        }
        put(
            &mut w,
            p("self_attn.o_proj.weight"),
            vec![d, q_out],
            lin(&mut rng, d, q_out),
        );
        put(
            &mut w,
            p("post_attention_layernorm.weight"),
            vec![d],
            norm(&mut rng, d),
        );
        put(
            &mut w,
            p("mlp.gate_proj.weight"),
            vec![spec.ff, d],
            lin(&mut rng, spec.ff, d),
        );
        put(
            &mut w,
            p("mlp.up_proj.weight"),
            vec![spec.ff, d],
            lin(&mut rng, spec.ff, d),
        );
        put(
            &mut w,
            p("mlp.down_proj.weight"),
            vec![d, spec.ff],
            lin(&mut rng, d, spec.ff),
        );
    }
    w
}

/// The GGUF name of an HF tensor name.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (i, part) = rest.split_once('.').unwrap();
    let g = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{i}.{g}")
}

/// llama.cpp's q/k row permutation (`convert_hf_to_gguf.py` `LlamaModel.permute`):
/// `w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(out, in)`.
pub fn permute_rows(data: &[f32], shape: &[usize], n_head: usize) -> Vec<f32> {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for j in 0..half {
                let src = h * hd + s * half + j;
                let dst = h * hd + j * 2 + s;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tiny byte-level BPE vocabulary (64 tokens).
// ---------------------------------------------------------------------------------------------

pub const VOCAB: usize = 64;
pub const EOS: &str = "<|endoftext|>";

pub const MERGES: &[(&str, &str)] = &[
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
    ("Ġ", "t"),
    ("Ġt", "he"),
    ("e", "m"),
    ("b", "e"),
    ("d", "d"),
    ("em", "be"),
    ("embe", "dd"),
    ("i", "n"),
    ("in", "g"),
    ("embedd", "ing"),
    ("Ġ", "a"),
    ("Ġ", "s"),
];

/// `<|endoftext|>`, a–z, `Ġ` (space), punctuation, digits, then one token per merge.
pub fn vocab_tokens() -> Vec<String> {
    let mut v = vec![EOS.to_string()];
    v.extend(('a'..='z').map(|c| c.to_string()));
    v.push("Ġ".into());
    v.extend([".", ",", "!", "?", "'"].iter().map(|s| s.to_string()));
    v.extend(('0'..='9').map(|c| c.to_string()));
    v.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    assert_eq!(v.len(), VOCAB);
    v
}

pub fn tok_id(t: &str) -> u32 {
    vocab_tokens()
        .iter()
        .position(|x| x == t)
        .unwrap_or_else(|| panic!("no token {t}")) as u32
}

// ---------------------------------------------------------------------------------------------
// Writers.
// ---------------------------------------------------------------------------------------------

pub fn gguf_metadata(spec: &Spec) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let a = spec.arch;
    let mut md = vec![
        ("general.architecture".to_string(), V::String(a.into())),
        ("general.name".to_string(), V::String("tiny".into())),
        (format!("{a}.context_length"), V::U32(spec.ctx as u32)),
        (format!("{a}.embedding_length"), V::U32(spec.d as u32)),
        (format!("{a}.block_count"), V::U32(spec.layers as u32)),
        (format!("{a}.feed_forward_length"), V::U32(spec.ff as u32)),
        (
            format!("{a}.attention.head_count"),
            V::U32(spec.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            V::U32(spec.kv_heads as u32),
        ),
        (
            format!("{a}.rope.freq_base"),
            V::F32(spec.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            V::F32(spec.eps as f32),
        ),
    ];
    if spec.head_dim * spec.heads != spec.d {
        md.push((
            format!("{a}.attention.key_length"),
            V::U32(spec.head_dim as u32),
        ));
        md.push((
            format!("{a}.attention.value_length"),
            V::U32(spec.head_dim as u32),
        ));
    }
    let tokens = vocab_tokens();
    md.extend([
        ("tokenizer.ggml.model".to_string(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), V::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            V::Array(tokens.iter().map(|t| V::String(t.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            V::Array(
                tokens
                    .iter()
                    .map(|t| V::I32(if t == EOS { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            V::Array(
                MERGES
                    .iter()
                    .map(|(a, b)| V::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".to_string(), V::U32(0)),
        ("tokenizer.ggml.eos_token_id".to_string(), V::U32(0)),
    ]);
    md
}

/// GGUF tensors in the order llama.cpp writes them, q/k permuted for llama when `permute`.
pub fn gguf_tensors(spec: &Spec, w: &Raw, permute: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut names: Vec<&String> = w.keys().collect();
    let rank = |n: &str| -> (usize, usize) {
        match n {
            "model.embed_tokens.weight" => (0, 0),
            "model.norm.weight" => (usize::MAX - 1, 0),
            "lm_head.weight" => (usize::MAX, 0),
            _ => {
                let i: usize = n.split('.').nth(2).unwrap().parse().unwrap();
                (1 + i, 0)
            }
        }
    };
    names.sort_by_key(|n| (rank(n), n.to_string()));
    names
        .into_iter()
        .map(|n| {
            let (shape, data) = &w[n];
            let is_q = n.contains("q_proj");
            let is_k = n.contains("k_proj");
            let data = if permute && spec.arch == "llama" && (is_q || is_k) {
                permute_rows(data, shape, if is_q { spec.heads } else { spec.kv_heads })
            } else {
                data.clone()
            };
            (gguf_name(n), shape.clone(), data)
        })
        .collect()
}

pub fn write_gguf_raw(
    path: &FsPath,
    md: &[(String, gguf_file::Value)],
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) {
    let qts: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let t = Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap();
            (n.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

pub fn write_gguf(path: &FsPath, spec: &Spec, w: &Raw) {
    write_gguf_raw(path, &gguf_metadata(spec), &gguf_tensors(spec, w, true));
}

pub fn hf_config(spec: &Spec) -> serde_json::Value {
    let mut c = serde_json::json!({
        "architectures": ["TinyForCausalLM"],
        "model_type": spec.arch,
        "hidden_size": spec.d,
        "intermediate_size": spec.ff,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.eps,
        "tie_word_embeddings": spec.tied,
        "max_position_embeddings": spec.ctx,
        "torch_dtype": "float32",
    });
    if spec.head_dim * spec.heads != spec.d {
        c["head_dim"] = serde_json::json!(spec.head_dim);
    }
    c
}

pub fn write_safetensors(path: &FsPath, w: &Raw, names: &[&String]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let (shape, data) = &w[*n];
            let b = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.to_string(), shape.clone(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    let md = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(md), path).unwrap();
}

pub fn write_tokenizer_json(path: &FsPath) {
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let vocab: Vocab = vocab_tokens()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let merges = MERGES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens([tokenizers::AddedToken::from(EOS, true)])
        .unwrap();
    tok.save(path, true).unwrap();
}

/// Writes an HF directory: config.json, tokenizer files and `shards` safetensors files (with an
/// index when more than one).
pub fn write_hf_dir(dir: &FsPath, spec: &Spec, w: &Raw, shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&hf_config(spec)).unwrap(),
    )
    .unwrap();
    write_tokenizer_json(&dir.join("tokenizer.json"));
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}).to_string(),
    )
    .unwrap();
    let names: Vec<&String> = w.keys().collect();
    if shards <= 1 {
        write_safetensors(&dir.join("model.safetensors"), w, &names);
        return;
    }
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        write_safetensors(&dir.join(&file), w, chunk);
        for n in chunk {
            weight_map.insert(n.to_string(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}
