//! `search-r3 adapter merge`: folds a trained adapter (LoRA + `<|embed_token|>` row) into its
//! base model and writes a standalone HF checkpoint, usable as `--model DIR` here and loadable
//! by transformers — or, with `--format sentence-transformers`, a directory that
//! `SentenceTransformer(path)` loads and that embeds as we do
//! ([`search_r3_core::export`]).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use search_r3_core::load::{load_embedder, EmbedderOptions};
use std::path::PathBuf;

/// Adapter tools.
#[derive(Subcommand)]
pub(crate) enum AdapterCmd {
    /// Fold an adapter into its base model and write the result as an HF model directory
    /// (config.json, model.safetensors, tokenizer files); `--model DIR` then needs no
    /// `--adapter`.
    Merge(MergeArgs),
}

/// `adapter merge` arguments.
#[derive(Args)]
pub(crate) struct MergeArgs {
    /// Base model the adapter was trained on (fetched name, .gguf, or HF directory).
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    /// Adapter file, or a `train sft` run directory (its adapter.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory (must not exist; written to a temporary directory and renamed).
    #[arg(long)]
    out: PathBuf,
    /// Template file the adapter was trained with, when not the built-in one.
    #[arg(long)]
    templates: Option<PathBuf>,
    /// `hf`: a transformers checkpoint (also `--model DIR` here). `sentence-transformers`: the
    /// same plus the prompt in the tokenizer, last-token pooling and normalisation, so
    /// `SentenceTransformer(DIR).encode` gives our vectors.
    #[arg(long, value_enum, default_value_t = Format::Hf)]
    format: Format,
    /// Longest document text in tokens for the sentence-transformers export (the rest is cut,
    /// as `search-r3 index --max-doc-tokens` does).
    #[arg(long)]
    max_doc_tokens: Option<usize>,
}

/// What `adapter merge` writes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// A Hugging Face transformers checkpoint.
    Hf,
    /// A sentence-transformers model directory.
    SentenceTransformers,
}

pub(crate) fn run(cmd: &AdapterCmd) -> Result<()> {
    match cmd {
        AdapterCmd::Merge(a) => merge(a),
    }
}

fn merge(a: &MergeArgs) -> Result<()> {
    // The embedder's loader checks the adapter against the base model and merges it in memory.
    let (embedder, identity) = load_embedder(
        &a.model,
        &EmbedderOptions {
            adapter: Some(a.adapter.clone()),
            templates: a.templates.clone(),
            max_doc_tokens: a.max_doc_tokens,
            reason_mode: None,
        },
    )
    .with_context(|| format!("loading `{}` with adapter {}", a.model, a.adapter.display()))?;
    if embedder.query_tower.is_some() && a.format == Format::Hf {
        bail!(
            "{} has a query tower ({}): queries and documents run through different weights, \
             which one merged model cannot hold; serve the adapter directory instead",
            a.adapter.display(),
            search_r3_core::load::QUERY_ADAPTER
        );
    }
    let extra = serde_json::json!({
        "base_model": embedder.model.id,
        "base_model_sha256": identity.sha256,
        "adapter": a.adapter.display().to_string(),
        "adapter_sha256": identity.adapter,
        "templates_hash": identity.template_hash,
    });
    let written = match a.format {
        Format::Hf => search_r3_model::merge::save_hf_dir(
            &embedder.model.model,
            &embedder.model.tokenizer,
            &a.out,
            &extra,
        )
        .map_err(anyhow::Error::from),
        Format::SentenceTransformers => {
            search_r3_core::export::save_sentence_transformers(&embedder, &a.out, &extra)
                .map_err(anyhow::Error::from)
        }
    };
    written.with_context(|| format!("writing the merged model to {}", a.out.display()))?;
    let bytes = std::fs::metadata(a.out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    let usage = match a.format {
        Format::Hf => format!("use it as `--model {}` (no --adapter)", a.out.display()),
        Format::SentenceTransformers => format!(
            "load it with `SentenceTransformer(\"{}\")`; queries: `encode(q, prompt_name=\"query\")`",
            a.out.display()
        ),
    };
    println!(
        "wrote {} ({:.0} MB of weights); {usage}",
        a.out.display(),
        bytes as f64 / 1e6,
    );
    Ok(())
}
