//! Stage 1 of Search-R3 (Gui & Cheng, arXiv 2510.07048): supervised contrastive training
//! of LoRA adapters and the `<|embed_token|>` row.
//!
//! * `step` — one gradient of `λ_ce·L_CE + λ_kl·L_KL + λ_nce·L_InfoNCE + λ_tri·L_triplet`
//!   over a batch, with gradient caching so in-batch InfoNCE fits in CPU memory;
//! * `trainer` — the loop: seeded batches, accumulation, clipping, AdamW, evaluation hooks,
//!   checkpoints with exact resume, the final adapter + manifest.

mod step;
mod trainer;

pub use step::{sft_gradients, SftBatch, SftExample, StepOutput};
pub use trainer::{train_sft, EvalHook, SftConfig, TrainData, TrainQuery, TrainSummary};
