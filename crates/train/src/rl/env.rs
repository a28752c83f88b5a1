//! The RL environment of stage 2: the corpus embedded by the policy, held in an ANN index that
//! ranks rollout embeddings, and kept current *locally*.
//!
//! Every policy update changes every document's embedding a little. Re-encoding the whole
//! corpus after each update is exact but costs a corpus pass per step; never re-encoding is
//! free but lets the index drift away from the policy, so rewards measured against it go
//! stale. [`RefreshPolicy::Local`] re-encodes a budget of documents per update — the ones the
//! step touched (gold documents and retrieved top-k, whose ranks decided the rewards), then
//! their graph neighbours (the region the next similar queries land in), stalest first — and
//! updates them in place. [`RetrievalEnv::drift`] and [`RetrievalEnv::reward_fidelity`]
//! measure what that costs in accuracy against a fresh encoding.
//!
//! Documents are addressed by their position in the prompt list (key = position).

use super::grpo::dcg_reward;
use crate::error::{invalid, Result};
use crate::forward::embed_unit;
use search_r3_index::{
    load_index_with_files, save_index_with_files, AnyIndex, ExactIndex, HnswParams, IndexKind,
    IndexMeta, VectorIndex,
};
use search_r3_model::Model;
use serde::{Deserialize, Serialize};

/// How the environment keeps document vectors current after a policy update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum RefreshPolicy {
    /// Never re-encode: the index keeps the vectors of the policy it was built with.
    Never,
    /// Re-encode the whole corpus after every update (the exact, expensive baseline).
    Full,
    /// Re-encode at most `budget` documents per update: the touched ones first, then up to
    /// `neighbors` graph neighbours of each, stalest first.
    Local {
        /// Documents re-encoded per update, at most.
        budget: usize,
        /// Graph neighbours considered per touched document.
        neighbors: usize,
    },
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy::Local {
            budget: 64,
            neighbors: 8,
        }
    }
}

/// What one refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RefreshReport {
    /// Documents re-encoded.
    pub reencoded: usize,
    /// `reencoded / corpus size`.
    pub fraction: f64,
    /// Distinct touched documents the step reported.
    pub touched: usize,
}

/// Embedding drift of stale documents: cosine between the stored vector and a fresh encoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Drift {
    /// Probe documents that were stale (encoded by an older policy).
    pub stale: usize,
    /// Mean cosine over them (1 = no drift); 1 when none was stale.
    pub mean_cos: f64,
    /// Smallest cosine over them.
    pub min_cos: f64,
}

/// How well rewards on the environment's index agree with rewards on a fresh full encoding.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fidelity {
    /// Rewards against the environment's (partly stale) index.
    pub env_rewards: Vec<f64>,
    /// Rewards against a fresh encoding of the whole corpus.
    pub fresh_rewards: Vec<f64>,
    /// Spearman's ρ between the two (average ranks for ties); `None` when either is constant.
    pub spearman: Option<f64>,
    /// Kendall's τ-b between the two; `None` when either is constant.
    pub kendall: Option<f64>,
    /// Mean |env − fresh|.
    pub mean_abs_diff: f64,
}

/// One query for reward measurements: its embedding and its gold documents.
#[derive(Debug, Clone)]
pub struct ProbeQuery {
    /// Unit-norm query embedding.
    pub embedding: Vec<f32>,
    /// Positions of its relevant documents.
    pub gold: Vec<usize>,
}

/// The corpus index the policy is rewarded against.
pub struct RetrievalEnv {
    index: AnyIndex,
    prompts: Vec<Vec<u32>>,
    pad_id: u32,
    micro_tokens: usize,
    policy: RefreshPolicy,
    /// Policy version each document's stored vector was encoded with.
    encoded_at: Vec<u64>,
    /// Policy updates seen so far.
    version: u64,
    reencoded_total: usize,
}

impl RetrievalEnv {
    /// Encodes every document prompt (each ending with `<|embed_token|>`) with `model` and
    /// indexes it (`kind`: exact or HNSW with default parameters). `micro_tokens` bounds the
    /// padded tokens of one forward pass.
    pub fn new(
        model: &Model,
        prompts: Vec<Vec<u32>>,
        pad_id: u32,
        micro_tokens: usize,
        kind: IndexKind,
        policy: RefreshPolicy,
    ) -> Result<Self> {
        check_corpus_and_policy(&prompts, policy)?;
        let vectors = embed_unit(model, &prompts, pad_id, micro_tokens)?;
        Self::from_vectors(prompts, &vectors, pad_id, micro_tokens, kind, policy)
    }

    /// An environment over `prompts` whose current vectors are `vectors` (row `i` belongs to
    /// prompt `i`, all encoded by the current policy). Lets several environments with
    /// different refresh policies start from one encoding (the baselines beside a run).
    pub fn from_vectors(
        prompts: Vec<Vec<u32>>,
        vectors: &[Vec<f32>],
        pad_id: u32,
        micro_tokens: usize,
        kind: IndexKind,
        policy: RefreshPolicy,
    ) -> Result<Self> {
        check_corpus_and_policy(&prompts, policy)?;
        if vectors.len() != prompts.len() {
            invalid!(
                "RetrievalEnv: {} vectors for {} documents",
                vectors.len(),
                prompts.len()
            );
        }
        let dim = vectors[0].len();
        let mut index = AnyIndex::new(kind, dim, HnswParams::default()).map_err(index_err)?;
        let keys: Vec<u64> = (0..prompts.len() as u64).collect();
        index
            .upsert_batch(&keys, &vectors.concat())
            .map_err(index_err)?;
        Ok(RetrievalEnv {
            index,
            encoded_at: vec![0; prompts.len()],
            prompts,
            pad_id,
            micro_tokens,
            policy,
            version: 0,
            reencoded_total: 0,
        })
    }

    /// Writes the environment (index, per-document versions, counters) to `dir`, atomically
    /// replacing an environment saved there before.
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        let state = EnvState {
            format: ENV_FORMAT.into(),
            policy: self.policy,
            version: self.version,
            reencoded_total: self.reencoded_total,
            encoded_at: self.encoded_at.clone(),
            prompts_sha256: prompts_hash(&self.prompts),
        };
        let json = serde_json::to_vec(&state).expect("env state serialises");
        save_index_with_files(
            dir,
            &self.index,
            &IndexMeta::with_extra(Default::default()),
            &[(ENV_FILE, json)],
        )
        .map_err(index_err)?;
        Ok(())
    }

    /// Restores an environment written by [`RetrievalEnv::save`] for the same `prompts`
    /// (checked by hash): the resumed run sees exactly the vectors, graph and staleness the
    /// interrupted one had.
    pub fn load(
        dir: &std::path::Path,
        prompts: Vec<Vec<u32>>,
        pad_id: u32,
        micro_tokens: usize,
    ) -> Result<Self> {
        let (index, _, files) = load_index_with_files(dir).map_err(index_err)?;
        let path = dir.join(ENV_FILE);
        let bytes = files
            .get(ENV_FILE)
            .ok_or_else(|| crate::error::file_err(&path, "missing from the saved environment"))?;
        let state: EnvState = serde_json::from_slice(bytes)
            .map_err(|e| crate::error::file_err(&path, format!("corrupted: {e}")))?;
        if state.format != ENV_FORMAT {
            return Err(crate::error::file_err(
                &path,
                format!("unknown format `{}`", state.format),
            ));
        }
        if state.prompts_sha256 != prompts_hash(&prompts)
            || state.encoded_at.len() != prompts.len()
            || index.len() != prompts.len()
        {
            return Err(crate::error::file_err(
                &path,
                "saved for a different corpus (document prompts differ)",
            ));
        }
        Ok(RetrievalEnv {
            index,
            prompts,
            pad_id,
            micro_tokens,
            policy: state.policy,
            encoded_at: state.encoded_at,
            version: state.version,
            reencoded_total: state.reencoded_total,
        })
    }

    /// The document prompts, by position.
    pub fn prompts(&self) -> &[Vec<u32>] {
        &self.prompts
    }

    /// A fresh encoding of the whole corpus by `model` (row `i` = document `i`): what the
    /// measurements compare the stored vectors with. One corpus pass.
    pub fn encode_all(&self, model: &Model) -> Result<Vec<Vec<f32>>> {
        embed_unit(model, &self.prompts, self.pad_id, self.micro_tokens)
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether the corpus is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The refresh policy.
    pub fn policy(&self) -> RefreshPolicy {
        self.policy
    }

    /// Policy updates seen.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Documents re-encoded by refreshes so far (the initial encoding excluded).
    pub fn reencoded_total(&self) -> usize {
        self.reencoded_total
    }

    /// The stored vector of document `doc`.
    pub fn stored(&self, doc: usize) -> Option<Vec<f32>> {
        self.index.get(doc as u64)
    }

    /// Policy updates since `doc` was last encoded (0 = current).
    pub fn staleness(&self, doc: usize) -> u64 {
        self.version - self.encoded_at[doc]
    }

    /// Up to `k` graph neighbours of document `doc`, closest first (see
    /// [`VectorIndex::neighbors`]).
    pub fn neighbors(&self, doc: usize, k: usize) -> Result<Vec<usize>> {
        Ok(self
            .index
            .neighbors(doc as u64, k)
            .map_err(index_err)?
            .into_iter()
            .map(|h| h.key as usize)
            .collect())
    }

    /// The `k` best documents for a query embedding, best first.
    pub fn search(&self, q: &[f32], k: usize) -> Result<Vec<usize>> {
        Ok(self
            .index
            .search(q, k)
            .map_err(index_err)?
            .into_iter()
            .map(|h| h.key as usize)
            .collect())
    }

    /// The DCG reward of a query embedding against this index (see [`dcg_reward`]), with the
    /// ranking it came from (top `top_k`).
    pub fn reward(&self, q: &[f32], gold: &[usize], top_k: usize) -> Result<(f64, Vec<usize>)> {
        let ranking = self.search(q, top_k)?;
        Ok((reward_of(&ranking, gold, top_k)?, ranking))
    }

    /// Registers a policy update and re-encodes documents according to the policy. `touched`
    /// lists the documents the step's rewards depended on (gold and retrieved), most important
    /// first; [`RefreshPolicy::Local`] refreshes them first, then their graph neighbours.
    pub fn refresh(&mut self, model: &Model, touched: &[usize]) -> Result<RefreshReport> {
        self.version += 1;
        let n = self.len();
        let mut seen = vec![false; n];
        let mut distinct = Vec::new();
        for &d in touched {
            if d >= n {
                invalid!("refresh: touched document {d} is outside the corpus of {n}");
            }
            if !std::mem::replace(&mut seen[d], true) {
                distinct.push(d);
            }
        }
        let chosen: Vec<usize> = match self.policy {
            RefreshPolicy::Never => Vec::new(),
            RefreshPolicy::Full => (0..n).collect(),
            RefreshPolicy::Local { budget, neighbors } => {
                let mut chosen: Vec<usize> = distinct.iter().copied().take(budget).collect();
                if chosen.len() < budget && neighbors > 0 {
                    let mut around = Vec::new();
                    for &d in &distinct {
                        for h in self
                            .index
                            .neighbors(d as u64, neighbors)
                            .map_err(index_err)?
                        {
                            let k = h.key as usize;
                            if !std::mem::replace(&mut seen[k], true) {
                                around.push(k);
                            }
                        }
                    }
                    // Stalest first; ties keep discovery order (closest region first).
                    around.sort_by_key(|&k| std::cmp::Reverse(self.staleness(k)));
                    chosen.extend(around.into_iter().take(budget - chosen.len()));
                }
                chosen
            }
        };
        self.reencode(model, &chosen)?;
        Ok(RefreshReport {
            reencoded: chosen.len(),
            fraction: chosen.len() as f64 / n as f64,
            touched: distinct.len(),
        })
    }

    fn reencode(&mut self, model: &Model, docs: &[usize]) -> Result<()> {
        if docs.is_empty() {
            return Ok(());
        }
        let prompts: Vec<Vec<u32>> = docs.iter().map(|&d| self.prompts[d].clone()).collect();
        let vectors = embed_unit(model, &prompts, self.pad_id, self.micro_tokens)?;
        let keys: Vec<u64> = docs.iter().map(|&d| d as u64).collect();
        self.index
            .upsert_batch(&keys, &vectors.concat())
            .map_err(index_err)?;
        for &d in docs {
            self.encoded_at[d] = self.version;
        }
        self.reencoded_total += docs.len();
        Ok(())
    }

    /// Drift of the stale documents among `probe`: cosine of the stored vector to a fresh
    /// encoding by `model`. Costs one forward pass over the probe's stale documents.
    pub fn drift(&self, model: &Model, probe: &[usize]) -> Result<Drift> {
        let stale = self.stale_among(probe);
        let prompts: Vec<Vec<u32>> = stale.iter().map(|&d| self.prompts[d].clone()).collect();
        let fresh = embed_unit(model, &prompts, self.pad_id, self.micro_tokens)?;
        Ok(self.drift_of(&stale, &fresh))
    }

    /// [`RetrievalEnv::drift`] against an encoding of the whole corpus already made
    /// ([`RetrievalEnv::encode_all`]), at no model cost.
    pub fn drift_against(&self, fresh: &[Vec<f32>], probe: &[usize]) -> Result<Drift> {
        self.check_fresh(fresh)?;
        let stale = self.stale_among(probe);
        let rows: Vec<Vec<f32>> = stale.iter().map(|&d| fresh[d].clone()).collect();
        Ok(self.drift_of(&stale, &rows))
    }

    fn stale_among(&self, probe: &[usize]) -> Vec<usize> {
        probe
            .iter()
            .copied()
            .filter(|&d| d < self.len() && self.staleness(d) > 0)
            .collect()
    }

    fn drift_of(&self, stale: &[usize], fresh: &[Vec<f32>]) -> Drift {
        if stale.is_empty() {
            return Drift {
                stale: 0,
                mean_cos: 1.0,
                min_cos: 1.0,
            };
        }
        let mut sum = 0.0;
        let mut min = f64::INFINITY;
        for (&d, f) in stale.iter().zip(fresh) {
            let s = self.stored(d).expect("every document is indexed");
            let c = cosine(&s, f);
            sum += c;
            min = min.min(c);
        }
        Drift {
            stale: stale.len(),
            mean_cos: sum / stale.len() as f64,
            min_cos: min,
        }
    }

    fn check_fresh(&self, fresh: &[Vec<f32>]) -> Result<()> {
        if fresh.len() != self.len() {
            invalid!(
                "fresh encoding has {} rows, the corpus {} documents",
                fresh.len(),
                self.len()
            );
        }
        Ok(())
    }

    /// Rewards of `queries` against this index and against a fresh exact encoding of the
    /// whole corpus by `model`, and their rank agreement. Costs a full corpus pass: run it
    /// every K steps, not every step.
    pub fn reward_fidelity(
        &self,
        model: &Model,
        queries: &[ProbeQuery],
        top_k: usize,
    ) -> Result<Fidelity> {
        if queries.is_empty() {
            invalid!("reward_fidelity: no probe queries");
        }
        self.fidelity_against(&self.encode_all(model)?, queries, top_k)
    }

    /// [`RetrievalEnv::reward_fidelity`] against an encoding of the whole corpus already made
    /// ([`RetrievalEnv::encode_all`]), searched exactly.
    pub fn fidelity_against(
        &self,
        fresh: &[Vec<f32>],
        queries: &[ProbeQuery],
        top_k: usize,
    ) -> Result<Fidelity> {
        if queries.is_empty() {
            invalid!("reward_fidelity: no probe queries");
        }
        self.check_fresh(fresh)?;
        let exact = exact_index(fresh)?;
        let mut env_rewards = Vec::with_capacity(queries.len());
        let mut fresh_rewards = Vec::with_capacity(queries.len());
        for q in queries {
            env_rewards.push(self.reward(&q.embedding, &q.gold, top_k)?.0);
            fresh_rewards.push(exact_reward(&exact, q, top_k)?);
        }
        let mean_abs_diff = env_rewards
            .iter()
            .zip(&fresh_rewards)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / queries.len() as f64;
        Ok(Fidelity {
            spearman: spearman(&env_rewards, &fresh_rewards),
            kendall: kendall_tau_b(&env_rewards, &fresh_rewards),
            env_rewards,
            fresh_rewards,
            mean_abs_diff,
        })
    }
}

/// An exact index over `vectors` (key = row).
pub fn exact_index(vectors: &[Vec<f32>]) -> Result<ExactIndex> {
    let dim = vectors.first().map_or(0, Vec::len);
    let mut exact = ExactIndex::new(dim).map_err(index_err)?;
    let keys: Vec<u64> = (0..vectors.len() as u64).collect();
    exact
        .upsert_batch(&keys, &vectors.concat())
        .map_err(index_err)?;
    Ok(exact)
}

/// trec_eval's nDCG@10 of unit vector `v` against `index` (key = row), the rows `gold` relevant:
/// what every held-out evaluation of the training stages reports.
pub fn ndcg_at_10(index: &ExactIndex, v: &[f32], gold: &[usize]) -> Result<f64> {
    let hits: Vec<(String, f64)> = index
        .search(v, 10)
        .map_err(index_err)?
        .into_iter()
        .map(|h| (h.key.to_string(), h.score as f64))
        .collect();
    let judged: std::collections::HashMap<String, i32> =
        gold.iter().map(|d| (d.to_string(), 1)).collect();
    Ok(search_r3_core::metrics::evaluate_query(&judged, &hits)
        .get("ndcg@10")
        .copied()
        .unwrap_or(0.0))
}

/// The DCG reward of a probe query against an exact index.
pub fn exact_reward(index: &ExactIndex, q: &ProbeQuery, top_k: usize) -> Result<f64> {
    let ranking: Vec<usize> = index
        .search(&q.embedding, top_k)
        .map_err(index_err)?
        .into_iter()
        .map(|h| h.key as usize)
        .collect();
    reward_of(&ranking, &q.gold, top_k)
}

const ENV_FORMAT: &str = "search-r3-rl-env-1";
const ENV_FILE: &str = "env.json";

/// What [`RetrievalEnv::save`] stores beside the index.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvState {
    format: String,
    policy: RefreshPolicy,
    version: u64,
    reencoded_total: usize,
    encoded_at: Vec<u64>,
    prompts_sha256: String,
}

fn prompts_hash(prompts: &[Vec<u32>]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((prompts.len() as u64).to_le_bytes());
    for p in prompts {
        h.update((p.len() as u64).to_le_bytes());
        p.iter().for_each(|t| h.update(t.to_le_bytes()));
    }
    hex::encode(h.finalize())
}

/// Refuses an empty corpus and a local budget of 0 (before any encoding is spent).
fn check_corpus_and_policy(prompts: &[Vec<u32>], policy: RefreshPolicy) -> Result<()> {
    if prompts.is_empty() {
        invalid!("RetrievalEnv: the corpus is empty");
    }
    if let RefreshPolicy::Local { budget: 0, .. } = policy {
        invalid!(
            "RetrievalEnv: a local refresh budget of 0 never refreshes; use policy = \"never\""
        );
    }
    Ok(())
}

fn index_err(e: search_r3_index::IndexError) -> crate::Error {
    crate::Error::Invalid(format!("index: {e}"))
}

/// DCG reward of `gold` in a ranking of document positions.
fn reward_of(ranking: &[usize], gold: &[usize], top_k: usize) -> Result<f64> {
    let ranks: Vec<Option<usize>> = gold
        .iter()
        .map(|g| ranking.iter().position(|d| d == g).map(|p| p + 1))
        .collect();
    dcg_reward(&ranks, top_k)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}

/// Ranks 1..n with ties given their average rank.
fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    ranks
}

fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        ab += (x - ma) * (y - mb);
        aa += (x - ma).powi(2);
        bb += (y - mb).powi(2);
    }
    (aa > 0.0 && bb > 0.0).then(|| ab / (aa * bb).sqrt())
}

/// Spearman's rank correlation (Pearson on average ranks, as scipy computes it); `None` when
/// either side is constant or the lengths differ.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    pearson(&average_ranks(a), &average_ranks(b))
}

/// Kendall's τ-b (tie-corrected, as scipy's default): `(C − D) / √((n0 − n1)(n0 − n2))`;
/// `None` when either side is constant or the lengths differ.
pub fn kendall_tau_b(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (mut conc, mut disc, mut ties_a, mut ties_b) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            let (da, db) = (a[i] - a[j], b[i] - b[j]);
            match (da == 0.0, db == 0.0) {
                (true, true) => {
                    ties_a += 1;
                    ties_b += 1;
                }
                (true, false) => ties_a += 1,
                (false, true) => ties_b += 1,
                (false, false) if (da > 0.0) == (db > 0.0) => conc += 1,
                _ => disc += 1,
            }
        }
    }
    let n0 = (a.len() * (a.len() - 1) / 2) as i64;
    let denom = (((n0 - ties_a) * (n0 - ties_b)) as f64).sqrt();
    (denom > 0.0).then(|| (conc - disc) as f64 / denom)
}
