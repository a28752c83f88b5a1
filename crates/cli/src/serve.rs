//! `search-r3 serve` (the HTTP server, crates/server) and `search-r3 bench serve` (its load
//! test: concurrent clients over loopback, batching on vs off).

use crate::bench::proc_bytes;
use crate::retrieval::{EmbedArgs, DEMO_CORPUS, DEMO_QUERIES};
use anyhow::{Context, Result};
use clap::Args;
use search_r3_server::loadgen::{run_load, LoadOptions, LoadReport};
use search_r3_server::{shutdown_signal, Backend, Limits, ServeOptions, Server};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `search-r3 serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: fetched name, GGUF file or HF directory.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    embed: EmbedArgs,
    /// Serve the untrained base model instead of the adapter shipped in `adapters/` for it
    /// (used by default, with its reasoning mode, when there is one).
    #[arg(long, conflicts_with = "adapter")]
    no_adapter: bool,
    /// Index to search and update: opened when it exists (its model must match), created
    /// empty otherwise. Without it `/search` and `/index/*` answer 404.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the search page (GET /).
    #[arg(long, env = "SEARCH_R3_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    limits: Limits,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs the server until Ctrl-C or SIGTERM.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an address", a.host, a.port))?;
    let mut embed = a.embed.clone();
    if embed.adapter_path().is_none() && !a.no_adapter {
        embed.set_adapter(crate::retrieval::shipped_adapter(&a.model));
    }
    eprintln!(
        "adapter: {}",
        embed
            .adapter_path()
            .map_or("none (base model)".into(), |p| p.display().to_string())
    );
    let backend = Backend::open(&a.model, &embed.options(None), a.index.as_deref())?;
    let opts = ServeOptions {
        addr,
        api_key: a.api_key.clone(),
        limits: a.limits,
    };
    runtime()?.block_on(async {
        let server = Server::bind(backend, opts).await?;
        // Printed on stderr in a fixed form so scripts (and the tests) can find the port.
        eprintln!("search-r3 listening on http://{}", server.addr());
        server.run(shutdown_signal()).await
    })
}

/// `search-r3 bench serve`.
#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Model: fetched name, GGUF file or HF directory.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    embed: EmbedArgs,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of load per setting.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds of load before measuring (model and allocator warm-up).
    #[arg(long, default_value_t = 10.0)]
    warmup: f64,
    /// Share of requests that are searches (the rest embed 1–4 texts).
    #[arg(long, default_value_t = 0.3)]
    search_share: f64,
    /// Share of searches that reason first.
    #[arg(long, default_value_t = 0.1)]
    reason_share: f64,
    /// Demo-corpus documents indexed (through `/index/upsert`) for the searches to rank.
    #[arg(long, default_value_t = 128)]
    docs: usize,
    /// `on`, `off` or `both` (TEI-style batching of queued requests).
    #[arg(long, default_value = "both")]
    batching: String,
    /// Write the reports as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    limits: Limits,
}

/// The first `n` demo documents, bodies cut to 600 characters (the load is about the server,
/// not about long documents).
fn demo_docs(n: usize) -> Result<Vec<serde_json::Value>> {
    DEMO_CORPUS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| format!("demo corpus line {}", i + 1))?;
            let text: String = v["text"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(600)
                .collect();
            Ok(json!({"id": v["_id"], "title": v["title"], "text": text}))
        })
        .collect()
}

/// A `search-r3 serve` child process (its own process, so its memory is measured alone).
struct Child {
    proc: std::process::Child,
    base_url: String,
}

impl Child {
    fn spawn(a: &BenchServeArgs, batching: bool, index: &std::path::Path) -> Result<Child> {
        use std::io::BufRead;
        let limits = Limits {
            batching,
            ..a.limits
        };
        let mut proc = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--model", &a.model, "--port", "0", "--index"])
            .arg(index)
            // The load clients send no key.
            .env_remove("SEARCH_R3_API_KEY")
            .args(a.embed.to_args())
            .args(limits.to_args())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting search-r3 serve")?;
        let stderr = proc.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let tail = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = tail.clone();
        // Drained for the whole run so the server never blocks on a full pipe; the last lines
        // are kept to explain an early exit.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line.strip_prefix("search-r3 listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                let mut t = sink.lock().expect("not poisoned");
                t.push(line);
                let excess = t.len().saturating_sub(20);
                t.drain(..excess);
            }
        });
        let started = rx.recv_timeout(Duration::from_secs(300));
        let child = Child {
            proc,
            base_url: started.clone().unwrap_or_default(),
        };
        match started {
            Ok(_) => Ok(child),
            // Dropping `child` stops the process.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                anyhow::bail!("search-r3 serve did not start within 300 s")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!(
                "search-r3 serve exited before listening:\n{}",
                tail.lock().expect("not poisoned").join("\n")
            ),
        }
    }

    /// Resident memory of the server process in bytes: (current, peak).
    fn rss(&self) -> Option<(u64, u64)> {
        let pid = self.proc.id();
        Some((proc_bytes(pid, "VmRSS:")?, proc_bytes(pid, "VmHWM:")?))
    }

    /// SIGTERM, then waits: the server must finish and exit cleanly.
    fn terminate(mut self) -> Result<()> {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.proc.id().to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM failed");
        let status = self.proc.wait()?;
        anyhow::ensure!(
            status.success(),
            "search-r3 serve exited with {status} after SIGTERM"
        );
        Ok(())
    }
}

impl Drop for Child {
    /// A bench that fails half-way must not leave a server running.
    fn drop(&mut self) {
        if let Ok(None) = self.proc.try_wait() {
            let _ = self.proc.kill();
            let _ = self.proc.wait();
        }
    }
}

async fn one_setting(a: &BenchServeArgs, batching: bool) -> Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let server = Child::spawn(a, batching, &dir.path().join("index"))?;
    let base_url = server.base_url.clone();
    // The documents the searches rank, indexed through the API.
    let docs = demo_docs(a.docs.max(1))?;
    let http = reqwest::Client::new();
    for chunk in docs.chunks(32) {
        let r = http
            .post(format!("{base_url}/index/upsert"))
            .json(&json!({"documents": chunk}))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "upsert: {}", r.text().await?);
    }
    let texts: Vec<String> = docs
        .iter()
        .map(|d| d["text"].as_str().unwrap_or_default().to_string())
        .collect();
    let load = |secs: f64, seed: u64| LoadOptions {
        base_url: base_url.clone(),
        clients: a.clients,
        duration: Duration::from_secs_f64(secs),
        api_key: None,
        search_share: a.search_share,
        reason_share: a.reason_share,
        texts: texts.clone(),
        queries: DEMO_QUERIES.iter().map(|q| q.to_string()).collect(),
        seed,
    };
    let label = if batching { "on" } else { "off" };
    eprintln!("batching {label}: warm-up {:.0} s", a.warmup);
    if a.warmup > 0.0 {
        run_load(load(a.warmup, 1)).await?;
    }
    let m0 = scrape(&http, &base_url).await?;
    eprintln!(
        "batching {label}: {} clients for {:.0} s",
        a.clients, a.duration
    );
    // The server's memory every 5 s while the load runs.
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let pid = server.proc.id();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        loop {
            if let Some(r) = proc_bytes(pid, "VmRSS:") {
                samples.push(r);
            }
            tokio::select! {
                _ = &mut done_rx => break,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        samples
    });
    let report = run_load(load(a.duration, 2)).await?;
    let server_side = ServerSide::between(&m0, &scrape(&http, &base_url).await?);
    let _ = done_tx.send(());
    let samples = sampler.await?;
    let (rss_end, rss_peak) = server.rss().unwrap_or_default();
    server.terminate()?;
    let mb = |b: u64| b as f64 / 1048576.0;
    let rss_start = samples.first().copied().unwrap_or_default();
    print_report(label, &report);
    println!(
        "  model: {} batches, {:.1} requests/batch, {:.0} prompt tokens/s while embedding, busy {:.0}% of the run",
        server_side.batches,
        server_side.requests_per_batch,
        server_side.embed_tokens_per_s,
        100.0 * server_side.busy_s / report.seconds
    );
    println!(
        "  server RSS: {:.0} MB at the start of the run, {:.0} MB at the end (peak {:.0} MB); every 5 s: {:?}",
        mb(rss_start),
        mb(rss_end),
        mb(rss_peak),
        samples.iter().map(|&b| mb(b).round() as u64).collect::<Vec<_>>()
    );
    Ok(json!({
        "batching": batching,
        "report": report,
        "server": server_side,
        "rss_start_bytes": rss_start,
        "rss_end_bytes": rss_end,
        "rss_peak_bytes": rss_peak,
        "rss_every_5s_bytes": samples,
    }))
}

/// The server's own counters (from `/metrics`), as sample name → value.
async fn scrape(
    http: &reqwest::Client,
    base: &str,
) -> Result<std::collections::HashMap<String, f64>> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect())
}

/// What the model worker did during the measured run.
#[derive(Debug, serde::Serialize)]
struct ServerSide {
    batches: f64,
    requests_per_batch: f64,
    prompt_tokens: f64,
    embed_tokens_per_s: f64,
    busy_s: f64,
}

impl ServerSide {
    fn between(
        a: &std::collections::HashMap<String, f64>,
        b: &std::collections::HashMap<String, f64>,
    ) -> ServerSide {
        let d = |k: &str| b.get(k).copied().unwrap_or(0.0) - a.get(k).copied().unwrap_or(0.0);
        let batches = d("search_r3_batch_requests_count");
        let embed_s = d("search_r3_inference_duration_seconds_sum{kind=\"embed\"}");
        let prompt_tokens = d("search_r3_tokens_total{kind=\"prompt\"}");
        ServerSide {
            batches,
            requests_per_batch: d("search_r3_batch_requests_sum") / batches.max(1.0),
            prompt_tokens,
            embed_tokens_per_s: prompt_tokens / embed_s.max(1e-9),
            busy_s: embed_s + d("search_r3_inference_duration_seconds_sum{kind=\"reason\"}"),
        }
    }
}

fn print_report(label: &str, r: &LoadReport) {
    println!(
        "batching {label}: {} clients, {:.1} s, {:.1} req/s, {:.1} inputs/s, errors other than 429: {}",
        r.clients,
        r.seconds,
        r.throughput_rps,
        r.inputs_per_s,
        r.errors()
    );
    println!(
        "  {:<14} {:>8} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9}",
        "route", "requests", "200", "429", "other", "p50 ms", "p90 ms", "p99 ms"
    );
    for (route, s) in &r.routes {
        println!(
            "  {:<14} {:>8} {:>8} {:>6} {:>6} {:>9.1} {:>9.1} {:>9.1}",
            route, s.requests, s.ok, s.overloaded, s.errors, s.p50_ms, s.p90_ms, s.p99_ms
        );
    }
    for e in &r.error_samples {
        println!("  error: {e}");
    }
}

/// Runs the load test for each batching setting and reports latency, throughput and memory.
pub fn bench_serve(a: &BenchServeArgs) -> Result<()> {
    let settings: &[bool] = match a.batching.as_str() {
        "on" => &[true],
        "off" => &[false],
        "both" => &[true, false],
        other => anyhow::bail!("--batching {other}: expected on, off or both"),
    };
    let results = runtime()?.block_on(async {
        let mut out = Vec::new();
        for &b in settings {
            out.push(one_setting(a, b).await?);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    if let Some(p) = &a.json {
        let body = serde_json::to_vec_pretty(&json!({
            "model": a.model,
            "adapter": a.embed.adapter_path(),
            "clients": a.clients,
            "duration_s": a.duration,
            "search_share": a.search_share,
            "reason_share": a.reason_share,
            "settings": results,
        }))?;
        search_r3_model::files::write_atomic(p, &body)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let errors: u64 = results
        .iter()
        .map(|r| r["report"]["routes"]["all"]["errors"].as_u64().unwrap_or(0))
        .sum();
    anyhow::ensure!(
        errors == 0,
        "{errors} requests failed with errors other than 429"
    );
    Ok(())
}
