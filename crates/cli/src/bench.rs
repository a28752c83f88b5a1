//! `search-r3 bench model`: throughput of the runtime on the shapes the rest of the system
//! uses (document prefill, batched reasoning generation, LoRA training steps) and peak memory.
//! `bench/compare.sh` runs it beside PyTorch/transformers on the same GGUF in one go.

use anyhow::{Context, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use search_r3_model::{
    generate, load_model, Batch, GenerationConfig, LoadOptions, LoraConfig, Path,
};
use std::time::Instant;

/// Options of `bench model`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Model to measure.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    /// Timed repeats of the prefill shapes (median reported); generation and LoRA use half.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Comma list of: prefill, gen, lora, passes (embedding 160 prompts of 64–256 tokens in
    /// length-sorted forward passes of 512 … 16384 padded tokens: the server's
    /// `--max-forward-tokens`).
    #[arg(long, default_value = "prefill,gen,lora")]
    only: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` once to warm up, then `n` times; returns the median seconds.
fn timed(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut ts = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        f()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    Ok(median(ts))
}

/// A memory field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`) in bytes (Linux only).
pub(crate) fn proc_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mb() -> Option<f64> {
    Some(proc_bytes(std::process::id(), "VmHWM:")? as f64 / 1048576.0)
}

/// Random ids avoiding the first special ids, like bench/torch_bench.py.
fn random_ids(rng: &mut impl Rng, b: usize, t: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|_| (0..t).map(|_| rng.random_range(17..vocab as u32)).collect())
        .collect()
}

/// Runs the benchmark and prints a table (and JSON when asked).
pub fn run(a: &BenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut m = load_model(&a.model, &LoadOptions::default()).context("loading model")?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = m.model.config.vocab_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let only: Vec<&str> = a.only.split(',').map(str::trim).collect();
    let long = (a.repeats / 2).max(3);
    let mut res = serde_json::Map::new();
    let mut put = |k: &str, v: f64| {
        eprintln!("{k:<28} {v:>10.1}");
        res.insert(k.to_string(), serde_json::json!((v * 10.0).round() / 10.0));
    };

    if only.contains(&"prefill") {
        for (name, b, t) in [
            ("prefill_1x142_tok_s", 1, 142),
            ("prefill_8x128_tok_s", 8, 128),
        ] {
            let batch = Batch::left_padded(&random_ids(&mut rng, b, t, vocab), 0)?;
            let s = timed(a.repeats, || {
                m.model.forward(&batch, Path::Fast, None)?;
                Ok(())
            })?;
            put(name, (b * t) as f64 / s);
        }
    }
    if only.contains(&"passes") {
        let prompts: Vec<Vec<u32>> = (0..160)
            .map(|_| {
                let t = rng.random_range(64..=256);
                random_ids(&mut rng, 1, t, vocab).remove(0)
            })
            .collect();
        let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let tokens: usize = lengths.iter().sum();
        for budget in [512, 1024, 2048, 4096, 16384] {
            let plan = search_r3_core::encode::plan_batches(&lengths, budget);
            let s = timed(long, || {
                for rows in &plan {
                    let b: Vec<Vec<u32>> = rows.iter().map(|&i| prompts[i].clone()).collect();
                    m.model
                        .forward(&Batch::left_padded(&b, 0)?, Path::Fast, None)?;
                }
                Ok(())
            })?;
            put(&format!("passes_{budget}_tok_s"), tokens as f64 / s);
        }
    }
    if only.contains(&"gen") {
        let new = 64;
        let cfg = GenerationConfig {
            max_new_tokens: new,
            stop_at_eos: false,
            stop_at_embed_token: false,
            ..Default::default()
        };
        for (name, b) in [("gen_b1_tok_s", 1), ("gen_b16_tok_s", 16)] {
            let prompts = random_ids(&mut rng, b, 40, vocab);
            let s = timed(long, || {
                let g = generate(
                    &m.model,
                    &m.tokenizer,
                    &prompts,
                    &cfg,
                    search_r3_model::Cancel::NEVER,
                )?;
                anyhow::ensure!(g.iter().all(|g| g.tokens.len() == new), "short generation");
                Ok(())
            })?;
            put(name, (b * new) as f64 / s);
        }
    }
    // Inference and training peaks separately: the autograd graph dominates the latter.
    if let Some(p) = peak_rss_mb() {
        put("peak_rss_inference_mb", p);
    }
    if only.contains(&"lora") {
        m.model.add_lora(LoraConfig::default(), 0)?;
        let (b, t) = (4, 128);
        let batch = Batch::left_padded(&random_ids(&mut rng, b, t, vocab), 0)?;
        let d = m.model.config.hidden_size;
        let r = Tensor::randn(0f32, 1.0, (b, t, d), m.model.device())?;
        let s = timed(long, || {
            let h = m.model.forward(&batch, Path::Diff, None)?;
            let loss = (h * &r)?.sum_all()?;
            let grads = loss.backward()?;
            anyhow::ensure!(grads.get_ids().next().is_some(), "no gradients");
            Ok(())
        })?;
        put("fwd_bwd_lora_4x128_tok_s", (b * t) as f64 / s);
    }
    if let Some(p) = peak_rss_mb() {
        put("peak_rss_mb", p);
    }
    res.insert("load_s".into(), serde_json::json!(load_s));
    res.insert("model".into(), serde_json::json!(m.id));
    // Figures from different CPUs are not comparable; the JSON says which one this was.
    let machine = search_r3_model::Machine::current();
    eprintln!("machine: {machine}");
    res.insert("machine".into(), serde_json::json!(machine));
    let json = serde_json::Value::Object(res);
    println!("{}", serde_json::to_string_pretty(&json)?);
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Options of `bench index`.
#[derive(clap::Args, Debug)]
pub struct IndexBenchArgs {
    /// Measure on the vectors of this index (queries: stored vectors of sampled documents,
    /// slightly perturbed) instead of random unit vectors.
    #[arg(long)]
    index: Option<std::path::PathBuf>,
    /// Random vectors: how many.
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Random vectors: dimension.
    #[arg(long, default_value_t = 576)]
    dim: usize,
    /// Random vectors drawn around this many cluster centres (the shape of real embeddings)
    /// instead of uniformly on the sphere (the worst case for a graph index).
    #[arg(long)]
    clustered: Option<usize>,
    /// Number of queries.
    #[arg(long, default_value_t = 500)]
    queries: usize,
    /// HNSW links per node.
    #[arg(long)]
    connectivity: Option<usize>,
    /// HNSW beam width at search time.
    #[arg(long)]
    expansion_search: Option<usize>,
}

/// HNSW recall@10 against exact search, build time and single-query latency.
pub fn run_index(a: &IndexBenchArgs) -> Result<()> {
    use search_r3_index::{
        bench_recall, bench_recall_on, clustered_unit_vectors, load_index, HnswParams, VectorIndex,
    };
    // The spread the index crate's clustered tests use: neighbours within a cluster are
    // distinguishable but close, as in real embeddings.
    const CLUSTER_SPREAD: f32 = 0.5;
    let mut params = HnswParams::default();
    if let Some(c) = a.connectivity {
        params.connectivity = c;
    }
    if let Some(e) = a.expansion_search {
        params.expansion_search = e;
    }
    let (what, report, bytes) = match &a.index {
        None => match a.clustered {
            None => (
                format!("{} random unit vectors, dim {}", a.n, a.dim),
                bench_recall(a.n, a.dim, a.queries, params)?,
                None,
            ),
            Some(c) => {
                let data = clustered_unit_vectors(a.n, a.dim, c, CLUSTER_SPREAD, 1);
                let qs = clustered_unit_vectors(a.queries, a.dim, c, CLUSTER_SPREAD, 2);
                (
                    format!(
                        "{} clustered unit vectors ({c} clusters), dim {}",
                        a.n, a.dim
                    ),
                    bench_recall_on(a.dim, &data, &qs, params)?,
                    None,
                )
            }
        },
        Some(dir) => {
            let (idx, meta) = load_index(dir)?;
            let dim = meta.dim;
            let keys = idx.keys();
            let data: Vec<f32> = keys
                .iter()
                .flat_map(|&k| idx.get(k).expect("listed key"))
                .collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let mut qs = Vec::with_capacity(a.queries * dim);
            for _ in 0..a.queries {
                let k = keys[rng.random_range(0..keys.len())];
                let v = idx.get(k).expect("listed key");
                let noisy: Vec<f32> = v
                    .iter()
                    .map(|x| x + rng.random_range(-0.02f32..0.02))
                    .collect();
                qs.extend(noisy);
            }
            let size: u64 = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum();
            (
                format!("{} ({} vectors, dim {dim})", dir.display(), keys.len()),
                bench_recall_on(dim, &data, &qs, params)?,
                Some(size),
            )
        }
    };
    let json = serde_json::json!({
        "data": what,
        "queries": a.queries,
        "hnsw": {"connectivity": params.connectivity, "expansion_add": params.expansion_add, "expansion_search": params.expansion_search},
        "recall_at_10": report.recall,
        "build_s": report.build_s,
        "hnsw_p50_us": report.p50_us,
        "hnsw_p99_us": report.p99_us,
        "exact_p50_us": report.exact_p50_us,
        "exact_p99_us": report.exact_p99_us,
        "index_bytes_on_disk": bytes,
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
