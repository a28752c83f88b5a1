//! `search-r3 mine-negatives`: stage-1 training triples from a BEIR split, with hard negatives
//! taken from a retriever's ranking (BM25, MiniLM, or the current Search-R3 embedder) minus the
//! query's relevant documents.

use crate::eval::{retrieve, RetrieverArgs};
use anyhow::{Context, Result};
use clap::Args;
use search_r3_core::corpus::ReadOptions;
use search_r3_core::dataset::load_split;
use search_r3_core::triples::{pick_negatives, triples_from_split, write_triples};
use std::path::PathBuf;

/// `search-r3 mine-negatives`.
#[derive(Args, Debug)]
pub struct MineArgs {
    /// BEIR dataset directory.
    #[arg(long)]
    dataset: PathBuf,
    /// The split whose queries and judgements become training examples.
    #[arg(long, default_value = "train")]
    split: String,
    /// Output JSONL: one `{"query", "pos", "neg", "query_id", "pos_ids", "neg_ids"}` per query.
    #[arg(long)]
    out: PathBuf,
    /// Hard negatives kept per query.
    #[arg(long, default_value_t = 4)]
    count: usize,
    /// Eligible candidates skipped at the top of each ranking, where unjudged positives are
    /// most likely.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    #[command(flatten)]
    r: RetrieverArgs,
}

/// Runs `search-r3 mine-negatives`.
pub fn mine(a: &MineArgs) -> Result<()> {
    let ds = load_split(&a.dataset, &a.split, &ReadOptions::default())
        .with_context(|| format!("loading {} split `{}`", a.dataset.display(), a.split))?;
    let mut triples = triples_from_split(&ds)?;
    let ranked = retrieve(&a.r.model, &a.r, &ds, a.r.index.as_deref())?;
    let by_id = ds.doc_positions();
    let mut short = 0;
    for t in &mut triples {
        let qid = t.query_id.as_deref().expect("split examples carry ids");
        let mut hits = ranked.run.get(qid).cloned().unwrap_or_default();
        search_r3_core::trec::rank_trec(&mut hits);
        let ids: Vec<String> = hits.into_iter().map(|(d, _)| d).collect();
        let judged = ds.qrels.judgments(qid).cloned().unwrap_or_default();
        let picked = pick_negatives(&ids, &judged, a.skip, a.count);
        if picked.len() < a.count {
            short += 1;
        }
        t.neg = picked
            .iter()
            .map(|d| ds.corpus[by_id[d.as_str()]].full_text())
            .collect();
        t.neg_ids = picked.into_iter().cloned().collect();
    }
    write_triples(&a.out, &triples).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} examples to {} ({} negatives each from `{}` top {}{}; relevant documents \
         excluded)",
        triples.len(),
        a.out.display(),
        a.count,
        a.r.model,
        a.r.depth,
        if short > 0 {
            format!("; {short} queries got fewer, their ranking ran out")
        } else {
            String::new()
        }
    );
    Ok(())
}
