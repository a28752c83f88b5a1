//! text-embeddings-inference compatibility, checked against TEI's own published OpenAPI
//! document (`fixtures/tei/openapi-1.7.4.json`): every TEI route an embedding model answers
//! (`/embed`, `POST /`, `/embed_all`, `/similarity`, `/decode`, `/tokenize`, `/info`) answers
//! with a body that validates against TEI's response schema, and the values agree with each
//! other (`/embed_all`'s last row is `/embed`'s vector, `/similarity` is the cosine of the
//! `/embed` vectors, `/decode` inverts `/tokenize`, token-id inputs embed as their text).
//!
//! Not checked against the schema: error bodies' `error_type`, whose enum TEI's document
//! capitalises (`Validation`) while TEI itself answers lowercase (`validation`, as its own
//! examples show); ours are lowercase like TEI's answers.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::Path;

/// TEI's OpenAPI 3.0 document as JSON Schema: `nullable: true` becomes a `null` alternative
/// (JSON Schema has no `nullable`), everything else is read as is.
fn tei_spec() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tei/openapi-1.7.4.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut spec: Value = serde_json::from_str(&text).expect("TEI's OpenAPI document parses");
    assert_eq!(spec["info"]["version"], "1.7.1", "the document of TEI v1.7");
    fn nullable(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if m.remove("nullable") == Some(Value::Bool(true)) {
                    let inner = Value::Object(std::mem::take(m));
                    m.insert("anyOf".into(), json!([inner, {"type": "null"}]));
                }
                m.values_mut().for_each(nullable);
            }
            Value::Array(a) => a.iter_mut().for_each(nullable),
            _ => {}
        }
    }
    nullable(&mut spec["components"]);
    spec
}

/// Panics unless `body` validates against TEI's component schema `name`.
fn assert_shape(spec: &Value, name: &str, body: &Value) {
    let schema = json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": spec["components"].clone(),
    });
    let v = jsonschema::validator_for(&schema).expect("TEI's schema compiles");
    let errors: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    let shown = body.to_string();
    assert!(
        errors.is_empty(),
        "answer is not a TEI `{name}`: {errors:?}\nbody: {}",
        &shown[..shown.len().min(400)]
    );
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().expect("a list").iter().map(floats).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tei_routes_answer_in_teis_shapes() {
    if !model_available() {
        return;
    }
    let spec = tei_spec();
    // A spec the validator rejects nothing with would make every check below pass.
    let neg = std::panic::catch_unwind(|| assert_shape(&spec, "EmbedResponse", &json!([["x"]])));
    assert!(neg.is_err(), "the schema check accepts anything");

    let s = start(None, local_opts()).await;
    let (st, info) = s.get("/info").await;
    assert_eq!(st, StatusCode::OK);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_shape(&spec, "Info", &info);

    // /embed: one text, a batch, token ids, a mixed batch.
    let texts = ["hello world", "Sparse retrieval with learned term weights."];
    let (st, e) = s.post("/embed", json!({"inputs": texts})).await;
    assert_eq!(st, StatusCode::OK, "{e}");
    assert_shape(&spec, "EmbedResponse", &e);
    let e = matrix(&e);
    let (_, one) = s.post("/embed", json!({"inputs": texts[0]})).await;
    assert_shape(&spec, "EmbedResponse", &one);
    assert!(max_diff(&matrix(&one)[0], &e[0]) < 1e-5);

    let (st, tok) = s.post("/tokenize", json!({"inputs": texts})).await;
    assert_eq!(st, StatusCode::OK, "{tok}");
    assert_shape(&spec, "TokenizeResponse", &tok);
    let ids: Vec<Vec<u32>> = tok
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let (st, by_ids) = s.post("/embed", json!({"inputs": ids[1]})).await;
    assert_eq!(st, StatusCode::OK, "{by_ids}");
    assert!(max_diff(&matrix(&by_ids)[0], &e[1]) < 1e-5);
    let (st, mixed) = s
        .post("/embed", json!({"inputs": [ids[0], texts[1]]}))
        .await;
    assert_eq!(st, StatusCode::OK, "{mixed}");
    let mixed = matrix(&mixed);
    assert!(max_diff(&mixed[0], &e[0]) < 1e-5 && max_diff(&mixed[1], &e[1]) < 1e-5);
    let (st, err) = s.post("/embed", json!({"inputs": [[1, 999_999]]})).await;
    assert_error(
        st,
        &err,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
    assert!(
        err["error"].as_str().unwrap().contains("inputs[0]"),
        "{err}"
    );

    // POST / is /embed for an embedding request, /similarity for a similarity request (what
    // Hugging Face's inference clients send).
    let (st, root) = s.post("/", json!({"inputs": texts})).await;
    assert_eq!(st, StatusCode::OK, "{root}");
    assert_shape(&spec, "EmbedResponse", &root);
    assert!(max_diff(&matrix(&root)[1], &e[1]) < 1e-5);

    // /embed_all: every token of the prompt; the last row is the embedding.
    let (st, all) = s
        .post(
            "/embed_all",
            json!({"inputs": texts, "prompt_name": "query"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{all}");
    assert_shape(&spec, "EmbedAllResponse", &all);
    let (_, raw_q) = s
        .post(
            "/embed",
            json!({"inputs": texts, "prompt_name": "query", "normalize": false}),
        )
        .await;
    let raw_q = matrix(&raw_q);
    for (i, rows) in all.as_array().unwrap().iter().enumerate() {
        let rows = matrix(rows);
        // The template's tokens around the text's own.
        assert!(rows.len() > ids[i].len() + 5, "{} rows", rows.len());
        assert!(rows.iter().all(|r| r.len() == 576));
        let last = rows.last().unwrap();
        let scale = norm(last) as f32;
        assert!(
            max_diff(last, &raw_q[i]) < 1e-4 * scale,
            "input {i}: the last token's state is not the embedding"
        );
    }

    // /similarity: the cosine of the /embed vectors.
    let body = json!({"inputs": {"source_sentence": texts[0], "sentences": [texts[1], texts[0]]}});
    let (st, sim) = s.post("/similarity", body.clone()).await;
    assert_eq!(st, StatusCode::OK, "{sim}");
    assert_shape(&spec, "SimilarityResponse", &sim);
    let sim = floats(&sim);
    assert!((sim[0] - dot(&e[0], &e[1])).abs() < 1e-5, "{sim:?}");
    assert!((sim[1] - 1.0).abs() < 1e-5, "{sim:?}");
    let (st, via_root) = s.post("/", body).await;
    assert_eq!(st, StatusCode::OK, "{via_root}");
    assert!(max_diff(&floats(&via_root), &sim) < 1e-6);
    let (st, err) = s
        .post(
            "/similarity",
            json!({"inputs": {"source_sentence": "a", "sentences": []}}),
        )
        .await;
    assert_error(st, &err, StatusCode::BAD_REQUEST, "empty");

    // /decode inverts /tokenize, for one id list and for several.
    let (st, dec) = s.post("/decode", json!({"ids": ids})).await;
    assert_eq!(st, StatusCode::OK, "{dec}");
    assert_shape(&spec, "DecodeResponse", &dec);
    assert_eq!(dec, json!(texts));
    let (st, dec) = s
        .post(
            "/decode",
            json!({"ids": ids[0], "skip_special_tokens": false}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{dec}");
    assert_eq!(dec, json!([texts[0]]));
    let (st, err) = s.post("/decode", json!({"ids": [999_999]})).await;
    assert_error(
        st,
        &err,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );

    s.stop().await;
}
