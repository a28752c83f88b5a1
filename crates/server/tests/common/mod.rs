//! Shared by the HTTP tests: a server on 127.0.0.1 with the real SmolLM2 (fetched by CI;
//! skipped locally when absent) and a client for it.
#![allow(dead_code)]

use reqwest::StatusCode;
use search_r3_core::load::EmbedderOptions;
use search_r3_server::{Backend, Limits, ServeOptions, Server};
use serde_json::{json, Value};
use std::path::Path;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn model_available() -> bool {
    if search_r3_model::fetch::cached_path("smollm2").is_some() || std::env::var_os("CI").is_some()
    {
        return true;
    }
    eprintln!("SKIP: smollm2 not fetched");
    false
}

pub struct Running {
    pub base: String,
    pub http: reqwest::Client,
    pub stop: Option<oneshot::Sender<()>>,
    pub handle: Option<JoinHandle<anyhow::Result<()>>>,
    pub key: Option<String>,
}

pub fn local_opts() -> ServeOptions {
    ServeOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        ..ServeOptions::default()
    }
}

pub fn with_limits(limits: Limits) -> ServeOptions {
    ServeOptions {
        limits,
        ..local_opts()
    }
}

pub async fn start(index: Option<&Path>, opts: ServeOptions) -> Running {
    start_with(index, EmbedderOptions::default(), opts).await
}

/// [`start`] with other embedder options (e.g. a small reasoning budget).
pub async fn start_with(
    index: Option<&Path>,
    embedder: EmbedderOptions,
    opts: ServeOptions,
) -> Running {
    let index = index.map(Path::to_path_buf);
    let backend =
        tokio::task::spawn_blocking(move || Backend::open("smollm2", &embedder, index.as_deref()))
            .await
            .unwrap()
            .expect("loading smollm2");
    let key = opts.api_key.clone();
    let server = Server::bind(backend, opts).await.expect("bind");
    let base = format!("http://{}", server.addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running {
        base,
        http: reqwest::Client::new(),
        stop: Some(stop),
        handle: Some(handle),
        key,
    }
}

impl Running {
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status();
        (status, resp.json().await.expect("JSON body"))
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        let status = resp.status();
        (status, resp.json().await.expect("JSON body"))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.expect("request");
        (resp.status(), resp.text().await.unwrap())
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("clean shutdown");
    }
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Largest element difference. Vectors of the same text computed in batches of different
/// shapes differ in float rounding (~1e-7); identical requests are bit-identical.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

pub fn assert_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error_type"], kind, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
}

pub const DOCS: &[(&str, &str, &str)] = &[
    (
        "csv",
        "csv module",
        "Read and write CSV files; csv.reader iterates over the rows of a file.",
    ),
    (
        "shutil",
        "shutil.rmtree",
        "Recursively delete a directory tree, like rm -rf.",
    ),
    (
        "stats",
        "statistics.median",
        "Return the median (middle value) of numeric data.",
    ),
    (
        "subprocess",
        "subprocess.run",
        "Run a command with arguments and capture its output.",
    ),
];

pub fn doc_json() -> Value {
    Value::Array(
        DOCS.iter()
            .map(|(id, title, text)| json!({"id": id, "title": title, "text": text}))
            .collect(),
    )
}

/// Jobs the model workers have taken from the queue so far (each is timed once).
pub async fn taken_before(s: &Running) -> usize {
    metric(s, "search_r3_queue_duration_seconds_count").await as usize
}

/// The value of the first `/metrics` sample named `name` (0 when absent).
pub async fn metric(s: &Running, name: &str) -> f64 {
    let (_, m) = s.get("/metrics").await;
    m.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `/metrics` until `n` jobs have been taken by a worker.
pub async fn wait_until_taken(s: &Running, n: usize) {
    for _ in 0..1000 {
        if taken_before(s).await >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no worker took job {n} within 10 s");
}

pub fn long_inputs(n: usize) -> Value {
    json!((0..n)
        .map(|i| format!(
            "document {i}: {}",
            "the quick brown fox jumps over the lazy dog ".repeat(40)
        ))
        .collect::<Vec<_>>())
}
