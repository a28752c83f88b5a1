//! `search-r3 data import`: a BEIR dataset from a Debian package's text (WordNet, FOLDOC, the
//! Linux man pages). The parsing and splitting live in `search_r3_core::import`; this module
//! parses arguments, shows progress and prints the summary.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use search_r3_core::import::{import, ImportOptions, Source};
use std::path::PathBuf;
use std::time::Instant;

/// `search-r3 data ...`.
#[derive(Subcommand)]
pub enum DataCmd {
    /// Build a BEIR dataset (corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv and the
    /// provenance SOURCE.json, e.g. wordnet.json) from Debian-packaged text: wordnet
    /// (wordnet-base), foldoc (dict-foldoc), manpages (manpages, manpages-dev).
    Import(ImportArgs),
}

/// `search-r3 data import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// wordnet | foldoc | manpages
    source: String,
    /// Output directory (must not exist; written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Where the package's data lies (default: where Debian installs it:
    /// /usr/share/wordnet, /usr/share/dictd, /usr/share/man).
    #[arg(long)]
    from: Option<PathBuf>,
    /// Seed of the item selection and of the 80/10/10 split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep at most N items (a seeded choice made before splitting).
    #[arg(long)]
    max_items: Option<usize>,
}

/// Runs a `data` subcommand.
pub fn run(cmd: &DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Import(a) => run_import(a),
    }
}

fn run_import(a: &ImportArgs) -> Result<()> {
    let Some(source) = Source::from_name(&a.source) else {
        let names: Vec<&str> = Source::ALL.iter().map(|s| s.name()).collect();
        bail!(
            "unknown source `{}`; expected one of: {}",
            a.source,
            names.join(", ")
        );
    };
    if a.max_items == Some(0) {
        bail!("--max-items 0 would write an empty dataset; give at least 1");
    }
    let opts = ImportOptions {
        source,
        from: a
            .from
            .clone()
            .unwrap_or_else(|| source.default_dir().to_path_buf()),
        out: a.out.clone(),
        seed: a.seed,
        max_items: a.max_items,
    };
    let started = Instant::now();
    // Created on the first report, when the number of files is known.
    let mut pb: Option<ProgressBar> = None;
    let mut progress = |done: usize, total: usize| {
        let bar = pb.get_or_insert_with(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{} {{bar:30}} {{pos}}/{{len}} files [{{elapsed_precise}} < {{eta_precise}}]",
                    source.name()
                ))
                .expect("valid template"),
            );
            bar
        });
        bar.set_position(done as u64);
    };
    let result = import(&opts, &mut progress);
    if let Some(bar) = pb {
        bar.finish_and_clear();
    }
    let prov = result?;
    let c = &prov.counts;
    let versions: Vec<String> = prov
        .packages
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    println!(
        "{}: {} items ({} available) from {} → train {}, dev {}, test {} in {} ({:.1} s)",
        prov.source,
        c.items,
        prov.available_items,
        versions.join(", "),
        c.train,
        c.dev,
        c.test,
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    for (why, n) in &prov.skipped {
        println!("  skipped {n}: {why}");
    }
    Ok(())
}
