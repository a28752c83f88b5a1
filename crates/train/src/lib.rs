//! Training for search-r3: stage 1 (contrastive SFT) and stage 2 (GRPO with a retrieval
//! reward against an index environment refreshed locally).
//!
//! * [`losses`] — the stage-1 objective `L = λ_ce·L_CE + λ_kl·L_KL + λ_nce·L_InfoNCE +
//!   λ_tri·L_triplet`, the k3 KL estimator and per-token log-probabilities for GRPO; every
//!   term is built only from candle ops that record a backward op (BRIEF §4: fused kernels
//!   drop gradients silently);
//! * [`optim`] — warmup + cosine schedule, global-norm clipping, gradient accumulation, and an
//!   AdamW whose moments are saved and restored bit-exactly for resumable runs;
//! * `forward` — the training-side forward passes both stages build on (right-padded batches,
//!   rows at the embed token, micro-batches, the frozen reference policy);
//! * [`run`] — what both loops share: configs and their hashes, the seeded data order,
//!   checkpoints with exact resume, `metrics.jsonl` and curves, the final adapter + manifest;
//! * [`sft`] — stage 1: one gradient with gradient caching, and the loop;
//! * [`reason`] — the thought stage: expert iteration over thoughts selected by their
//!   retrieval gain, training a query tower against frozen document vectors;
//! * [`rl`] — stage 2: the GRPO pieces, the retrieval environment, one step, and the loop;
//! * [`plot`] — a PNG of a run's `metrics.jsonl` curves (bundled font, no system libraries).
#![warn(missing_docs)]

mod error;
mod forward;
pub mod losses;
pub mod optim;
pub mod plot;
pub mod reason;
pub mod rl;
pub mod run;
pub mod sft;

pub use error::{Error, Result};
