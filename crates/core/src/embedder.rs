//! The Search-R3 embedder: a text's embedding is the final-norm hidden state at
//! `<|embed_token|>`, L2-normalised (brief §1). Documents are embedded directly; queries either
//! directly or after the model writes a bounded analysis (`reason` mode).
//!
//! Reasoning follows the ways the literature found it pays for retrieval ([`ReasonMode`]): one
//! greedy thought (Search-R3), or several sampled thoughts whose embeddings are averaged with
//! the direct one (HyDE, Gao et al. 2022; O1 Embedder, Yan et al. 2025), so the query itself
//! never drops out of its vector.
//!
//! An adapter may carry a separate *query tower* (`train reason` trains one against a frozen
//! document index): queries — direct, reasoning and their generation — then run through it,
//! documents through the document model, and indexes built with the document model stay valid.

use crate::templates::{prompt_parts, PromptParts, TemplateError, Templates};
use candle_core::Tensor;
use search_r3_index::{l2_normalize, mean_unit};
use search_r3_model::{
    generate, Batch, Cancel, GenerationConfig, LoadedModel, Model, Path, StopReason,
};
use std::time::Instant;

/// Errors from embedding.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Template problem.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Runtime problem.
    #[error(transparent)]
    Model(#[from] search_r3_model::Error),
    /// Tensor problem.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model has no `<|embed_token|>`.
    #[error("the model was loaded without <|embed_token|>")]
    NoEmbedToken,
}

/// How a query is embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryMode {
    /// No reasoning: the assistant turn is written for the model.
    Direct,
    /// The model analyses the query first, then emits the embed token.
    Reason,
}

/// Which model embeds a prompt: documents always go through the document model, queries
/// through the query tower when the adapter has one (else the same model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// A document prompt.
    Document,
    /// A query prompt.
    Query,
}

/// How reasoning turns a query into one vector.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReasonMode {
    /// Thoughts written per query.
    pub thoughts: usize,
    /// Sampling temperature of the thoughts (0 = greedy; then `thoughts` must be 1).
    pub temperature: f64,
    /// Nucleus cut of the sampling.
    pub top_p: Option<f64>,
    /// The direct embedding is one more part of the average.
    pub with_direct: bool,
    /// Budget of each thought in tokens (`None`: the template's `max_reasoning_tokens`).
    pub max_tokens: Option<usize>,
    /// The model may not stop before writing this many tokens.
    pub min_tokens: usize,
    /// Seed of the sampling.
    pub seed: u64,
}

impl ReasonMode {
    /// One greedy thought, its embedding alone (Search-R3's inference).
    pub const GREEDY: ReasonMode = ReasonMode {
        thoughts: 1,
        temperature: 0.0,
        top_p: None,
        with_direct: false,
        max_tokens: None,
        min_tokens: 0,
        seed: 0,
    };

    /// `n` thoughts sampled at temperature 0.7 (nucleus 0.95), averaged with the direct
    /// embedding.
    pub fn mean(n: usize) -> ReasonMode {
        ReasonMode {
            thoughts: n.max(1),
            temperature: 0.7,
            top_p: Some(0.95),
            with_direct: true,
            ..ReasonMode::GREEDY
        }
    }

    /// Parses `greedy`, `greedy+direct` or `mean:N` (N sampled thoughts + direct), optionally
    /// followed by `,min=M` and `,max=B` token bounds.
    pub fn parse(s: &str) -> Result<ReasonMode, String> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default().trim();
        let mut mode = match head {
            "greedy" => ReasonMode::GREEDY,
            "greedy+direct" => ReasonMode {
                with_direct: true,
                ..ReasonMode::GREEDY
            },
            _ => match head.strip_prefix("mean:").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => ReasonMode::mean(n),
                _ => {
                    return Err(format!(
                        "unknown reasoning mode `{head}`: expected greedy, greedy+direct or \
                         mean:N (N ≥ 1)"
                    ))
                }
            },
        };
        for p in parts {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let v: usize = v
                .trim()
                .parse()
                .map_err(|_| format!("`{p}` in reasoning mode `{s}`: expected min=N or max=N"))?;
            match k.trim() {
                "min" => mode.min_tokens = v,
                "max" if v >= 1 => mode.max_tokens = Some(v),
                _ => {
                    return Err(format!(
                        "`{p}` in reasoning mode `{s}`: expected min=N or max=N (max ≥ 1)"
                    ))
                }
            }
        }
        Ok(mode)
    }

    /// The mode in the syntax [`ReasonMode::parse`] reads.
    pub fn name(&self) -> String {
        let mut s = match (self.thoughts, self.temperature > 0.0, self.with_direct) {
            (1, false, false) => "greedy".to_string(),
            (1, false, true) => "greedy+direct".to_string(),
            (n, _, _) => format!("mean:{n}"),
        };
        if self.min_tokens > 0 {
            s += &format!(",min={}", self.min_tokens);
        }
        if let Some(m) = self.max_tokens {
            s += &format!(",max={m}");
        }
        s
    }
}

/// A query embedding and how it came about.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryEmbedding {
    /// Unit-norm embedding.
    pub vector: Vec<f32>,
    /// The model's analysis (reason mode; the first thought when there are several).
    pub reasoning: Option<String>,
    /// Every thought written (reason mode).
    pub thoughts: Vec<String>,
    /// True when the embed token had to be appended because the model did not write it (to
    /// any of the thoughts).
    pub forced: bool,
    /// Tokens generated for this query (reason mode; all thoughts together).
    pub generated_tokens: usize,
    /// Seconds spent generating the analysis.
    pub generation_s: f64,
    /// Seconds spent on the embedding forward pass (0 when the generation's own hidden state
    /// at the embed token was used).
    pub embedding_s: f64,
}

/// Token ids of one document prompt.
#[derive(Debug, Clone)]
pub struct DocPrompt {
    /// Prompt ids, ending with `<|embed_token|>`.
    pub ids: Vec<u32>,
    /// Whether the document text was cut to fit the limit.
    pub truncated: bool,
}

/// Embeds documents and queries with one model and one template set.
pub struct Embedder {
    /// The model and tokenizer (documents; queries too when there is no query tower).
    pub model: LoadedModel,
    /// The query tower: the model queries (and their reasoning) run through, when the adapter
    /// has one.
    pub query_tower: Option<Model>,
    /// How `reason` mode embeds a query.
    pub reason_mode: ReasonMode,
    /// The prompts in use.
    pub templates: Templates,
    /// Documents longer than this many text tokens are truncated (counted and reported).
    pub max_doc_tokens: usize,
    /// Padded tokens per forward pass when embedding prompts; longer lists are split into
    /// several passes so memory stays bounded whatever the caller hands in.
    pub batch_tokens: usize,
    /// Queries generated together in reasoning mode (each holds a KV cache while it runs).
    pub reason_batch: usize,
    pub(crate) doc: PromptParts,
    pub(crate) query: PromptParts,
    reason: PromptParts,
    closer: ThoughtCloser,
    embed_id: u32,
}

/// Closes a thought that stopped without `<|embed_token|>`: appends the reasoning template's
/// closing sentence and token, or only the token when the thought already ends with the
/// sentence. Inference and `train reason` both build their thought sequences with it, so what
/// is trained is what is served.
#[derive(Debug, Clone)]
pub struct ThoughtCloser {
    tokenizer: search_r3_model::TextTokenizer,
    /// `\nThe embedding is <|embed_token|>` as ids.
    suffix: Vec<u32>,
    /// The sentence without its token ("The embedding is").
    sentence: String,
    /// ` <|embed_token|>` as ids.
    tail: Vec<u32>,
}

/// Two closers are equal when they close alike (same suffix, sentence and tail ids).
impl PartialEq for ThoughtCloser {
    fn eq(&self, other: &Self) -> bool {
        (&self.suffix, &self.sentence, &self.tail) == (&other.suffix, &other.sentence, &other.tail)
    }
}

impl ThoughtCloser {
    /// The closer for a template's closing `suffix` text (e.g. `"\nThe embedding is
    /// <|embed_token|>"`), which must tokenize to end with `<|embed_token|>`.
    pub fn new(
        tokenizer: &search_r3_model::TextTokenizer,
        suffix: &str,
    ) -> Result<Self, EmbedError> {
        let ids = tokenizer.encode_markup(suffix)?;
        if ids.last().copied() != tokenizer.embed_token_id {
            return Err(TemplateError::File {
                path: "<templates>".into(),
                msg: "reason.suffix does not tokenize to end with <|embed_token|>".into(),
            }
            .into());
        }
        Ok(ThoughtCloser {
            tokenizer: tokenizer.clone(),
            suffix: ids,
            sentence: suffix
                .replace(search_r3_model::EMBED_TOKEN, "")
                .trim()
                .to_string(),
            tail: tokenizer.encode_markup(&format!(" {}", search_r3_model::EMBED_TOKEN))?,
        })
    }

    /// `prompt` + `thought` + what closes it; the result ends with `<|embed_token|>`.
    pub fn close(&self, prompt: &[u32], thought: &[u32]) -> Result<Vec<u32>, EmbedError> {
        let mut ids = prompt.to_vec();
        ids.extend(thought);
        let written = self.tokenizer.decode(thought, true)?;
        if !self.sentence.is_empty() && written.trim_end().ends_with(&self.sentence) {
            ids.extend(&self.tail);
        } else {
            ids.extend(&self.suffix);
        }
        Ok(ids)
    }

    /// The whole closing suffix (sentence and token).
    pub fn suffix(&self) -> &[u32] {
        &self.suffix
    }
}

impl Embedder {
    /// Prepares prompts for `model` from `templates`.
    pub fn new(
        model: LoadedModel,
        templates: Templates,
        max_doc_tokens: usize,
    ) -> Result<Self, EmbedError> {
        let embed_id = model
            .model
            .embed_token
            .as_ref()
            .ok_or(EmbedError::NoEmbedToken)?
            .id;
        let tok = &model.tokenizer;
        let t = &templates;
        let doc = prompt_parts(
            tok,
            &t.document.system,
            &t.document.user,
            &t.document.assistant,
        )?;
        let query = prompt_parts(tok, &t.query.system, &t.query.user, &t.query.assistant)?;
        if query.assistant_len == 0 || query.assistant_len > query.suffix.len() {
            return Err(TemplateError::File {
                path: "<templates>".into(),
                msg: "query prompt: the assistant text tokenizes to an empty span".into(),
            }
            .into());
        }
        let reason = prompt_parts(tok, &t.reason.system, &t.reason.user, "")?;
        let closer = ThoughtCloser::new(tok, &t.reason.suffix)?;
        for (what, ids) in [("document", &doc.suffix), ("query", &query.suffix)] {
            if ids.last() != Some(&embed_id) {
                return Err(TemplateError::File {
                    path: "<templates>".into(),
                    msg: format!("{what} prompt does not tokenize to end with <|embed_token|>"),
                }
                .into());
            }
        }
        Ok(Embedder {
            model,
            query_tower: None,
            reason_mode: ReasonMode::GREEDY,
            templates,
            max_doc_tokens,
            batch_tokens: 4096,
            reason_batch: 16,
            doc,
            query,
            reason,
            closer,
            embed_id,
        })
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.model.model.config.hidden_size
    }

    /// Hash of the templates in use.
    pub fn template_hash(&self) -> String {
        self.templates.hash()
    }

    /// The prompt ids of a document (title and text already joined by the caller).
    pub fn document_prompt(&self, text: &str) -> Result<DocPrompt, EmbedError> {
        let mut body = self.model.tokenizer.encode(text)?;
        let truncated = body.len() > self.max_doc_tokens;
        body.truncate(self.max_doc_tokens);
        Ok(DocPrompt {
            ids: self.document_prompt_ids(&body),
            truncated,
        })
    }

    /// The document prompt around already tokenized text (no truncation: callers that
    /// tokenize themselves, like the server, apply their own length rules first).
    pub fn document_prompt_ids(&self, body: &[u32]) -> Vec<u32> {
        join(&self.doc, body)
    }

    /// The prompt ids of a query in direct mode.
    pub fn query_prompt(&self, query: &str) -> Result<Vec<u32>, EmbedError> {
        Ok(self.query_prompt_ids(&self.model.tokenizer.encode(query)?))
    }

    /// The direct-mode query prompt around already tokenized query text.
    pub fn query_prompt_ids(&self, body: &[u32]) -> Vec<u32> {
        join(&self.query, body)
    }

    /// The direct-mode query prompt for stage-1 training, and the index of its first
    /// assistant-response token (`The` of `The embedding is <|embed_token|>`): the span from
    /// there to the end is what the cross-entropy and KL terms are computed on.
    pub fn query_training_prompt(&self, query: &str) -> Result<(Vec<u32>, usize), EmbedError> {
        let (ids, start, _) = self.query_training_prompt_limited(query, usize::MAX)?;
        Ok((ids, start))
    }

    /// [`Embedder::query_training_prompt`] with the query text cut to `max_text_tokens`
    /// tokens; the third value says whether it was cut.
    pub fn query_training_prompt_limited(
        &self,
        query: &str,
        max_text_tokens: usize,
    ) -> Result<(Vec<u32>, usize, bool), EmbedError> {
        let mut body = self.model.tokenizer.encode(query)?;
        let truncated = body.len() > max_text_tokens;
        body.truncate(max_text_tokens);
        let ids = join(&self.query, &body);
        let start = ids.len() - self.query.assistant_len;
        Ok((ids, start, truncated))
    }

    /// The reasoning-mode prompt of a query (the assistant turn left open for the model's
    /// analysis) with the query text cut to `max_text_tokens`; the flag says whether it was
    /// cut. Stage 2 samples its trajectories from this prompt.
    pub fn reason_prompt(
        &self,
        query: &str,
        max_text_tokens: usize,
    ) -> Result<(Vec<u32>, bool), EmbedError> {
        let mut body = self.model.tokenizer.encode(query)?;
        let truncated = body.len() > max_text_tokens;
        body.truncate(max_text_tokens);
        Ok((join(&self.reason, &body), truncated))
    }

    /// What reasoning mode appends when the model stops without writing `<|embed_token|>`
    /// (the template's closing sentence, ending with the token).
    pub fn forced_suffix(&self) -> &[u32] {
        self.closer.suffix()
    }

    /// What closes a thought that stopped without `<|embed_token|>` (see [`ThoughtCloser`]).
    pub fn closer(&self) -> &ThoughtCloser {
        &self.closer
    }

    /// Embeds prompts that each end with `<|embed_token|>`, in left-padded batches of at most
    /// [`Embedder::batch_tokens`] padded tokens (length-sorted); the result does not depend on
    /// what else is in a batch (padding is masked exactly).
    pub fn embed_prompts(
        &self,
        side: Side,
        prompts: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(self
            .embed_prompts_raw(side, prompts, Cancel::NEVER)?
            .into_iter()
            .map(l2_normalize)
            .collect())
    }

    /// The model that embeds prompts of `side`.
    pub fn model_for(&self, side: Side) -> &Model {
        match (side, &self.query_tower) {
            (Side::Query, Some(q)) => q,
            _ => &self.model.model,
        }
    }

    /// [`Embedder::embed_prompts`] without the L2 normalisation: the final-norm hidden states
    /// at the embed token as the model computes them (TEI's `"normalize": false`); `cancel` is
    /// checked before every forward pass.
    pub fn embed_prompts_raw(
        &self,
        side: Side,
        prompts: &[Vec<u32>],
        cancel: Cancel,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        for p in prompts {
            if p.last() != Some(&self.embed_id) {
                return Err(search_r3_model::Error::Invalid(
                    "prompt does not end with <|embed_token|>".into(),
                )
                .into());
            }
        }
        embed_at_token(
            self.model_for(side),
            prompts,
            self.model.tokenizer.pad_id,
            self.batch_tokens,
            cancel,
        )
    }

    /// The final-norm hidden state of every token of each prompt (unnormalised), through the
    /// model of `side`: TEI's `/embed_all`. Prompts are whole prompts (template included), as
    /// for [`Embedder::embed_prompts_raw`].
    pub fn token_states(
        &self,
        side: Side,
        prompts: &[Vec<u32>],
        cancel: Cancel,
    ) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
        token_states(
            self.model_for(side),
            prompts,
            self.model.tokenizer.pad_id,
            self.batch_tokens,
            cancel,
        )
    }

    /// Embeds document texts; returns the vectors and how many were truncated.
    pub fn embed_documents(&self, texts: &[&str]) -> Result<(Vec<Vec<f32>>, usize), EmbedError> {
        let prompts: Vec<DocPrompt> = texts
            .iter()
            .map(|t| self.document_prompt(t))
            .collect::<Result<_, _>>()?;
        let truncated = prompts.iter().filter(|p| p.truncated).count();
        let ids: Vec<Vec<u32>> = prompts.into_iter().map(|p| p.ids).collect();
        Ok((self.embed_prompts(Side::Document, &ids)?, truncated))
    }

    /// Embeds queries (batched) in the given mode.
    pub fn embed_queries(
        &self,
        queries: &[&str],
        mode: QueryMode,
    ) -> Result<Vec<QueryEmbedding>, EmbedError> {
        match mode {
            QueryMode::Direct => {
                let t0 = Instant::now();
                let prompts: Vec<Vec<u32>> = queries
                    .iter()
                    .map(|q| self.query_prompt(q))
                    .collect::<Result<_, _>>()?;
                let vecs = self.embed_prompts(Side::Query, &prompts)?;
                let per = t0.elapsed().as_secs_f64() / queries.len().max(1) as f64;
                Ok(vecs
                    .into_iter()
                    .map(|vector| QueryEmbedding {
                        vector,
                        reasoning: None,
                        thoughts: vec![],
                        forced: false,
                        generated_tokens: 0,
                        generation_s: 0.0,
                        embedding_s: per,
                    })
                    .collect())
            }
            QueryMode::Reason => self.reason_queries(queries, Cancel::NEVER),
        }
    }

    /// Embeds queries in [`QueryMode::Reason`] under the [`Embedder::reason_mode`], in chunks of
    /// [`Embedder::reason_batch`]; `cancel` is checked before every forward pass.
    pub fn reason_queries(
        &self,
        queries: &[&str],
        cancel: Cancel,
    ) -> Result<Vec<QueryEmbedding>, EmbedError> {
        let mut out = Vec::with_capacity(queries.len());
        for chunk in queries.chunks(self.reason_batch.max(1)) {
            out.extend(self.reason_chunk(chunk, cancel)?);
        }
        Ok(out)
    }

    fn reason_chunk(
        &self,
        queries: &[&str],
        cancel: Cancel,
    ) -> Result<Vec<QueryEmbedding>, EmbedError> {
        let mode = &self.reason_mode;
        if mode.thoughts == 0 || (mode.temperature <= 0.0 && mode.thoughts > 1) {
            return Err(search_r3_model::Error::Invalid(format!(
                "reasoning mode {}: greedy decoding writes one thought per query",
                mode.name()
            ))
            .into());
        }
        let tok = &self.model.tokenizer;
        let k = mode.thoughts;
        let prompts: Vec<Vec<u32>> = queries
            .iter()
            .map(|q| Ok(join(&self.reason, &tok.encode(q)?)))
            .collect::<Result<_, EmbedError>>()?;
        // Row `i·k + j` is thought `j` of query `i`.
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), k))
            .collect();
        let cfg = GenerationConfig {
            max_new_tokens: mode
                .max_tokens
                .unwrap_or(self.templates.reason.max_reasoning_tokens)
                .max(1),
            min_new_tokens: mode.min_tokens,
            temperature: mode.temperature,
            top_p: mode.top_p,
            seed: mode.seed,
            return_hidden: true,
            ..Default::default()
        };
        let t0 = Instant::now();
        let thoughts = think(
            self.model_for(Side::Query),
            tok,
            &self.closer,
            &rows,
            &cfg,
            self.batch_tokens,
            cancel,
        )?;
        let think_s = t0.elapsed().as_secs_f64() / queries.len().max(1) as f64;
        let t1 = Instant::now();
        let direct = if mode.with_direct {
            let direct: Vec<Vec<u32>> = queries
                .iter()
                .map(|q| self.query_prompt(q))
                .collect::<Result<_, _>>()?;
            self.embed_prompts_raw(Side::Query, &direct, cancel)?
                .into_iter()
                .map(l2_normalize)
                .collect()
        } else {
            vec![]
        };
        let emb_s = t1.elapsed().as_secs_f64() / queries.len().max(1) as f64;
        let mut out = Vec::with_capacity(queries.len());
        for i in 0..queries.len() {
            let mine = &thoughts[i * k..(i + 1) * k];
            let mut parts: Vec<&[f32]> = mine.iter().map(|t| t.vector.as_slice()).collect();
            if let Some(d) = direct.get(i) {
                parts.push(d);
            }
            let texts: Vec<String> = mine.iter().map(|t| t.text.clone()).collect();
            let generated: usize = mine.iter().map(|t| t.tokens.len()).sum();
            out.push(QueryEmbedding {
                vector: mean_unit(&parts).expect("parts of one width"),
                reasoning: texts.first().cloned(),
                thoughts: texts,
                forced: mine.iter().any(|t| t.forced),
                generated_tokens: generated,
                generation_s: think_s,
                embedding_s: emb_s,
            });
        }
        Ok(out)
    }
}

/// One written thought and the unit vector after it.
#[derive(Debug, Clone)]
pub struct Thought {
    /// The thought as text (stop token and closing sentence excluded).
    pub text: String,
    /// The tokens the model generated (its stop token included).
    pub tokens: Vec<u32>,
    /// Their log-probabilities under the sampling distribution's source logits.
    pub logprobs: Vec<f32>,
    /// Why the generation stopped.
    pub stop: StopReason,
    /// Prompt + thought + closing, ending with `<|embed_token|>`: the sequence the vector is
    /// the hidden state of, and what `train reason` trains on.
    pub sequence: Vec<u32>,
    /// Unit-norm embedding at the end of `sequence`.
    pub vector: Vec<f32>,
    /// The closing had to be appended ([`ThoughtCloser`]): the model did not write the token.
    pub forced: bool,
}

/// Lets `model` write one thought per row of `prompts` (reasoning prompts, assistant turn
/// open) under `cfg`, then embeds each: the generation's own hidden state at the embed token
/// when the model wrote it, else prompt + thought + closing ([`ThoughtCloser`]) embedded with
/// [`embed_at_token`] in batches of `budget` padded tokens. Inference and `train reason` both
/// think through this function. `cfg.return_hidden` is forced on; `cancel` is checked before
/// every forward pass.
pub fn think(
    model: &Model,
    tok: &search_r3_model::TextTokenizer,
    closer: &ThoughtCloser,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    budget: usize,
    cancel: Cancel,
) -> Result<Vec<Thought>, EmbedError> {
    let cfg = GenerationConfig {
        return_hidden: true,
        ..cfg.clone()
    };
    let gens = generate(model, tok, prompts, &cfg, cancel)?;
    let mut out = Vec::with_capacity(gens.len());
    let mut forced_rows = Vec::new();
    for (i, g) in gens.into_iter().enumerate() {
        let mut body = g.tokens.clone();
        let forced = g.stop != StopReason::EmbedToken;
        let (sequence, vector) = match (&g.hidden, forced) {
            (Some(h), false) => {
                let mut seq = prompts[i].clone();
                seq.extend(&body);
                body.pop();
                let v = l2_normalize(h.to_dtype(candle_core::DType::F32)?.to_vec1()?);
                (seq, v)
            }
            _ => {
                if g.stop == StopReason::Eos || g.stop == StopReason::EmbedToken {
                    body.pop();
                }
                forced_rows.push(i);
                (closer.close(&prompts[i], &body)?, vec![])
            }
        };
        out.push(Thought {
            text: tok.decode(&body, true)?.trim().to_string(),
            tokens: g.tokens,
            logprobs: g.logprobs,
            stop: g.stop,
            sequence,
            vector,
            forced,
        });
    }
    if !forced_rows.is_empty() {
        let seqs: Vec<Vec<u32>> = forced_rows
            .iter()
            .map(|&r| out[r].sequence.clone())
            .collect();
        let vecs = embed_at_token(model, &seqs, tok.pad_id, budget, cancel)?;
        for (r, v) in forced_rows.into_iter().zip(vecs) {
            out[r].vector = l2_normalize(v);
        }
    }
    Ok(out)
}

/// The final-norm hidden state at the last token of each prompt (its `<|embed_token|>`), on
/// the fast (no-graph) path, unnormalised. This is the one function every embedding in the
/// system comes from — indexing, evaluation, serving and the RL environment — so a document's
/// vector is the same wherever it is computed.
///
/// Prompts run in left-padded batches of at most `budget` padded tokens, planned by
/// [`crate::encode::plan_batches`] (longest first); padding is masked exactly, so a row does not
/// depend on what else is in its batch beyond float rounding. Row `i` is `prompts[i]`.
/// `cancel` is checked before every pass.
pub fn embed_at_token(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    budget: usize,
    cancel: Cancel,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    final_states(model, prompts, pad_id, budget, cancel, |h| {
        let last = h.narrow(0, h.dim(0)? - 1, 1)?.squeeze(0)?;
        Ok(last.to_dtype(candle_core::DType::F32)?.to_vec1()?)
    })
}

/// The final-norm hidden state of every token of each prompt (`[len][dim]`, unnormalised), as
/// [`embed_at_token`] computes them: TEI's `/embed_all`, sentence-transformers'
/// `token_embeddings`. The last row of a prompt is its embedding.
pub fn token_states(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    budget: usize,
    cancel: Cancel,
) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
    final_states(model, prompts, pad_id, budget, cancel, |h| {
        Ok(h.to_dtype(candle_core::DType::F32)?.to_vec2()?)
    })
}

/// Runs `prompts` through `model` in left-padded batches (see [`embed_at_token`]) and hands
/// `take` each prompt's own final hidden states (`[len, dim]`, padding cut off).
fn final_states<T: Default + Clone>(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    budget: usize,
    cancel: Cancel,
    take: impl Fn(&Tensor) -> Result<T, EmbedError>,
) -> Result<Vec<T>, EmbedError> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(search_r3_model::Error::Invalid("embed_at_token: empty prompt".into()).into());
    }
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut out = vec![T::default(); prompts.len()];
    for rows in crate::encode::plan_batches(&lengths, budget.max(1)) {
        let batch: Vec<Vec<u32>> = rows.iter().map(|&i| prompts[i].clone()).collect();
        let batch = Batch::left_padded(&batch, pad_id)?;
        cancel.check()?;
        let h = model.forward(&batch, Path::Fast, None)?; // [b, t, d]
        for (b, i) in rows.into_iter().enumerate() {
            // Left padding: the prompt is the last `lengths[i]` positions of its row.
            let own = h.get(b)?.narrow(0, batch.t - lengths[i], lengths[i])?;
            out[i] = take(&own)?;
        }
    }
    Ok(out)
}

fn join(parts: &PromptParts, body: &[u32]) -> Vec<u32> {
    let mut ids = Vec::with_capacity(parts.prefix.len() + body.len() + parts.suffix.len());
    ids.extend(&parts.prefix);
    ids.extend(body);
    ids.extend(&parts.suffix);
    ids
}
