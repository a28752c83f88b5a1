//! Tests on tiny random models that the tests write themselves (GGUF files and HF directories),
//! so every loader path, both forward paths, LoRA, gradients and the `<|embed_token|>` row are
//! checked without the real checkpoints.
//!
//! The tiny models: d=16, 2 blocks, 4 query heads, 2 KV heads, ff=32, a 64-token byte-level
//! BPE vocabulary. Weights come from a seeded xorshift generator, so every run sees the same
//! numbers.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use search_r3_model::fetch::ModelFormat;
use search_r3_model::load::load_path;
use search_r3_model::{
    state, Batch, Error, LoadOptions, LoadedModel, LoraConfig, LoraTarget, Model, Path,
};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path as FsPath, PathBuf};

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers.
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Tiny model specification and random weights (HF names, PyTorch [out, in] layout).
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Spec {
    arch: &'static str,
    d: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ff: usize,
    /// Rows of the stored embedding (may exceed the tokenizer's vocabulary, as Qwen pads).
    vocab: usize,
    tied: bool,
    qkv_bias: bool,
    qk_norm: bool,
    rope_theta: f64,
    eps: f64,
    ctx: usize,
}

impl Spec {
    fn llama() -> Spec {
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

    fn qwen2() -> Spec {
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
    fn qwen3() -> Spec {
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
type Raw = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn random_weights(spec: &Spec, seed: u64) -> Raw {
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
fn gguf_name(hf: &str) -> String {
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
fn permute_rows(data: &[f32], shape: &[usize], n_head: usize) -> Vec<f32> {
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

const VOCAB: usize = 64;
const EOS: &str = "<|endoftext|>";

const MERGES: &[(&str, &str)] = &[
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
fn vocab_tokens() -> Vec<String> {
    let mut v = vec![EOS.to_string()];
    v.extend(('a'..='z').map(|c| c.to_string()));
    v.push("Ġ".into());
    v.extend([".", ",", "!", "?", "'"].iter().map(|s| s.to_string()));
    v.extend(('0'..='9').map(|c| c.to_string()));
    v.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    assert_eq!(v.len(), VOCAB);
    v
}

fn tok_id(t: &str) -> u32 {
    vocab_tokens()
        .iter()
        .position(|x| x == t)
        .unwrap_or_else(|| panic!("no token {t}")) as u32
}

// ---------------------------------------------------------------------------------------------
// Writers.
// ---------------------------------------------------------------------------------------------

fn gguf_metadata(spec: &Spec) -> Vec<(String, gguf_file::Value)> {
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
fn gguf_tensors(spec: &Spec, w: &Raw, permute: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
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

fn write_gguf_raw(
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

fn write_gguf(path: &FsPath, spec: &Spec, w: &Raw) {
    write_gguf_raw(path, &gguf_metadata(spec), &gguf_tensors(spec, w, true));
}

fn hf_config(spec: &Spec) -> serde_json::Value {
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

fn write_safetensors(path: &FsPath, w: &Raw, names: &[&String]) {
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

fn write_tokenizer_json(path: &FsPath) {
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
fn write_hf_dir(dir: &FsPath, spec: &Spec, w: &Raw, shards: usize) {
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

// ---------------------------------------------------------------------------------------------
// Loading and running.
// ---------------------------------------------------------------------------------------------

fn opts(add_embed_token: bool) -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        add_embed_token,
    }
}

/// Loads without letting a panic escape as a panic: a loader that panics on bad input fails the
/// test with a message saying so.
fn try_load(
    path: &FsPath,
    format: ModelFormat,
    add_embed_token: bool,
) -> Result<LoadedModel, Error> {
    let p = path.to_path_buf();
    match std::panic::catch_unwind(move || load_path(&p, format, &opts(add_embed_token))) {
        Ok(r) => r,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("loader PANICKED on {}: {msg}", path.display())
        }
    }
}

fn load(path: &FsPath, format: ModelFormat) -> LoadedModel {
    try_load(path, format, true).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn load_err(path: &FsPath, format: ModelFormat) -> String {
    match try_load(path, format, true) {
        Ok(_) => panic!("{} loaded, expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            msg.contains(n),
            "error message {msg:?} does not mention {n:?}"
        );
    }
}

/// Token ids used by most tests (all below the base vocabulary).
fn seqs() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 27, 40, 12, 63, 2], vec![3, 60, 44, 7, 50]]
}

fn seqs_with_embed(id: u32) -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 27, id, 12, 63, 2], vec![3, 60, 44, 7, id]]
}

fn hidden(model: &Model, seqs: &[Vec<u32>], path: Path) -> Tensor {
    let batch = Batch::left_padded(seqs, 0).unwrap();
    model.forward(&batch, path, None).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn flat64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Max |a-b| over the real (non-padding) positions of a left-padded batch.
fn real_positions_diff(a: &Tensor, b: &Tensor, seqs: &[Vec<u32>]) -> f32 {
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let mut m = 0.0f32;
    for (r, s) in seqs.iter().enumerate() {
        for i in t - s.len()..t {
            let x = flat(&Model::pick(a, r, i).unwrap());
            let y = flat(&Model::pick(b, r, i).unwrap());
            m = m.max(max_abs_diff(&x, &y));
        }
    }
    m
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn set_var_random(v: &Var, rng: &mut Rng, scale: f32) {
    let n = v.elem_count();
    let t = Tensor::from_vec(rng.vec(n, scale), v.shape(), v.device())
        .unwrap()
        .to_dtype(v.dtype())
        .unwrap();
    v.set(&t).unwrap();
}

/// Sets every LoRA B factor (zero at init) to random values so adapters change the output.
fn randomize_lora_b(model: &Model, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut n = 0;
    for (name, v) in model.trainable_vars() {
        if name.ends_with("lora_b") {
            set_var_random(&v, &mut rng, 0.3);
            n += 1;
        }
    }
    assert!(n > 0, "no LoRA B factors");
}

fn all_targets(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        targets: LoraTarget::ALL.to_vec(),
    }
}

/// Every frozen base tensor, with a name for messages.
fn base_tensors(model: &Model) -> Vec<(String, Tensor)> {
    let w = &model.weights;
    let mut out = vec![
        ("embed".to_string(), w.embed.clone()),
        ("norm".to_string(), w.norm.clone()),
    ];
    if let Some(h) = &w.lm_head {
        out.push(("lm_head".into(), h.clone()));
    }
    for (i, l) in w.layers.iter().enumerate() {
        out.push((format!("{i}.attn_norm"), l.attn_norm.clone()));
        out.push((format!("{i}.wqkv_t"), l.wqkv_t.clone()));
        out.push((format!("{i}.wo_t"), l.wo_t.clone()));
        out.push((format!("{i}.ffn_norm"), l.ffn_norm.clone()));
        out.push((format!("{i}.w_gate_up_t"), l.w_gate_up_t.clone()));
        out.push((format!("{i}.w_down_t"), l.w_down_t.clone()));
        for (n, t) in [
            ("bqkv", &l.bqkv),
            ("q_norm", &l.q_norm),
            ("k_norm", &l.k_norm),
        ] {
            if let Some(t) = t {
                out.push((format!("{i}.{n}"), t.clone()));
            }
        }
    }
    out
}

/// Writes `spec` with weights from `seed` as both a GGUF file and an HF directory under `dir`.
fn write_both(dir: &FsPath, spec: &Spec, seed: u64) -> (PathBuf, PathBuf, Raw) {
    let w = random_weights(spec, seed);
    let gguf = dir.join(format!("tiny-{}.gguf", spec.arch));
    let hf = dir.join(format!("tiny-{}-hf", spec.arch));
    write_gguf(&gguf, spec, &w);
    write_hf_dir(&hf, spec, &w, 1);
    (gguf, hf, w)
}

fn raw_tensor(w: &Raw, name: &str) -> Tensor {
    let (shape, data) = &w[name];
    Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. GGUF llama: config, and q/k un-permutation (GGUF and HF give the same hidden states).
// ---------------------------------------------------------------------------------------------

#[test]
fn gguf_llama_config_and_unpermutation_match_hf() {
    let dir = tmp();
    let spec = Spec::llama();
    let (gguf, hf, w) = write_both(dir.path(), &spec, 1);
    let g = load(&gguf, ModelFormat::Gguf);
    let h = load(&hf, ModelFormat::HfDir);

    let c = &g.model.config;
    assert_eq!(c.arch, search_r3_model::Arch::Llama);
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (16, 32, 2, 4, 2, 4)
    );
    assert_eq!(c.vocab_size, VOCAB);
    assert_eq!(c.rope_theta, 100_000.0);
    assert!(
        (c.rms_norm_eps - 1e-5).abs() < 1e-12,
        "eps {}",
        c.rms_norm_eps
    );
    assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
    assert_eq!(c.max_position_embeddings, 256);
    // Both formats describe the same model (eps differs only by the f32 rounding of GGUF).
    let mut hc = h.model.config.clone();
    hc.rms_norm_eps = c.rms_norm_eps;
    assert_eq!(&hc, c);

    // The loaded q rows are the HF (unpermuted) rows.
    let wqkv = flat(
        &g.model.weights.layers[0]
            .wqkv_t
            .t()
            .unwrap()
            .contiguous()
            .unwrap(),
    );
    let q_hf = &w["model.layers.0.self_attn.q_proj.weight"].1;
    assert_eq!(
        &wqkv[..q_hf.len()],
        q_hf.as_slice(),
        "GGUF q rows were not un-permuted"
    );

    let s = seqs();
    let a = flat(&hidden(&g.model, &s, Path::Fast));
    let b = flat(&hidden(&h.model, &s, Path::Fast));
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= 1e-5, "GGUF vs HF hidden states differ by {diff}");

    // Sensitivity: a GGUF written WITHOUT llama.cpp's permutation is loaded as if permuted, so
    // its hidden states must differ — otherwise the comparison above proves nothing.
    let unperm = dir.path().join("unpermuted.gguf");
    write_gguf_raw(
        &unperm,
        &gguf_metadata(&spec),
        &gguf_tensors(&spec, &w, false),
    );
    let u = load(&unperm, ModelFormat::Gguf);
    let c2 = flat(&hidden(&u.model, &s, Path::Fast));
    assert!(
        max_abs_diff(&a, &c2) > 1e-3,
        "the q/k permutation does not affect the output"
    );
}

#[test]
fn gguf_tokenizer_encodes_expected_ids() {
    let dir = tmp();
    let spec = Spec::llama();
    let (gguf, hf, _) = write_both(dir.path(), &spec, 2);
    let g = load(&gguf, ModelFormat::Gguf);
    let h = load(&hf, ModelFormat::HfDir);
    let cases: &[(&str, Vec<u32>)] = &[
        ("hello world", vec![tok_id("hello"), tok_id("Ġworld")]),
        (
            "hello the world!",
            vec![
                tok_id("hello"),
                tok_id("Ġthe"),
                tok_id("Ġworld"),
                tok_id("!"),
            ],
        ),
        ("the", vec![tok_id("t"), tok_id("he")]),
        (
            "embedding 42",
            vec![tok_id("embedding"), tok_id("Ġ"), tok_id("4"), tok_id("2")],
        ),
        ("a <|endoftext|>", vec![tok_id("a"), tok_id("Ġ"), 0]),
    ];
    for (text, want) in cases {
        assert_eq!(
            &g.tokenizer.encode(text).unwrap(),
            want,
            "GGUF tokenizer on {text:?}"
        );
        assert_eq!(
            &h.tokenizer.encode(text).unwrap(),
            want,
            "HF tokenizer on {text:?}"
        );
        assert_eq!(
            g.tokenizer.decode(want, false).unwrap(),
            *text,
            "decode {want:?}"
        );
    }
    assert_eq!(g.tokenizer.eos_ids, vec![0]);
    assert_eq!(g.tokenizer.eos_token, EOS);
    assert_eq!(h.tokenizer.eos_ids, vec![0]);
}

// ---------------------------------------------------------------------------------------------
// 2. Qwen2: q/k/v biases and an untied LM head.
// ---------------------------------------------------------------------------------------------

#[test]
fn qwen2_biases_and_untied_head() {
    let dir = tmp();
    let spec = Spec::qwen2();
    let (gguf, hf, w) = write_both(dir.path(), &spec, 3);
    let g = load(&gguf, ModelFormat::Gguf);
    let h = load(&hf, ModelFormat::HfDir);
    for m in [&g.model, &h.model] {
        assert_eq!(m.config.arch, search_r3_model::Arch::Qwen2);
        assert!(m.config.qkv_bias && !m.config.tie_word_embeddings);
        assert_eq!(m.config.rope_theta, 1_000_000.0);
        assert!(m.weights.lm_head.is_some());
        assert!(m.weights.layers.iter().all(|l| l.bqkv.is_some()));
    }
    // qwen2 q/k are stored unpermuted in GGUF and must be loaded as is.
    let q_hf = &w["model.layers.1.self_attn.q_proj.weight"].1;
    assert_eq!(
        &flat(
            &g.model.weights.layers[1]
                .wqkv_t
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
        )[..q_hf.len()],
        q_hf.as_slice()
    );

    let s = seqs();
    let hg = hidden(&g.model, &s, Path::Fast);
    let hh = hidden(&h.model, &s, Path::Fast);
    let diff = max_abs_diff(&flat(&hg), &flat(&hh));
    assert!(diff <= 1e-5, "qwen2 GGUF vs HF differ by {diff}");

    // The biases matter: zeroing them changes the output.
    let mut nob = g.model.clone();
    for l in &mut nob.weights.layers {
        let b = l.bqkv.as_ref().unwrap();
        l.bqkv = Some(b.zeros_like().unwrap());
    }
    let hz = hidden(&nob, &s, Path::Fast);
    assert!(
        max_abs_diff(&flat(&hg), &flat(&hz)) > 1e-3,
        "q/k/v biases have no effect"
    );

    // Logits use the untied head: [.., vocab] = hidden · lm_headᵀ, then the embed-token column.
    let head = raw_tensor(&w, "lm_head.weight");
    let embed = raw_tensor(&w, "model.embed_tokens.weight");
    for m in [&g.model, &h.model] {
        let hid = hidden(m, &s, Path::Fast);
        let logits = m.logits(&hid).unwrap();
        let (b, t, _) = hid.dims3().unwrap();
        assert_eq!(logits.dims(), &[b, t, VOCAB + 1]);
        let h2 = hid.reshape((b * t, spec.d)).unwrap();
        let want = h2.matmul(&head.t().unwrap()).unwrap();
        let got = logits.reshape((b * t, VOCAB + 1)).unwrap();
        let base = got.narrow(1, 0, VOCAB).unwrap();
        let diff = max_abs_diff(&flat(&base), &flat(&want));
        assert!(diff <= 1e-4, "logits differ from hidden·lm_headᵀ by {diff}");
        let tied = h2.matmul(&embed.t().unwrap()).unwrap();
        assert!(
            max_abs_diff(&flat(&base), &flat(&tied)) > 1e-2,
            "logits look tied"
        );
        let mean_head = head.mean_keepdim(0).unwrap();
        let col = h2.matmul(&mean_head.t().unwrap()).unwrap();
        let diff = max_abs_diff(&flat(&got.narrow(1, VOCAB, 1).unwrap()), &flat(&col));
        assert!(
            diff <= 1e-4,
            "embed-token logit column is not hidden·mean(lm_head): {diff}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Qwen3 (q/k norms, head_dim ≠ d/heads): GGUF and HF agree.
// ---------------------------------------------------------------------------------------------

#[test]
fn qwen3_gguf_matches_hf() {
    let dir = tmp();
    let spec = Spec::qwen3();
    let (gguf, hf, _) = write_both(dir.path(), &spec, 4);
    let g = load(&gguf, ModelFormat::Gguf);
    let h = load(&hf, ModelFormat::HfDir);
    for m in [&g.model, &h.model] {
        assert_eq!(m.config.arch, search_r3_model::Arch::Qwen3);
        assert!(m.config.qk_norm && !m.config.qkv_bias);
        assert_eq!(m.config.head_dim, 8);
        assert_eq!(m.weights.layers[0].wqkv_t.dims(), &[16, (4 + 2 * 2) * 8]);
        assert_eq!(m.weights.layers[0].wo_t.dims(), &[32, 16]);
    }
    let s = seqs();
    let a = hidden(&g.model, &s, Path::Fast);
    let b = hidden(&h.model, &s, Path::Fast);
    let diff = max_abs_diff(&flat(&a), &flat(&b));
    assert!(diff <= 1e-5, "qwen3 GGUF vs HF differ by {diff}");
    // The q/k norms matter.
    let mut non = g.model.clone();
    for l in &mut non.weights.layers {
        l.q_norm = Some(l.q_norm.as_ref().unwrap().ones_like().unwrap());
    }
    let c = hidden(&non, &s, Path::Fast);
    assert!(
        max_abs_diff(&flat(&a), &flat(&c)) > 1e-3,
        "q_norm weights have no effect"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Sharded HF directory.
// ---------------------------------------------------------------------------------------------

#[test]
fn sharded_hf_dir_loads_like_unsharded() {
    let dir = tmp();
    let spec = Spec::qwen2();
    let w = random_weights(&spec, 5);
    let one = dir.path().join("one");
    let three = dir.path().join("three");
    write_hf_dir(&one, &spec, &w, 1);
    write_hf_dir(&three, &spec, &w, 3);
    assert!(three.join("model-00003-of-00003.safetensors").exists());
    assert!(!three.join("model.safetensors").exists());
    // A stray file beside the shards must not be read when the index exists.
    std::fs::write(three.join("stray.safetensors"), b"not a safetensors file").unwrap();

    let a = load(&one, ModelFormat::HfDir);
    let b = load(&three, ModelFormat::HfDir);
    assert_eq!(a.model.config, b.model.config);
    let s = seqs();
    let ha = flat(&hidden(&a.model, &s, Path::Fast));
    let hb = flat(&hidden(&b.model, &s, Path::Fast));
    assert_eq!(
        max_abs_diff(&ha, &hb),
        0.0,
        "sharded and unsharded loads differ"
    );

    // An index that names a missing shard is reported with the shard's name.
    std::fs::remove_file(three.join("model-00002-of-00003.safetensors")).unwrap();
    let msg = load_err(&three, ModelFormat::HfDir);
    assert_mentions(&msg, &["model-00002-of-00003.safetensors", "missing"]);
}

// ---------------------------------------------------------------------------------------------
// 4. Fast and differentiable paths agree (with LoRA active).
// ---------------------------------------------------------------------------------------------

#[test]
fn fast_and_diff_paths_agree_with_lora() {
    let dir = tmp();
    for (k, spec) in [Spec::llama(), Spec::qwen2(), Spec::qwen3()]
        .iter()
        .enumerate()
    {
        let (gguf, _, _) = write_both(dir.path(), spec, 10 + k as u64);
        let mut m = load(&gguf, ModelFormat::Gguf).model;
        let id = m.embed_token.as_ref().unwrap().id;
        let s = seqs_with_embed(id);
        let base = hidden(&m, &s, Path::Fast);
        m.add_lora(all_targets(2), 7).unwrap();
        // Fresh adapters (B = 0) leave the model unchanged.
        let fresh = hidden(&m, &s, Path::Fast);
        assert_eq!(max_abs_diff(&flat(&base), &flat(&fresh)), 0.0);
        randomize_lora_b(&m, 8);
        let fast = hidden(&m, &s, Path::Fast);
        let diffp = hidden(&m, &s, Path::Diff);
        assert!(
            real_positions_diff(&fast, &base, &s) > 1e-3,
            "{}: LoRA has no effect",
            spec.arch
        );
        let d = real_positions_diff(&fast, &diffp, &s);
        assert!(d <= 1e-5, "{}: Fast vs Diff differ by {d}", spec.arch);
        // The fast path records no autograd graph (it would keep every activation alive);
        // the differentiable one does.
        assert!(
            !fast.track_op(),
            "{}: fast path output tracks a graph",
            spec.arch
        );
        assert!(
            diffp.track_op(),
            "{}: diff path output lost its graph",
            spec.arch
        );
        // lora_enabled = false gives back the base model on both paths.
        m.lora_enabled = false;
        for p in [Path::Fast, Path::Diff] {
            let off = hidden(&m, &s, p);
            let d = real_positions_diff(&off, &base, &s);
            assert!(
                d <= 1e-5,
                "{}: disabled LoRA still changes the output ({d})",
                spec.arch
            );
        }
    }
}

/// Feeding a left-padded batch in pieces through the KV cache gives the hidden states of one
/// full forward call.
#[test]
fn kv_cache_steps_match_full_forward() {
    let dir = tmp();
    for (k, spec) in [Spec::llama(), Spec::qwen2(), Spec::qwen3()]
        .iter()
        .enumerate()
    {
        let (gguf, _, _) = write_both(dir.path(), spec, 15 + k as u64);
        let m = load(&gguf, ModelFormat::Gguf).model;
        let full_seqs = vec![
            vec![1u32, 5, 9, 27, 40, 12, 63, 2],
            vec![3, 60, 44, 7, 50, 8],
        ];
        for path in [Path::Fast, Path::Diff] {
            let full = hidden(&m, &full_seqs, path);
            let t_full = 8;
            // Prefix: all but the last 3 tokens of every row, then one token per step.
            let prefix: Vec<Vec<u32>> = full_seqs
                .iter()
                .map(|s| s[..s.len() - 3].to_vec())
                .collect();
            let first = Batch::left_padded(&prefix, 0).unwrap();
            let mut cache = search_r3_model::KvCache::new();
            let h0 = m.forward(&first, path, Some(&mut cache)).unwrap();
            let mut key_mask = first.key_mask.clone();
            let t0 = first.t;
            // Left padding of the full batch = left padding of the prefix batch (same 3-token
            // suffixes), so position i of the prefix batch is position i of the full batch.
            assert_eq!(t0 + 3, t_full);
            // Padding outputs depend on the key count (their queries see no real key), so only
            // real positions are compared.
            let d = real_positions_diff(&h0, &full.narrow(1, 0, t0).unwrap(), &prefix);
            assert!(d <= 1e-5, "{} {path:?}: prefix differs by {d}", spec.arch);
            for step in 0..3 {
                let ids: Vec<u32> = full_seqs.iter().map(|s| s[s.len() - 3 + step]).collect();
                let positions: Vec<u32> = full_seqs
                    .iter()
                    .map(|s| (s.len() - 3 + step) as u32)
                    .collect();
                let b = full_seqs.len();
                let s_now = t0 + step + 1;
                let mut km = Vec::with_capacity(b * s_now);
                for r in 0..b {
                    km.extend_from_slice(&key_mask[r * (s_now - 1)..(r + 1) * (s_now - 1)]);
                    km.push(true);
                }
                key_mask = km.clone();
                let batch = Batch {
                    b,
                    t: 1,
                    ids,
                    positions,
                    key_mask: km,
                };
                let h = m.forward(&batch, path, Some(&mut cache)).unwrap();
                assert_eq!(cache.len(), s_now);
                for r in 0..b {
                    let a = flat(&Model::pick(&h, r, 0).unwrap());
                    let want = flat(&Model::pick(&full, r, t0 + step).unwrap());
                    let d = max_abs_diff(&a, &want);
                    assert!(
                        d <= 1e-5,
                        "{} {path:?}: step {step} row {r} differs by {d}",
                        spec.arch
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Gradients reach every trainable tensor and no base weight.
// ---------------------------------------------------------------------------------------------

/// `sum(hidden · R) + sum(logits[row 0, last] · R2)`: touches every hidden state and, through
/// the logits, the LM-head row of `<|embed_token|>`.
fn probe_loss(model: &Model, seqs: &[Vec<u32>], seed: u64) -> Tensor {
    let h = hidden(model, seqs, Path::Diff);
    let dt = model.dtype();
    let mut rng = Rng::new(seed);
    let (b, t, d) = h.dims3().unwrap();
    // Padding positions are excluded, as every real loss does: their queries see no key, the
    // -big mask swamps the scores, so their outputs do not depend on the scores at all
    // (a constant function, whose autograd gradient through softmax is not zero).
    let mut r = rng.vec(b * t * d, 1.0);
    for (row, s) in seqs.iter().enumerate() {
        for x in &mut r[row * t * d..(row * t + t - s.len()) * d] {
            *x = 0.0;
        }
    }
    let r = Tensor::from_vec(r, h.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    let last = Model::pick(&h, 0, t - 1).unwrap().unsqueeze(0).unwrap();
    let logits = model.logits(&last).unwrap();
    let r2 = Tensor::from_vec(
        rng.vec(logits.elem_count(), 1.0),
        logits.shape(),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dt)
    .unwrap();
    let a = (h * r).unwrap().sum_all().unwrap();
    let b = (logits * r2).unwrap().sum_all().unwrap();
    (a + b).unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_no_base_weight_does() {
    let dir = tmp();
    for (k, spec) in [Spec::qwen2(), Spec::llama()].iter().enumerate() {
        let (gguf, _, _) = write_both(dir.path(), spec, 20 + k as u64);
        let mut m = load(&gguf, ModelFormat::Gguf).model;
        m.add_lora(all_targets(2), 3).unwrap();
        randomize_lora_b(&m, 4);
        let id = m.embed_token.as_ref().unwrap().id;
        let s = seqs_with_embed(id);
        let loss = probe_loss(&m, &s, 5);
        let grads = loss.backward().unwrap();

        let vars = m.trainable_vars();
        // 2 layers × 7 targets × (A, B) + embed row (+ head row when untied).
        let want = 2 * 7 * 2 + 1 + usize::from(!spec.tied);
        assert_eq!(
            vars.len(),
            want,
            "{}: trainable vars {:?}",
            spec.arch,
            names(&vars)
        );
        if !spec.tied {
            assert!(vars.iter().any(|(n, _)| n == "embed_token.head_row"));
        }
        for (name, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", spec.arch));
            assert_eq!(g.dims(), v.dims(), "{name}");
            let g = flat(g);
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{}: non-finite gradient for {name}",
                spec.arch
            );
            let mx = g.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            assert!(mx > 0.0, "{}: all-zero gradient for {name}", spec.arch);
        }
        for (name, t) in base_tensors(&m) {
            assert!(
                grads.get(&t).is_none(),
                "{}: base weight {name} received a gradient",
                spec.arch
            );
        }
    }
}

fn names(v: &[(String, Var)]) -> Vec<&str> {
    v.iter().map(|(n, _)| n.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// 6. Finite differences in f64.
// ---------------------------------------------------------------------------------------------

#[test]
fn finite_differences_match_autograd_in_f64() {
    let dir = tmp();
    let spec = Spec::qwen2();
    let (gguf, _, _) = write_both(dir.path(), &spec, 30);
    let m32 = load(&gguf, ModelFormat::Gguf).model;
    let mut m = m32.to_dtype(DType::F64).unwrap();
    assert_eq!(m.dtype(), DType::F64);
    assert!(m.embed_token.is_some());
    m.add_lora(all_targets(2), 31).unwrap();
    randomize_lora_b(&m, 32);
    let mut rng = Rng::new(33);
    let vars: HashMap<String, Var> = m.trainable_vars().into_iter().collect();
    // Move the embed-token rows away from the mean so their gradients are generic.
    for n in ["embed_token.row", "embed_token.head_row"] {
        let v = &vars[n];
        let cur = v.as_tensor().clone();
        let noise = Tensor::from_vec(rng.vec(cur.elem_count(), 0.5), cur.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        v.set(&(cur + noise).unwrap()).unwrap();
    }
    let id = m.embed_token.as_ref().unwrap().id;
    let s = seqs_with_embed(id);
    let loss_val = |m: &Model| probe_loss(m, &s, 34).to_scalar::<f64>().unwrap();

    let loss = probe_loss(&m, &s, 34);
    let grads = loss.backward().unwrap();
    let eps = 1e-5;
    let mut worst = 0.0f64;
    for name in [
        "lora.layers.0.q_proj.lora_a",
        "lora.layers.1.k_proj.lora_a",
        "lora.layers.0.down_proj.lora_b",
        "lora.layers.1.v_proj.lora_b",
        "embed_token.row",
        "embed_token.head_row",
    ] {
        let v = vars.get(name).unwrap_or_else(|| panic!("no var {name}"));
        let g = flat64(
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no grad {name}")),
        );
        let orig = flat64(v.as_tensor());
        for _ in 0..5 {
            let j = rng.below(orig.len());
            let at = |x: f64| {
                let mut d = orig.clone();
                d[j] = x;
                v.set(&Tensor::from_vec(d, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_val(&m)
            };
            let fd = (at(orig[j] + eps) - at(orig[j] - eps)) / (2.0 * eps);
            v.set(&Tensor::from_vec(orig.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let ag = g[j];
            let rel = (fd - ag).abs() / fd.abs().max(ag.abs()).max(1e-6);
            worst = worst.max(rel);
            assert!(
                rel <= 1e-4,
                "{name}[{j}]: finite difference {fd:.9e} vs autograd {ag:.9e} (rel {rel:.2e})"
            );
        }
    }
    eprintln!("worst relative error: {worst:.2e}");
}

// ---------------------------------------------------------------------------------------------
// 7. Saving and restoring the trainable state.
// ---------------------------------------------------------------------------------------------

#[test]
fn trainable_state_round_trips_and_refuses_other_models() {
    let dir = tmp();
    let spec = Spec::qwen2();
    let (gguf, _, _) = write_both(dir.path(), &spec, 40);
    let mut m = load(&gguf, ModelFormat::Gguf).model;
    m.add_lora(all_targets(3), 41).unwrap();
    randomize_lora_b(&m, 42);
    let mut rng = Rng::new(43);
    for (n, v) in m.trainable_vars() {
        if n.starts_with("embed_token") {
            set_var_random(&v, &mut rng, 1.0);
        }
    }
    let id = m.embed_token.as_ref().unwrap().id;
    let s = seqs_with_embed(id);
    let want_fast = flat(&hidden(&m, &s, Path::Fast));
    let want_diff = flat(&hidden(&m, &s, Path::Diff));
    let file = dir.path().join("adapters/state.safetensors");
    let extra = HashMap::from([("base_model".to_string(), "tiny-qwen2".to_string())]);
    state::save_trainable(&m, &file, &extra).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o644,
            "an adapter is a shareable file, not a private temp file"
        );
    }

    let mut fresh = load(&gguf, ModelFormat::Gguf).model;
    let before = flat(&hidden(&fresh, &s, Path::Fast));
    assert!(
        max_abs_diff(&before, &want_fast) > 1e-3,
        "trained state has no effect"
    );
    let md = state::load_trainable(&mut fresh, &file).unwrap();
    assert_eq!(md.get("base_model").map(String::as_str), Some("tiny-qwen2"));
    assert_eq!(fresh.lora.as_ref().unwrap().config, all_targets(3));
    assert_eq!(flat(&hidden(&fresh, &s, Path::Fast)), want_fast);
    assert_eq!(flat(&hidden(&fresh, &s, Path::Diff)), want_diff);
    for ((na, va), (nb, vb)) in m.trainable_vars().iter().zip(fresh.trainable_vars().iter()) {
        assert_eq!(na, nb);
        assert_eq!(flat(va.as_tensor()), flat(vb.as_tensor()), "{na}");
    }

    // A model with another hidden size refuses the file, naming it.
    let other = Spec {
        d: 24,
        head_dim: 6,
        ..Spec::qwen2()
    };
    let ow = random_weights(&other, 44);
    let og = dir.path().join("other.gguf");
    write_gguf(&og, &other, &ow);
    let mut om = load(&og, ModelFormat::Gguf).model;
    let err = state::load_trainable(&mut om, &file).expect_err("loaded into a d=24 model");
    let msg = err.to_string();
    assert_mentions(&msg, &[&file.display().to_string(), "d=16", "d=24"]);
}

/// A state file whose recorded LoRA config disagrees with its tensors is refused — and the
/// refusal must leave the model as it was (trained rank-2 adapters must not be replaced by the
/// file's fresh rank-4 ones).
#[test]
fn failed_load_trainable_leaves_model_unchanged() {
    let dir = tmp();
    let spec = Spec::qwen2();
    let (gguf, _, _) = write_both(dir.path(), &spec, 45);
    let mut m = load(&gguf, ModelFormat::Gguf).model;
    m.add_lora(all_targets(3), 46).unwrap();
    randomize_lora_b(&m, 47);
    let file = dir.path().join("state.safetensors");
    state::save_trainable(&m, &file, &HashMap::new()).unwrap();
    // The same tensors, with metadata claiming rank 4.
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut md = state::read_metadata(&file).unwrap();
    md.insert(
        "lora".into(),
        serde_json::to_string(&all_targets(4)).unwrap(),
    );
    let bad = dir.path().join("bad-rank.safetensors");
    safetensors::serialize_to_file(st.tensors(), Some(md), &bad).unwrap();

    let mut t = load(&gguf, ModelFormat::Gguf).model;
    t.add_lora(all_targets(2), 48).unwrap();
    randomize_lora_b(&t, 49);
    let s = seqs();
    let before = flat(&hidden(&t, &s, Path::Fast));
    let err = state::load_trainable(&mut t, &bad).expect_err("rank mismatch accepted");
    assert_mentions(&err.to_string(), &["bad-rank.safetensors", "lora_a"]);
    assert_eq!(
        t.lora.as_ref().unwrap().config.rank,
        2,
        "adapters were replaced"
    );
    assert_eq!(
        flat(&hidden(&t, &s, Path::Fast)),
        before,
        "a failed load changed the model"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Bad inputs: errors name the file and the problem; nothing panics.
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_gguf_is_reported() {
    let dir = tmp();
    let spec = Spec::llama();
    let w = random_weights(&spec, 50);
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &spec, &w);
    let bytes = std::fs::read(&good).unwrap();
    let (_, content) = search_r3_model::weights::open_gguf(&good).unwrap();
    let data_start = content.tensor_data_offset as usize;
    assert!(data_start < bytes.len());
    for cut in [
        data_start + (bytes.len() - data_start) / 2,
        bytes.len() - 1,
        data_start + 3,
    ] {
        let p = dir.path().join(format!("cut-{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let msg = load_err(&p, ModelFormat::Gguf);
        assert_mentions(&msg, &[&p.display().to_string(), "truncated"]);
    }
    // Cut inside the header: still an error naming the file, not a panic.
    for cut in [0, 3, 10, 24, 100, data_start / 2, data_start - 1] {
        let p = dir.path().join(format!("head-{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let msg = load_err(&p, ModelFormat::Gguf);
        assert_mentions(&msg, &[&p.display().to_string()]);
    }
}

#[test]
fn corrupt_gguf_is_reported() {
    let dir = tmp();
    let spec = Spec::llama();
    let w = random_weights(&spec, 51);
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &spec, &w);
    let bytes = std::fs::read(&good).unwrap();

    // Garbage and a bad magic.
    let garbage = dir.path().join("garbage.gguf");
    let mut rng = Rng::new(52);
    let g: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&garbage, &g).unwrap();
    assert_mentions(
        &load_err(&garbage, ModelFormat::Gguf),
        &["garbage.gguf", "GGUF"],
    );
    let bad_magic = dir.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&bad_magic, &b).unwrap();
    assert_mentions(
        &load_err(&bad_magic, ModelFormat::Gguf),
        &["magic.gguf", "GGUF"],
    );
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert_mentions(&load_err(&empty, ModelFormat::Gguf), &["empty.gguf"]);

    // Header counts: tensor count (bytes 8..16) and metadata count (16..24).
    let n_tensors = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let n_md = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let cases: Vec<(&str, usize, u64)> = vec![
        ("tensors-huge", 8, u64::MAX),
        ("tensors-big", 8, 1 << 40),
        ("tensors-plus1", 8, n_tensors + 1),
        ("md-huge", 16, u64::MAX),
        ("md-big", 16, 1 << 33),
        ("md-plus1", 16, n_md + 1),
        ("md-minus1", 16, n_md - 1),
    ];
    for (tag, off, val) in cases {
        let p = dir.path().join(format!("{tag}.gguf"));
        let mut b = bytes.clone();
        b[off..off + 8].copy_from_slice(&val.to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let msg = load_err(&p, ModelFormat::Gguf);
        assert_mentions(&msg, &[&format!("{tag}.gguf")]);
    }
    // One tensor fewer than written: the last one (`output_norm.weight`) is missing.
    let p = dir.path().join("tensors-minus1.gguf");
    let mut b = bytes.clone();
    b[8..16].copy_from_slice(&(n_tensors - 1).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    assert_mentions(
        &load_err(&p, ModelFormat::Gguf),
        &["tensors-minus1.gguf", "output_norm.weight"],
    );
}

/// Byte offsets of each tensor-info record of a GGUF file written by `gguf_file::write`
/// (v2: u64 name length, name, u32 n_dims, u64 dims…, u32 dtype, u64 offset):
/// `(record start, dims start, n_dims)`, in file order.
fn tensor_info_records(bytes: &[u8], content: &gguf_file::Content) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = content
        .tensor_infos
        .iter()
        .map(|(name, info)| {
            let mut pat = (name.len() as u64).to_le_bytes().to_vec();
            pat.extend_from_slice(name.as_bytes());
            let start = bytes
                .windows(pat.len())
                .position(|w| w == pat.as_slice())
                .unwrap_or_else(|| panic!("tensor info of {name} not found"));
            (start, start + pat.len() + 4, info.shape.rank())
        })
        .collect();
    out.sort();
    out
}

/// Single-byte corruptions of the GGUF header either load or fail with an error that names the
/// file; none panics. Covered densely: the fixed header, the tensor-info records and the end of
/// the metadata; every 5th byte of the (large) tokenizer arrays. The most significant byte of
/// each tensor dimension is covered by `gguf_tensor_dim_overflow_is_an_error`.
#[test]
fn gguf_header_byte_flips_never_panic() {
    let dir = tmp();
    let spec = Spec::llama();
    let w = random_weights(&spec, 53);
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &spec, &w);
    let bytes = std::fs::read(&good).unwrap();
    let (_, content) = search_r3_model::weights::open_gguf(&good).unwrap();
    let end = content.tensor_data_offset as usize;
    let records = tensor_info_records(&bytes, &content);
    assert_eq!(records.len(), content.tensor_infos.len());
    let infos_start = records[0].0;
    let dim_top_bytes: Vec<usize> = records
        .iter()
        .flat_map(|&(_, dims, n)| (0..n).map(move |k| dims + 8 * k + 7))
        .collect();
    let p = dir.path().join("flip.gguf");
    let (mut failures, mut tried) = (0, 0);
    let positions: Vec<usize> = (0..end)
        .filter(|&i| i < 64 || i + 512 > infos_start || i % 5 == 0)
        .filter(|i| !dim_top_bytes.contains(i))
        .collect();
    for &i in &positions {
        for val in [0xFFu8, 0x00, bytes[i] ^ 0x80, bytes[i] ^ 0x01] {
            if bytes[i] == val {
                continue;
            }
            tried += 1;
            let mut b = bytes.clone();
            b[i] = val;
            std::fs::write(&p, &b).unwrap();
            let p2 = p.clone();
            let r =
                std::panic::catch_unwind(move || load_path(&p2, ModelFormat::Gguf, &opts(true)));
            match r {
                Err(_) => panic!("loader panicked with byte {i} set to {val:#04x}"),
                Ok(Err(e)) => {
                    failures += 1;
                    let msg = e.to_string();
                    assert!(
                        msg.contains("flip.gguf"),
                        "byte {i}={val:#04x}: error does not name the file: {msg}"
                    );
                }
                Ok(Ok(_)) => {}
            }
        }
    }
    assert!(
        failures > tried / 10,
        "only {failures} of {tried} corruptions were noticed"
    );
}

/// A tensor dimension whose byte size overflows u64 (`[2^63 + 16]` f32 elements: ×4 wraps to
/// 64 bytes) must be refused at load (`weights::open_gguf` uses checked arithmetic; with wrapping
/// arithmetic the wrapped size passed the bounds check and candle's dequantize panicked).
#[test]
fn gguf_tensor_dim_overflow_is_an_error() {
    let dir = tmp();
    let spec = Spec::llama();
    let w = random_weights(&spec, 53);
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &spec, &w);
    let mut bytes = std::fs::read(&good).unwrap();
    let (_, content) = search_r3_model::weights::open_gguf(&good).unwrap();
    let mut pat = 21u64.to_le_bytes().to_vec();
    pat.extend_from_slice(b"blk.0.ffn_norm.weight");
    let at = bytes
        .windows(pat.len())
        .position(|x| x == pat.as_slice())
        .unwrap();
    let dims = at + pat.len() + 4;
    assert_eq!(
        content.tensor_infos["blk.0.ffn_norm.weight"].shape.dims(),
        &[16]
    );
    assert_eq!(&bytes[dims..dims + 8], &16u64.to_le_bytes());
    bytes[dims + 7] = 0x80; // dim = 2^63 + 16
    let p = dir.path().join("overflow.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let msg = load_err(&p, ModelFormat::Gguf);
    assert_mentions(&msg, &["overflow.gguf", "blk.0.ffn_norm.weight"]);
}

/// Runs `body` in a child process (this test binary, filtered to `test`), so a loader that
/// aborts the process (an allocation failure is an abort, not a catchable panic) fails one
/// test instead of killing the whole run.
fn isolated(test: &str, body: impl FnOnce()) {
    const CHILD: &str = "TINY_MODELS_ISOLATED_CHILD";
    if std::env::var_os(CHILD).is_some() {
        body();
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr
        .lines()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(
        out.status.success(),
        "{test} failed in its child process ({}):\n{}",
        out.status,
        tail.join("\n")
    );
}

/// A header claiming 2^32-1 blocks (or an HF config claiming 10^12 layers) must be refused with
/// an error, not abort the process on a huge allocation (this once aborted with SIGABRT, so the
/// test runs in a child process). A plausible but wrong count fails at the first missing block.
#[test]
fn huge_layer_count_is_an_error() {
    isolated("huge_layer_count_is_an_error", || {
        let dir = tmp();
        let spec = Spec::llama();
        let w = random_weights(&spec, 58);
        let p = dir.path().join("layers.gguf");
        let mut md = gguf_metadata(&spec);
        md.iter_mut()
            .find(|(k, _)| k == "llama.block_count")
            .unwrap()
            .1 = gguf_file::Value::U32(u32::MAX);
        write_gguf_raw(&p, &md, &gguf_tensors(&spec, &w, true));
        assert_mentions(
            &load_err(&p, ModelFormat::Gguf),
            &["layers.gguf", "num_layers"],
        );
        md.iter_mut()
            .find(|(k, _)| k == "llama.block_count")
            .unwrap()
            .1 = gguf_file::Value::U32(1000);
        write_gguf_raw(&p, &md, &gguf_tensors(&spec, &w, true));
        assert_mentions(&load_err(&p, ModelFormat::Gguf), &["layers.gguf", "blk.2."]);

        let hf = dir.path().join("hf-layers");
        write_hf_dir(&hf, &spec, &w, 1);
        let mut c = hf_config(&spec);
        c["num_hidden_layers"] = 1_000_000_000_000u64.into();
        std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
        assert_mentions(
            &load_err(&hf, ModelFormat::HfDir),
            &["hf-layers", "num_layers"],
        );
        c["num_hidden_layers"] = 1000u64.into();
        std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
        assert_mentions(
            &load_err(&hf, ModelFormat::HfDir),
            &["hf-layers", "model.layers.2."],
        );
    });
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tmp();
    let spec = Spec::llama();
    let w = random_weights(&spec, 54);
    let p = dir.path().join("gpt9.gguf");
    let mut md = gguf_metadata(&spec);
    md[0].1 = gguf_file::Value::String("gpt9".into());
    write_gguf_raw(&p, &md, &gguf_tensors(&spec, &w, true));
    assert_mentions(
        &load_err(&p, ModelFormat::Gguf),
        &["gpt9.gguf", "gpt9", "architecture"],
    );

    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &spec, &w, 1);
    let mut c = hf_config(&spec);
    c["model_type"] = "gpt9".into();
    std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
    assert_mentions(&load_err(&hf, ModelFormat::HfDir), &["config.json", "gpt9"]);
}

#[test]
fn hf_dir_without_tokenizer_is_refused() {
    let dir = tmp();
    let spec = Spec::llama();
    let w = random_weights(&spec, 55);
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &spec, &w, 1);
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    assert_mentions(
        &load_err(&hf, ModelFormat::HfDir),
        &["tokenizer.json", "tokenizer"],
    );
    // A corrupt tokenizer.json is reported too.
    std::fs::write(hf.join("tokenizer.json"), "{ not json").unwrap();
    assert_mentions(&load_err(&hf, ModelFormat::HfDir), &["tokenizer.json"]);
}

#[test]
fn config_weight_shape_mismatch_names_the_tensor() {
    let dir = tmp();
    let spec = Spec::llama();
    let w = random_weights(&spec, 56);

    // HF: hidden_size disagrees with every tensor.
    let hf = dir.path().join("hf-d");
    write_hf_dir(&hf, &spec, &w, 1);
    let mut c = hf_config(&spec);
    c["hidden_size"] = 24.into();
    std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
    let msg = load_err(&hf, ModelFormat::HfDir);
    assert_mentions(
        &msg,
        &["hf-d", "model.embed_tokens.weight", "[64, 16]", "[64, 24]"],
    );

    // HF: intermediate_size disagrees with the MLP tensors.
    let hf = dir.path().join("hf-ff");
    write_hf_dir(&hf, &spec, &w, 1);
    let mut c = hf_config(&spec);
    c["intermediate_size"] = 48.into();
    std::fs::write(hf.join("config.json"), c.to_string()).unwrap();
    let msg = load_err(&hf, ModelFormat::HfDir);
    assert_mentions(&msg, &["hf-ff", "model.layers.0.mlp.gate_proj.weight"]);

    // GGUF: embedding_length and feed_forward_length disagree with the tensors.
    for (key, val, tensor) in [
        ("llama.embedding_length", 24u32, "token_embd.weight"),
        ("llama.feed_forward_length", 48, "blk.0.ffn_gate.weight"),
        ("llama.attention.head_count_kv", 4, "blk.0.attn_k.weight"),
    ] {
        let p = dir.path().join(format!("{key}.gguf"));
        let mut md = gguf_metadata(&spec);
        md.iter_mut().find(|(k, _)| k == key).unwrap().1 = gguf_file::Value::U32(val);
        write_gguf_raw(&p, &md, &gguf_tensors(&spec, &w, true));
        let msg = load_err(&p, ModelFormat::Gguf);
        assert_mentions(&msg, &[&format!("{key}.gguf"), tensor]);
    }

    // GGUF: a tensor stored with the wrong shape.
    let p = dir.path().join("bad-tensor.gguf");
    let mut ts = gguf_tensors(&spec, &w, true);
    let t = ts
        .iter_mut()
        .find(|(n, _, _)| n == "blk.1.ffn_down.weight")
        .unwrap();
    t.1 = vec![32, 16];
    write_gguf_raw(&p, &gguf_metadata(&spec), &ts);
    assert_mentions(
        &load_err(&p, ModelFormat::Gguf),
        &["bad-tensor.gguf", "blk.1.ffn_down.weight"],
    );

    // GGUF: a required tensor missing.
    let p = dir.path().join("missing.gguf");
    let ts: Vec<_> = gguf_tensors(&spec, &w, true)
        .into_iter()
        .filter(|(n, _, _)| n != "blk.1.attn_v.weight")
        .collect();
    write_gguf_raw(&p, &gguf_metadata(&spec), &ts);
    assert_mentions(
        &load_err(&p, ModelFormat::Gguf),
        &["missing.gguf", "blk.1.attn_v.weight"],
    );
}

#[test]
fn untied_config_without_lm_head_is_refused() {
    let dir = tmp();
    let spec = Spec::qwen2();
    let mut w = random_weights(&spec, 57);
    w.remove("lm_head.weight");
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &spec, &w, 1);
    assert_mentions(
        &load_err(&hf, ModelFormat::HfDir),
        &["hf", "lm_head.weight", "tie_word_embeddings"],
    );
}

// ---------------------------------------------------------------------------------------------
// 9. `<|embed_token|>`.
// ---------------------------------------------------------------------------------------------

#[test]
fn embed_token_is_added_as_mean_row() {
    let dir = tmp();
    for spec in [Spec::llama(), Spec::qwen2()] {
        let (gguf, hf, w) = write_both(dir.path(), &spec, 60);
        for (path, fmt) in [(&gguf, ModelFormat::Gguf), (&hf, ModelFormat::HfDir)] {
            let lm = load(path, fmt);
            let (m, tok) = (&lm.model, &lm.tokenizer);
            let id = tok.embed_token_id.expect("embed token added");
            assert_eq!(id as usize, VOCAB, "embed id is the base vocab size");
            assert_eq!(m.embed_token.as_ref().unwrap().id, id);
            assert_eq!(tok.token_to_id(search_r3_model::EMBED_TOKEN), Some(id));
            assert_eq!(tok.vocab_size(), VOCAB + 1);
            assert_eq!(
                tok.encode("x<|embed_token|>").unwrap(),
                vec![tok_id("x"), id],
                "{}",
                path.display()
            );
            assert_eq!(
                tok.encode("hello<|embed_token|>.").unwrap(),
                vec![tok_id("hello"), id, tok_id(".")]
            );
            assert_eq!(
                tok.decode(&[tok_id("x"), id], false).unwrap(),
                "x<|embed_token|>"
            );

            let e = m.embed_token.as_ref().unwrap();
            let mean = raw_tensor(&w, "model.embed_tokens.weight")
                .mean_keepdim(0)
                .unwrap();
            let d = max_abs_diff(&flat(e.row.as_tensor()), &flat(&mean));
            assert!(
                d <= 1e-6,
                "embed row is not the mean of the embedding rows ({d})"
            );
            match &e.head_row {
                Some(hr) => {
                    assert!(!spec.tied);
                    let mh = raw_tensor(&w, "lm_head.weight").mean_keepdim(0).unwrap();
                    assert!(max_abs_diff(&flat(hr.as_tensor()), &flat(&mh)) <= 1e-6);
                }
                None => assert!(spec.tied),
            }
            assert_eq!(m.output_vocab(), VOCAB + 1);
            let s = seqs_with_embed(id);
            let h = hidden(m, &s, Path::Fast);
            let logits = m.logits(&h).unwrap();
            assert_eq!(logits.dims(), &[2, 8, VOCAB + 1]);

            // The first layer sees the mean row at the embed-token position: replacing the id
            // by an ordinary token changes the hidden state there.
            let mut other = s.clone();
            other[1][4] = 7;
            let h2 = hidden(m, &other, Path::Fast);
            let a = flat(&Model::pick(&h, 1, 7).unwrap());
            let b = flat(&Model::pick(&h2, 1, 7).unwrap());
            assert!(max_abs_diff(&a, &b) > 1e-4);
        }
    }
    // Without add_embed_token the id is outside the vocabulary and refused, not panicking.
    let (gguf, _, _) = write_both(dir.path(), &Spec::llama(), 61);
    let lm = try_load(&gguf, ModelFormat::Gguf, false).unwrap();
    assert!(lm.model.embed_token.is_none() && lm.tokenizer.embed_token_id.is_none());
    let batch = Batch::left_padded(&[vec![1, VOCAB as u32]], 0).unwrap();
    let err = lm
        .model
        .forward(&batch, Path::Fast, None)
        .expect_err("id past vocab");
    assert_mentions(&err.to_string(), &["64", "vocabulary"]);
}

/// Qwen checkpoints pad the embedding beyond the tokenizer: the embed token then reuses a
/// padding row inside the table and the logit column is replaced, not appended.
#[test]
fn embed_token_inside_padded_vocab() {
    let dir = tmp();
    let spec = Spec {
        vocab: 72,
        ..Spec::qwen2()
    };
    let w = random_weights(&spec, 62);
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &spec, &w, 1);
    let gguf = dir.path().join("padded.gguf");
    write_gguf(&gguf, &spec, &w);
    for (path, fmt) in [(&hf, ModelFormat::HfDir), (&gguf, ModelFormat::Gguf)] {
        let lm = load(path, fmt);
        let m = &lm.model;
        let id = lm.tokenizer.embed_token_id.unwrap();
        assert_eq!(id as usize, VOCAB);
        assert_eq!(m.config.vocab_size, 72);
        assert_eq!(m.output_vocab(), 72);
        let e = m.embed_token.as_ref().unwrap();
        let emb = raw_tensor(&w, "model.embed_tokens.weight");
        let mean = emb.narrow(0, 0, VOCAB).unwrap().mean_keepdim(0).unwrap();
        assert!(max_abs_diff(&flat(e.row.as_tensor()), &flat(&mean)) <= 1e-6);
        let s = seqs_with_embed(id);
        let h = hidden(m, &s, Path::Fast);
        let logits = m.logits(&h).unwrap();
        assert_eq!(logits.dims(), &[2, 8, 72]);
        let h2 = h.reshape((16, spec.d)).unwrap();
        let head = raw_tensor(&w, "lm_head.weight");
        let want = h2.matmul(&head.t().unwrap()).unwrap();
        let got = logits.reshape((16, 72)).unwrap();
        let hr = e.head_row.as_ref().unwrap().as_tensor();
        let col = h2.matmul(&hr.t().unwrap()).unwrap();
        for c in 0..72 {
            let g = flat(&got.narrow(1, c, 1).unwrap());
            let x = if c == VOCAB {
                flat(&col)
            } else {
                flat(&want.narrow(1, c, 1).unwrap())
            };
            assert!(max_abs_diff(&g, &x) <= 1e-4, "logit column {c}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Merging adapters: in memory, and as a standalone HF checkpoint that loads back.
// ---------------------------------------------------------------------------------------------

/// Base + trained adapter + trained embed-token row, merged in memory and exported with
/// `save_hf_dir`, computes the same hidden states and logits as the unmerged model; the
/// exported directory loads with its trained `<|embed_token|>` row (not a fresh mean row).
#[test]
fn merged_adapters_match_unmerged_and_round_trip_as_hf_dir() {
    let dir = tmp();
    for (k, spec) in [Spec::llama(), Spec::qwen2()].iter().enumerate() {
        let (gguf, _, _) = write_both(dir.path(), spec, 40 + k as u64);
        let loaded = load(&gguf, ModelFormat::Gguf);
        let mut m = loaded.model.clone();
        m.add_lora(all_targets(2), 3).unwrap();
        randomize_lora_b(&m, 4);
        let mut rng = Rng::new(5);
        let e = m.embed_token.clone().unwrap();
        set_var_random(&e.row, &mut rng, 0.5);
        if let Some(h) = &e.head_row {
            set_var_random(h, &mut rng, 0.5);
        }
        let s = seqs_with_embed(e.id);
        let want = hidden(&m, &s, Path::Fast);
        let want_logits = flat(&m.logits(&want).unwrap());

        let mut merged = m.clone();
        merged.merge_lora().unwrap();
        assert!(merged.lora.is_none());
        for (name, t) in base_tensors(&merged) {
            assert!(
                !t.track_op(),
                "{}: merged {name} remembers the adapter graph",
                spec.arch
            );
        }
        for p in [Path::Fast, Path::Diff] {
            let d = real_positions_diff(&hidden(&merged, &s, p), &want, &s);
            assert!(d <= 1e-5, "{}: merged differs by {d} ({p:?})", spec.arch);
        }

        let out = dir.path().join(format!("merged-{}", spec.arch));
        let extra = serde_json::json!({"adapter_sha256": "abc"});
        search_r3_model::merge::save_hf_dir(&m, &loaded.tokenizer, &out, &extra).unwrap();
        let back = load(&out, ModelFormat::HfDir);
        assert_eq!(back.tokenizer.embed_token_id, Some(e.id));
        assert_eq!(back.model.embed_token.as_ref().unwrap().id, e.id);
        assert_eq!(
            back.tokenizer.encode("<|embed_token|>").unwrap().last(),
            Some(&e.id)
        );
        let got = hidden(&back.model, &s, Path::Fast);
        let d = real_positions_diff(&got, &want, &s);
        assert!(d <= 1e-5, "{}: reloaded merge differs by {d}", spec.arch);
        let dl = max_abs_diff(&flat(&back.model.logits(&got).unwrap()), &want_logits);
        assert!(dl <= 1e-4, "{}: reloaded logits differ by {dl}", spec.arch);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["search_r3"]["adapter_sha256"], "abc");
        assert_eq!(cfg["search_r3"]["embed_token_id"], e.id);
        // The export is self-contained: a model without a template gets the ChatML it used.
        assert_eq!(
            back.tokenizer.chat_template.as_deref(),
            Some(
                loaded
                    .tokenizer
                    .chat_template
                    .as_deref()
                    .unwrap_or(search_r3_model::tokenizer::CHATML_TEMPLATE)
            ),
            "chat template lost"
        );
        // The base model's own loader still mean-initialises (its tokenizer lacks the token).
        let again = load(&gguf, ModelFormat::Gguf).model;
        let d = max_abs_diff(
            &flat(again.embed_token.as_ref().unwrap().row.as_tensor()),
            &flat(e.row.as_tensor()),
        );
        assert!(d > 1e-3);
        // Never overwrites.
        let err = search_r3_model::merge::save_hf_dir(&m, &loaded.tokenizer, &out, &extra)
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["already exists"]);
        assert_eq!(
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".merge-"))
                .count(),
            0,
            "temporary directory left behind"
        );
    }
}
