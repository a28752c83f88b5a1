//! The server over real HTTP on 127.0.0.1 with the real SmolLM2 (fetched by CI; skipped
//! locally when absent): every route, every error code, base64 = float, upsert → search
//! finds, delete → gone, restart → persisted, graceful shutdown finishes in-flight work.

mod common;

use base64::Engine;
use common::*;
use reqwest::StatusCode;
use search_r3_server::{Limits, ServeOptions};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_and_the_index_persists() {
    if !model_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("index");
    let s = start(Some(&idx), local_opts()).await;

    let (st, body) = s.get("/health").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let (st, body) = s.get("/info").await;
    assert_eq!(st, StatusCode::OK);
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["dimensions"], 576);
    assert_eq!(info["model_type"]["embedding"]["pooling"], "embed_token");
    assert_eq!(info["index"]["documents"], 0);

    // /embed: unit vectors, normalize=false gives the raw state in the same direction.
    let texts = json!(["hello world", "The embedding comes out of the reasoning."]);
    let (st, e) = s.post("/embed", json!({"inputs": texts})).await;
    assert_eq!(st, StatusCode::OK, "{e}");
    let e: Vec<Vec<f32>> = e.as_array().unwrap().iter().map(floats).collect();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].len(), 576);
    assert!((norm(&e[0]) - 1.0).abs() < 1e-5);
    let (_, raw) = s
        .post(
            "/embed",
            json!({"inputs": "hello world", "normalize": false}),
        )
        .await;
    let raw = floats(&raw[0]);
    let n = norm(&raw);
    assert!(n > 2.0, "raw hidden state norm {n}");
    for (a, b) in raw.iter().zip(&e[0]) {
        assert!((*a as f64 / n - *b as f64).abs() < 1e-5);
    }
    // Explicit nulls mean the defaults (clients that serialise every field send them).
    let (st, nulls) = s
        .post(
            "/embed",
            json!({"inputs": texts, "normalize": null, "truncate": null, "prompt_name": null, "truncation_direction": null}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{nulls}");
    assert!(floats(&nulls[0]) == e[0]);
    // A single string is a batch of one; the query prompt gives another vector.
    let (_, one) = s.post("/embed", json!({"inputs": "hello world"})).await;
    assert!(max_diff(&floats(&one[0]), &e[0]) < 1e-5);
    let (_, q) = s
        .post(
            "/embed",
            json!({"inputs": "hello world", "prompt_name": "query"}),
        )
        .await;
    assert!(floats(&q[0]) != e[0]);

    // /v1/embeddings: float and base64 decode to the same f32 values as /embed.
    let (st, f) = s
        .post(
            "/v1/embeddings",
            json!({"input": texts, "model": "smollm2"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{f}");
    assert_eq!(f["object"], "list");
    assert_eq!(f["model"], "smollm2");
    assert_eq!(f["data"][1]["index"], 1);
    assert_eq!(f["data"][0]["object"], "embedding");
    assert!(f["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
    let (st, b) = s
        .post(
            "/v1/embeddings",
            json!({"input": texts, "model": "smollm2", "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    for i in 0..2 {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // The same inputs in the same batch: bit-identical.
        assert!(
            decoded == floats(&f["data"][i]["embedding"]),
            "base64 != float"
        );
        assert!(decoded == e[i], "/v1/embeddings != /embed");
    }
    // Token-id input embeds the same text.
    let (_, tk) = s.post("/tokenize", json!({"inputs": "hello world"})).await;
    let ids: Vec<u64> = tk[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    let spans: Vec<String> = tk[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(spans.concat(), "hello world");
    assert_eq!(tk[0][1]["start"], 5);
    let (_, by_ids) = s.post("/v1/embeddings", json!({"input": ids})).await;
    assert!(max_diff(&floats(&by_ids["data"][0]["embedding"]), &e[0]) < 1e-5);

    // /search on an empty index, then upsert → search finds it.
    let (st, r) = s.post("/search", json!({"query": "delete a folder"})).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["hits"].as_array().unwrap().len(), 0);
    let (st, u) = s
        .post("/index/upsert", json!({"documents": doc_json()}))
        .await;
    assert_eq!(st, StatusCode::OK, "{u}");
    assert_eq!(u["upserted"], 4);
    assert_eq!(u["documents"], 4);
    let (st, r) = s
        .post(
            "/search",
            json!({"query": "remove a directory tree", "k": 2}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["mode"], "direct");
    assert_eq!(r["hits"].as_array().unwrap().len(), 2);
    assert_eq!(r["hits"][0]["id"], "shutil", "{r}");
    assert_eq!(r["hits"][0]["title"], "shutil.rmtree");
    assert!(r["hits"][0]["snippet"]
        .as_str()
        .unwrap()
        .starts_with("Recursively"));
    assert!(r["timings"]["total_s"].as_f64().unwrap() > 0.0);
    // The score is the cosine of /embed's query-prompt vector and document vector ("title\ntext").
    let (_, qv) = s
        .post(
            "/embed",
            json!({"inputs": "remove a directory tree", "prompt_name": "query"}),
        )
        .await;
    let (_, dv) = s
        .post(
            "/embed",
            json!({"inputs": format!("{}\n{}", DOCS[1].1, DOCS[1].2)}),
        )
        .await;
    let cos: f32 = floats(&qv[0])
        .iter()
        .zip(floats(&dv[0]))
        .map(|(a, b)| a * b)
        .sum();
    let top = r["hits"][0]["score"].as_f64().unwrap() as f32;
    assert!((top - cos).abs() < 1e-4, "score {top} vs cosine {cos}");
    // Reasoning: the trace comes back with the hits.
    let (st, r) = s
        .post(
            "/search",
            json!({"query": "remove a directory tree", "k": 4, "reason": true}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(r["mode"], "reason");
    assert!(r["reasoning"].is_string(), "{r}");
    assert!(r["generated_tokens"].as_u64().unwrap() > 0);
    assert!(r["timings"]["generation_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["hits"].as_array().unwrap().len(), 4);

    // Replace one document, delete another: gone from the results.
    let (st, u) = s
        .post(
            "/index/upsert",
            json!({"documents": [{"id": "stats", "text": "Compute the median of a list of numbers."}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{u}");
    assert_eq!(u["documents"], 4);
    let (st, d) = s
        .post("/index/delete", json!({"ids": ["shutil", "nope"]}))
        .await;
    assert_eq!(st, StatusCode::OK, "{d}");
    assert_eq!(d["deleted"], 1);
    assert_eq!(d["missing"], json!(["nope"]));
    assert_eq!(d["documents"], 3);
    let (_, r) = s
        .post(
            "/search",
            json!({"query": "remove a directory tree", "k": 10}),
        )
        .await;
    let ids: Vec<&str> = r["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(!ids.contains(&"shutil"));

    // Metrics and OpenAPI.
    let (st, m) = s.get("/metrics").await;
    assert_eq!(st, StatusCode::OK);
    for name in [
        "search_r3_requests_total{route=\"/embed\",status=\"200\"}",
        "search_r3_request_duration_seconds_bucket",
        "search_r3_queue_depth 0",
        "search_r3_batch_requests_count",
        "search_r3_batch_tokens_sum",
        "search_r3_tokens_total{kind=\"prompt\"}",
        "search_r3_tokens_total{kind=\"generated\"}",
        "search_r3_index_documents 3",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
    }
    let (st, doc) = s.get("/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for p in [
        "/embed",
        "/v1/embeddings",
        "/search",
        "/index/upsert",
        "/index/delete",
        "/tokenize",
        "/info",
        "/health",
        "/metrics",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"]["SearchResponse"].is_object());
    s.stop().await;

    // Restart on the same directory: the changes were persisted.
    let s = start(Some(&idx), local_opts()).await;
    let (_, info) = s.get("/info").await;
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["index"]["documents"], 3);
    let (_, r) = s
        .post("/search", json!({"query": "median of numbers", "k": 1}))
        .await;
    assert_eq!(r["hits"][0]["id"], "stats", "{r}");
    assert!(r["hits"][0]["snippet"]
        .as_str()
        .unwrap()
        .starts_with("Compute the median"));
    let (_, r) = s
        .post(
            "/search",
            json!({"query": "remove a directory tree", "k": 10}),
        )
        .await;
    assert!(r["hits"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["id"] != "shutil"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code() {
    if !model_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        Some(&dir.path().join("index")),
        with_limits(Limits {
            max_client_batch_size: 4,
            max_input_length: Some(16),
            payload_limit: 4096,
            max_k: 50,
            ..Limits::default()
        }),
    )
    .await;
    let long = "word ".repeat(40);
    // Documents follow the index's limit (512 tokens), not `max_input_length`.
    let doc_long = "word ".repeat(600);
    // 400: empty.
    let (st, b) = s.post("/embed", json!({"inputs": []})).await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "empty");
    let (st, b) = s.post("/embed", json!({"inputs": [""]})).await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "empty");
    let (st, b) = s.post("/search", json!({"query": "  "})).await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "empty");
    let (st, b) = s.post("/index/delete", json!({"ids": []})).await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "empty");
    let (st, b) = s.post_raw("/embed", "{\"inputs\": ").await;
    assert_error(st, &b, StatusCode::BAD_REQUEST, "invalid_request");
    // 413: too many inputs, an input over the token limit, a body over the payload limit.
    let (st, b) = s
        .post("/embed", json!({"inputs": ["a", "b", "c", "d", "e"]}))
        .await;
    assert_error(st, &b, StatusCode::PAYLOAD_TOO_LARGE, "validation");
    assert!(b["error"].as_str().unwrap().contains("batch size 5"));
    let (st, b) = s.post("/embed", json!({"inputs": [long.clone()]})).await;
    assert_error(st, &b, StatusCode::PAYLOAD_TOO_LARGE, "validation");
    assert!(b["error"].as_str().unwrap().contains("inputs[0]"), "{b}");
    let (st, b) = s
        .post("/v1/embeddings", json!({"input": long.clone()}))
        .await;
    assert_error(st, &b, StatusCode::PAYLOAD_TOO_LARGE, "validation");
    let (st, b) = s.post("/search", json!({"query": long.clone()})).await;
    assert_error(st, &b, StatusCode::PAYLOAD_TOO_LARGE, "validation");
    let (st, b) = s
        .post(
            "/index/upsert",
            json!({"documents": [{"id": "x", "text": doc_long.clone()}], "truncate": false}),
        )
        .await;
    assert_error(st, &b, StatusCode::PAYLOAD_TOO_LARGE, "validation");
    let (st, b) = s
        .post("/embed", json!({"inputs": ["x".repeat(5000)]}))
        .await;
    assert_error(st, &b, StatusCode::PAYLOAD_TOO_LARGE, "validation");
    // ... and truncation makes the long input acceptable: keeping the first 16 tokens by
    // default, the last 16 with `Left` (each word below is one token).
    let long2 = format!("alpha{}{}", " alpha".repeat(19), " omega".repeat(20));
    let mut cut = Vec::new();
    for (dir, text) in [
        ("Right", long2.clone()),
        ("Left", long2),
        ("Right", format!("alpha{}", " alpha".repeat(15))),
        ("Right", " omega".repeat(16)),
    ] {
        let (st, b) = s
            .post(
                "/embed",
                json!({"inputs": [text], "truncate": true, "truncation_direction": dir}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{b}");
        cut.push(floats(&b[0]));
    }
    assert!(
        max_diff(&cut[0], &cut[2]) < 1e-5,
        "Right keeps the first 16 tokens"
    );
    assert!(
        max_diff(&cut[1], &cut[3]) < 1e-5,
        "Left keeps the last 16 tokens"
    );
    assert!(max_diff(&cut[0], &cut[1]) > 1e-3);
    let (st, b) = s
        .post(
            "/index/upsert",
            json!({"documents": [{"id": "x", "text": doc_long.clone()}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["truncated"], 1);
    // 422: wrong types, fields out of range.
    let (st, b) = s.post("/embed", json!({"inputs": 3})).await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, b) = s.post("/search", json!({"query": "q", "k": 0})).await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, b) = s.post("/search", json!({"query": "q", "k": 51})).await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, b) = s
        .post("/v1/embeddings", json!({"input": "q", "dimensions": 128}))
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, b) = s
        .post("/v1/embeddings", json!({"input": [[1, 2, 999999999]]}))
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, b) = s
        .post(
            "/v1/embeddings",
            json!({"input": "q", "encoding_format": "int8"}),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, b) = s
        .post(
            "/index/upsert",
            json!({"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    let (st, b) = s
        .post(
            "/index/upsert",
            json!({"documents": [{"id": "", "text": "x"}]}),
        )
        .await;
    assert_error(st, &b, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    // 404: unknown route.
    let resp = s.http.get(format!("{}/nope", s.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["error_type"], "not_found");
    s.stop().await;

    // 404 for the index routes of a server without an index; 401 without the key.
    let s = start(
        None,
        ServeOptions {
            api_key: Some("sesame".into()),
            ..local_opts()
        },
    )
    .await;
    let (st, b) = s.post("/search", json!({"query": "q"})).await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "not_found");
    let (st, b) = s.post("/index/delete", json!({"ids": ["a"]})).await;
    assert_error(st, &b, StatusCode::NOT_FOUND, "not_found");
    let (st, _) = s.post("/embed", json!({"inputs": "q"})).await;
    assert_eq!(st, StatusCode::OK);
    // The scheme name is case-insensitive.
    let resp = s
        .http
        .post(format!("{}/embed", s.base))
        .header("authorization", "bearer sesame")
        .json(&json!({"inputs": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for key in [None, Some("wrong")] {
        let mut r = s
            .http
            .post(format!("{}/embed", s.base))
            .json(&json!({"inputs": "q"}));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        let st = resp.status();
        assert_error(
            st,
            &resp.json().await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
    }
    let resp = s
        .http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Health probes need no key.
    let resp = s
        .http
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_shutdown_finishes_in_flight_requests() {
    if !model_available() {
        return;
    }
    let s = start(
        None,
        with_limits(Limits {
            max_concurrent_requests: 1,
            ..Limits::default()
        }),
    )
    .await;
    // One job runs, one waits, the rest are refused at once.
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let (http, url) = (s.http.clone(), format!("{}/embed", s.base));
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"inputs": long_inputs(8)}))
                .send()
                .await
                .unwrap();
            let st = r.status();
            let retry = r.headers().get("retry-after").cloned();
            (st, retry, r.json::<Value>().await.unwrap())
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        let (st, retry, b) = t.await.unwrap();
        match st {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(b["error_type"], "overloaded");
                assert_eq!(retry.unwrap(), "1");
                overloaded += 1
            }
            other => panic!("unexpected {other}: {b}"),
        }
    }
    assert!(ok >= 1 && overloaded >= 1, "ok {ok}, 429 {overloaded}");
    let (_, m) = s.get("/metrics").await;
    assert!(m.contains(&format!(
        "search_r3_requests_total{{route=\"/embed\",status=\"429\"}} {overloaded}"
    )));

    // Shutdown while a slow request runs: it is answered in full, then the server stops.
    let (http, url) = (s.http.clone(), format!("{}/embed", s.base));
    let slow = tokio::spawn(async move {
        let r = http
            .post(url)
            .json(&json!({"inputs": long_inputs(16)}))
            .send()
            .await
            .unwrap();
        let st = r.status();
        (st, r.json::<Value>().await.unwrap())
    });
    // Wait until the worker holds it.
    wait_until_taken(&s, ok + 1).await;
    let base = s.base.clone();
    s.stop().await;
    let (st, b) = slow.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b.as_array().unwrap().len(), 16);
    // Nothing listens any more.
    assert!(reqwest::get(format!("{base}/health")).await.is_err());
}

/// Occupies the worker with a slow request, queues `n` searches behind it, and returns the
/// batch size each search ran in.
async fn batch_sizes_behind_a_slow_request(s: &Running, n: usize) -> Vec<u64> {
    let before = taken_before(s).await;
    let (http, url) = (s.http.clone(), format!("{}/embed", s.base));
    let slow = tokio::spawn(async move {
        http.post(url)
            .json(&json!({"inputs": long_inputs(16)}))
            .send()
            .await
            .unwrap()
            .status()
    });
    wait_until_taken(s, before + 1).await;
    let searches: Vec<_> = (0..n)
        .map(|i| {
            let (http, url) = (s.http.clone(), format!("{}/search", s.base));
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .json(&json!({"query": format!("query number {i}"), "k": 1}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                r.json::<Value>().await.unwrap()["timings"]["batch_requests"]
                    .as_u64()
                    .unwrap()
            })
        })
        .collect();
    let mut sizes = Vec::new();
    for t in searches {
        sizes.push(t.await.unwrap());
    }
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_share_a_forward_pass_only_with_batching_on() {
    if !model_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = start(Some(&dir.path().join("on")), local_opts()).await;
    let sizes = batch_sizes_behind_a_slow_request(&s, 6).await;
    assert!(sizes.iter().any(|&b| b > 1), "batching on: {sizes:?}");
    s.stop().await;

    let s = start(
        Some(&dir.path().join("off")),
        with_limits(Limits {
            batching: false,
            ..Limits::default()
        }),
    )
    .await;
    let sizes = batch_sizes_behind_a_slow_request(&s, 6).await;
    assert!(sizes.iter().all(|&b| b == 1), "batching off: {sizes:?}");
    s.stop().await;
}
