//! `adapter merge --format sentence-transformers`, checked by the real package: for both
//! shipped adapters, `SentenceTransformer(dir).encode(documents)` and
//! `encode(queries, prompt_name="query")` give our document and direct-query vectors (cosine
//! ≥ 0.9999 each), on texts of mixed length including ones cut at the maximum length.
//!
//! sentence-transformers (with PyTorch) is installed by `.ci/run` into `bench/.venv` (see
//! `bench/setup_torch.sh`); `SEARCH_R3_PYTHON` names another interpreter. Outside CI the test
//! skips when neither has the package.

mod common;

use search_r3_core::embedder::Side;
use search_r3_core::load::{load_embedder, EmbedderOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Document text limit of the export under test: small, so several texts are cut.
const MAX_DOC_TOKENS: usize = 48;

/// A Python interpreter with sentence-transformers, or `None` (SKIP) outside CI.
fn st_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        std::env::var_os("SEARCH_R3_PYTHON").map(PathBuf::from),
        Some(root.join("bench/.venv/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    for py in candidates.into_iter().flatten() {
        let ok = Command::new(&py)
            .args(["-c", "import sentence_transformers"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(py);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide sentence-transformers (bash bench/setup_torch.sh)"
    );
    eprintln!(
        "SKIP: no Python with sentence-transformers (bash bench/setup_torch.sh, or set \
         SEARCH_R3_PYTHON)"
    );
    None
}

fn texts() -> (Vec<String>, Vec<String>) {
    let long = "Aspirin irreversibly inhibits cyclooxygenase-1 in platelets, which blocks \
                thromboxane A2 synthesis for the lifetime of the platelet; low doses therefore \
                reduce the risk of myocardial infarction and ischaemic stroke, at the cost of a \
                small increase in gastrointestinal and intracranial bleeding.";
    let code = "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    \
                println!(\"{v:?}\");\n}";
    let mut docs: Vec<String> = [
        "hello world",
        "BRCA1",
        "Vitamin D deficiency is associated with an increased risk of tuberculosis.",
        "Die Katze sitzt auf der Matte. Le chat est sur le tapis. 猫はマットの上にいる。",
        "    leading and trailing whitespace    ",
        "Mitochondrial DNA is inherited maternally in most animals.",
        code,
        long,
        "Statins lower LDL cholesterol by inhibiting HMG-CoA reductase.",
        "The quick brown fox jumps over the lazy dog. 1234567890 !@#$%^&*()",
        "CRISPR–Cas9 enables targeted genome editing in human cells.",
        "Smoking cessation reduces the risk of lung cancer over the following decade.",
        "e = mc^2; ∑_{i=1}^{n} i = n(n+1)/2",
        "Antibiotic resistance spreads between bacteria through horizontal gene transfer.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Cut at the limit: two, three and six times the long paragraph, and a list of words.
    for n in [2, 3, 6] {
        docs.push(std::iter::repeat_n(long, n).collect::<Vec<_>>().join(" "));
    }
    docs.push(
        (0..120)
            .map(|i| format!("term{i}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    docs.push(format!("{code}\n{long}"));
    docs.push(long.chars().rev().collect());
    let queries: Vec<String> = [
        "does aspirin reduce heart attack risk",
        "BRCA1 mutation breast cancer",
        "vitamin D and tuberculosis",
        "how are mitochondria inherited?",
        "rust closure map collect vector",
        "statin mechanism of action",
        "CRISPR gene editing human cells",
        "quitting smoking lung cancer",
        "antibiotic resistance gene transfer",
        "What is the capital of France?",
        "x",
        "Katze Matte",
        "bleeding risk of low-dose aspirin in elderly patients with atrial fibrillation",
        "sum of the first n integers",
        "  spaced   query  ",
        "Is there evidence that vitamin C prevents the common cold in adults who exercise?",
        "lazy dog",
        "thromboxane synthesis platelets",
        "horizontal gene transfer",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()
    .into_iter()
    .chain(std::iter::once([long; 3].join(" ")))
    .collect();
    (docs, queries)
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn sentence_transformers_loads_the_export_and_gives_our_vectors() {
    if !common::model_available("smollm2") {
        return;
    }
    let Some(py) = st_python() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (docs, queries) = texts();
    assert!(docs.len() >= 20 && queries.len() >= 20);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.json");
    std::fs::write(
        &input,
        json!({"documents": docs, "queries": queries}).to_string(),
    )
    .unwrap();
    let mut rows = Vec::new();
    for name in ["sft-smollm2", "rl-smollm2"] {
        let adapter = root.join("adapters").join(name);
        let out = dir.path().join(name);
        let limit = MAX_DOC_TOKENS.to_string();
        let (ok, stdout, stderr) = common::run(&[
            "adapter",
            "merge",
            "--adapter",
            adapter.to_str().unwrap(),
            "--format",
            "sentence-transformers",
            "--max-doc-tokens",
            &limit,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{stdout}{stderr}");
        let pooling: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("1_Pooling/config.json")).unwrap(),
        )
        .unwrap();
        // The key text-embeddings-inference 1.7 reads for last-token pooling.
        assert_eq!(pooling["pooling_mode_lasttoken"], true);

        let vectors = dir.path().join(format!("{name}.json"));
        let o = Command::new(&py)
            .arg(root.join("crates/cli/tests/st_encode.py"))
            .args([&out, &input, &vectors])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "sentence-transformers failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let st: Value = serde_json::from_str(&std::fs::read_to_string(&vectors).unwrap()).unwrap();
        let theirs = |k: &str| -> Vec<Vec<f64>> {
            st[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect()
                })
                .collect()
        };

        // Ours: the document path as indexing runs it; the direct-query prompt around the
        // query text cut at the same limit, as `serve` does with `truncate`.
        let (e, _) = load_embedder(
            "smollm2",
            &EmbedderOptions {
                adapter: Some(adapter.clone()),
                max_doc_tokens: Some(MAX_DOC_TOKENS),
                ..EmbedderOptions::default()
            },
        )
        .unwrap();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let (our_docs, truncated) = e.embed_documents(&refs).unwrap();
        assert!(truncated >= 6, "only {truncated} documents reach the limit");
        let prompts: Vec<Vec<u32>> = queries
            .iter()
            .map(|q| {
                let mut body = e.model.tokenizer.encode(q).unwrap();
                body.truncate(MAX_DOC_TOKENS);
                e.query_prompt_ids(&body)
            })
            .collect();
        let our_queries = e.embed_prompts(Side::Query, &prompts).unwrap();

        for (what, ours, theirs) in [
            ("documents", &our_docs, theirs("documents")),
            ("queries", &our_queries, theirs("queries")),
        ] {
            assert_eq!(ours.len(), theirs.len());
            let mut min_cos = f64::INFINITY;
            let mut max_abs: f64 = 0.0;
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                let c = cosine(a, b);
                assert!(c >= 0.9999, "{name} {what}[{i}]: cosine {c:.6}");
                min_cos = min_cos.min(c);
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (*x as f64 - y).abs())
                    .fold(0.0, f64::max);
                max_abs = max_abs.max(d);
            }
            rows.push(format!(
                "| {name} | {what} | {} | {min_cos:.7} | {max_abs:.2e} |",
                ours.len()
            ));
        }
        if name == "rl-smollm2" {
            rows.push(format!("versions: {}", st["versions"]));
        }
    }
    // The comparison table of docs/export.md.
    println!("| adapter | texts | n | min cosine | max abs diff |\n|---|---|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
}
