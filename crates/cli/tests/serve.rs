//! `search-r3 serve` as users run it: the binary on a free port, the `openai` Python package
//! against `/v1/embeddings`, SIGTERM → clean exit with the index flushed → restart finds the
//! documents; and `search-r3 bench serve` (a short load: only 200s and 429s allowed).

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Served {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

/// Starts `search-r3 serve --port 0 ARGS` and waits for the address it prints.
fn serve(args: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_search-r3"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn search-r3 serve");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let sink = log.clone();
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("search-r3 listening on ") {
                let _ = tx.send(addr.to_string());
            }
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("server did not start:\n{}", log.lock().unwrap()));
    Served { child, base, log }
}

impl Served {
    fn post(&self, path: &str, key: &str, body: Value) -> Value {
        let r = reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().unwrap()
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(mut self) -> String {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().unwrap().clone();
        assert!(status.success(), "exit {status} after SIGTERM:\n{log}");
        log
    }
}

impl Drop for Served {
    /// A failed assertion must not leave a server running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether the Python package `module` can be imported: always required in CI (.ci/run
/// installs the client packages these tests drive).
fn python_has(module: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var_os("CI").is_none() {
        eprintln!("SKIP: the {module} Python package is not installed");
        return false;
    }
    true
}

/// Runs `tests/{script}` against the server; its output when it succeeds.
fn client_check(script: &str, s: &Served, key: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new("python3")
        .arg(&script)
        .args([&s.base, key])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} failed:\n{text}", script.display());
    text
}

#[test]
fn python_clients_sigterm_and_restart() {
    if !common::model_available("smollm2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("index");
    let idx_s = idx.to_str().unwrap();
    let s = serve(&["--index", idx_s, "--api-key", "k1"]);

    if python_has("openai") {
        let text = client_check("openai_compat.py", &s, "k1");
        assert!(
            text.contains("format default (base64): 3 vectors equal to /embed"),
            "{text}"
        );
    }
    // Hugging Face's TEI client, pointed at the server as at a TEI endpoint.
    if python_has("huggingface_hub") {
        let text = client_check("tei_compat.py", &s, "k1");
        assert!(text.contains("sentence_similarity: 3 cosines"), "{text}");
        assert!(text.contains("wrong key: 401"), "{text}");
    }

    let docs = json!({"documents": [
        {"id": "csv", "title": "csv.reader", "text": "Iterate over the rows of a CSV file."},
        {"id": "rm", "title": "shutil.rmtree", "text": "Delete an entire directory tree."}
    ]});
    let u = s.post("/index/upsert", "k1", docs);
    assert_eq!(u["documents"], 2);
    let log = s.terminate();
    assert!(log.contains("stopped"), "{log}");

    // The key is not needed to open the index again, only to talk to the server.
    let s = serve(&["--index", idx_s, "--api-key", "k2"]);
    let r = s.post(
        "/search",
        "k2",
        json!({"query": "delete a folder recursively", "k": 2}),
    );
    assert_eq!(r["hits"][0]["id"], "rm", "{r}");
    assert_eq!(r["hits"].as_array().unwrap().len(), 2);
    s.terminate();

    // An index built for another model is refused at start, naming the directory.
    if common::model_available("qwen2.5-coder-0.5b") {
        let (ok, _, err) = common::run(&[
            "serve",
            "--port",
            "0",
            "--model",
            "qwen2.5-coder-0.5b",
            "--index",
            idx_s,
        ]);
        assert!(!ok);
        assert!(err.contains(idx_s), "{err}");
    }
}

#[test]
fn bench_serve_reports_only_429s_as_errors() {
    if !common::model_available("smollm2") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("load.json");
    let (ok, stdout, stderr) = common::run(&[
        "bench",
        "serve",
        "--clients",
        "64",
        "--duration",
        "5",
        "--warmup",
        "1",
        "--docs",
        "16",
        "--max-concurrent-requests",
        "16",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let settings = report["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 2, "batching on and off");
    for s in settings {
        let all = &s["report"]["routes"]["all"];
        assert_eq!(all["errors"], 0, "{s}");
        assert!(all["ok"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(
            all["requests"].as_u64().unwrap(),
            all["ok"].as_u64().unwrap() + all["overloaded"].as_u64().unwrap()
        );
        assert!(
            s["report"]["routes"]["search"]["ok"].as_u64().unwrap() > 0,
            "{s}"
        );
        assert!(all["p99_ms"].as_f64().unwrap() >= all["p50_ms"].as_f64().unwrap());
        // The server ran as its own process and was measured.
        assert!(s["rss_end_bytes"].as_u64().unwrap() > 100 << 20, "{s}");
        assert!(s["server"]["batches"].as_f64().unwrap() > 0.0, "{s}");
    }
    // With a 16-deep queue and 64 clients, the overflow is answered 429.
    let refused: u64 = settings
        .iter()
        .map(|s| s["report"]["routes"]["all"]["overloaded"].as_u64().unwrap())
        .sum();
    assert!(refused > 0, "{stdout}");
    assert!(
        stdout.contains("batching on:") && stdout.contains("batching off:"),
        "{stdout}"
    );
}
