//! `index`, `search` and `demo`: the retrieval commands. A query travels
//! `search` → [`Searcher::open`] (model + templates checked against the index) →
//! [`Searcher::search`] (reasoning, embedding at `<|embed_token|>`) → the vector index → hits.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use search_r3_core::corpus::{read_corpus, CorpusFormat, Document, OnError, ReadOptions};
use search_r3_core::embedder::{QueryMode, ReasonMode};
use search_r3_core::encode::EncodeOptions;
use search_r3_core::load::{load_embedder, EmbedderOptions};
use search_r3_core::searcher::{BuildOptions, SearchResult, Searcher};
use search_r3_index::{check_save_target, IndexKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Options shared by commands that load an embedder.
#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    /// Trainable state (LoRA + embed-token rows) to apply, from `train sft`/`train rl`.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompt templates (TOML) instead of the built-in ones for the model family.
    #[arg(long)]
    templates: Option<PathBuf>,
    /// How reasoning embeds a query: `greedy` (one thought), `greedy+direct`, or `mean:N` (N
    /// sampled thoughts averaged with the direct embedding), optionally `,min=M,max=B` token
    /// bounds per thought; default: the adapter's shipped mode (its manifest), else `greedy`.
    #[arg(long, value_parser = ReasonMode::parse)]
    reason_mode: Option<ReasonMode>,
}

impl EmbedArgs {
    /// The adapter file, if one was given.
    pub(crate) fn adapter_path(&self) -> Option<&Path> {
        self.adapter.as_deref()
    }

    /// Uses `adapter` (a default the command picked, e.g. the shipped one).
    pub(crate) fn set_adapter(&mut self, adapter: Option<PathBuf>) {
        self.adapter = adapter;
    }

    /// The same choices as command-line flags (for a child `search-r3` process).
    pub(crate) fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut v = Vec::new();
        for (flag, path) in [
            ("--adapter", &self.adapter),
            ("--templates", &self.templates),
        ] {
            if let Some(p) = path {
                v.push(flag.into());
                v.push(p.clone().into_os_string());
            }
        }
        if let Some(m) = &self.reason_mode {
            v.push("--reason-mode".into());
            v.push(m.name().into());
        }
        v
    }

    pub(crate) fn options(&self, max_doc_tokens: Option<usize>) -> EmbedderOptions {
        EmbedderOptions {
            adapter: self.adapter.clone(),
            templates: self.templates.clone(),
            max_doc_tokens,
            reason_mode: self.reason_mode,
        }
    }
}

/// Corpus reading options.
#[derive(Args, Debug, Clone)]
pub struct CorpusArgs {
    /// BEIR directory or corpus.jsonl, JSONL `{id, text[, title]}`, or a text file (one document per line).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Force the corpus format (beir, jsonl, text) instead of detecting it.
    #[arg(long)]
    format: Option<CorpusFormat>,
    /// Malformed lines: fail (default) or skip (reported with line numbers).
    #[arg(long, default_value = "fail")]
    on_error: OnError,
    /// Keep documents whose text and title are empty (they are reported either way).
    #[arg(long)]
    allow_empty: bool,
}

impl CorpusArgs {
    fn read(&self) -> Result<Vec<Document>> {
        let opts = ReadOptions {
            format: self.format,
            on_error: self.on_error,
            allow_empty: self.allow_empty,
        };
        let path = self
            .corpus
            .as_ref()
            .context("--corpus FILE|DIR is required")?;
        let (docs, report) = read_corpus(path, &opts)?;
        eprintln!("{report}");
        Ok(docs)
    }
}

/// `search-r3 index`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct IndexArgs {
    #[command(subcommand)]
    cmd: Option<IndexCmd>,
    #[command(flatten)]
    build: BuildArgs,
}

/// Build a new index.
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Model: fetched name, GGUF file or HF directory.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    corpus: CorpusArgs,
    /// Output directory (replaced atomically if it holds an index).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    embed: EmbedArgs,
    /// Document truncation, in tokens of text.
    #[arg(long, default_value_t = 512)]
    max_doc_tokens: usize,
    /// Padded tokens per forward batch.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// `hnsw` (approximate, default) or `exact`.
    #[arg(long, default_value = "hnsw", value_parser = parse_kind)]
    kind: IndexKind,
}

pub(crate) fn parse_kind(s: &str) -> Result<IndexKind, String> {
    match s {
        "hnsw" => Ok(IndexKind::Hnsw),
        "exact" => Ok(IndexKind::Exact),
        _ => Err(format!("unknown index kind `{s}` (expected hnsw or exact)")),
    }
}

/// Incremental changes to an existing index.
#[derive(Subcommand, Debug)]
pub enum IndexCmd {
    /// Add or replace documents (matched by id).
    Add {
        /// Index directory.
        #[arg(long)]
        index: PathBuf,
        #[command(flatten)]
        corpus: CorpusArgs,
        #[command(flatten)]
        embed: EmbedArgs,
    },
    /// Delete documents by id.
    Delete {
        /// Index directory.
        #[arg(long)]
        index: PathBuf,
        /// Document ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        embed: EmbedArgs,
    },
}

/// `search-r3 search`.
#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Index directory.
    #[arg(long)]
    index: PathBuf,
    /// The question.
    query: String,
    /// Let the model reason about the query before embedding it.
    #[arg(long)]
    reason: bool,
    /// Number of results.
    #[arg(short, long, default_value_t = 10)]
    k: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Use this model instead of the one recorded in the index (must be the same weights).
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    embed: EmbedArgs,
}

/// Ctrl-C stops an encoding job between batches, or training after the current step; their
/// checkpoints make the next run resume.
pub(crate) fn cancel_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing the current batch or step and saving a checkpoint (Ctrl-C again to abort)"
        );
    });
    flag
}

fn build(a: &BuildArgs) -> Result<()> {
    let out = a
        .out
        .as_ref()
        .context("--out DIR is required to build an index")?;
    // The save at the end would refuse a file or someone's directory, after all the encoding.
    check_save_target(out).with_context(|| format!("--out {}", out.display()))?;
    let docs = a.corpus.read()?;
    let (embedder, identity) = load_embedder(&a.model, &a.embed.options(Some(a.max_doc_tokens)))?;
    let opts = BuildOptions {
        kind: a.kind,
        encode: EncodeOptions {
            batch_tokens: a.batch_tokens,
            ..Default::default()
        },
        ..Default::default()
    };
    let cancel = cancel_flag();
    let (s, report) = Searcher::build(embedder, identity, docs, out, &opts, &cancel)?;
    eprintln!(
        "indexed {} documents into {} ({} truncated to {} tokens; {} tokens in {:.1}s, {:.0} tok/s{})",
        report.docs,
        out.display(),
        report.truncated,
        a.max_doc_tokens,
        report.tokens,
        report.encode_s,
        report.tokens as f64 / report.encode_s.max(1e-9),
        if report.resumed_batches > 0 {
            format!("; resumed {} batches from the checkpoint", report.resumed_batches)
        } else {
            String::new()
        }
    );
    drop(s);
    Ok(())
}

/// Runs `search-r3 index …`.
pub fn index(a: &IndexArgs) -> Result<()> {
    match &a.cmd {
        Some(IndexCmd::Add {
            index,
            corpus,
            embed,
        }) => {
            let docs = corpus.read()?;
            let mut s = Searcher::open(index, None, &embed.options(None))?;
            let before = s.len();
            let truncated = s.upsert(docs, &EncodeOptions::default())?;
            eprintln!(
                "index now holds {} documents (was {before}; {truncated} truncated)",
                s.len()
            );
        }
        Some(IndexCmd::Delete { index, ids, embed }) => {
            let mut s = Searcher::open(index, None, &embed.options(None))?;
            let missing = s.delete(ids)?;
            if !missing.is_empty() {
                eprintln!("not in the index: {}", missing.join(", "));
            }
            eprintln!("index now holds {} documents", s.len());
        }
        None => build(&a.build)?,
    }
    Ok(())
}

/// Prints results as a table with the reasoning trace.
pub fn print_results(results: &[SearchResult]) {
    for r in results {
        println!("query: {}", r.query);
        if let Some(t) = &r.embedding.reasoning {
            println!(
                "reasoning{}: {}",
                if r.embedding.forced {
                    " (embed token forced)"
                } else {
                    ""
                },
                t
            );
        }
        println!(
            "[generation {:.2}s, embedding {:.2}s, search {:.1}ms]",
            r.embedding.generation_s,
            r.embedding.embedding_s,
            r.search_s * 1e3
        );
        for h in &r.hits {
            let title = if h.title.is_empty() {
                String::new()
            } else {
                format!("{} — ", h.title)
            };
            println!(
                "{:>3}. {:.4}  {:<28} {}{}",
                h.rank, h.score, h.id, title, h.snippet
            );
        }
        println!();
    }
}

/// Runs `search-r3 search`.
pub fn search(a: &SearchArgs) -> Result<()> {
    let s = Searcher::open(&a.index, a.model.as_deref(), &a.embed.options(None))
        .with_context(|| format!("opening index {}", a.index.display()))?;
    let mode = if a.reason {
        QueryMode::Reason
    } else {
        QueryMode::Direct
    };
    let results = s.search(&[a.query.as_str()], a.k, mode)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_results(&results);
    }
    Ok(())
}

/// The bundled demo corpus (Python standard-library docstrings; see data/demo/SOURCE.md).
pub(crate) const DEMO_CORPUS: &str = include_str!("../../../data/demo/python-docs.jsonl");

pub(crate) const DEMO_QUERIES: &[&str] = &[
    "How do I read a CSV file row by row?",
    "run a shell command and capture its output",
    "compute the median of a list of numbers",
    "parse a date string into a datetime",
    "remove a directory tree",
];

/// `search-r3 demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Model: fetched name, GGUF file or HF directory.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    /// Where to keep the demo index (reused when it matches).
    #[arg(long, default_value = "runs/demo-index")]
    out: PathBuf,
    /// Results per query.
    #[arg(short, long, default_value_t = 3)]
    k: usize,
    /// Run the untrained base model instead of the adapter shipped in `adapters/`.
    #[arg(long, conflicts_with = "adapter")]
    no_adapter: bool,
    #[command(flatten)]
    embed: EmbedArgs,
}

/// Trained adapters shipped in the repository, by the model they were trained on: the stage-2
/// adapter (stage 1 stacked with GRPO), which beats the stage-1 one on SciFact test with
/// reasoning on (docs/benchmarks.md, stage-2 section).
const SHIPPED_ADAPTERS: &[(&str, &str)] = &[("smollm2", "adapters/rl-smollm2")];

/// The shipped adapter for `model`: looked up from the working directory first, then in the
/// source tree the binary was built from (so `demo` finds it from anywhere in a checkout).
pub(crate) fn shipped_adapter(model: &str) -> Option<PathBuf> {
    let rel = SHIPPED_ADAPTERS.iter().find(|(m, _)| *m == model)?.1;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [PathBuf::from(rel), repo.join(rel)]
        .into_iter()
        .find(|d| d.join("adapter.safetensors").is_file())
}

/// Runs `search-r3 demo`: fetch the model, index the bundled corpus, run example queries with
/// and without reasoning.
pub fn demo(a: &DemoArgs) -> Result<()> {
    // Before fetching the model and encoding the corpus, which a bad --out would waste.
    check_save_target(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let mut embed = a.embed.clone();
    if embed.adapter.is_none() && !a.no_adapter {
        embed.set_adapter(shipped_adapter(&a.model));
    }
    match &embed.adapter {
        Some(p) => eprintln!(
            "adapter: {} (--no-adapter runs the base model)",
            p.display()
        ),
        None => eprintln!("adapter: none (base model `{}`)", a.model),
    }
    let corpus = write_demo_corpus(&a.out)?;
    let searcher = match Searcher::open(&a.out, Some(&a.model), &embed.options(None)) {
        Ok(s) => {
            eprintln!("reusing the demo index in {}", a.out.display());
            s
        }
        Err(e) => {
            if a.out.exists() {
                eprintln!("not reusing {}: {e:#}", a.out.display());
            }
            eprintln!(
                "indexing the demo corpus (531 Python docstrings) into {}",
                a.out.display()
            );
            let (docs, _) = read_corpus(&corpus, &ReadOptions::default())?;
            let (embedder, identity) = load_embedder(&a.model, &embed.options(Some(256)))?;
            let cancel = cancel_flag();
            Searcher::build(
                embedder,
                identity,
                docs,
                &a.out,
                &BuildOptions::default(),
                &cancel,
            )?
            .0
        }
    };
    for mode in [QueryMode::Direct, QueryMode::Reason] {
        println!(
            "==== {} ====\n",
            if mode == QueryMode::Direct {
                "direct (no reasoning)"
            } else {
                "with reasoning"
            }
        );
        let results = searcher.search(DEMO_QUERIES, a.k, mode)?;
        print_results(&results);
    }
    Ok(())
}

fn write_demo_corpus(out: &Path) -> Result<PathBuf> {
    let p = PathBuf::from(format!("{}.corpus.jsonl", out.display()));
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&p, DEMO_CORPUS).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}
