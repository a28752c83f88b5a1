//! Bad model files (tiny random models, deliberately broken): errors name the file and the
//! problem, and nothing panics or aborts.

mod common;

use candle_core::quantized::gguf_file;
use common::tiny::*;
use common::tiny_run::*;
use search_r3_model::fetch::ModelFormat;
use search_r3_model::load_path;

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
