//! `search-r3 train sft`: stage-1 training (LoRA + `<|embed_token|>` row) on a BEIR split's
//! judgements or a triples JSONL file.
//!
//! The flow: load the model and templates → read the examples (`--triples` or the split's
//! qrels; a query without a positive is an error) → shuffle them with the config's seed, cut to
//! `--max-queries`, hold out `eval_queries` of them → tokenize every prompt once (a document
//! shared by several queries is tokenized and stored once) → [`train_sft`] with an eval hook
//! that scores nDCG@10 of the held-out queries against a small corpus built from the examples'
//! documents (the held-out queries' positives and negatives plus others up to `eval_docs`). The
//! held-out queries come from the training data itself: test judgements are never read.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use search_r3_core::corpus::ReadOptions;
use search_r3_core::dataset::load_split;
use search_r3_core::embedder::{embed_at_token, Embedder};
use search_r3_core::load::QUERY_ADAPTER;
use search_r3_core::load::{
    adapter_file, load_embedder, merge_adapter, EmbedderOptions, ModelIdentity,
};
use search_r3_core::metrics::evaluate_query;
use search_r3_core::triples::{read_triples, triples_from_split, Triple};
use search_r3_index::{l2_normalize, VectorIndex};
use search_r3_model::Model;
use search_r3_train::reason::{train_reason, ReasonConfig, ReasonData, ReasonQuery, Teacher};
use search_r3_train::rl::{policy_name, train_rl, RlConfig, RlData, RlQuery};
use search_r3_train::run::config::RunConfig;
use search_r3_train::run::TrainOptions;
use search_r3_train::sft::{train_sft, EvalHook, SftConfig, TrainData, TrainQuery};
use std::collections::HashMap;
use std::path::PathBuf;

/// `search-r3 train ...`.
#[derive(Subcommand, Debug)]
pub enum TrainCmd {
    /// Stage 1: contrastive SFT (CE + KL + InfoNCE + triplet) of LoRA adapters and the
    /// embed-token row; writes OUT/adapter.safetensors and OUT/manifest.json.
    Sft(SftArgs),
    /// Stage 2: GRPO with a retrieval reward from an environment index that is refreshed
    /// locally; writes OUT/adapter.safetensors (stacked on --adapter) and OUT/manifest.json.
    Rl(RlArgs),
    /// The thought stage: expert iteration over thoughts selected by how much they improve
    /// retrieval, training a query tower against the frozen document vectors of --adapter;
    /// writes OUT/query.safetensors beside a copy of the document adapter, so OUT is an
    /// adapter directory whose existing indexes stay valid.
    Reason(ReasonArgs),
}

/// `search-r3 train reason`.
#[derive(Args, Debug)]
pub struct ReasonArgs {
    /// The document adapter (run directory or file): folded into the weights; documents are
    /// embedded with it and the query tower starts from it.
    #[arg(long)]
    adapter: PathBuf,
    /// BEIR dataset directory: the split's queries and judgements are the training task, its
    /// corpus the documents.
    #[arg(long)]
    dataset: PathBuf,
    /// The split to train on (test judgements are never read unless named here).
    #[arg(long, default_value = "train")]
    split: String,
    /// An index of this dataset's corpus built with the same model and --adapter (e.g. by
    /// `eval --index`): its vectors are the documents, none are encoded.
    #[arg(long)]
    index: Option<PathBuf>,
    /// A teacher model (fetched name, .gguf or HF directory) that writes candidate thoughts
    /// beside the policy's, prompted by the config's `[teacher]` section (which it requires).
    #[arg(long)]
    teacher: Option<String>,
    #[command(flatten)]
    run: RunArgs,
}

/// `search-r3 train rl`.
#[derive(Args, Debug)]
pub struct RlArgs {
    /// The stage-1 adapter (file or run directory) the policy starts from; it is folded into
    /// the weights, is the KL reference, and the saved adapter includes it.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// BEIR dataset directory: the split's queries and judgements are the training task, its
    /// corpus the environment's documents.
    #[arg(long)]
    dataset: PathBuf,
    /// The split to train on (test judgements are never read unless named here).
    #[arg(long, default_value = "train")]
    split: String,
    #[command(flatten)]
    run: RunArgs,
}

/// What both training stages take: the model, the run directory and config, resumption,
/// data size and templates.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// A fetched name (smollm2, qwen2.5-coder-0.5b), a .gguf file, or an HF model directory.
    #[arg(long, short, default_value = "smollm2")]
    model: String,
    /// Output directory (checkpoints, metrics.jsonl, curves.png, adapter.safetensors,
    /// manifest.json).
    #[arg(long)]
    out: PathBuf,
    /// The stage's config (TOML); every key is optional, unknown keys are errors.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from OUT/checkpoint (same config and data required).
    #[arg(long)]
    resume: bool,
    /// Use at most this many examples (after the seeded shuffle, before the held-out split).
    #[arg(long)]
    max_queries: Option<usize>,
    /// Prompt templates (TOML) instead of the built-in ones for the model family.
    #[arg(long)]
    templates: Option<PathBuf>,
}

/// `search-r3 train sft`.
#[derive(Args, Debug)]
pub struct SftArgs {
    /// BEIR dataset directory whose split's judgements are the training examples (not needed
    /// with --triples).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// The split to train on.
    #[arg(long, default_value = "train")]
    split: String,
    /// Triples JSONL (`{"query", "pos": [...], "neg": [...]}`, e.g. from `mine-negatives`)
    /// instead of the split's judgements.
    #[arg(long)]
    triples: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

/// nDCG@10 of held-out queries over a small corpus, with the model being trained.
struct HeldOut {
    queries: Vec<Vec<u32>>,
    judgments: Vec<HashMap<String, i32>>,
    docs: Vec<Vec<u32>>,
    doc_ids: Vec<String>,
    pad_id: u32,
    budget: usize,
}

impl EvalHook for HeldOut {
    fn evaluate(&mut self, model: &Model, _step: usize) -> search_r3_train::Result<f64> {
        let embed = |seqs: &[Vec<u32>]| -> search_r3_train::Result<Vec<Vec<f32>>> {
            let raw = embed_at_token(
                model,
                seqs,
                self.pad_id,
                self.budget,
                search_r3_model::Cancel::NEVER,
            )
            .map_err(|e| search_r3_train::Error::Invalid(e.to_string()))?;
            Ok(raw.into_iter().map(l2_normalize).collect())
        };
        let d = embed(&self.docs)?;
        let q = embed(&self.queries)?;
        let mut total = 0.0;
        for (qv, judged) in q.iter().zip(&self.judgments) {
            let hits: Vec<(String, f64)> = d
                .iter()
                .zip(&self.doc_ids)
                .map(|(dv, id)| {
                    let s: f32 = qv.iter().zip(dv).map(|(a, b)| a * b).sum();
                    (id.clone(), s as f64)
                })
                .collect();
            total += evaluate_query(judged, &hits)
                .get("ndcg@10")
                .copied()
                .unwrap_or(0.0);
        }
        Ok(total / self.queries.len().max(1) as f64)
    }
}

/// Document table: prompts tokenized once, keyed by document id (or text when ids are absent).
struct DocTable<'a> {
    embedder: &'a Embedder,
    index: HashMap<String, usize>,
    keys: Vec<String>,
    prompts: Vec<Vec<u32>>,
    truncated: usize,
}

impl DocTable<'_> {
    fn add(&mut self, key: String, text: &str) -> Result<usize> {
        if let Some(&i) = self.index.get(&key) {
            return Ok(i);
        }
        let p = self.embedder.document_prompt(text)?;
        self.truncated += p.truncated as usize;
        self.prompts.push(p.ids);
        self.keys.push(key.clone());
        self.index.insert(key, self.prompts.len() - 1);
        Ok(self.prompts.len() - 1)
    }

    /// Indices of a triple's positives and negatives.
    fn add_triple(&mut self, t: &Triple) -> Result<(Vec<usize>, Vec<usize>)> {
        let key = |ids: &[String], texts: &[String], k: usize| -> String {
            if ids.len() == texts.len() {
                format!("id:{}", ids[k])
            } else {
                format!("text:{}", texts[k])
            }
        };
        let mut pos = Vec::new();
        for (k, text) in t.pos.iter().enumerate() {
            pos.push(self.add(key(&t.pos_ids, &t.pos, k), text)?);
        }
        let mut neg = Vec::new();
        for (k, text) in t.neg.iter().enumerate() {
            let j = self.add(key(&t.neg_ids, &t.neg, k), text)?;
            if !pos.contains(&j) && !neg.contains(&j) {
                neg.push(j);
            }
        }
        Ok((pos, neg))
    }
}

/// Runs `search-r3 train ...`.
pub fn run(cmd: &TrainCmd) -> Result<()> {
    match cmd {
        TrainCmd::Sft(a) => sft(a),
        TrainCmd::Rl(a) => rl(a),
        TrainCmd::Reason(a) => reason(a),
    }
}

fn sft(a: &SftArgs) -> Result<()> {
    let cfg = match &a.run.config {
        Some(p) => SftConfig::from_file(p)?,
        None => SftConfig::default(),
    };
    let started = std::time::Instant::now();
    // Examples first: a bad dataset fails before the model is loaded.
    let (mut triples, source) = match (&a.triples, &a.dataset) {
        (Some(path), _) => {
            let t = read_triples(path)?;
            let sha = search_r3_model::files::sha256_file(path)
                .with_context(|| format!("reading {}", path.display()))?;
            (
                t,
                serde_json::json!({"triples": path.display().to_string(), "triples_sha256": sha}),
            )
        }
        (None, Some(dir)) => {
            let ds = load_split(dir, &a.split, &ReadOptions::default())
                .with_context(|| format!("loading {} split `{}`", dir.display(), a.split))?;
            let t = triples_from_split(&ds)?;
            (
                t,
                serde_json::json!({"dataset": dir.display().to_string(), "split": a.split}),
            )
        }
        (None, None) => bail!("give --dataset DIR (with --split) or --triples FILE"),
    };
    if triples.is_empty() {
        bail!("no training examples");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let held = shuffle_and_hold_out(
        &mut triples,
        &mut rng,
        a.run.max_queries,
        cfg.eval_queries,
        cfg.queries_per_batch,
    );

    let (mut embedder, identity) =
        load_base(&a.run.model, a.run.templates.as_ref(), cfg.max_doc_tokens)?;
    let pad_id = embedder.model.tokenizer.pad_id;

    // Tokenize.
    let mut table = DocTable {
        embedder: &embedder,
        index: HashMap::new(),
        keys: Vec::new(),
        prompts: Vec::new(),
        truncated: 0,
    };
    let mut queries = Vec::new();
    let mut eval_q = Vec::new();
    let mut eval_judged = Vec::new();
    let mut eval_docs: Vec<usize> = Vec::new();
    let mut query_truncated = 0;
    for (i, t) in triples.iter().enumerate() {
        let (ids, assistant_start, cut) = embedder
            .query_training_prompt_limited(&t.query, cfg.max_query_tokens)
            .context("tokenizing a query")?;
        query_truncated += cut as usize;
        let (positives, negatives) = table.add_triple(t)?;
        if i < held {
            eval_q.push(ids);
            eval_judged.push(
                positives
                    .iter()
                    .map(|&j| (table.keys[j].clone(), 1))
                    .collect::<HashMap<_, _>>(),
            );
            eval_docs.extend(positives.iter().chain(&negatives));
        } else {
            queries.push(TrainQuery {
                ids,
                assistant_start,
                positives,
                negatives,
            });
        }
    }
    let (doc_keys, docs, doc_truncated) = (table.keys, table.prompts, table.truncated);
    eprintln!(
        "{} training queries, {} held out, {} documents ({} truncated to {} tokens, {} queries to {})",
        queries.len(),
        held,
        docs.len(),
        doc_truncated,
        cfg.max_doc_tokens,
        query_truncated,
        cfg.max_query_tokens
    );
    let mut hook = None;
    if held > 0 {
        eval_docs.sort_unstable();
        eval_docs.dedup();
        let mut others: Vec<usize> = (0..docs.len())
            .filter(|j| eval_docs.binary_search(j).is_err())
            .collect();
        others.shuffle(&mut rng);
        let room = cfg.eval_docs.saturating_sub(eval_docs.len());
        eval_docs.extend(others.into_iter().take(room));
        hook = Some(HeldOut {
            queries: eval_q,
            judgments: eval_judged,
            docs: eval_docs.iter().map(|&j| docs[j].clone()).collect(),
            doc_ids: eval_docs.iter().map(|&j| doc_keys[j].clone()).collect(),
            pad_id,
            budget: cfg.micro_tokens.max(512),
        });
        eprintln!(
            "eval: nDCG@10 of {held} held-out training queries over {} documents",
            eval_docs.len()
        );
    }
    let data = TrainData {
        queries,
        docs,
        pad_id,
    };

    let opts = run_options(
        &a.run.out,
        a.run.resume,
        &a.run.model,
        &embedder,
        &identity,
        [
            ("source", source),
            (
                "held_out",
                serde_json::json!({"queries": held, "docs": hook.as_ref().map_or(0, |h| h.docs.len())}),
            ),
            (
                "truncated",
                serde_json::json!({"docs": doc_truncated, "queries": query_truncated}),
            ),
        ],
    )?;
    let summary = train_sft(
        &mut embedder.model.model,
        &data,
        &cfg,
        &opts,
        hook.as_mut().map(|h| h as &mut dyn EvalHook),
    )?;
    interrupted_error(summary.interrupted, summary.step, cfg.steps, &a.run.out)?;
    eprintln!(
        "done: {} steps in {:.0}s ({} skipped); best eval {}; adapter {}",
        summary.step,
        started.elapsed().as_secs_f64(),
        summary.skipped_steps,
        summary
            .best
            .map_or("-".into(), |b| format!("{:.4} at step {}", b.score, b.step)),
        a.run.out.join("adapter.safetensors").display()
    );
    Ok(())
}

fn rl(a: &RlArgs) -> Result<()> {
    let cfg = match &a.run.config {
        Some(p) => RlConfig::from_file(p)?,
        None => RlConfig::default(),
    };
    let started = std::time::Instant::now();
    // The stage-1 adapter becomes part of the weights: the reference policy is then the
    // stage-1 model, and the stage-2 adapter is saved stacked onto it.
    let Stacked {
        ds,
        triples,
        held,
        mut embedder,
        identity,
        base,
        mut rng,
    } = stacked_setup(
        &a.run,
        &a.dataset,
        &a.split,
        a.adapter.as_deref(),
        "stage-1 adapter",
        (
            cfg.seed,
            cfg.eval_queries,
            cfg.queries_per_step,
            cfg.max_doc_tokens,
        ),
    )?;
    let (base, base_sha) = match base {
        Some(m) => (m.lora, Some(m.sha256)),
        None => (None, None),
    };

    // The environment corpus: every used query's gold documents, then random others.
    let pos_of = ds.doc_positions();
    let mut corpus: Vec<usize> = Vec::new();
    let mut slot: HashMap<usize, usize> = HashMap::new();
    let mut golds = Vec::with_capacity(triples.len());
    for t in &triples {
        let mut g = Vec::new();
        for id in &t.pos_ids {
            let p = pos_of[id.as_str()];
            let s = *slot.entry(p).or_insert_with(|| {
                corpus.push(p);
                corpus.len() - 1
            });
            g.push(s);
        }
        golds.push(g);
    }
    let gold_docs = corpus.len();
    let mut others: Vec<usize> = (0..ds.corpus.len())
        .filter(|p| !slot.contains_key(p))
        .collect();
    others.shuffle(&mut rng);
    corpus.extend(
        others
            .into_iter()
            .take(cfg.env_docs.saturating_sub(gold_docs)),
    );
    let mut truncated = 0;
    let mut docs = Vec::with_capacity(corpus.len());
    for &p in &corpus {
        let d = embedder.document_prompt(&ds.corpus[p].full_text())?;
        truncated += d.truncated as usize;
        docs.push(d.ids);
    }
    let mut queries = Vec::new();
    let mut eval = Vec::new();
    let mut query_truncated = 0;
    for (i, (t, gold)) in triples.iter().zip(golds).enumerate() {
        let (prompt, cut) = embedder.reason_prompt(&t.query, cfg.max_query_tokens)?;
        query_truncated += cut as usize;
        let q = RlQuery { prompt, gold };
        if i < held {
            eval.push(q);
        } else {
            queries.push(q);
        }
    }
    eprintln!(
        "{} training queries, {} held out; environment: {} documents ({} gold, {} truncated to {} tokens), {:?} index, refresh {}",
        queries.len(),
        eval.len(),
        docs.len(),
        gold_docs,
        truncated,
        cfg.max_doc_tokens,
        cfg.index,
        policy_name(&cfg.refresh)
    );
    if gold_docs > cfg.env_docs {
        eprintln!(
            "note: the queries' gold documents alone ({gold_docs}) exceed env_docs = {}; no random documents were added",
            cfg.env_docs
        );
    }
    let data = RlData {
        queries,
        eval,
        docs,
        pad_id: embedder.model.tokenizer.pad_id,
        closer: embedder.closer().clone(),
    };

    let opts = run_options(
        &a.run.out,
        a.run.resume,
        &a.run.model,
        &embedder,
        &identity,
        [
            (
                "stage1_adapter",
                serde_json::json!(a.adapter.as_ref().map(|p| serde_json::json!({
                    "path": p.display().to_string(), "sha256": base_sha}))),
            ),
            (
                "source",
                serde_json::json!({"dataset": a.dataset.display().to_string(), "split": a.split}),
            ),
            (
                "truncated",
                serde_json::json!({"docs": truncated, "queries": query_truncated}),
            ),
        ],
    )?;
    let tok = embedder.model.tokenizer.clone();
    let summary = train_rl(
        &mut embedder.model.model,
        &tok,
        &data,
        &cfg,
        base.as_ref(),
        &opts,
    )?;
    interrupted_error(summary.interrupted, summary.step, cfg.steps, &a.run.out)?;
    eprintln!(
        "done: {} steps in {:.0}s ({} skipped); start eval {}; best eval {}; adapter {}",
        summary.step,
        started.elapsed().as_secs_f64(),
        summary.skipped_steps,
        summary
            .start_eval
            .map_or("-".into(), |e| format!("{:.4}", e.ndcg10)),
        summary
            .best
            .map_or("-".into(), |b| format!("{:.4} at step {}", b.score, b.step)),
        a.run.out.join("adapter.safetensors").display()
    );
    Ok(())
}

fn reason(a: &ReasonArgs) -> Result<()> {
    let cfg = match &a.run.config {
        Some(p) => ReasonConfig::from_file(p)?,
        None => ReasonConfig::default(),
    };
    match (&a.teacher, &cfg.teacher) {
        (Some(_), None) => bail!(
            "--teacher needs a [teacher] section in the config (--config): thoughts, max_tokens, \
             temperature, system, user (each optional)"
        ),
        (None, Some(_)) => {
            bail!("the config's [teacher] section needs a teacher model: pass --teacher MODEL")
        }
        _ => {}
    }
    let started = std::time::Instant::now();
    let Stacked {
        ds,
        triples,
        held,
        mut embedder,
        identity,
        base,
        mut rng,
    } = stacked_setup(
        &a.run,
        &a.dataset,
        &a.split,
        Some(&a.adapter),
        "document adapter",
        (
            cfg.seed,
            cfg.eval_queries,
            cfg.queries_per_step,
            cfg.max_doc_tokens,
        ),
    )?;
    let merged = base.expect("an adapter was given");

    // The documents: the index's vectors of the whole corpus, or encoded here.
    let pos_of = ds.doc_positions();
    let (docs, doc_rows) = match &a.index {
        Some(dir) => {
            let opts = EmbedderOptions {
                adapter: Some(a.adapter.clone()),
                templates: a.run.templates.clone(),
                max_doc_tokens: Some(cfg.max_doc_tokens),
                reason_mode: None,
            };
            let s = search_r3_core::searcher::Searcher::open(dir, Some(&a.run.model), &opts)
                .with_context(|| format!("opening the index {}", dir.display()))?;
            let mut vecs = Vec::with_capacity(ds.corpus.len());
            for d in &ds.corpus {
                let v = s
                    .key_of(&d.id)
                    .and_then(|k| s.index.get(k))
                    .with_context(|| {
                        format!(
                            "{}: document `{}` of the corpus is not in the index",
                            dir.display(),
                            d.id
                        )
                    })?;
                vecs.push(v);
            }
            eprintln!("documents: {} vectors from {}", vecs.len(), dir.display());
            (vecs, (0..ds.corpus.len()).collect::<Vec<usize>>())
        }
        None => {
            let mut rows: Vec<usize> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for t in &triples {
                for id in &t.pos_ids {
                    if seen.insert(pos_of[id.as_str()]) {
                        rows.push(pos_of[id.as_str()]);
                    }
                }
            }
            let mut others: Vec<usize> =
                (0..ds.corpus.len()).filter(|p| !seen.contains(p)).collect();
            others.shuffle(&mut rng);
            let want = if cfg.env_docs == 0 {
                ds.corpus.len()
            } else {
                cfg.env_docs
            };
            rows.extend(others.into_iter().take(want.saturating_sub(rows.len())));
            let texts: Vec<String> = rows.iter().map(|&p| ds.corpus[p].full_text()).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            eprintln!(
                "documents: encoding {} with the document adapter",
                refs.len()
            );
            let (vecs, truncated) = embedder.embed_documents(&refs)?;
            eprintln!(
                "encoded ({truncated} truncated to {} tokens)",
                cfg.max_doc_tokens
            );
            (vecs, rows)
        }
    };
    let row_of: HashMap<usize, usize> = doc_rows.iter().enumerate().map(|(r, &p)| (p, r)).collect();
    let mut queries = Vec::new();
    let mut eval = Vec::new();
    for (i, t) in triples.iter().enumerate() {
        let (prompt, _) = embedder.reason_prompt(&t.query, cfg.max_query_tokens)?;
        let (direct, direct_start, _) =
            embedder.query_training_prompt_limited(&t.query, cfg.max_query_tokens)?;
        let gold = t
            .pos_ids
            .iter()
            .map(|id| row_of[&pos_of[id.as_str()]])
            .collect();
        let q = ReasonQuery {
            prompt,
            direct,
            direct_start,
            gold,
        };
        if i < held {
            eval.push(q);
        } else {
            queries.push(q);
        }
    }
    eprintln!(
        "{} training queries, {} held out; {} documents",
        queries.len(),
        eval.len(),
        docs.len()
    );
    let data = ReasonData {
        queries,
        eval,
        docs,
        pad_id: embedder.model.tokenizer.pad_id,
    };
    let opts = run_options(
        &a.run.out,
        a.run.resume,
        &a.run.model,
        &embedder,
        &identity,
        [
            (
                "document_adapter",
                serde_json::json!({"path": a.adapter.display().to_string(), "sha256": merged.sha256}),
            ),
            (
                "source",
                serde_json::json!({"dataset": a.dataset.display().to_string(), "split": a.split,
                    "index": a.index.as_ref().map(|p| p.display().to_string())}),
            ),
        ],
    )?;
    let teacher_model = match &a.teacher {
        Some(spec) => Some(
            search_r3_model::load_model(spec, &search_r3_model::LoadOptions::default())
                .with_context(|| format!("loading the teacher `{spec}`"))?,
        ),
        None => None,
    };
    let teacher = match (&teacher_model, &cfg.teacher) {
        (Some(lm), Some(tc)) => {
            let parts =
                search_r3_core::templates::prompt_parts(&lm.tokenizer, &tc.system, &tc.user, "")?;
            // Aligned with `data.queries`: the held-out queries come first in `triples`.
            let mut prompts = Vec::with_capacity(data.queries.len());
            for t in triples.iter().skip(held) {
                let mut body = lm.tokenizer.encode(&t.query)?;
                body.truncate(cfg.max_query_tokens);
                prompts.push([parts.prefix.as_slice(), &body, &parts.suffix].concat());
            }
            let size = std::fs::metadata(&lm.path).map(|m| m.len()).unwrap_or(0);
            let id = format!("{} {} ({size} bytes)", lm.id, lm.path.display());
            eprintln!("teacher: {id}");
            Some(Teacher {
                model: &lm.model,
                tok: &lm.tokenizer,
                prompts,
                id,
            })
        }
        _ => None,
    };
    let tok = embedder.model.tokenizer.clone();
    let closer = embedder.closer().clone();
    let summary = train_reason(
        &mut embedder.model.model,
        &tok,
        &closer,
        &data,
        teacher.as_ref(),
        &cfg,
        merged.lora.as_ref(),
        &opts,
    )?;
    interrupted_error(summary.interrupted, summary.step, cfg.steps(), &a.run.out)?;
    // OUT becomes an adapter directory: the document side as given, the query tower beside it.
    let out = &a.run.out;
    std::fs::rename(out.join("adapter.safetensors"), out.join(QUERY_ADAPTER)).with_context(
        || {
            format!(
                "moving the query tower into {}",
                out.join(QUERY_ADAPTER).display()
            )
        },
    )?;
    std::fs::copy(adapter_file(&a.adapter), out.join("adapter.safetensors"))
        .with_context(|| format!("copying the document adapter into {}", out.display()))?;
    eprintln!(
        "done: {} steps in {:.0}s; best held-out {} {}; adapter directory {}",
        summary.step,
        started.elapsed().as_secs_f64(),
        cfg.select_by,
        summary
            .best
            .map_or("-".into(), |b| format!("{:.4} at step {}", b.score, b.step)),
        out.display()
    );
    Ok(())
}

/// What the two stages that stack onto an adapter (`rl`, `reason`) start from.
struct Stacked {
    ds: search_r3_core::dataset::BeirSplit,
    /// The split's examples, shuffled with the seed and cut to `--max-queries`.
    triples: Vec<Triple>,
    /// How many of the first `triples` are held out.
    held: usize,
    embedder: Embedder,
    identity: ModelIdentity,
    /// The adapter folded into the weights, if one was given.
    base: Option<search_r3_core::load::MergedAdapter>,
    /// The seeded generator after the shuffle: the stage's later draws continue from it.
    rng: rand::rngs::StdRng,
}

/// Reads the split (bad data fails before the model loads), shuffles and holds out with
/// `(seed, eval_queries, batch, max_doc_tokens)` from the stage's config, loads the base model
/// and folds `adapter` (named `what` in errors) into its weights.
fn stacked_setup(
    run: &RunArgs,
    dataset: &std::path::Path,
    split: &str,
    adapter: Option<&std::path::Path>,
    what: &str,
    (seed, eval_queries, batch, max_doc_tokens): (u64, usize, usize, usize),
) -> Result<Stacked> {
    let ds = load_split(dataset, split, &ReadOptions::default())
        .with_context(|| format!("loading {} split `{split}`", dataset.display()))?;
    let mut triples = triples_from_split(&ds)?;
    if triples.is_empty() {
        bail!("the split has no queries");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let held = shuffle_and_hold_out(&mut triples, &mut rng, run.max_queries, eval_queries, batch);
    let (mut embedder, identity) = load_base(&run.model, run.templates.as_ref(), max_doc_tokens)?;
    let base = match adapter {
        Some(p) => Some(
            merge_adapter(&mut embedder.model.model, p, &run.model, &identity.sha256)
                .with_context(|| format!("loading the {what} {}", adapter_file(p).display()))?,
        ),
        None => None,
    };
    Ok(Stacked {
        ds,
        triples,
        held,
        embedder,
        identity,
        base,
        rng,
    })
}

/// Shuffles the examples with the run's seed, keeps at most `max`, and says how many of the
/// first ones are held out for evaluation (none, with a warning, when too few would be left
/// for one training batch of `batch`).
fn shuffle_and_hold_out(
    triples: &mut Vec<Triple>,
    rng: &mut rand::rngs::StdRng,
    max: Option<usize>,
    eval_queries: usize,
    batch: usize,
) -> usize {
    triples.shuffle(rng);
    if let Some(m) = max {
        triples.truncate(m);
    }
    if triples.len() >= eval_queries + batch {
        eval_queries
    } else {
        eprintln!(
            "warning: {} examples are too few to hold out {eval_queries} for evaluation; no eval",
            triples.len()
        );
        0
    }
}

/// The base model (no adapter) with its templates, documents cut to `max_doc_tokens`.
fn load_base(
    model: &str,
    templates: Option<&PathBuf>,
    max_doc_tokens: usize,
) -> Result<(Embedder, ModelIdentity)> {
    load_embedder(
        model,
        &EmbedderOptions {
            adapter: None,
            templates: templates.cloned(),
            max_doc_tokens: Some(max_doc_tokens),
            reason_mode: None,
        },
    )
    .with_context(|| format!("loading model `{model}`"))
}

/// Run options shared by both stages: the base model's identity in every saved adapter's
/// metadata (so an adapter refuses another base model), and a manifest with the base model,
/// templates, command line and the stage's own `extra` entries.
fn run_options<const N: usize>(
    out: &std::path::Path,
    resume: bool,
    spec: &str,
    embedder: &Embedder,
    identity: &ModelIdentity,
    extra: [(&str, serde_json::Value); N],
) -> Result<TrainOptions> {
    let mut adapter_metadata = HashMap::new();
    adapter_metadata.insert("base_model".into(), embedder.model.id.clone());
    adapter_metadata.insert("base_model_sha256".into(), identity.sha256.clone());
    adapter_metadata.insert("template_hash".into(), identity.template_hash.clone());
    let mut manifest = serde_json::Map::new();
    manifest.insert(
        "base_model".into(),
        serde_json::json!({"spec": spec, "id": embedder.model.id, "sha256": identity.sha256}),
    );
    manifest.insert(
        "templates_hash".into(),
        identity.template_hash.clone().into(),
    );
    manifest.insert(
        "templates".into(),
        serde_json::to_value(&embedder.templates)?,
    );
    for (k, v) in extra {
        manifest.insert(k.into(), v);
    }
    manifest.insert(
        "command_line".into(),
        std::env::args().collect::<Vec<_>>().join(" ").into(),
    );
    Ok(TrainOptions {
        out: out.to_path_buf(),
        resume,
        progress: true,
        stop_after: None,
        adapter_metadata,
        manifest,
        interrupt: Some(crate::retrieval::cancel_flag()),
    })
}

/// The error that ends an interrupted run, saying how to continue it.
fn interrupted_error(
    interrupted: bool,
    step: usize,
    steps: usize,
    out: &std::path::Path,
) -> Result<()> {
    if interrupted {
        bail!(
            "interrupted after step {step} of {steps}; the checkpoint in {} continues with the \
             same command plus --resume",
            out.display()
        );
    }
    Ok(())
}
