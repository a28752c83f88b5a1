//! The runtime against transformers/PyTorch on the real SmolLM2-135M GGUF
//! (`fixtures/smollm2`). CI fetches the model; locally these skip if it is absent.

mod common;
use common::reference::*;
use search_r3_model::Path;

const MODEL: &str = "smollm2";
const FIX: &str = "smollm2";
/// The brief's bound: float32 rounding alone moves these hidden states by up to 7e-5.
const TOL: f32 = 2e-3;

#[test]
fn tokenizer_matches_transformers() {
    check_tokenizer_matches_transformers(MODEL, FIX);
}

#[test]
fn chat_template_renders_like_transformers() {
    check_chat_template_renders_like_transformers(MODEL, FIX);
}

#[test]
fn forward_fast_matches_reference() {
    check_forward(MODEL, FIX, TOL, Path::Fast);
}

#[test]
fn forward_diff_matches_reference() {
    check_forward(MODEL, FIX, TOL, Path::Diff);
}

#[test]
fn greedy_generation_matches_reference() {
    check_greedy_generation_matches_reference(MODEL, FIX);
}

#[test]
fn left_padding_does_not_change_hidden_states() {
    check_left_padding_does_not_change_hidden_states(MODEL, 1e-4);
}

/// On the real model: with LoRA on every projection (B factors moved off zero, as after a
/// first optimizer step) and `<|embed_token|>` in the input, every trainable tensor receives a
/// finite, non-zero gradient through the differentiable path, and no base weight receives one.
#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let Some(mut m) = common::real_model(MODEL) else {
        return;
    };
    let model = &mut m.model;
    model
        .add_lora(search_r3_model::LoraConfig::default(), 7)
        .unwrap();
    for (name, var) in model.trainable_vars() {
        if name.ends_with("lora_b") {
            let t = candle_core::Tensor::randn(0f32, 0.01, var.dims(), var.device()).unwrap();
            var.set(&t).unwrap();
        }
    }
    let text = "<|im_start|>assistant\nThe embedding is <|embed_token|><|im_end|>";
    let ids = m.tokenizer.encode_markup(text).unwrap();
    let eid = model.embed_token.as_ref().unwrap().id;
    assert_eq!(
        ids.iter().filter(|&&i| i == eid).count(),
        1,
        "embed token is one token"
    );
    let batch = search_r3_model::Batch::left_padded(std::slice::from_ref(&ids), 0).unwrap();
    let h = model.forward(&batch, Path::Diff, None).unwrap();
    let r = candle_core::Tensor::randn(0f32, 1.0, h.dims(), h.device()).unwrap();
    // Hidden-state term (the embedding) plus an LM term that reads the embed-token logit.
    let last = h.narrow(1, ids.len() - 1, 1).unwrap();
    let logit_embed = model
        .logits(&last)
        .unwrap()
        .narrow(2, eid as usize, 1)
        .unwrap()
        .sum_all()
        .unwrap();
    let loss = ((h * r).unwrap().sum_all().unwrap() + logit_embed).unwrap();
    let grads = loss.backward().unwrap();
    let vars = model.trainable_vars();
    assert_eq!(
        vars.len(),
        1 + 30 * 7 * 2,
        "tied model: one embed row + 420 LoRA factors"
    );
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
    }
    let w = &model.weights;
    let mut base = vec![&w.embed, &w.norm];
    for l in &w.layers {
        base.extend([
            &l.attn_norm,
            &l.wqkv_t,
            &l.wo_t,
            &l.ffn_norm,
            &l.w_gate_up_t,
            &l.w_down_t,
        ]);
    }
    for t in base {
        assert!(
            grads.get(t).is_none(),
            "a frozen base weight received a gradient"
        );
    }
}

/// `return_hidden` gives the final-norm hidden state at the stop token, equal to a plain forward
/// over prompt + output; a model that writes `<|embed_token|>` stops there with that reason.
#[test]
fn generation_returns_the_hidden_state_at_the_stop_token() {
    let Some(m) = common::real_model(MODEL) else {
        return;
    };
    let tok = &m.tokenizer;
    let prompts: Vec<Vec<u32>> = ["Name a colour.", "What is 2+2? Answer briefly, please."]
        .iter()
        .map(|q| {
            let msgs = [search_r3_model::ChatMessage::new("user", q)];
            tok.encode_markup(&tok.apply_chat_template(&msgs, true).unwrap())
                .unwrap()
        })
        .collect();
    let cfg = search_r3_model::GenerationConfig {
        max_new_tokens: 6,
        return_hidden: true,
        ..Default::default()
    };
    let check = |gens: &[search_r3_model::Generation]| {
        for (p, g) in prompts.iter().zip(gens) {
            let mut full = p.clone();
            full.extend(&g.tokens);
            let b = search_r3_model::Batch::left_padded(&[full.clone()], 0).unwrap();
            let h = m.model.forward(&b, Path::Fast, None).unwrap();
            let want = h.get(0).unwrap().get(full.len() - 1).unwrap();
            let got = g.hidden.as_ref().expect("hidden requested");
            let d = common::max_abs_diff_t(got, &want);
            assert!(d <= 1e-4, "hidden at stop differs by {d}");
        }
    };
    let gens = search_r3_model::generate(
        &m.model,
        tok,
        &prompts,
        &cfg,
        search_r3_model::Cancel::NEVER,
    )
    .unwrap();
    assert!(gens.iter().all(|g| g.logprobs.len() == g.tokens.len()));
    check(&gens);

    // Point the embed-token row along the first prompt's last hidden state so that its logit
    // dominates: generation must stop at once with StopReason::EmbedToken.
    let e = m.model.embed_token.as_ref().unwrap();
    let b = search_r3_model::Batch::left_padded(&prompts[..1], 0).unwrap();
    let h = m.model.forward(&b, Path::Fast, None).unwrap();
    let last = h.get(0).unwrap().get(prompts[0].len() - 1).unwrap();
    let n2 = last.sqr().unwrap().sum_all().unwrap();
    let row = (last.broadcast_div(&n2).unwrap() * 1000.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    e.row.set(&row).unwrap();
    let gens = search_r3_model::generate(
        &m.model,
        tok,
        &prompts[..1],
        &cfg,
        search_r3_model::Cancel::NEVER,
    )
    .unwrap();
    assert_eq!(gens[0].tokens, vec![e.id]);
    assert_eq!(gens[0].stop, search_r3_model::StopReason::EmbedToken);
    assert!(gens[0].text.ends_with(search_r3_model::EMBED_TOKEN));
    check(&gens);
}
