//! Decoder-LLM runtime for search-r3: loads llama/qwen2/qwen3 models from GGUF files or HF
//! directories, tokenizes and renders chat templates, runs a fast and a differentiable forward
//! pass over the same weights, carries LoRA adapters and the `<|embed_token|>` row, and
//! generates with a KV cache.
//!
//! Every public name has one path. The front door is the crate root, which re-exports the main
//! types of the private modules; the public modules are reached by their path.
//!
//! * `config` — hyper-parameters from GGUF metadata or `config.json` ([`ModelConfig`], [`Arch`]);
//! * `error` — the runtime's one error type, naming the file at fault ([`Error`], [`Result`]);
//! * [`fetch`] — known models fetched by name through pip into a verified, shared cache;
//! * [`files`] — streamed sha256 and atomic file writes, shared by the crates above;
//! * `generate` — batched generation with a KV cache ([`generate()`], [`GenerationConfig`]);
//! * `load` — model + tokenizer from a GGUF file, HF directory or fetched name ([`load_model`]);
//! * `lora` — LoRA adapters on the differentiable path ([`Lora`], [`LoraConfig`]);
//! * [`merge`] — folding adapters into the base weights, exporting an HF checkpoint;
//! * `model` — the decoder forward pass, fast and differentiable ([`Model`], [`Batch`]);
//! * `ops` — ops candle lacks for training with frozen weights;
//! * [`state`] — saving and restoring the trainable state (LoRA, `<|embed_token|>` rows);
//! * `tokenizer` — tokenizer and chat template ([`TextTokenizer`], [`ChatMessage`]);
//! * [`weights`] — the frozen base weights and their GGUF and safetensors readers.
#![warn(missing_docs)]

mod config;
mod error;
pub mod fetch;
pub mod files;
mod generate;
mod load;
mod lora;
pub mod machine;
pub mod merge;
mod model;
mod ops;
pub mod state;
mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::{Error, Result};
pub use generate::{generate, Cancel, Generation, GenerationConfig, StopReason};
pub use load::{known_model_for_tests, load_model, load_path, LoadOptions, LoadedModel};
pub use lora::{Lora, LoraConfig, LoraTarget};
pub use machine::Machine;
pub use model::{Batch, EmbedTokenParams, ForwardOptions, ForwardOutput, KvCache, Model, Path};
pub use tokenizer::{ChatMessage, TextTokenizer, CHATML_TEMPLATE, EMBED_TOKEN};

/// Process-wide threading defaults; call first thing in `main`, before any tensor op.
///
/// candle runs matmuls on rayon's pool and elementwise ops on a separate spin-waiting barrier
/// pool. With both active, the spinning workers compete with the gemm threads for the same
/// cores; on the 2-core reference machine that cost 25% of prefill throughput
/// (`search-r3 bench model`: 1×142 prefill 1007 vs 753 tok/s). Unless the user set
/// `CANDLE_NUM_THREADS`, elementwise ops therefore stay on the calling thread (they are
/// memory-bound and small next to the matmuls); matmuls still use every core.
///
/// It also keeps large freed buffers in glibc's heap: every candle op allocates its output, and
/// with glibc's defaults each buffer over the adaptive mmap threshold is a fresh `mmap` whose
/// pages fault in one by one and are unmapped again on drop (the SciFact encoding run counted
/// 64M page faults, ~20% of its time; 7×540-token batches went from 686 to 849 tok/s).
pub fn init_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called before any other thread exists (documented contract), so this is sound.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is called before the
    // program allocates in earnest and takes plain integers.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts; a huge trim threshold keeps freed
        // heap memory for reuse instead of returning it to the kernel after every op.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
