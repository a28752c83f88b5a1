//! Training for search-r3.
//!
//! * [`losses`] — the stage-1 (SFT) objective `L = λ_ce·L_CE + λ_kl·L_KL + λ_nce·L_InfoNCE +
//!   λ_tri·L_triplet`, plus the k3 KL estimator and per-token log-probabilities that the GRPO
//!   stage needs. Every term is built only from candle ops that record a backward op (see
//!   BRIEF §4: fused kernels drop gradients silently).
//! * [`optim`] — warmup + cosine learning-rate schedule, global-norm gradient clipping,
//!   gradient accumulation over micro-batches, and an AdamW whose moments can be saved and
//!   restored bit-exactly for resumable runs.
//! * [`sft`] — one stage-1 gradient over a batch of queries and documents, with gradient
//!   caching (GradCache) so in-batch InfoNCE over many documents fits in CPU memory.
//! * [`trainer`] — the stage-1 loop: seeded data order, batches, accumulation, clipping,
//!   AdamW, `metrics.jsonl`, atomic checksummed checkpoints with exact resume, eval hooks, and
//!   the final adapter + manifest.
//! * [`grpo`] — stage 2's pieces: the DCG retrieval reward with format and length terms,
//!   group-normalised advantages, and the clipped GRPO objective with a k3 KL penalty.
//! * [`env`] — the RL environment: corpus vectors of the current policy in an ANN index,
//!   refreshed locally (touched documents, then graph neighbours) under a budget, with drift
//!   and reward-fidelity measurements against a fresh encoding.
//! * [`rl`] — one stage-2 step: G sampled trajectories per query, rewards from the
//!   environment, the GRPO objective on the trajectory tokens plus an InfoNCE term on the
//!   trajectory embeddings against the environment's hard negatives.
//! * [`rl_trainer`] — the stage-2 loop: rollouts, GRPO + InfoNCE updates, local refresh of
//!   the environment (and baseline policies beside it), drift/fidelity measurements, held-out
//!   evaluation with reasoning, checkpoints with exact resume (environment included).
//! * [`plot`] — a PNG of a run's `metrics.jsonl` curves, one panel per series, text drawn with
//!   a bundled font (no system font libraries).
#![warn(missing_docs)]

pub mod env;
pub mod error;
pub mod grpo;
pub mod losses;
pub mod optim;
pub mod plot;
pub mod rl;
pub mod rl_trainer;
pub mod sft;
pub mod trainer;

pub use env::{RefreshPolicy, RetrievalEnv};
pub use error::{Error, Result};
pub use losses::{
    cross_entropy, info_nce, kl_k3, kl_to_reference, token_log_probs, triplet, LossTerms,
    SftLossConfig,
};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule, ADAMW_PREFIX};
pub use plot::plot_metrics;
pub use rl::{reason_and_embed, rl_gradients, rollout, RlQuery, RlStats, RlStepConfig, Trajectory};
pub use rl_trainer::{
    evaluate_reasoning, policy_name, train_rl, RlConfig, RlData, RlEval, RlSummary,
};
pub use sft::{sft_gradients, SftBatch, SftExample, StepOutput};
pub use trainer::{
    embed_sequences, train_sft, BestEval, EvalHook, LoraSection, SftConfig, TrainData,
    TrainOptions, TrainQuery, TrainSummary,
};
