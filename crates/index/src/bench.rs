//! Recall/latency measurement and seeded test data, shared by tests and the CLI's benchmarks.

use std::time::Instant;

use crate::{ExactIndex, Hit, HnswIndex, HnswParams, Result, VectorIndex};

/// What [`bench_recall`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchReport {
    /// Mean recall@10 of the HNSW index against the exact index.
    pub recall: f64,
    /// Seconds to build the HNSW graph (all cores).
    pub build_s: f64,
    /// Median single-query HNSW search latency, microseconds (one thread).
    pub p50_us: f64,
    /// 99th-percentile single-query HNSW search latency, microseconds (one thread).
    pub p99_us: f64,
    /// Median single-query exact search latency, microseconds (the scan uses all cores).
    pub exact_p50_us: f64,
    /// 99th-percentile single-query exact search latency, microseconds.
    pub exact_p99_us: f64,
}

/// `n` pseudo-random unit vectors of dimension `dim` (row-major), uniform on the sphere and a
/// pure function of `seed`, so benchmarks and tests are reproducible without a `rand`
/// dependency.
pub fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed ^ 0x005E_ED0F_1DE5);
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let start = out.len();
        let mut norm = 0f64;
        for _ in 0..dim {
            let g = rng.gaussian();
            norm += g * g;
            out.push(g as f32);
        }
        let inv = 1.0 / norm.sqrt().max(f64::MIN_POSITIVE);
        for x in &mut out[start..] {
            *x = (*x as f64 * inv) as f32;
        }
    }
    out
}

/// `n` unit vectors in `clusters` clusters, each a random centre plus a random 8-dimensional
/// local spread of scale `spread` and a little isotropic noise: clustered, with a low
/// intrinsic dimension, which is the shape real text embeddings have (unlike
/// [`random_unit_vectors`]). Centres and local directions depend only on `clusters` and
/// `dim`, so queries drawn with another `seed` come from the same clusters. Row `i` belongs
/// to cluster `i % clusters`.
pub fn clustered_unit_vectors(
    n: usize,
    dim: usize,
    clusters: usize,
    spread: f32,
    seed: u64,
) -> Vec<f32> {
    const LOCAL: usize = 8;
    let clusters = clusters.max(1);
    let centres = random_unit_vectors(clusters, dim, 1000);
    let bases = random_unit_vectors(clusters * LOCAL, dim, 2000);
    let coeffs = random_unit_vectors(n, LOCAL, seed);
    let noise = random_unit_vectors(n, dim, seed.wrapping_add(1));
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let c = i % clusters;
        let mut v = centres[c * dim..(c + 1) * dim].to_vec();
        for j in 0..LOCAL {
            let b = &bases[(c * LOCAL + j) * dim..(c * LOCAL + j + 1) * dim];
            let z = coeffs[i * LOCAL + j] * spread;
            v.iter_mut().zip(b).for_each(|(x, b)| *x += z * b);
        }
        let e = &noise[i * dim..(i + 1) * dim];
        v.iter_mut().zip(e).for_each(|(x, e)| *x += 0.05 * e);
        let norm = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        out.extend(v.iter().map(|x| x / norm));
    }
    out
}

/// Mean over queries of |approx ∩ truth| / |truth| (1 for a query with an empty truth list).
pub fn recall_at_k(truth: &[Vec<Hit>], approx: &[Vec<Hit>]) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let total: f64 = truth
        .iter()
        .zip(approx)
        .map(|(t, a)| {
            if t.is_empty() {
                return 1.0;
            }
            let found = t
                .iter()
                .filter(|h| a.iter().any(|x| x.key == h.key))
                .count();
            found as f64 / t.len() as f64
        })
        .sum();
    total / truth.len() as f64
}

/// Builds an HNSW index over `n` uniformly random unit vectors of dimension `dim` (seed 1) and
/// measures it against the exact index with `queries` random queries (seed 2): recall@10,
/// build time, and single-thread search latency percentiles.
///
/// Uniform random vectors are the worst case for any graph index (no cluster structure, every
/// point almost equally far from every other), so this is a lower bound on what real
/// embeddings get; use [`bench_recall_on`] for those.
pub fn bench_recall(
    n: usize,
    dim: usize,
    queries: usize,
    params: HnswParams,
) -> Result<BenchReport> {
    let data = random_unit_vectors(n, dim, 1);
    let qs = random_unit_vectors(queries, dim, 2);
    bench_recall_on(dim, &data, &qs, params)
}

/// [`bench_recall`] on given row-major `data` (keys 0..n) and `queries`.
pub fn bench_recall_on(
    dim: usize,
    data: &[f32],
    queries: &[f32],
    params: HnswParams,
) -> Result<BenchReport> {
    crate::check_batch(dim, data.len() / dim.max(1), data.len())?;
    let n = data.len() / dim;
    let keys: Vec<u64> = (0..n as u64).collect();

    let mut exact = ExactIndex::new(dim)?;
    exact.reserve(n);
    exact.upsert_batch(&keys, data)?;
    let truth = exact.search_batch(queries, 10)?;
    let mut exact_lat = Vec::with_capacity(queries.len() / dim);
    for q in queries.chunks_exact(dim) {
        let t = Instant::now();
        exact.search(q, 10)?;
        exact_lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(exact);

    let t = Instant::now();
    let hnsw = HnswIndex::build(dim, params, &keys, data)?;
    let build_s = t.elapsed().as_secs_f64();

    let mut lat = Vec::with_capacity(queries.len() / dim);
    let mut got = Vec::with_capacity(queries.len() / dim);
    for q in queries.chunks_exact(dim) {
        let t = Instant::now();
        let hits = hnsw.search(q, 10)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        got.push(hits);
    }
    Ok(BenchReport {
        recall: recall_at_k(&truth, &got),
        build_s,
        p50_us: percentile(&mut lat, 0.50),
        p99_us: percentile(&mut lat, 0.99),
        exact_p50_us: percentile(&mut exact_lat, 0.50),
        exact_p99_us: percentile(&mut exact_lat, 0.99),
    })
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// SplitMix64: tiny, fast and good enough for test data.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller; the second value is dropped for simplicity).
    fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}
