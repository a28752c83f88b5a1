//! The Search-R3 embedder: a text's embedding is the final-norm hidden state at
//! `<|embed_token|>`, L2-normalised (brief §1). Documents are embedded directly; queries either
//! directly or after the model writes a bounded analysis (`reason` mode).

use crate::templates::{prompt_parts, PromptParts, TemplateError, Templates};
use search_r3_index::l2_normalize;
use search_r3_model::{generate, Batch, GenerationConfig, LoadedModel, Model, Path, StopReason};
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

/// A query embedding and how it came about.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryEmbedding {
    /// Unit-norm embedding.
    pub vector: Vec<f32>,
    /// The model's analysis (reason mode).
    pub reasoning: Option<String>,
    /// True when the embed token had to be appended because the model did not write it.
    pub forced: bool,
    /// Tokens generated (reason mode).
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
    /// The model and tokenizer.
    pub model: LoadedModel,
    /// The prompts in use.
    pub templates: Templates,
    /// Documents longer than this many text tokens are truncated (counted and reported).
    pub max_doc_tokens: usize,
    /// Sampling temperature for reasoning (0 = greedy, deterministic).
    pub reason_temperature: f64,
    /// Padded tokens per forward pass when embedding prompts; longer lists are split into
    /// several passes so memory stays bounded whatever the caller hands in.
    pub batch_tokens: usize,
    /// Queries generated together in reasoning mode (each holds a KV cache while it runs).
    pub reason_batch: usize,
    doc: PromptParts,
    query: PromptParts,
    reason: PromptParts,
    forced_suffix: Vec<u32>,
    /// The suffix sentence without its embed token ("The embedding is"), and the ids that
    /// complete it: a model that wrote the sentence but stopped short only gets the token.
    forced_sentence: String,
    forced_tail: Vec<u32>,
    embed_id: u32,
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
        let forced_suffix = tok.encode(&t.reason.suffix)?;
        let forced_sentence = t
            .reason
            .suffix
            .replace(search_r3_model::EMBED_TOKEN, "")
            .trim()
            .to_string();
        let forced_tail = tok.encode(&format!(" {}", search_r3_model::EMBED_TOKEN))?;
        for (what, ids) in [
            ("document", &doc.suffix),
            ("query", &query.suffix),
            ("reason.suffix", &forced_suffix),
        ] {
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
            templates,
            max_doc_tokens,
            reason_temperature: 0.0,
            batch_tokens: 4096,
            reason_batch: 16,
            doc,
            query,
            reason,
            forced_suffix,
            forced_sentence,
            forced_tail,
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
        &self.forced_suffix
    }

    /// Embeds prompts that each end with `<|embed_token|>`, in left-padded batches of at most
    /// [`Embedder::batch_tokens`] padded tokens (length-sorted); the result does not depend on
    /// what else is in a batch (padding is masked exactly).
    pub fn embed_prompts(&self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(self
            .embed_prompts_raw(prompts)?
            .into_iter()
            .map(l2_normalize)
            .collect())
    }

    /// [`Embedder::embed_prompts`] without the L2 normalisation: the final-norm hidden states
    /// at the embed token as the model computes them (TEI's `"normalize": false`).
    pub fn embed_prompts_raw(&self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        for p in prompts {
            if p.last() != Some(&self.embed_id) {
                return Err(search_r3_model::Error::Invalid(
                    "prompt does not end with <|embed_token|>".into(),
                )
                .into());
            }
        }
        embed_at_token(
            &self.model.model,
            prompts,
            self.model.tokenizer.pad_id,
            self.batch_tokens,
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
        Ok((self.embed_prompts(&ids)?, truncated))
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
                let vecs = self.embed_prompts(&prompts)?;
                let per = t0.elapsed().as_secs_f64() / queries.len().max(1) as f64;
                Ok(vecs
                    .into_iter()
                    .map(|vector| QueryEmbedding {
                        vector,
                        reasoning: None,
                        forced: false,
                        generated_tokens: 0,
                        generation_s: 0.0,
                        embedding_s: per,
                    })
                    .collect())
            }
            QueryMode::Reason => {
                let mut out = Vec::with_capacity(queries.len());
                for chunk in queries.chunks(self.reason_batch.max(1)) {
                    out.extend(self.embed_queries_reasoning(chunk)?);
                }
                Ok(out)
            }
        }
    }

    fn embed_queries_reasoning(&self, queries: &[&str]) -> Result<Vec<QueryEmbedding>, EmbedError> {
        let tok = &self.model.tokenizer;
        let prompts: Vec<Vec<u32>> = queries
            .iter()
            .map(|q| Ok(join(&self.reason, &tok.encode(q)?)))
            .collect::<Result<_, EmbedError>>()?;
        let cfg = GenerationConfig {
            max_new_tokens: self.templates.reason.max_reasoning_tokens.max(1),
            temperature: self.reason_temperature,
            return_hidden: true,
            ..Default::default()
        };
        let t0 = Instant::now();
        let gens = generate(&self.model.model, tok, &prompts, &cfg)?;
        let gen_s = t0.elapsed().as_secs_f64() / queries.len().max(1) as f64;
        let mut out = Vec::with_capacity(gens.len());
        // Rows that did not write the embed token get the template's sentence appended and are
        // embedded in one extra batch.
        let mut forced_rows = Vec::new();
        let mut forced_prompts = Vec::new();
        for (i, g) in gens.iter().enumerate() {
            let mut body = g.tokens.clone();
            let forced = g.stop != StopReason::EmbedToken;
            if forced {
                if g.stop == StopReason::Eos {
                    body.pop();
                }
                let mut ids = prompts[i].clone();
                ids.extend(&body);
                let written = tok.decode(&body, true)?;
                if !self.forced_sentence.is_empty()
                    && written.trim_end().ends_with(&self.forced_sentence)
                {
                    ids.extend(&self.forced_tail);
                } else {
                    ids.extend(&self.forced_suffix);
                }
                forced_rows.push(i);
                forced_prompts.push(ids);
            } else {
                body.pop();
            }
            let reasoning = tok.decode(&body, true)?.trim().to_string();
            let vector = match (&g.hidden, forced) {
                (Some(h), false) => l2_normalize(h.to_dtype(candle_core::DType::F32)?.to_vec1()?),
                _ => vec![],
            };
            out.push(QueryEmbedding {
                vector,
                reasoning: Some(reasoning),
                forced,
                generated_tokens: g.tokens.len(),
                generation_s: gen_s,
                embedding_s: 0.0,
            });
        }
        if !forced_prompts.is_empty() {
            let t1 = Instant::now();
            let vecs = self.embed_prompts(&forced_prompts)?;
            let per = t1.elapsed().as_secs_f64() / forced_prompts.len() as f64;
            for (row, v) in forced_rows.into_iter().zip(vecs) {
                out[row].vector = v;
                out[row].embedding_s = per;
            }
        }
        Ok(out)
    }
}

/// The final-norm hidden state at the last token of each prompt (its `<|embed_token|>`), on
/// the fast (no-graph) path, unnormalised. This is the one function every embedding in the
/// system comes from — indexing, evaluation, serving and the RL environment — so a document's
/// vector is the same wherever it is computed.
///
/// Prompts run in left-padded batches of at most `budget` padded tokens, planned by
/// [`crate::encode::plan_batches`] (longest first); padding is masked exactly, so a row does not
/// depend on what else is in its batch beyond float rounding. Row `i` is `prompts[i]`.
pub fn embed_at_token(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    budget: usize,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(search_r3_model::Error::Invalid("embed_at_token: empty prompt".into()).into());
    }
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut out = vec![Vec::new(); prompts.len()];
    for rows in crate::encode::plan_batches(&lengths, budget.max(1)) {
        let batch: Vec<Vec<u32>> = rows.iter().map(|&i| prompts[i].clone()).collect();
        let batch = Batch::left_padded(&batch, pad_id)?;
        let h = model.forward(&batch, Path::Fast, None)?;
        let last = h.narrow(1, batch.t - 1, 1)?.squeeze(1)?; // [b, d]
        let vecs: Vec<Vec<f32>> = last.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        for (i, v) in rows.into_iter().zip(vecs) {
            out[i] = v;
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
