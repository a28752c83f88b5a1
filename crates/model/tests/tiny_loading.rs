//! Loading tiny random models (written by the tests as GGUF files and HF directories): the
//! GGUF llama q/k un-permutation, the tokenizer, Qwen2 biases and untied heads, Qwen3 q/k norms,
//! sharded HF directories, and the `<|embed_token|>` row added at load.

mod common;

use common::max_abs_diff;
use common::tiny::*;
use common::tiny_run::*;
use search_r3_model::fetch::ModelFormat;
use search_r3_model::{Batch, Model, Path};

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
            &g.tokenizer.encode_markup(text).unwrap(),
            want,
            "GGUF tokenizer on {text:?}"
        );
        assert_eq!(
            &h.tokenizer.encode_markup(text).unwrap(),
            want,
            "HF tokenizer on {text:?}"
        );
        if !text.contains("<|") {
            assert_eq!(&g.tokenizer.encode(text).unwrap(), want, "{text:?} as text");
        }
        assert_eq!(
            g.tokenizer.decode(want, false).unwrap(),
            *text,
            "decode {want:?}"
        );
    }
    // As text, a special token's name is never its id.
    for t in [&g.tokenizer, &h.tokenizer] {
        let ids = t.encode("a <|endoftext|>").unwrap();
        assert!(!ids.contains(&0), "{ids:?}");
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
                tok.encode_markup("x<|embed_token|>").unwrap(),
                vec![tok_id("x"), id],
                "{}",
                path.display()
            );
            assert_eq!(
                tok.encode_markup("hello<|embed_token|>.").unwrap(),
                vec![tok_id("hello"), id, tok_id(".")]
            );
            assert_eq!(
                tok.decode(&[tok_id("x"), id], false).unwrap(),
                "x<|embed_token|>"
            );
            // Text never yields the id: written out, the token is its characters (the tiny
            // vocabulary has no `<` or `|`; the real model's round trip is tested in core).
            let ids = tok.encode("hello<|embed_token|>.").unwrap();
            assert!(!ids.contains(&id), "{ids:?}");
            assert_eq!(ids[0], tok_id("hello"));

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
