//! Checks of a real model against the transformers/PyTorch fixtures, shared by the
//! per-model test files.
#![allow(non_snake_case, dead_code)]

use super::*;
use search_r3_model::{generate, Batch, ForwardOptions, GenerationConfig, Path, StopReason};

pub fn check_tokenizer_matches_transformers(MODEL: &str, FIX: &str) {
    let Some(m) = real_model(MODEL) else { return };
    let fx = fixture(&format!("{FIX}/tokenize_cases.json"));
    for case in fx["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // transformers parses special tokens written in text: that is our markup encoding.
        let ids = m.tokenizer.encode_markup(text).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "tokenizing {text:?}");
        // User text is encoded as text only; without control tokens in it, identically.
        if !text.contains("<|") {
            assert_eq!(m.tokenizer.encode(text).unwrap(), ids, "{text:?} as text");
        }
    }
}

pub fn check_chat_template_renders_like_transformers(MODEL: &str, FIX: &str) {
    let Some(m) = real_model(MODEL) else { return };
    let fx = fixture(&format!("{FIX}/generate.json"));
    for case in fx["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        // The fixture prompts were rendered from a single user turn with the generation prompt.
        let user = prompt
            .split("<|im_start|>user\n")
            .nth(1)
            .and_then(|s| s.split("<|im_end|>").next())
            .unwrap();
        let msgs = [search_r3_model::ChatMessage::new("user", user)];
        let rendered = m.tokenizer.apply_chat_template(&msgs, true).unwrap();
        assert_eq!(rendered, prompt);
        assert_eq!(
            m.tokenizer.encode_markup(&rendered).unwrap(),
            u32s(&case["prompt_ids"])
        );
    }
}

pub fn check_forward(MODEL: &str, FIX: &str, TOL: f32, path: Path) {
    let Some(m) = real_model(MODEL) else { return };
    let fx = fixture(&format!("{FIX}/forward.json"));
    let d = m.model.config.hidden_size;
    for (ci, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let ids = u32s(&case["ids"]);
        // The fixture texts are rendered chat prompts: markup.
        assert_eq!(
            m.tokenizer
                .encode_markup(case["text"].as_str().unwrap())
                .unwrap(),
            ids
        );
        let batch = Batch::left_padded(std::slice::from_ref(&ids), m.tokenizer.pad_id).unwrap();
        let out = m
            .model
            .forward_with(
                &batch,
                path,
                None,
                ForwardOptions {
                    capture_layers: true,
                },
            )
            .unwrap();
        let hidden: Vec<Vec<f32>> = out.hidden.squeeze(0).unwrap().to_vec2().unwrap();
        let want = case["last_hidden_state"].as_array().unwrap();
        assert_eq!(hidden.len(), want.len());
        let mut worst = 0f32;
        for (p, w) in want.iter().enumerate() {
            worst = worst.max(max_abs_diff(&hidden[p], &f32s(w)));
        }
        eprintln!("case {ci} {path:?}: max |Δ| hidden = {worst:.2e}");
        assert!(worst <= TOL, "case {ci} {path:?}: max |Δ| hidden = {worst}");
        let block0 = out.layers[0].squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let dl = max_abs_diff(&block0[ids.len() - 1], &f32s(&case["layer1_output"]));
        assert!(dl <= TOL, "case {ci} {path:?}: block-0 max |Δ| = {dl}");
        // Top-10 logits over the base vocabulary (the reference has no embed token).
        let last = out.hidden.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        let logits: Vec<f32> = m
            .model
            .logits(&last.reshape((1, d)).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let logits = &logits[..m.model.config.vocab_size];
        let want_ids = u32s(&case["last_logits_top10"]);
        let want_vals = f32s(&case["last_logits_top10_values"]);
        for (k, (&id, &v)) in want_ids.iter().zip(&want_vals).enumerate() {
            let got = logits[id as usize];
            assert!(
                (got - v).abs() <= 2.5 * TOL,
                "case {ci}: logit of top-{k} id {id}: {got} vs {v}"
            );
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for k in 0..10 {
            let got = order[k] as u32;
            // Equal order, except where the reference values are themselves within tolerance.
            if got != want_ids[k] {
                let j = want_ids
                    .iter()
                    .position(|&x| x == got)
                    .expect("top-10 sets differ");
                assert!(
                    (want_vals[j] - want_vals[k]).abs() <= 2.5 * TOL,
                    "case {ci}: top-10 order differs at {k}"
                );
            }
        }
    }
}

pub fn check_greedy_generation_matches_reference(MODEL: &str, FIX: &str) {
    let Some(m) = real_model(MODEL) else { return };
    let fx = fixture(&format!("{FIX}/generate.json"));
    let cases = fx["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| u32s(&c["prompt_ids"])).collect();
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        ..Default::default()
    };
    // One at a time and all together (left-padded batch) must both reproduce the reference.
    let batched = generate(
        &m.model,
        &m.tokenizer,
        &prompts,
        &cfg,
        search_r3_model::Cancel::NEVER,
    )
    .unwrap();
    for (i, c) in cases.iter().enumerate() {
        let want = u32s(&c["greedy_ids"]);
        let single = generate(
            &m.model,
            &m.tokenizer,
            &prompts[i..i + 1],
            &cfg,
            search_r3_model::Cancel::NEVER,
        )
        .unwrap();
        assert_eq!(single[0].tokens, want, "case {i} alone");
        assert_eq!(batched[i].tokens, want, "case {i} in batch");
        let expect_stop = if want.len() < 24 {
            StopReason::Eos
        } else {
            StopReason::Budget
        };
        assert_eq!(single[0].stop, expect_stop);
        assert_eq!(single[0].text, c["greedy_text"].as_str().unwrap());
    }
}

pub fn check_left_padding_does_not_change_hidden_states(MODEL: &str, TOL: f32) {
    let Some(m) = real_model(MODEL) else { return };
    let texts = [
        "A short one.",
        "Earth's axial tilt of about 23.4 degrees causes seasons as the planet orbits the Sun.",
        "def f(x):\n    return x**2",
    ];
    let seqs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| m.tokenizer.encode(t).unwrap())
        .collect();
    for path in [Path::Fast, Path::Diff] {
        let batch = Batch::left_padded(&seqs, m.tokenizer.pad_id).unwrap();
        let all = m.model.forward(&batch, path, None).unwrap();
        for (i, s) in seqs.iter().enumerate() {
            let alone = m
                .model
                .forward(
                    &Batch::left_padded(std::slice::from_ref(s), 0).unwrap(),
                    path,
                    None,
                )
                .unwrap()
                .squeeze(0)
                .unwrap();
            let row = all.get(i).unwrap();
            let pad = batch.t - s.len();
            let row = row.narrow(0, pad, s.len()).unwrap();
            let diff = max_abs_diff_t(&row, &alone);
            assert!(diff <= TOL, "{path:?} row {i}: max |Δ| = {diff}");
        }
    }
}
