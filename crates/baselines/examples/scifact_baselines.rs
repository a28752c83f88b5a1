//! Runs the baselines on SciFact's test split and prints nDCG@10 and R@100, to check them
//! against the brief's bm25s / sentence-transformers figures (BRIEF §4).
//!
//! ```text
//! cargo run --release -p search-r3-baselines --example scifact_baselines -- [bm25] [minilm]
//!     [--data DIR] [--model DIR] [--limit N] [--batch N] [--alnum]
//! ```
//!
//! `--limit N` encodes only the first N documents with MiniLM and prints throughput without
//! metrics (for thread-count comparisons: run it under `CANDLE_NUM_THREADS=1` and `=2`).
//! `--alnum` indexes with tantivy's alphanumeric tokenizer instead of bm25s's `\w\w+`.
//! `DUMP_TERMS=FILE` writes every document's and test query's analyzed terms (`id<TAB>terms`,
//! queries prefixed `Q`), to diff against bm25s's tokenizer.
//!
//! The metric code here is deliberately minimal (binary or graded gains, ties in the order
//! the retriever returned them); the evaluation command has the trec_eval-exact one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use search_r3_baselines::{Bm25Index, Bm25Params, SentenceEncoder, TokenPattern};
use search_r3_core::corpus::{read_corpus, read_qrels, read_queries, Document, ReadOptions};

type Qrels = HashMap<String, HashMap<String, i32>>;

struct Args {
    bm25: bool,
    minilm: bool,
    data: PathBuf,
    model: Option<PathBuf>,
    limit: Option<usize>,
    batch: usize,
    alnum: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        bm25: false,
        minilm: false,
        data: PathBuf::from("/work/shared/datasets/scifact"),
        model: None,
        limit: None,
        batch: 32,
        alnum: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "bm25" => args.bm25 = true,
            "minilm" => args.minilm = true,
            "--data" => args.data = value()?.into(),
            "--model" => args.model = Some(value()?.into()),
            "--limit" => args.limit = Some(value()?.parse()?),
            "--batch" => args.batch = value()?.parse()?,
            "--alnum" => args.alnum = true,
            _ => bail!("unknown argument {a}"),
        }
    }
    if !args.bm25 && !args.minilm {
        args.bm25 = true;
    }
    Ok(args)
}

/// nDCG@k with gains = relevance grades and the ranking as given.
fn ndcg_at(ranked: &[String], rels: &HashMap<String, i32>, k: usize) -> f64 {
    let discount = |i: usize| 1.0 / ((i + 2) as f64).log2();
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| rels.get(d).copied().unwrap_or(0).max(0) as f64 * discount(i))
        .sum();
    let mut ideal: Vec<i32> = rels.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, &g)| g as f64 * discount(i))
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

fn recall_at(ranked: &[String], rels: &HashMap<String, i32>, k: usize) -> f64 {
    let relevant = rels.values().filter(|&&g| g > 0).count();
    if relevant == 0 {
        return 0.0;
    }
    let found = ranked
        .iter()
        .take(k)
        .filter(|d| rels.get(*d).is_some_and(|&g| g > 0))
        .count();
    found as f64 / relevant as f64
}

fn report(name: &str, runs: &[(String, Vec<String>)], qrels: &Qrels) {
    let (mut ndcg, mut recall) = (0.0, 0.0);
    for (qid, ranked) in runs {
        ndcg += ndcg_at(ranked, &qrels[qid], 10);
        recall += recall_at(ranked, &qrels[qid], 100);
    }
    let n = runs.len() as f64;
    println!(
        "{name}: nDCG@10 {:.4}  R@100 {:.4}  ({} queries)",
        ndcg / n,
        recall / n,
        runs.len()
    );
}

fn main() -> Result<()> {
    // The same process setup as the `search-r3` binary, so timings carry over (it matters:
    // without its allocator tuning MiniLM spends a third of its time in page faults).
    search_r3_model::init_threads();
    let args = parse_args()?;
    let (docs, _) = read_corpus(&args.data.join("corpus.jsonl"), &ReadOptions::default())?;
    let queries: HashMap<String, String> = read_queries(&args.data.join("queries.jsonl"))?
        .into_iter()
        .collect();
    let mut qrels: Qrels = HashMap::new();
    for (q, d, g) in read_qrels(&args.data.join("qrels/test.tsv"))? {
        qrels.entry(q).or_default().insert(d, g);
    }
    let mut qids: Vec<&String> = qrels.keys().collect();
    qids.sort();
    let qtexts: Vec<&str> = qids
        .iter()
        .map(|q| {
            queries
                .get(*q)
                .map(String::as_str)
                .context("qrels query not in queries")
        })
        .collect::<Result<_>>()?;
    println!("{} docs, {} test queries", docs.len(), qids.len());

    if args.bm25 {
        let params = Bm25Params {
            tokens: if args.alnum {
                TokenPattern::Alphanumeric
            } else {
                TokenPattern::WordsMin2
            },
            ..Bm25Params::default()
        };
        let t = Instant::now();
        let index = Bm25Index::build(&docs, &params)?;
        let build = t.elapsed();
        if let Ok(path) = std::env::var("DUMP_TERMS") {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
            for d in &docs {
                writeln!(f, "{}\t{}", d.id, index.analyze(&d.full_text()).join(" "))?;
            }
            for (q, t) in qids.iter().zip(&qtexts) {
                writeln!(f, "Q{}\t{}", q, index.analyze(t).join(" "))?;
            }
        }
        let t = Instant::now();
        let hits = index.search_batch(&qtexts, 100)?;
        let search = t.elapsed();
        println!(
            "BM25 {params:?}: index build {:.2}s, {} queries in {:.3}s",
            build.as_secs_f64(),
            qids.len(),
            search.as_secs_f64()
        );
        let runs: Vec<(String, Vec<String>)> = qids
            .iter()
            .zip(hits)
            .map(|(q, h)| (q.to_string(), h.into_iter().map(|(d, _)| d).collect()))
            .collect();
        report("BM25", &runs, &qrels);
    }

    if args.minilm {
        let dir = match &args.model {
            Some(d) => d.clone(),
            None => search_r3_model::fetch::cached_known(&search_r3_baselines::minilm::MINILM)
                .context("minilm is not fetched; pass --model DIR")?,
        };
        let encoder = SentenceEncoder::load(&dir)?;
        let slice: &[Document] = &docs[..args.limit.unwrap_or(docs.len()).min(docs.len())];
        let texts: Vec<String> = slice.iter().map(Document::full_text).collect();
        let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens: usize = text_refs
            .iter()
            .map(|t| encoder.tokenize(t).map(|ids| ids.len()))
            .sum::<Result<usize, _>>()?;
        let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into());
        let t = Instant::now();
        let mut last = Instant::now();
        let doc_vecs = encoder.encode_with_progress(&text_refs, args.batch, &mut |done| {
            if last.elapsed().as_secs() >= 30 {
                eprintln!("  {done}/{} docs", text_refs.len());
                last = Instant::now();
            }
        })?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "MiniLM (CANDLE_NUM_THREADS={threads}, batch {}): {} docs, {tokens} tokens in \
             {secs:.1}s = {:.1} docs/s, {:.0} tok/s",
            args.batch,
            slice.len(),
            slice.len() as f64 / secs,
            tokens as f64 / secs
        );
        if args.limit.is_none() {
            let t = Instant::now();
            let q_vecs = encoder.encode(&qtexts, args.batch)?;
            println!(
                "  {} queries in {:.2}s",
                qtexts.len(),
                t.elapsed().as_secs_f64()
            );
            let runs: Vec<(String, Vec<String>)> = qids
                .iter()
                .zip(&q_vecs)
                .map(|(q, qv)| {
                    // Vectors are unit length, so the dot product is the cosine.
                    let mut scored: Vec<(f32, usize)> = doc_vecs
                        .iter()
                        .enumerate()
                        .map(|(i, dv)| (qv.iter().zip(dv).map(|(a, b)| a * b).sum(), i))
                        .collect();
                    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    let ranked = scored
                        .iter()
                        .take(100)
                        .map(|&(_, i)| slice[i].id.clone())
                        .collect();
                    (q.to_string(), ranked)
                })
                .collect();
            report("MiniLM", &runs, &qrels);
        }
    }
    Ok(())
}
