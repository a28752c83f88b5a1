//! Decoder-LLM runtime for search-r3: loads llama/qwen2/qwen3 models from GGUF files or HF
//! directories, tokenizes and renders chat templates, runs a fast and a differentiable forward
//! pass over the same weights, carries LoRA adapters and the `<|embed_token|>` row, and
//! generates with a KV cache.
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod load;
pub mod lora;
pub mod model;
pub mod ops;
pub mod state;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use generate::{generate, Generation, GenerationConfig, StopReason};
pub use load::{load_model, LoadOptions, LoadedModel};
pub use lora::{LoraConfig, LoraTarget};
pub use model::{Batch, ForwardOptions, KvCache, Model, Path};
pub use tokenizer::{ChatMessage, TextTokenizer, EMBED_TOKEN};

/// Turns on candle's AVX-512 matmul kernels when the CPU has them (chosen at run time, so the
/// binary still runs elsewhere). Linking `gemm` with `x86-v4` is what enables them; this
/// function exists so the dependency is visibly used.
pub fn cpu_features() -> String {
    format!(
        "avx512f={} avx2={}",
        std::is_x86_feature_detected!("avx512f"),
        std::is_x86_feature_detected!("avx2")
    )
}
