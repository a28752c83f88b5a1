//! The runtime against transformers/PyTorch on the real Qwen2.5-Coder-0.5B-Instruct GGUF (qwen2: q/k/v biases, untied head)
//! (`fixtures/qwen2.5-coder-0.5b`). CI fetches the model; locally these skip if it is absent.

mod common;
use common::reference::*;
use search_r3_model::Path;

const MODEL: &str = "qwen2.5-coder-0.5b";
const FIX: &str = "qwen2.5-coder-0.5b";
/// The brief: float32 rounding alone moves these (values up to 177) by up to 2.8e-3.
const TOL: f32 = 1e-2;

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
    check_left_padding_does_not_change_hidden_states(MODEL, 1e-2);
}
