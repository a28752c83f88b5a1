//! A closed-loop load generator for the server (loopback only): `clients` concurrent clients,
//! each sending its next request when the previous one is answered, for a fixed time, mixing
//! `/embed` and `/search`. A 429 is what an overloaded server should answer; the client backs
//! off (exponentially with jitter, 10 ms doubling to 640 ms, reset by a success) and goes on,
//! as a well-behaved one would. Anything else that is not a 200 is an
//! error and is kept as a sample.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// Concurrent clients.
    pub clients: usize,
    /// How long to send.
    pub duration: Duration,
    /// Sent as a bearer token.
    pub api_key: Option<String>,
    /// Share of requests that are `/search` (the rest are `/embed`).
    pub search_share: f64,
    /// Share of searches with `"reason": true`.
    pub reason_share: f64,
    /// Texts `/embed` draws 1–4 inputs from.
    pub texts: Vec<String>,
    /// Queries `/search` draws from.
    pub queries: Vec<String>,
    /// Seed of the request mix.
    pub seed: u64,
}

/// Latency and outcome counts of one route.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RouteStats {
    /// Requests sent.
    pub requests: usize,
    /// Answered 200.
    pub ok: usize,
    /// Answered 429.
    pub overloaded: usize,
    /// Anything else (other statuses, transport failures).
    pub errors: usize,
    /// Median latency of the 200s, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest 200, ms.
    pub max_ms: f64,
    /// Inputs embedded by the 200s.
    pub inputs: usize,
}

/// The outcome of a load run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds the run took (the last requests end after the deadline).
    pub seconds: f64,
    /// Per route (`embed`, `search`, `search+reason`), plus `all`.
    pub routes: BTreeMap<String, RouteStats>,
    /// 200s per second.
    pub throughput_rps: f64,
    /// Inputs (texts or queries) answered per second.
    pub inputs_per_s: f64,
    /// Up to 10 examples of errors.
    pub error_samples: Vec<String>,
}

impl LoadReport {
    /// Requests that were neither 200 nor 429.
    pub fn errors(&self) -> usize {
        self.routes.get("all").map_or(0, |s| s.errors)
    }
}

struct Sample {
    route: &'static str,
    status: Option<u16>,
    ms: f64,
    inputs: usize,
    error: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn stats<'a>(samples: impl Iterator<Item = &'a Sample>) -> RouteStats {
    let mut s = RouteStats::default();
    let mut lat = Vec::new();
    for x in samples {
        s.requests += 1;
        match x.status {
            Some(200) => {
                s.ok += 1;
                s.inputs += x.inputs;
                lat.push(x.ms);
            }
            Some(429) => s.overloaded += 1,
            _ => s.errors += 1,
        }
    }
    lat.sort_by(f64::total_cmp);
    s.p50_ms = percentile(&lat, 50.0);
    s.p90_ms = percentile(&lat, 90.0);
    s.p99_ms = percentile(&lat, 99.0);
    s.max_ms = lat.last().copied().unwrap_or(0.0);
    s
}

async fn client(
    http: reqwest::Client,
    opts: std::sync::Arc<LoadOptions>,
    id: usize,
    deadline: Instant,
) -> Vec<Sample> {
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(id as u64));
    let mut out = Vec::new();
    let mut refusals = 0u32;
    while Instant::now() < deadline {
        let (route, path, body, inputs) = if rng.random::<f64>() < opts.search_share {
            let q = &opts.queries[rng.random_range(0..opts.queries.len())];
            let reason = rng.random::<f64>() < opts.reason_share;
            let route = if reason { "search+reason" } else { "search" };
            (
                route,
                "/search",
                json!({"query": q, "k": 10, "reason": reason}),
                1,
            )
        } else {
            let n = rng.random_range(1..=4usize);
            let inputs: Vec<&String> = (0..n)
                .map(|_| &opts.texts[rng.random_range(0..opts.texts.len())])
                .collect();
            (
                "embed",
                "/embed",
                json!({"inputs": inputs, "truncate": true}),
                n,
            )
        };
        let mut req = http.post(format!("{}{path}", opts.base_url)).json(&body);
        if let Some(k) = &opts.api_key {
            req = req.bearer_auth(k);
        }
        let t0 = Instant::now();
        let res = req.send().await;
        let (status, error) = match res {
            Ok(r) => {
                let status = r.status().as_u16();
                // The body is read in full: a client that drops it would understate latency.
                let text = r.text().await.unwrap_or_default();
                let err = (status != 200 && status != 429).then(|| {
                    format!(
                        "{route}: {status} {}",
                        text.chars().take(200).collect::<String>()
                    )
                });
                (Some(status), err)
            }
            Err(e) => (None, Some(format!("{route}: transport error: {e}"))),
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        out.push(Sample {
            route,
            status,
            ms,
            inputs,
            error,
        });
        if status == Some(429) {
            let cap = 10u64 << refusals.min(6);
            refusals += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(cap / 2..=cap))).await;
        } else {
            refusals = 0;
        }
    }
    out
}

/// Runs the load and summarises it.
pub async fn run_load(opts: LoadOptions) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(
        !opts.texts.is_empty() && !opts.queries.is_empty(),
        "the load needs texts and queries"
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.clients)
        .timeout(Duration::from_secs(300))
        .build()?;
    let opts = std::sync::Arc::new(opts);
    let start = Instant::now();
    let deadline = start + opts.duration;
    let tasks: Vec<_> = (0..opts.clients)
        .map(|i| tokio::spawn(client(http.clone(), opts.clone(), i, deadline)))
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut routes = BTreeMap::new();
    for route in ["embed", "search", "search+reason"] {
        let s = stats(samples.iter().filter(|x| x.route == route));
        if s.requests > 0 {
            routes.insert(route.to_string(), s);
        }
    }
    let all = stats(samples.iter());
    let throughput_rps = all.ok as f64 / seconds;
    let inputs_per_s = all.inputs as f64 / seconds;
    routes.insert("all".into(), all);
    let error_samples = samples
        .iter()
        .filter_map(|s| s.error.clone())
        .take(10)
        .collect();
    Ok(LoadReport {
        clients: opts.clients,
        seconds,
        routes,
        throughput_rps,
        inputs_per_s,
        error_samples,
    })
}
