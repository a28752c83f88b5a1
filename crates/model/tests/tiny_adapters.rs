//! Adapters on tiny random models: the trainable state (LoRA factors and `<|embed_token|>` rows)
//! saved and restored, refused for other models, and merging adapters in memory and as a
//! standalone HF checkpoint that loads back.

mod common;

use common::max_abs_diff;
use common::tiny::*;
use common::tiny_run::*;
use search_r3_model::fetch::ModelFormat;
use search_r3_model::{state, Path};
use std::collections::HashMap;

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
            back.tokenizer
                .encode_markup("<|embed_token|>")
                .unwrap()
                .last(),
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
                    .unwrap_or(search_r3_model::CHATML_TEMPLATE)
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
