//! Scoring a query vector against a frozen document matrix, and choosing which thought to
//! learn from: the one that retrieves the gold documents best, if it beats the query's direct
//! embedding (O1 Embedder's selection by retrieval; LREM's "reasoning must beat no
//! reasoning"). A thought that ties or loses is never trained on, so the policy is not taught
//! to reason where reasoning does not help.

use search_r3_index::dot;
use serde::{Deserialize, Serialize};

/// How well one query vector retrieves its gold documents from the whole document matrix.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Retrieval {
    /// `Σ_g 1/log2(1 + rank_g) / IDCG` over the gold documents' exact ranks in the whole
    /// matrix (no depth cut, so a gold document moving from rank 400 to 150 counts).
    pub ndcg: f64,
    /// The best gold document's 1-based rank.
    pub best_rank: usize,
    /// Cosine of the query to its closest gold document (breaks ties between equal rankings).
    pub gold_cos: f64,
}

/// Scores unit vector `q` against unit rows `docs` for the gold rows `gold` (non-empty,
/// in range). A document ties the gold one only with an equal score; ties rank the gold
/// document first.
pub fn retrieval(q: &[f32], docs: &[Vec<f32>], gold: &[usize]) -> Retrieval {
    let scores: Vec<f32> = docs.iter().map(|d| dot(q, d)).collect();
    let mut dcg = 0.0;
    let mut best_rank = usize::MAX;
    let mut gold_cos = f64::NEG_INFINITY;
    for &g in gold {
        let s = scores[g];
        let rank = 1 + scores.iter().filter(|&&x| x > s).count();
        dcg += 1.0 / (1.0 + rank as f64).log2();
        best_rank = best_rank.min(rank);
        gold_cos = gold_cos.max(s as f64);
    }
    let idcg: f64 = (1..=gold.len())
        .map(|i| 1.0 / (1.0 + i as f64).log2())
        .sum();
    Retrieval {
        ndcg: dcg / idcg,
        best_rank,
        gold_cos,
    }
}

/// Whether `a` retrieves strictly better than `b`: a higher nDCG of the gold documents, or the
/// same ranking and a closer gold document.
pub fn beats(a: &Retrieval, b: &Retrieval) -> bool {
    const EPS: f64 = 1e-9;
    a.ndcg > b.ndcg + EPS || ((a.ndcg - b.ndcg).abs() <= EPS && a.gold_cos > b.gold_cos + EPS)
}

/// The thought to learn from: the index of the best of `thoughts` (by [`beats`]) when it beats
/// `direct`, else `None`.
pub fn select_thought(direct: &Retrieval, thoughts: &[Retrieval]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, t) in thoughts.iter().enumerate() {
        if best.is_none_or(|b| beats(t, &thoughts[b])) {
            best = Some(i);
        }
    }
    best.filter(|&b| beats(&thoughts[b], direct))
}
