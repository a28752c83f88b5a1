//! Stage 2 of Search-R3 (Gui & Cheng, arXiv 2510.07048): GRPO with a retrieval reward,
//! against an index environment refreshed locally instead of re-encoding the corpus.
//!
//! * [`grpo`] — the DCG retrieval reward with format and length terms, group-normalised
//!   advantages, the clipped objective with a k3 KL penalty;
//! * [`env`] — the environment: corpus vectors of the current policy in an ANN index,
//!   refreshed locally (touched documents, then graph neighbours) under a budget, with drift
//!   and reward-fidelity measurements against a fresh encoding;
//! * `step` — one step: G sampled trajectories per query, rewards from the environment, the
//!   GRPO objective on trajectory tokens plus InfoNCE on trajectory embeddings;
//! * `trainer` — the loop: rollouts, updates, refreshes (baseline policies beside), held-out
//!   evaluation with reasoning, checkpoints with exact resume (environment included).

pub mod env;
pub mod grpo;
mod step;
mod trainer;

pub use step::{rl_gradients, rollout, touched_documents, RlQuery, RlStats, RlStepConfig, Rollout};
pub use trainer::{evaluate_reasoning, policy_name, train_rl, RlConfig, RlData, RlEval, RlSummary};
