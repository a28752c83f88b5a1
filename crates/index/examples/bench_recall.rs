//! Recall and latency of the HNSW index against the exact index:
//! `cargo run --release -p search-r3-index --example bench_recall -- N DIM QUERIES
//! [CONNECTIVITY EXPANSION_ADD EXPANSION_SEARCH]`. Uniform random unit vectors (the worst
//! case) by default; with `DATA=clustered` in the environment, clustered vectors of low
//! intrinsic dimension (the shape of real embeddings).

use search_r3_index::{
    bench_recall, bench_recall_on, clustered_unit_vectors, HnswIndex, HnswParams,
};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are numbers"))
        .collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let d = HnswParams::default();
    let params = HnswParams {
        connectivity: arg(3, d.connectivity),
        expansion_add: arg(4, d.expansion_add),
        expansion_search: arg(5, d.expansion_search),
    };
    let (n, dim, queries) = (arg(0, 100_000), arg(1, 576), arg(2, 200));
    let clustered = std::env::var("DATA").is_ok_and(|v| v == "clustered");
    let r = if clustered {
        let clusters = (n / 250).max(1);
        let data = clustered_unit_vectors(n, dim, clusters, 0.5, 1);
        let qs = clustered_unit_vectors(queries, dim, clusters, 0.5, 2);
        bench_recall_on(dim, &data, &qs, params)
    } else {
        bench_recall(n, dim, queries, params)
    }
    .expect("benchmark failed");
    let accel = HnswIndex::new(dim, params)
        .map(|h| h.hardware_acceleration())
        .unwrap_or_default();
    println!(
        "{} n={n} dim={dim} queries={queries} {params:?} (usearch kernel {accel}): recall@10 {:.4}, \
         build {:.1}s, HNSW p50 {:.0}us p99 {:.0}us, exact p50 {:.0}us p99 {:.0}us",
        if clustered { "clustered" } else { "uniform" },
        r.recall,
        r.build_s,
        r.p50_us,
        r.p99_us,
        r.exact_p50_us,
        r.exact_p99_us
    );
}
