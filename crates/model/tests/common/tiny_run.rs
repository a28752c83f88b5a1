//! Loading and running the tiny models of [`super::tiny`]: load options, loaders that turn a
//! panic into a test failure, the token ids most tests feed, hidden-state and tensor
//! comparisons, LoRA set-up, and the list of frozen base tensors.

use super::max_abs_diff;
use super::tiny::{random_weights, write_gguf, write_hf_dir, Raw, Rng, Spec};
use candle_core::{DType, Device, Tensor, Var};
use search_r3_model::fetch::ModelFormat;
use search_r3_model::{
    load_path, Batch, Error, LoadOptions, LoadedModel, LoraConfig, LoraTarget, Model, Path,
};
use std::path::{Path as FsPath, PathBuf};

// ---------------------------------------------------------------------------------------------
// Loading and running.
// ---------------------------------------------------------------------------------------------

pub fn opts(add_embed_token: bool) -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        add_embed_token,
    }
}

/// Loads without letting a panic escape as a panic: a loader that panics on bad input fails the
/// test with a message saying so.
pub fn try_load(
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

pub fn load(path: &FsPath, format: ModelFormat) -> LoadedModel {
    try_load(path, format, true).unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

pub fn load_err(path: &FsPath, format: ModelFormat) -> String {
    match try_load(path, format, true) {
        Ok(_) => panic!("{} loaded, expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

pub fn assert_mentions(msg: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            msg.contains(n),
            "error message {msg:?} does not mention {n:?}"
        );
    }
}

/// Token ids used by most tests (all below the base vocabulary).
pub fn seqs() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 27, 40, 12, 63, 2], vec![3, 60, 44, 7, 50]]
}

pub fn seqs_with_embed(id: u32) -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 27, id, 12, 63, 2], vec![3, 60, 44, 7, id]]
}

pub fn hidden(model: &Model, seqs: &[Vec<u32>], path: Path) -> Tensor {
    let batch = Batch::left_padded(seqs, 0).unwrap();
    model.forward(&batch, path, None).unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn flat64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Max |a-b| over the real (non-padding) positions of a left-padded batch.
pub fn real_positions_diff(a: &Tensor, b: &Tensor, seqs: &[Vec<u32>]) -> f32 {
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

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn set_var_random(v: &Var, rng: &mut Rng, scale: f32) {
    let n = v.elem_count();
    let t = Tensor::from_vec(rng.vec(n, scale), v.shape(), v.device())
        .unwrap()
        .to_dtype(v.dtype())
        .unwrap();
    v.set(&t).unwrap();
}

/// Sets every LoRA B factor (zero at init) to random values so adapters change the output.
pub fn randomize_lora_b(model: &Model, seed: u64) {
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

pub fn all_targets(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        targets: LoraTarget::ALL.to_vec(),
    }
}

/// Every frozen base tensor, with a name for messages.
pub fn base_tensors(model: &Model) -> Vec<(String, Tensor)> {
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
pub fn write_both(dir: &FsPath, spec: &Spec, seed: u64) -> (PathBuf, PathBuf, Raw) {
    let w = random_weights(spec, seed);
    let gguf = dir.join(format!("tiny-{}.gguf", spec.arch));
    let hf = dir.join(format!("tiny-{}-hf", spec.arch));
    write_gguf(&gguf, spec, &w);
    write_hf_dir(&hf, spec, &w, 1);
    (gguf, hf, w)
}

pub fn raw_tensor(w: &Raw, name: &str) -> Tensor {
    let (shape, data) = &w[name];
    Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap()
}
