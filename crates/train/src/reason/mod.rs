//! The thought stage: reasoning trained *through the embedding* (between stage 1 and stage 2,
//! or after them), so that `--reason` pays.
//!
//! Expert iteration (STaR, Zelikman et al. 2022) with the selection and objective of O1
//! Embedder (Yan et al. 2025): sample several thoughts per training query, keep the one whose
//! embedding retrieves the gold documents best *if it beats the direct embedding*, then train
//! `0.8·InfoNCE + 0.2·CE` on query + kept thought → `<|embed_token|>`, dropping the thought
//! now and then so the direct embedding keeps learning too; repeat.
//!
//! What is trained is a *query tower*: the documents are frozen vectors from the document
//! model, so the index that model built stays valid (an asymmetric dual encoder).
//!
//! * [`select`] — scoring a vector against the frozen documents, and the selection rule;
//! * `trainer` — the loop: think, select, train, evaluate (direct, greedy thought, averaged
//!   thoughts), checkpoints with exact resume, the adapter + manifest.

pub mod select;
mod trainer;

pub use trainer::{
    train_reason, ReasonConfig, ReasonData, ReasonEval, ReasonQuery, ReasonSummary, Selection,
    Teacher, TeacherSection,
};
