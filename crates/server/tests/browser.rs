//! The search page (`GET /`) in a real browser: headless Chromium driven through chromedriver
//! against a real server on 127.0.0.1 with the real SmolLM2 and a small index. A query gives
//! ranked hits, reasoning shows the model's text, API errors (400 for a query of spaces, 401,
//! 404 without an index) are shown as the server words them, markup in a document stays text,
//! and with an API key the page asks for it and then searches. With
//! `SEARCH_R3_SCREENSHOT=docs/search-page.png` it refreshes the screenshot in the docs.
//!
//! Needs `chromedriver` and `chromium` on PATH (Debian: `apt-get install chromium
//! chromium-driver`) and smollm2 fetched; skipped locally without them, a failure in CI.

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use search_r3_core::embedder::ReasonMode;
use search_r3_core::load::EmbedderOptions;
use search_r3_server::ServeOptions;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A program on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// chromedriver and the browsers it starts, killed together when dropped (a failed assertion
/// included), so no browser outlives the test.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    async fn start(exe: &Path) -> Chromedriver {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(exe)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: Chromium's processes join it, and one signal ends them all.
            .process_group(0)
            .spawn()
            .expect("starting chromedriver");
        let driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "chromedriver did not listen on port {port} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    async fn browser(&self) -> Client {
        let args = [
            "--headless=new",
            // Tests often run as root in containers, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1280,900",
            "--lang=en-US",
        ];
        let mut opts = json!({ "args": args });
        // Debian's chromedriver finds /usr/bin/chromium itself; elsewhere name the binary.
        if let Some(bin) = ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .find_map(|n| on_path(n))
        {
            opts["binary"] = json!(bin);
        }
        let caps = json!({ "browserName": "chrome", "goog:chromeOptions": opts });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("starting headless Chromium through chromedriver")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The process group started above: chromedriver and Chromium. Signalled through
        // killpg, never `kill -SIG -PGID`, which procps 4.0.2 reads as `kill -SIG -1` (every
        // process); and never group 0 or 1.
        let pgid = self.child.id() as libc::pid_t;
        if pgid > 1 {
            // SAFETY: killpg only sends a signal; the group is the one this test created.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls a JavaScript expression in the page until it is truthy; returns its value.
async fn until(c: &Client, expr: &str, what: &str, secs: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let v = c
            .execute(&format!("return ({expr});"), vec![])
            .await
            .expect("executing a script in the page");
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return v;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let page = text(c, "main").await;
            panic!("waited {secs} s for {what} ({expr}); the page shows:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The rendered text of the first element matching `css` ("" when hidden).
async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

async fn hidden(c: &Client, id: &str) -> bool {
    let v = c
        .execute(
            "return document.getElementById(arguments[0]).hidden;",
            vec![json!(id)],
        )
        .await
        .unwrap();
    v == Value::Bool(true)
}

/// Types `query` and presses Search; waits for this search's answer or error.
async fn search(c: &Client, query: &str, secs: u64) {
    let done = r##"Number(document.getElementById("status").dataset.done)"##;
    let before = c
        .execute(&format!("return {done};"), vec![])
        .await
        .unwrap()
        .as_f64()
        .unwrap();
    let q = c.find(Locator::Css("#q")).await.unwrap();
    q.clear().await.unwrap();
    q.send_keys(query).await.unwrap();
    c.find(Locator::Css("#go"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(c, &format!("{done} > {before}"), "the search to end", secs).await;
}

async fn hit_titles(c: &Client) -> Vec<String> {
    let mut out = vec![];
    for e in c.find_all(Locator::Css("#hits .title")).await.unwrap() {
        out.push(e.text().await.unwrap());
    }
    out
}

async fn enter_key(c: &Client, key: &str) {
    let input = c.find(Locator::Css("#key")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(key).await.unwrap();
    c.find(Locator::Css("#key-save"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_page_searches_reasons_shows_errors_and_asks_for_the_key() {
    let ci = std::env::var_os("CI").is_some();
    let Some(exe) = on_path("chromedriver") else {
        assert!(
            !ci,
            "chromedriver is not on PATH (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "SKIP: chromedriver not on PATH (Debian: apt-get install chromium chromium-driver)"
        );
        return;
    };
    if !ci && search_r3_model::fetch::cached_path("smollm2").is_none() {
        eprintln!("SKIP: smollm2 not fetched (search-r3 model fetch smollm2)");
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("index");
    // A short reasoning budget keeps the one reasoning search to seconds on a CPU; a few tokens
    // at least, so there is text to show.
    let embedder = EmbedderOptions {
        reason_mode: Some(ReasonMode::parse("greedy,min=4,max=16").unwrap()),
        ..EmbedderOptions::default()
    };
    let s = start_with(Some(&idx), embedder, local_opts()).await;
    let (st, u) = s
        .post("/index/upsert", json!({"documents": doc_json()}))
        .await;
    assert_eq!(st, StatusCode::OK, "{u}");

    let driver = Chromedriver::start(&exe).await;
    let c = driver.browser().await;
    c.set_window_size(1280, 900).await.unwrap();
    c.goto(&s.base).await.unwrap();

    // The page's inline script ran (it filled in /info) and its inline style applied: the
    // Content-Security-Policy lets both through.
    let docs = until(
        &c,
        r##"document.querySelector("#info .documents")?.textContent"##,
        "the index size from /info",
        30,
    )
    .await;
    assert_eq!(docs, "4");
    let info = text(&c, "#info").await;
    assert!(info.contains("smollm2"), "{info}");
    assert!(info.contains("greedy,min=4,max=16"), "{info}");
    let bg = c
        .execute(
            "return getComputedStyle(document.body).backgroundColor;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(bg, "rgb(246, 247, 249)", "the page's style did not apply");

    // A direct search: ranked hits with title, score and snippet, and the time split.
    search(&c, "remove a directory tree", 60).await;
    assert!(hidden(&c, "error").await, "{}", text(&c, "#error").await);
    let titles = hit_titles(&c).await;
    assert_eq!(titles.len(), 4, "{titles:?}");
    assert!(titles[0].starts_with("shutil.rmtree"), "{titles:?}");
    let score: f64 = text(&c, "#hits .score").await.parse().unwrap();
    assert!(score > 0.0 && score <= 1.0, "{score}");
    assert!(text(&c, "#hits .snippet").await.starts_with("Recursively"));
    assert_eq!(text(&c, "#hits .rank").await, "1");
    let timings = text(&c, "#timings").await;
    for part in ["queue", "generation", "embedding", "search"] {
        assert!(timings.contains(part), "{timings}");
    }
    assert_eq!(text(&c, "#summary .mode").await, "direct");
    assert!(hidden(&c, "reasoning-box").await);

    // Reasoning on: the model's text appears, with whether the embed token was forced.
    c.find(Locator::Css("#reason"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    search(&c, "remove a directory tree", 120).await;
    assert!(hidden(&c, "error").await, "{}", text(&c, "#error").await);
    assert_eq!(text(&c, "#summary .mode").await, "reason");
    let reasoning = text(&c, "#reasoning").await;
    assert!(!reasoning.trim().is_empty(), "no reasoning shown");
    assert!(!text(&c, "#summary .forced").await.is_empty());
    assert_eq!(hit_titles(&c).await.len(), 4);
    let generation: f64 = c
        .execute(
            r##"return document.querySelector('[data-part="generation"]').textContent;"##,
            vec![],
        )
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(generation > 0.0);
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // The screenshot in docs/ is refreshed on request only, so a test run leaves the checkout
    // as it was: SEARCH_R3_SCREENSHOT=docs/search-page.png (relative to the workspace root).
    if let Some(to) = std::env::var_os("SEARCH_R3_SCREENSHOT") {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(to);
        std::fs::write(&out, &png).unwrap();
    }

    // A query of spaces goes to the server, and its 400 is shown; no stale hits stay.
    c.find(Locator::Css("#reason"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    search(&c, "   ", 30).await;
    let error = text(&c, "#error").await;
    assert!(error.starts_with("400 empty: "), "{error}");
    assert!(error.contains("whitespace"), "{error}");
    assert!(hidden(&c, "result").await);

    // Markup in a document is shown as text, never parsed.
    let (st, u) = s
        .post(
            "/index/upsert",
            json!({"documents": [{"id": "html", "title": "<img src=x onerror=\"document.title='owned'\"> rmdir",
                                  "text": "<script>document.title='owned'</script> remove a directory tree"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{u}");
    search(&c, "remove a directory tree", 60).await;
    let titles = hit_titles(&c).await;
    assert!(
        titles.iter().any(|t| t.starts_with("<img src=x")),
        "{titles:?}"
    );
    let parsed = c
        .execute(
            "return document.querySelectorAll('#hits img, #hits script').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(parsed, 0);
    assert_eq!(c.title().await.unwrap(), "search-r3");
    s.stop().await;

    // With a key: the page itself loads without it, then asks; a wrong key is refused and
    // asked for again; the right one makes /info and the search work.
    let key = "browser-test-key";
    let s = start(
        Some(&idx),
        ServeOptions {
            api_key: Some(key.into()),
            ..local_opts()
        },
    )
    .await;
    c.goto(&s.base).await.unwrap();
    until(
        &c,
        r##"!document.getElementById("auth").hidden"##,
        "the key prompt",
        30,
    )
    .await;
    assert!(text(&c, "#error").await.starts_with("401 unauthorized"));
    let kind = c
        .execute("return document.getElementById('key').type;", vec![])
        .await
        .unwrap();
    assert_eq!(kind, "password");
    enter_key(&c, "wrong-key").await;
    until(
        &c,
        r##"!document.getElementById("auth").hidden && document.getElementById("error").textContent.startsWith("401")"##,
        "the wrong key refused",
        30,
    )
    .await;
    enter_key(&c, key).await;
    let docs = until(
        &c,
        r##"document.querySelector("#info .documents")?.textContent"##,
        "/info with the key",
        30,
    )
    .await;
    assert_eq!(docs, "5");
    assert!(hidden(&c, "auth").await);
    let stored = c
        .execute(
            "return [sessionStorage.length, localStorage.length, document.cookie];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored, json!([1, 0, ""]));
    search(&c, "remove a directory tree", 60).await;
    assert!(hidden(&c, "error").await, "{}", text(&c, "#error").await);
    assert!(hit_titles(&c).await.len() >= 4);
    s.stop().await;

    // Without an index the search's 404 is what the page shows.
    let s = start(None, local_opts()).await;
    c.goto(&s.base).await.unwrap();
    until(
        &c,
        r##"document.getElementById("info").textContent.includes("no index")"##,
        "/info without an index",
        30,
    )
    .await;
    search(&c, "remove a directory tree", 30).await;
    let error = text(&c, "#error").await;
    assert!(error.starts_with("404 not_found: "), "{error}");
    assert!(error.contains("--index"), "{error}");
    s.stop().await;

    c.close().await.unwrap();
    drop(driver);
    eprintln!("browser test took {:.1} s", t0.elapsed().as_secs_f64());
}
