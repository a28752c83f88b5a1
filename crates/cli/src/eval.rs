//! `search-r3 eval`: retrieval quality on a BEIR split, for the Search-R3 embedder and for the
//! baselines it is compared with, scored with trec_eval's metrics.
//!
//! The flow: load and cross-check the split ([`load_split`]) → retrieve the top `depth`
//! documents per query with the chosen retriever (an LLM through [`Searcher`], `bm25`, or
//! `minilm`) → optionally fuse with a second run by reciprocal rank → [`evaluate`] → table,
//! `results.json`, TREC run file.

use crate::retrieval::{cancel_flag, EmbedArgs};
use crate::score::{metrics_json, print_metrics, write_atomic};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use search_r3_baselines::{Bm25Index, Bm25Params, SentenceEncoder};
use search_r3_core::corpus::{corpus_fingerprint, ReadOptions};
use search_r3_core::dataset::{load_split, BeirSplit};
use search_r3_core::embedder::QueryMode;
use search_r3_core::encode::EncodeOptions;
use search_r3_core::metrics::evaluate;
use search_r3_core::searcher::{BuildOptions, Searcher};
use search_r3_core::trec::{cmp_trec, fuse_rrf, read_run, write_run, Run, RRF_K};
use search_r3_index::{
    check_compatible, check_save_target, load_index_with_files, read_meta, save_index_with_files,
    AnyIndex, DocKey, HnswParams, IndexKind, IndexMeta, VectorIndex,
};
use search_r3_model::fetch::{self, FetchOptions};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Queries embedded (and, with `--reason`, generated) per step of the progress bar.
const QUERY_CHUNK: usize = 16;
/// Texts per MiniLM forward pass.
const MINILM_BATCH: usize = 32;
const MINILM_IDS_FILE: &str = "doc_ids.json";

/// Which retriever ranks the corpus, and how (shared by `eval` and `mine-negatives`).
#[derive(Args, Debug)]
pub struct RetrieverArgs {
    /// Retriever: an LLM (fetched name, GGUF file or HF directory), `bm25` (tantivy) or
    /// `minilm` (all-MiniLM-L6-v2 through candle).
    #[arg(long, short, default_value = "smollm2")]
    pub model: String,
    #[command(flatten)]
    pub embed: EmbedArgs,
    /// Let the model reason about each query before embedding it (LLM retrievers only).
    #[arg(long)]
    pub reason: bool,
    /// Keep the corpus vectors here: reused when model, adapter, templates, truncation and
    /// corpus match; built here otherwise (an index of another model is refused, not replaced).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Documents retrieved per query.
    #[arg(long, default_value_t = 100)]
    pub depth: usize,
    /// Document truncation for LLM retrievers, in tokens of text.
    #[arg(long, default_value_t = 512)]
    pub max_doc_tokens: usize,
    /// Padded tokens per forward batch when encoding documents.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Index kind built for LLM retrievers: `exact` (default: measures the embedder alone) or
    /// `hnsw`.
    #[arg(long, default_value = "exact", value_parser = crate::retrieval::parse_kind)]
    pub kind: IndexKind,
}

/// `search-r3 eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// BEIR dataset directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
    #[arg(long)]
    dataset: PathBuf,
    /// Which qrels split to evaluate.
    #[arg(long, default_value = "test")]
    split: String,
    #[command(flatten)]
    r: RetrieverArgs,
    /// Write the results (metrics, configuration, timings) as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the ranking as a TREC run file (re-score it with `search-r3 score` or trec_eval).
    #[arg(long)]
    run: Option<PathBuf>,
    /// Fuse with a second run by reciprocal rank: `bm25`, `minilm`, an LLM, or a TREC run file.
    #[arg(long)]
    fuse: Option<String>,
    /// The RRF constant k in Σ 1/(k + rank).
    #[arg(long, default_value_t = RRF_K)]
    rrf_k: f64,
    /// Evaluate a seeded random subset of this many queries.
    #[arg(long)]
    max_queries: Option<usize>,
    /// Shrink the corpus to this many documents: every document judged for the evaluated
    /// queries plus seeded random others (easier than the full corpus; label results so).
    #[arg(long)]
    max_docs: Option<usize>,
    /// Seed for --max-queries / --max-docs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also print (and write under "per_query") every query's metrics.
    #[arg(long)]
    per_query: bool,
}

/// One retriever's ranking of every query, and what produced it.
pub(crate) struct Retrieved {
    pub run: Run,
    pub config: Map<String, Value>,
    pub timings: Map<String, Value>,
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}, {{per_sec}}]"
        ))
        .expect("valid template"),
    );
    pb
}

/// Fails before any encoding when `dir` holds something other than a readable index (a file,
/// or a directory with other content): the save at the end would refuse it anyway, after
/// minutes of work.
fn check_cache_dir(dir: &Path) -> Result<()> {
    // read_meta recovers an interrupted save first, so its index is reused, not refused.
    if read_meta(dir).is_ok() {
        return Ok(());
    }
    let not_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if not_empty {
        bail!(
            "--index {}: the directory exists and does not hold a readable index; pass an \
             empty or new directory",
            dir.display()
        );
    }
    check_save_target(dir).with_context(|| format!("--index {}", dir.display()))?;
    Ok(())
}

fn query_texts(ds: &BeirSplit) -> Vec<&str> {
    ds.queries.iter().map(|(_, t)| t.as_str()).collect()
}

fn to_run(ds: &BeirSplit, ranked: Vec<Vec<(String, f64)>>) -> Run {
    ds.queries
        .iter()
        .map(|(q, _)| q.clone())
        .zip(ranked)
        .collect()
}

fn bm25_run(ds: &BeirSplit, depth: usize) -> Result<Retrieved> {
    let params = Bm25Params::default();
    let t0 = Instant::now();
    let index = Bm25Index::build(&ds.corpus, &params).context("building the BM25 index")?;
    let build_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let hits = index.search_batch(&query_texts(ds), depth)?;
    let search_s = t1.elapsed().as_secs_f64();
    let ranked = hits
        .into_iter()
        .map(|h| h.into_iter().map(|(d, s)| (d, s as f64)).collect())
        .collect();
    let mut config = Map::new();
    config.insert("model".into(), json!("bm25"));
    config.insert(
        "bm25".into(),
        json!({
            "library": "tantivy",
            "k1": search_r3_baselines::bm25::K1,
            "b": search_r3_baselines::bm25::B,
            "analyzer": format!("{params:?}"),
        }),
    );
    let mut timings = Map::new();
    timings.insert("index_s".into(), json!(build_s));
    timings.insert("search_s".into(), json!(search_s));
    Ok(Retrieved {
        run: to_run(ds, ranked),
        config,
        timings,
    })
}

/// The MiniLM corpus vectors, from `cache` when it holds this corpus's, else encoded (and saved
/// there when given).
fn minilm_corpus(
    enc: &SentenceEncoder,
    ds: &BeirSplit,
    identity: &Map<String, Value>,
    cache: Option<&Path>,
) -> Result<(AnyIndex, Option<f64>)> {
    let fingerprint = corpus_fingerprint(&ds.corpus);
    if let Some(dir) = cache.filter(|d| read_meta(d).is_ok()) {
        let (index, meta, files) = load_index_with_files(dir)?;
        check_compatible(&meta, identity)
            .with_context(|| format!("{} holds another model's vectors", dir.display()))?;
        if meta.extra.get("corpus_fingerprint") != Some(&json!(fingerprint)) {
            bail!(
                "{} was built from a different corpus; pass another --index directory",
                dir.display()
            );
        }
        let ids: Vec<String> = serde_json::from_slice(
            files
                .get(MINILM_IDS_FILE)
                .with_context(|| format!("{}: missing {MINILM_IDS_FILE}", dir.display()))?,
        )?;
        if ids.iter().ne(ds.corpus.iter().map(|d| &d.id)) {
            bail!("{}: document order differs from the corpus", dir.display());
        }
        eprintln!("reusing MiniLM vectors in {}", dir.display());
        return Ok((index, None));
    }
    let texts: Vec<String> = ds.corpus.iter().map(|d| d.full_text()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let pb = progress(refs.len(), "encoding corpus (MiniLM)");
    let t0 = Instant::now();
    let vectors = enc.encode_with_progress(&refs, MINILM_BATCH, &mut |done| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    let encode_s = t0.elapsed().as_secs_f64();
    let mut index = AnyIndex::new(IndexKind::Exact, enc.dim(), HnswParams::default())?;
    let keys: Vec<DocKey> = (0..vectors.len() as DocKey).collect();
    index.upsert_batch(&keys, &vectors.concat())?;
    if let Some(dir) = cache {
        let mut meta = IndexMeta::with_extra(identity.clone());
        meta.extra
            .insert("corpus_fingerprint".into(), json!(fingerprint));
        let ids: Vec<&str> = ds.corpus.iter().map(|d| d.id.as_str()).collect();
        save_index_with_files(
            dir,
            &index,
            &meta,
            &[(MINILM_IDS_FILE, serde_json::to_vec(&ids)?.as_slice())],
        )?;
    }
    Ok((index, Some(encode_s)))
}

fn minilm_run(ds: &BeirSplit, depth: usize, cache: Option<&Path>) -> Result<Retrieved> {
    let minilm = &search_r3_baselines::minilm::MINILM;
    let dir = fetch::fetch_known(minilm, &FetchOptions::default())?;
    let enc = SentenceEncoder::load(&dir)
        .with_context(|| format!("loading MiniLM from {}", dir.display()))?;
    let sha = minilm.sha256;
    let mut identity = Map::new();
    identity.insert("model_sha256".into(), json!(sha));
    identity.insert("pooling".into(), json!("mean, normalised"));
    let (index, encode_s) = minilm_corpus(&enc, ds, &identity, cache)?;
    let t0 = Instant::now();
    let qv = enc.encode(&query_texts(ds), MINILM_BATCH)?;
    let ranked = qv
        .iter()
        .map(|q| {
            Ok(index
                .search(q, depth)?
                .into_iter()
                .map(|h| (ds.corpus[h.key as usize].id.clone(), h.score as f64))
                .collect())
        })
        .collect::<Result<Vec<_>>>()?;
    let query_s = t0.elapsed().as_secs_f64();
    let mut config = Map::new();
    config.insert("model".into(), json!("minilm"));
    config.insert("model_sha256".into(), json!(sha));
    config.insert("max_seq_length".into(), json!(enc.max_seq_length()));
    let mut timings = Map::new();
    timings.insert("encode_s".into(), json!(encode_s));
    timings.insert("query_s".into(), json!(query_s));
    Ok(Retrieved {
        run: to_run(ds, ranked),
        config,
        timings,
    })
}

fn llm_run(
    spec: &str,
    a: &RetrieverArgs,
    ds: &BeirSplit,
    cache: Option<&Path>,
) -> Result<Retrieved> {
    let opts = a.embed.options(Some(a.max_doc_tokens));
    let tmp;
    let mut encode_s = None;
    let searcher = match cache {
        Some(dir) if read_meta(dir).is_ok() => {
            let mut s = Searcher::open(dir, Some(spec), &opts)
                .with_context(|| format!("reusing the index in {}", dir.display()))?;
            let stored = |k: &str| s.meta.extra.get(k).cloned().unwrap_or(Value::Null);
            if stored("corpus_fingerprint") != json!(corpus_fingerprint(&ds.corpus)) {
                bail!(
                    "{} was built from a different corpus (or another --max-docs subset); pass \
                     another --index directory",
                    dir.display()
                );
            }
            if stored("max_doc_tokens") != json!(a.max_doc_tokens) {
                bail!(
                    "{} truncates documents to {} tokens, this run asks for {}; pass another \
                     --index directory or the same --max-doc-tokens",
                    dir.display(),
                    stored("max_doc_tokens"),
                    a.max_doc_tokens
                );
            }
            eprintln!("reusing the index in {}", dir.display());
            if s.meta.kind != a.kind && a.kind == IndexKind::Exact {
                // Scores must measure the embedder, not the ANN graph: search the same vectors
                // exhaustively.
                let keys = s.index.keys();
                let flat: Vec<f32> = keys
                    .iter()
                    .flat_map(|&k| s.index.get(k).expect("listed key"))
                    .collect();
                let mut exact =
                    AnyIndex::new(IndexKind::Exact, s.index.dim(), HnswParams::default())?;
                exact.upsert_batch(&keys, &flat)?;
                s.index = exact;
                s.meta.kind = IndexKind::Exact;
            }
            s
        }
        _ => {
            let dir = match cache {
                Some(d) => d.to_path_buf(),
                None => {
                    tmp = tempfile::tempdir()?;
                    tmp.path().join("index")
                }
            };
            let (embedder, identity) = search_r3_core::load::load_embedder(spec, &opts)
                .with_context(|| format!("loading model `{spec}`"))?;
            let build = BuildOptions {
                kind: a.kind,
                encode: EncodeOptions {
                    batch_tokens: a.batch_tokens,
                    ..Default::default()
                },
                ..Default::default()
            };
            let cancel = cancel_flag();
            let (s, report) =
                Searcher::build(embedder, identity, ds.corpus.clone(), &dir, &build, &cancel)?;
            eprintln!(
                "encoded {} documents ({} truncated to {} tokens) in {:.0}s",
                report.docs, report.truncated, a.max_doc_tokens, report.encode_s
            );
            encode_s = Some(report.encode_s);
            s
        }
    };
    let mode = if a.reason {
        QueryMode::Reason
    } else {
        QueryMode::Direct
    };
    let texts = query_texts(ds);
    let pb = progress(texts.len(), "queries");
    let t0 = Instant::now();
    let mut results = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(QUERY_CHUNK) {
        results.extend(searcher.search(chunk, a.depth, mode)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let query_s = t0.elapsed().as_secs_f64();
    let n = results.len().max(1) as f64;
    let mean = |f: &dyn Fn(&search_r3_core::searcher::SearchResult) -> f64| {
        results.iter().map(f).sum::<f64>() / n
    };
    let mut timings = Map::new();
    timings.insert("encode_s".into(), json!(encode_s));
    timings.insert("query_s".into(), json!(query_s));
    timings.insert(
        "per_query_generation_s".into(),
        json!(mean(&|r| r.embedding.generation_s)),
    );
    timings.insert(
        "per_query_embedding_s".into(),
        json!(mean(&|r| r.embedding.embedding_s)),
    );
    timings.insert("per_query_search_s".into(), json!(mean(&|r| r.search_s)));
    let id = searcher.identity();
    let mut config = Map::new();
    config.insert("model".into(), json!(spec));
    config.insert("model_sha256".into(), json!(id.sha256));
    config.insert(
        "adapter".into(),
        json!(a.embed.adapter_path().map(|p| p.display().to_string())),
    );
    config.insert("adapter_sha256".into(), json!(id.adapter));
    config.insert("query_adapter_sha256".into(), json!(id.query_adapter));
    config.insert("mode".into(), json!(mode));
    config.insert("templates_hash".into(), json!(id.template_hash));
    config.insert("max_doc_tokens".into(), json!(a.max_doc_tokens));
    config.insert("index_kind".into(), json!(searcher.meta.kind));
    if a.reason {
        let forced = results.iter().filter(|r| r.embedding.forced).count();
        let rm = searcher.embedder.reason_mode;
        config.insert(
            "reasoning".into(),
            json!({
                "mode": rm.name(),
                "settings": rm,
                "forced_embed_token": forced,
                "forced_share": forced as f64 / n,
                "mean_generated_tokens": mean(&|r| r.embedding.generated_tokens as f64),
                "mean_tokens_per_thought":
                    mean(&|r| r.embedding.generated_tokens as f64) / rm.thoughts.max(1) as f64,
                // What the model wrote for each query, to read beside the per-query scores.
                "per_query": ds.queries.iter().zip(&results).map(|((qid, _), r)| {
                    (qid.clone(), json!({"thoughts": r.embedding.thoughts,
                        "generated_tokens": r.embedding.generated_tokens,
                        "forced": r.embedding.forced}))
                }).collect::<Map<String, Value>>(),
            }),
        );
    }
    let ranked = results
        .into_iter()
        .map(|r| r.hits.into_iter().map(|h| (h.id, h.score as f64)).collect())
        .collect();
    Ok(Retrieved {
        run: to_run(ds, ranked),
        config,
        timings,
    })
}

/// Ranks the corpus of `ds` for each of its queries with the retriever called `name`.
pub(crate) fn retrieve(
    name: &str,
    a: &RetrieverArgs,
    ds: &BeirSplit,
    cache: Option<&Path>,
) -> Result<Retrieved> {
    if let Some(dir) = cache {
        check_cache_dir(dir)?;
    }
    match name {
        "bm25" => bm25_run(ds, a.depth),
        "minilm" => minilm_run(ds, a.depth, cache),
        spec => llm_run(spec, a, ds, cache),
    }
}

/// Runs `search-r3 eval`.
pub fn eval(a: &EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    if a.r.reason && matches!(a.r.model.as_str(), "bm25" | "minilm") {
        bail!("--reason needs an LLM retriever, not `{}`", a.r.model);
    }
    let mut ds = load_split(&a.dataset, &a.split, &ReadOptions::default())
        .with_context(|| format!("loading {} split `{}`", a.dataset.display(), a.split))?;
    if !ds.corpus_report.is_clean() {
        eprintln!("{}", ds.corpus_report);
    }
    if let Some((line, id)) = ds.unknown_docs.first() {
        eprintln!(
            "warning: {} judgements name documents missing from the corpus (first: `{id}` on \
             line {line} of qrels/{}.tsv); they count as relevant but unretrievable",
            ds.unknown_docs.len(),
            a.split
        );
    }
    ds.subsample(a.max_queries, a.max_docs, a.seed);
    eprintln!(
        "{} split `{}`: {} queries, {} documents",
        a.dataset.display(),
        a.split,
        ds.queries.len(),
        ds.corpus.len()
    );

    let primary = retrieve(&a.r.model, &a.r, &ds, a.r.index.as_deref())?;
    let mut config = primary.config;
    let mut timings = primary.timings;
    let run = match &a.fuse {
        None => primary.run,
        Some(other) => {
            let second = if Path::new(other).is_file() {
                read_run(Path::new(other)).with_context(|| format!("reading run {other}"))?
            } else {
                let r = retrieve(other, &a.r, &ds, None)?;
                timings.insert("fuse".into(), Value::Object(r.timings));
                config.insert("fuse_config".into(), Value::Object(r.config));
                r.run
            };
            config.insert(
                "fuse".into(),
                json!({"with": other, "method": "rrf", "k": a.rrf_k}),
            );
            fuse_rrf(&[&primary.run, &second], a.rrf_k, a.r.depth)
        }
    };
    let ev = evaluate(&ds.qrels, &run);
    if ev.queries == 0 {
        bail!("no judged query was retrieved for; nothing to score");
    }
    timings.insert("total_s".into(), json!(t0.elapsed().as_secs_f64()));
    print_metrics(&ev, a.per_query)?;
    let reward = retrieval_reward(&ds, &run, a.r.depth)?;
    println!("{:<12} {:>8.4}", "reward", reward.mean);
    println!("{:<12} {:>8.4}", "reward>=0.5", reward.ge_half);
    println!("{:<12} {:>8}", "docs", ds.corpus.len());
    println!("{:<12} {:>8.1}", "wall_s", t0.elapsed().as_secs_f64());

    if let Some(path) = &a.run {
        let tag = format!(
            "search-r3-{}{}",
            a.r.model.replace(char::is_whitespace, "_"),
            if a.r.reason { "-reason" } else { "" }
        );
        write_run(path, &run, &tag).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.out {
        let mut json = metrics_json(&ev, a.per_query)?;
        json.insert("docs".into(), json!(ds.corpus.len()));
        json.insert(
            "reward".into(),
            json!({"mean": reward.mean, "ge_half": reward.ge_half, "top_k": a.r.depth}),
        );
        config.insert("dataset".into(), json!(a.dataset.display().to_string()));
        config.insert("split".into(), json!(a.split));
        config.insert("depth".into(), json!(a.r.depth));
        config.insert(
            "subset".into(),
            json!({"max_queries": a.max_queries, "max_docs": a.max_docs, "seed": a.seed}),
        );
        json.insert("config".into(), Value::Object(config));
        json.insert("timings".into(), Value::Object(timings));
        write_atomic(path, &serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Search-R3's retrieval reward over a run's scored queries.
struct RewardSummary {
    /// Mean reward.
    mean: f64,
    /// Share of queries with reward ≥ 0.5.
    ge_half: f64,
}

/// The stage-2 reward of each judged query (`(1/|gold|) Σ 1/log2(1 + rank)` over its relevant
/// documents, 0 below `top_k`; ranks in trec_eval order), averaged: the "mean test reward" and
/// "share of queries with reward ≥ 0.5" the paper reports.
fn retrieval_reward(ds: &BeirSplit, run: &Run, top_k: usize) -> Result<RewardSummary> {
    let (mut sum, mut ge, mut n) = (0.0, 0usize, 0usize);
    for (qid, hits) in run {
        let Some(judged) = ds.qrels.judgments(qid) else {
            continue;
        };
        let gold: Vec<&String> = judged
            .iter()
            .filter(|(_, &g)| g >= 1)
            .map(|(d, _)| d)
            .collect();
        if gold.is_empty() {
            continue;
        }
        let mut ranked: Vec<(&str, f64)> = hits.iter().map(|(d, s)| (d.as_str(), *s)).collect();
        ranked.sort_by(|x, y| cmp_trec(*x, *y));
        let ranks: Vec<Option<usize>> = gold
            .iter()
            .map(|g| ranked.iter().position(|(d, _)| d == g).map(|p| p + 1))
            .collect();
        let r = search_r3_train::rl::grpo::dcg_reward(&ranks, top_k)?;
        sum += r;
        ge += usize::from(r >= 0.5);
        n += 1;
    }
    let n = n.max(1) as f64;
    Ok(RewardSummary {
        mean: sum / n,
        ge_half: ge as f64 / n,
    })
}
