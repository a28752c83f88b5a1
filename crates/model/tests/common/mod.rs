//! Shared helpers for the model tests: real models and reference fixtures (here and in
//! [`reference`]), and the tiny random models the `tiny_*` tests write ([`tiny`], [`tiny_run`]).
#![allow(dead_code)]

use search_r3_model::LoadedModel;
use std::path::PathBuf;

/// `../shared` beside the repository (override with `SEARCH_R3_SHARED`).
pub fn shared_dir() -> PathBuf {
    if let Ok(p) = std::env::var("SEARCH_R3_SHARED") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// Reads a fixture JSON file.
pub fn fixture(rel: &str) -> serde_json::Value {
    let p = shared_dir().join("fixtures").join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// Loads a known model (fetched in CI, skipped locally when absent).
pub fn real_model(name: &str) -> Option<LoadedModel> {
    search_r3_model::known_model_for_tests(name)
}

/// Max |a-b| over two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A JSON array of numbers as f32.
pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A JSON array of ids.
pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub mod reference;
pub mod tiny;
pub mod tiny_run;

/// Max |a-b| over two tensors of the same shape.
pub fn max_abs_diff_t(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
