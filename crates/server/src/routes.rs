//! The HTTP handlers. Each validates its request (errors come back before a job is queued),
//! tokenizes on a blocking thread after refusing or cutting texts over the byte bound (so no
//! text, however long, occupies the async threads), hands model work to the
//! [`Queue`](crate::queue::Queue), and touches the index on a blocking thread.
//!
//! User text is tokenized as text only ([`TextTokenizer::encode`]): a control token written in
//! a document or query is its characters, never its id, so no request can change the prompt's
//! structure or where the embedding is read.
//!
//! [`TextTokenizer::encode`]: search_r3_model::TextTokenizer::encode

use crate::api::*;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use search_r3_core::corpus::Document;
use search_r3_core::embedder::{QueryEmbedding, Side};
use search_r3_core::searcher::Searcher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// `Json` whose rejections (bad JSON, wrong types, body over the limit) come back in our
/// error shape, read within `--body-read-timeout` (408 after) and given up at shutdown (503).
pub(crate) struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        // A body announced over the limit is refused before any of it is awaited.
        let limit = state.opts.limits.payload_limit;
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(n) = announced.filter(|&n| n > limit as u64) {
            return Err(ApiError::too_large(format!(
                "the body is {n} bytes, more than the limit of {limit} (--payload-limit)"
            ))
            .closing());
        }
        let secs = state.opts.limits.body_read_timeout;
        let mut closing = state.closing.subscribe();
        let read = tokio::time::timeout(
            Duration::from_secs(secs),
            Json::<T>::from_request(req, state),
        );
        // A body left unread (too large, too slow, shutdown) ends the connection: waiting to
        // drain it would hand a stalled client the connection again.
        tokio::select! {
            r = read => match r {
                Ok(Ok(Json(v))) => Ok(ApiJson(v)),
                Ok(Err(r)) => {
                    let e = ApiError::rejection(r.status(), r.body_text());
                    Err(if r.status() == StatusCode::PAYLOAD_TOO_LARGE { e.closing() } else { e })
                }
                Err(_) => Err(ApiError::timeout(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request body did not arrive within {secs} s (--body-read-timeout)"),
                )
                .closing()),
            },
            _ = closing.wait_for(|c| *c) => {
                Err(ApiError::unhealthy("the server is shutting down").closing())
            }
        }
    }
}

type St = State<Arc<AppState>>;

/// How over-long inputs are handled.
#[derive(Clone, Copy)]
struct Cut {
    limit: usize,
    truncate: bool,
    direction: TruncationDirection,
}

impl AppState {
    /// The request-level rule: `--max-input-length`, truncating when asked (or by default
    /// with `--auto-truncate`).
    fn cut(&self, truncate: Option<bool>, direction: Option<TruncationDirection>) -> Cut {
        Cut {
            limit: self.max_input_length,
            truncate: truncate.unwrap_or(self.opts.limits.auto_truncate),
            direction: direction.unwrap_or_default(),
        }
    }
}

/// The index lock, usable after a panic elsewhere held it: every index write is checked before
/// it changes anything, so the state behind a poisoned lock is still consistent.
fn read(l: &RwLock<Searcher>) -> RwLockReadGuard<'_, Searcher> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(l: &RwLock<Searcher>) -> RwLockWriteGuard<'_, Searcher> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// The longest prefix (`Right`) or suffix (`Left`) of `text` within `bytes`, on a character
/// boundary.
fn cut_bytes(mut text: String, bytes: usize, direction: TruncationDirection) -> String {
    if text.len() <= bytes {
        return text;
    }
    match direction {
        TruncationDirection::Right => {
            let mut end = bytes;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        TruncationDirection::Left => {
            let mut start = text.len() - bytes;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            text.drain(..start);
        }
    }
    text
}

impl AppState {
    /// The cut and prompt a request's [`PromptOptions`] ask for.
    fn prompt_options(&self, o: &PromptOptions) -> (Cut, PromptName) {
        let cut = self.cut(o.truncate, o.truncation_direction);
        (cut, o.prompt_name.unwrap_or_default())
    }

    /// Applies `--max-input-bytes` to `inputs[i]`: a longer text is cut to the bound when
    /// `cut` truncates (see [`AppState::tokenize_inputs`]), else refused (413).
    fn within_bytes(
        &self,
        i: usize,
        text: String,
        cut: Option<Cut>,
        field: &str,
    ) -> Result<String, ApiError> {
        let bound = self.max_input_bytes;
        match cut {
            _ if text.len() <= bound => Ok(text),
            Some(c) if c.truncate => Ok(cut_bytes(text, bound, c.direction)),
            _ => Err(ApiError::too_large(format!(
                "`{field}[{i}]` is {} bytes, more than the limit of {bound} \
                 (--max-input-bytes); shorten it{}",
                text.len(),
                if cut.is_some() {
                    " or send `\"truncate\": true`"
                } else {
                    ""
                }
            ))),
        }
    }

    /// The token ids of each input, on a blocking thread: texts are tokenized as text only,
    /// ids are checked against the vocabulary. An empty or whitespace-only text is refused
    /// (400). A text over `--max-input-bytes` is cut to that many bytes first when `cut`
    /// truncates — at under 32 bytes per token (any ordinary text) the kept bytes still hold
    /// more than `cut.limit` tokens, so the token cut that follows keeps the tokens it would
    /// have kept from the whole text — and is refused (413) otherwise, before any tokenizing.
    async fn tokenize_inputs(
        self: &Arc<Self>,
        inputs: Vec<InputItem>,
        cut: Cut,
        field: &'static str,
    ) -> Result<Vec<Vec<u32>>, ApiError> {
        let inputs = inputs
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                InputItem::Text(t) if t.trim().is_empty() => Err(ApiError::empty(format!(
                    "`{field}[{i}]` is empty or only whitespace"
                ))),
                InputItem::Text(t) => Ok(InputItem::Text(self.within_bytes(
                    i,
                    t,
                    Some(cut),
                    field,
                )?)),
                InputItem::Ids(ids) => {
                    self.check_ids(&ids, i, field)?;
                    Ok(InputItem::Ids(ids))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let state = self.clone();
        blocking(move || {
            inputs
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    InputItem::Ids(ids) => Ok(ids),
                    InputItem::Text(t) => state
                        .embedder
                        .model
                        .tokenizer
                        .encode(&t)
                        .map_err(|e| ApiError::tokenizer(format!("`{field}[{i}]`: {e}"))),
                })
                .collect()
        })
        .await
    }

    /// Refuses (422) token ids of `{field}[{i}]` outside the vocabulary.
    fn check_ids(&self, ids: &[u32], i: usize, field: &str) -> Result<(), ApiError> {
        let vocab = self.embedder.model.tokenizer.vocab_size() as u32;
        match ids.iter().find(|&&id| id >= vocab) {
            Some(bad) => Err(ApiError::invalid(format!(
                "`{field}[{i}]`: token id {bad} is outside the vocabulary (size {vocab})"
            ))),
            None => Ok(()),
        }
    }

    /// [`AppState::tokenize_inputs`] for texts.
    async fn tokenize_texts(
        self: &Arc<Self>,
        texts: Vec<String>,
        cut: Cut,
        field: &'static str,
    ) -> Result<Vec<Vec<u32>>, ApiError> {
        let inputs = texts.into_iter().map(InputItem::Text).collect();
        self.tokenize_inputs(inputs, cut, field).await
    }

    /// Embeds inputs (texts or token ids) with `prompt`, after every check of the embedding
    /// routes; returns the vectors (L2-normalised when `normalize`) and the text-token count.
    async fn embed_inputs(
        self: &Arc<Self>,
        inputs: Vec<InputItem>,
        cut: Cut,
        prompt: PromptName,
        normalize: bool,
        field: &'static str,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        self.check_batch(inputs.len(), field)?;
        let ids = self.tokenize_inputs(inputs, cut, field).await?;
        let (prompts, n_tokens) = self.prompts(ids, cut, prompt, field)?;
        let (vectors, _) = self.queue.embed(prompt.side(), prompts, normalize).await?;
        Ok((vectors, n_tokens))
    }

    /// Refuses a `dimensions` other than the model's (422): the vectors cannot be shortened.
    fn check_dimensions(&self, asked: Option<usize>) -> Result<(), ApiError> {
        let dim = self.embedder.dim();
        match asked.filter(|d| *d != dim) {
            Some(d) => Err(ApiError::invalid(format!(
                "`dimensions` is {d}, but this model's vectors have {dim} dimensions and cannot \
                 be shortened"
            ))),
            None => Ok(()),
        }
    }

    /// Wraps tokenized inputs in `prompt`, enforcing the request limits: none empty (400), none
    /// over `cut.limit` tokens unless truncating (413), at most `--max-batch-tokens` text
    /// tokens in all (413: one request may not hold the model worker longer than a full
    /// batch). Returns the prompts and the text-token count.
    fn prompts(
        &self,
        texts: Vec<Vec<u32>>,
        cut: Cut,
        prompt: PromptName,
        field: &str,
    ) -> Result<(Vec<Vec<u32>>, usize), ApiError> {
        let limit = cut.limit;
        let mut n_tokens = 0;
        let mut out = Vec::with_capacity(texts.len());
        for (i, mut body) in texts.into_iter().enumerate() {
            if body.is_empty() {
                return Err(ApiError::empty(format!("`{field}[{i}]` is empty")));
            }
            if body.len() > limit {
                if !cut.truncate {
                    return Err(ApiError::too_large(format!(
                        "`{field}[{i}]` has {} tokens, more than the limit of {limit}; shorten \
                         it or send `\"truncate\": true`",
                        body.len()
                    )));
                }
                match cut.direction {
                    TruncationDirection::Right => body.truncate(limit),
                    TruncationDirection::Left => {
                        body.drain(..body.len() - limit);
                    }
                }
            }
            n_tokens += body.len();
            out.push(match prompt {
                PromptName::Document => self.embedder.document_prompt_ids(&body),
                PromptName::Query => self.embedder.query_prompt_ids(&body),
            });
        }
        self.check_total(n_tokens, field)?;
        Ok((out, n_tokens))
    }

    /// At most `--max-batch-tokens` text tokens per request (413): one request may not hold
    /// the model worker longer than a full batch.
    fn check_total(&self, n_tokens: usize, field: &str) -> Result<(), ApiError> {
        let most = self.opts.limits.max_batch_tokens;
        if n_tokens > most {
            return Err(ApiError::too_large(format!(
                "`{field}` holds {n_tokens} tokens in all, more than the limit of {most} per \
                 request (--max-batch-tokens); split it into smaller requests"
            )));
        }
        Ok(())
    }

    fn check_batch(&self, n: usize, field: &str) -> Result<(), ApiError> {
        if n == 0 {
            return Err(ApiError::empty(format!("`{field}` is empty")));
        }
        if n > self.opts.limits.max_client_batch_size {
            return Err(ApiError::too_large(format!(
                "batch size {n} > maximum allowed batch size {} (`{field}`)",
                self.opts.limits.max_client_batch_size
            )));
        }
        Ok(())
    }

    fn searcher(&self) -> Result<&RwLock<Searcher>, ApiError> {
        self.index.as_ref().ok_or_else(|| {
            ApiError::not_found("this server has no index: start it with `--index DIR`")
        })
    }
}

/// Runs CPU or disk work (tokenizing, the index) on a blocking thread, off the async ones.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::backend(format!("a blocking task failed: {e}")))?
}

/// Changes the index under its write lock on a blocking thread; `change` returns its result
/// and whether the index changed, which saves it. Returns the result and the live document
/// count. A failed change may have reached memory, so it marks the index for a save at
/// shutdown.
async fn update_index<T: Send + 'static>(
    state: Arc<AppState>,
    change: impl FnOnce(&mut Searcher) -> anyhow::Result<(T, bool)> + Send + 'static,
) -> Result<(T, usize), ApiError> {
    blocking(move || {
        let mut guard = write(state.searcher()?);
        let (out, changed) = change(&mut guard).map_err(|e| {
            state.dirty.store(true, Ordering::SeqCst);
            ApiError::backend(format!("index update failed: {e}"))
        })?;
        if changed {
            state.persist(&mut guard)?;
        }
        Ok((out, guard.len()))
    })
    .await
}

/// Embed text(s) as TEI does.
#[utoipa::path(post, path = "/embed", request_body = EmbedRequest,
    responses(
        (status = 200, description = "One vector per input", body = Vec<Vec<f32>>),
        (status = 400, description = "Empty input", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many inputs, an input over the token limit, or a body over the payload limit", body = ErrorBody),
        (status = 422, description = "Malformed request or untokenizable text", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 503, description = "Model workers stopped", body = ErrorBody),
    ))]
pub(crate) async fn embed(
    s: St,
    ApiJson(req): ApiJson<EmbedRequest>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    s.check_dimensions(req.dimensions)?;
    let (cut, name) = s.prompt_options(&req.prompt);
    let normalize = req.normalize.unwrap_or(true);
    let (vectors, _) = s
        .embed_inputs(req.inputs.into_vec(), cut, name, normalize, "inputs")
        .await?;
    Ok(Json(vectors))
}

/// The final hidden state of every token of each input's prompt (template included, as the
/// sentence-transformers export's `token_embeddings`), unnormalised, as TEI's `/embed_all`.
#[utoipa::path(post, path = "/embed_all", request_body = EmbedAllRequest,
    responses(
        (status = 200, description = "Per input, one vector per prompt token", body = Vec<Vec<Vec<f32>>>),
        (status = 400, description = "Empty input", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many inputs, an input over the token limit, or a body over the payload limit", body = ErrorBody),
        (status = 422, description = "Malformed request, token id out of range, or untokenizable text", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
    ))]
pub(crate) async fn embed_all(
    s: St,
    ApiJson(req): ApiJson<EmbedAllRequest>,
) -> Result<Json<Vec<Vec<Vec<f32>>>>, ApiError> {
    let inputs = req.inputs.into_vec();
    s.check_batch(inputs.len(), "inputs")?;
    let (cut, name) = s.prompt_options(&req.prompt);
    let ids = s.tokenize_inputs(inputs, cut, "inputs").await?;
    let (prompts, _) = s.prompts(ids, cut, name, "inputs")?;
    let (states, _) = s.queue.token_states(name.side(), prompts).await?;
    Ok(Json(states))
}

/// Cosine similarity of `source_sentence` with each of `sentences`, as TEI's `/similarity`.
#[utoipa::path(post, path = "/similarity", request_body = SimilarityRequest,
    responses(
        (status = 200, description = "One cosine similarity per sentence", body = Vec<f32>),
        (status = 400, description = "No sentences, or an empty one", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many sentences or one over the token limit", body = ErrorBody),
        (status = 422, description = "Malformed request or untokenizable text", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
    ))]
pub(crate) async fn similarity(
    s: St,
    ApiJson(req): ApiJson<SimilarityRequest>,
) -> Result<Json<Vec<f32>>, ApiError> {
    let SimilarityInput {
        source_sentence,
        sentences,
    } = req.inputs;
    if sentences.is_empty() {
        return Err(ApiError::empty("`inputs.sentences` is empty"));
    }
    // The source sentence counts against the batch size, as in TEI.
    s.check_batch(sentences.len() + 1, "inputs.sentences")?;
    let (cut, name) = s.prompt_options(&req.parameters.unwrap_or_default());
    let source = s
        .tokenize_texts(vec![source_sentence], cut, "inputs.source_sentence")
        .await?;
    let others = s.tokenize_texts(sentences, cut, "inputs.sentences").await?;
    let (mut prompts, n_source) = s.prompts(source, cut, name, "inputs.source_sentence")?;
    let (rest, n_others) = s.prompts(others, cut, name, "inputs.sentences")?;
    s.check_total(n_source + n_others, "inputs")?;
    prompts.extend(rest);
    let (vectors, _) = s.queue.embed(name.side(), prompts, true).await?;
    let (source, others) = vectors.split_first().expect("at least two inputs");
    Ok(Json(
        others
            .iter()
            .map(|v| source.iter().zip(v).map(|(a, b)| a * b).sum())
            .collect(),
    ))
}

/// TEI's compatibility route, which Hugging Face's inference clients post to: `/similarity`
/// when `inputs` is an object (`source_sentence`, `sentences`), else `/embed`.
#[utoipa::path(post, path = "/", request_body = EmbedRequest,
    responses(
        (status = 200, description = "As `/embed` (or `/similarity` for a similarity request)", body = Vec<Vec<f32>>),
        (status = 400, description = "Empty input", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many inputs or an input over the token limit", body = ErrorBody),
        (status = 422, description = "Malformed request", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
    ))]
pub(crate) async fn compat(s: St, ApiJson(body): ApiJson<serde_json::Value>) -> Response {
    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
        serde_json::from_value(v)
            .map_err(|e| ApiError::invalid(format!("Failed to deserialize the JSON body: {e}")))
    }
    if body.get("inputs").is_some_and(serde_json::Value::is_object) {
        match parse(body) {
            Ok(req) => similarity(s, ApiJson(req)).await.into_response(),
            Err(e) => e.into_response(),
        }
    } else {
        match parse(body) {
            Ok(req) => embed(s, ApiJson(req)).await.into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// Text of token ids, as TEI's `/decode`.
#[utoipa::path(post, path = "/decode", request_body = DecodeRequest,
    responses(
        (status = 200, description = "One text per id list", body = Vec<String>),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many id lists, or one over the token limit", body = ErrorBody),
        (status = 422, description = "Malformed request or a token id outside the vocabulary", body = ErrorBody),
    ))]
pub(crate) async fn decode(
    s: St,
    ApiJson(req): ApiJson<DecodeRequest>,
) -> Result<Json<Vec<String>>, ApiError> {
    let lists = req.ids.0;
    s.check_batch(lists.len(), "ids")?;
    for (i, ids) in lists.iter().enumerate() {
        s.check_ids(ids, i, "ids")?;
        if ids.len() > s.max_input_length {
            return Err(ApiError::too_large(format!(
                "`ids[{i}]` has {} tokens, more than the limit of {} (--max-input-length)",
                ids.len(),
                s.max_input_length
            )));
        }
    }
    let skip = req.skip_special_tokens.unwrap_or(true);
    let state = s.0.clone();
    blocking(move || {
        lists
            .iter()
            .enumerate()
            .map(|(i, ids)| {
                state
                    .embedder
                    .model
                    .tokenizer
                    .decode(ids, skip)
                    .map_err(|e| ApiError::tokenizer(format!("`ids[{i}]`: {e}")))
            })
            .collect()
    })
    .await
    .map(Json)
}

/// Embed text(s) or token ids as OpenAI's embeddings API does (float or base64).
#[utoipa::path(post, path = "/v1/embeddings", request_body = OpenAiRequest,
    responses(
        (status = 200, description = "One vector per input", body = OpenAiResponse),
        (status = 400, description = "Empty input", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many inputs or an input over the token limit", body = ErrorBody),
        (status = 422, description = "Malformed request, token id out of range, or `dimensions` other than the model's", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
    ))]
pub(crate) async fn openai_embeddings(
    s: St,
    ApiJson(req): ApiJson<OpenAiRequest>,
) -> Result<Json<OpenAiResponse>, ApiError> {
    s.check_dimensions(req.dimensions)?;
    let cut = s.cut(None, None);
    let (vectors, n_tokens) = s
        .embed_inputs(
            req.input.into_vec(),
            cut,
            PromptName::Document,
            true,
            "input",
        )
        .await?;
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| OpenAiEmbedding {
            object: "embedding",
            embedding: match req.encoding_format.unwrap_or_default() {
                EncodingFormat::Float => EmbeddingData::Float(v),
                EncodingFormat::Base64 => EmbeddingData::Base64(
                    base64::engine::general_purpose::STANDARD
                        .encode(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()),
                ),
            },
            index,
        })
        .collect();
    Ok(Json(OpenAiResponse {
        object: "list",
        data,
        model: s.info.model_id.clone(),
        usage: Usage {
            prompt_tokens: n_tokens,
            total_tokens: n_tokens,
        },
    }))
}

/// Search the index, optionally letting the model reason about the query first.
#[utoipa::path(post, path = "/search", request_body = SearchRequest,
    responses(
        (status = 200, description = "Ranked hits, the reasoning trace and timings", body = SearchResponse),
        (status = 400, description = "Empty query", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "The server has no index", body = ErrorBody),
        (status = 413, description = "Query over the token limit", body = ErrorBody),
        (status = 422, description = "Malformed request or `k` out of range", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
    ))]
pub(crate) async fn search(
    s: St,
    ApiJson(req): ApiJson<SearchRequest>,
) -> Result<Json<SearchResponse>, ApiError> {
    let t0 = Instant::now();
    s.searcher()?;
    let k = req.k.unwrap_or(10);
    let reason = req.reason.unwrap_or(false);
    if k == 0 || k > s.opts.limits.max_k {
        return Err(ApiError::invalid(format!(
            "`k` is {k}, expected 1..={}",
            s.opts.limits.max_k
        )));
    }
    if req.query.trim().is_empty() {
        return Err(ApiError::empty("`query` is empty or only whitespace"));
    }
    let cut = s.cut(req.truncate, None);
    let ids = s
        .tokenize_texts(vec![req.query.clone()], cut, "query")
        .await?;
    let (prompts, _) = s.prompts(ids.clone(), cut, PromptName::Query, "query")?;
    let (e, timing) = if reason {
        // The reasoning prompt is built from text: a query cut (in bytes or tokens) is decoded
        // back from the tokens kept.
        let text = if ids[0].len() > s.max_input_length || req.query.len() > s.max_input_bytes {
            let kept = ids[0].len().min(s.max_input_length);
            s.embedder
                .model
                .tokenizer
                .decode(&ids[0][..kept], false)
                .map_err(|e| ApiError::tokenizer(format!("`query`: {e}")))?
        } else {
            req.query.clone()
        };
        s.queue.reason(text).await?
    } else {
        let (mut v, t) = s.queue.embed(Side::Query, prompts, true).await?;
        let e = QueryEmbedding {
            vector: v.remove(0),
            reasoning: None,
            thoughts: vec![],
            forced: false,
            generated_tokens: 0,
            generation_s: 0.0,
            embedding_s: t.inference_s,
        };
        (e, t)
    };
    let (state, vector) = (s.0.clone(), e.vector);
    let (hits, search_s) = blocking(move || {
        let t = Instant::now();
        let guard = read(state.searcher()?);
        let hits = guard
            .hits(&vector, k)
            .map_err(|e| ApiError::backend(format!("index search failed: {e}")))?;
        Ok((hits, t.elapsed().as_secs_f64()))
    })
    .await?;
    Ok(Json(SearchResponse {
        query: req.query,
        mode: if reason { "reason" } else { "direct" }.into(),
        reasoning: e.reasoning,
        forced: e.forced,
        generated_tokens: e.generated_tokens,
        hits: hits
            .into_iter()
            .map(|h| Hit {
                rank: h.rank,
                id: h.id,
                score: h.score,
                title: h.title,
                snippet: h.snippet,
            })
            .collect(),
        timings: SearchTimings {
            queue_s: timing.queue_s,
            generation_s: e.generation_s,
            embedding_s: e.embedding_s,
            search_s,
            total_s: t0.elapsed().as_secs_f64(),
            batch_requests: timing.batch_requests,
        },
    }))
}

/// Add or replace documents; the index is persisted atomically before the answer.
#[utoipa::path(post, path = "/index/upsert", request_body = UpsertRequest,
    responses(
        (status = 200, description = "Documents written and persisted", body = UpsertResponse),
        (status = 400, description = "No documents, or an empty document", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "The server has no index", body = ErrorBody),
        (status = 413, description = "Too many documents, or one over the token limit with `truncate: false`", body = ErrorBody),
        (status = 422, description = "Malformed request, empty or repeated id", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
    ))]
pub(crate) async fn upsert(
    s: St,
    ApiJson(req): ApiJson<UpsertRequest>,
) -> Result<Json<UpsertResponse>, ApiError> {
    s.searcher()?;
    s.check_batch(req.documents.len(), "documents")?;
    let mut seen = std::collections::HashSet::new();
    for (i, d) in req.documents.iter().enumerate() {
        if d.id.trim().is_empty() {
            return Err(ApiError::invalid(format!("`documents[{i}].id` is empty")));
        }
        if !seen.insert(d.id.as_str()) {
            return Err(ApiError::invalid(format!(
                "`documents[{i}].id` repeats `{}` within the request",
                d.id
            )));
        }
    }
    let docs: Vec<Document> = req
        .documents
        .into_iter()
        .map(|d| Document {
            id: d.id,
            title: d.title,
            text: d.text,
        })
        .collect();
    let texts: Vec<String> = docs.iter().map(Document::full_text).collect();
    // Documents follow the index's own limit, as `search-r3 index` and `index add` do.
    let cut = Cut {
        limit: s.embedder.max_doc_tokens,
        truncate: req.truncate.unwrap_or(true),
        direction: TruncationDirection::Right,
    };
    let long: Vec<bool> = texts.iter().map(|t| t.len() > s.max_input_bytes).collect();
    let ids = s.tokenize_texts(texts, cut, "documents").await?;
    let truncated = ids
        .iter()
        .zip(&long)
        .filter(|(t, &cut_in_bytes)| cut_in_bytes || t.len() > cut.limit)
        .count();
    let (prompts, _) = s.prompts(ids, cut, PromptName::Document, "documents")?;
    let (vectors, _) = s.queue.embed(Side::Document, prompts, true).await?;
    let upserted = docs.len();
    let ((), documents) = update_index(s.0.clone(), move |index| {
        index.upsert_vectors(docs, &vectors)?;
        Ok(((), true))
    })
    .await?;
    Ok(Json(UpsertResponse {
        upserted,
        truncated,
        documents,
    }))
}

/// Delete documents by id; the index is persisted atomically before the answer.
#[utoipa::path(post, path = "/index/delete", request_body = DeleteRequest,
    responses(
        (status = 200, description = "Documents deleted and persisted; unknown ids listed", body = DeleteResponse),
        (status = 400, description = "No ids", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "The server has no index", body = ErrorBody),
        (status = 413, description = "More ids than `max_client_batch_size`", body = ErrorBody),
        (status = 422, description = "Malformed request or a repeated id", body = ErrorBody),
    ))]
pub(crate) async fn delete(
    s: St,
    ApiJson(req): ApiJson<DeleteRequest>,
) -> Result<Json<DeleteResponse>, ApiError> {
    s.searcher()?;
    s.check_batch(req.ids.len(), "ids")?;
    let mut seen = std::collections::HashSet::new();
    if let Some(i) = req.ids.iter().position(|id| !seen.insert(id.as_str())) {
        return Err(ApiError::invalid(format!(
            "`ids[{i}]` repeats `{}` within the request",
            req.ids[i]
        )));
    }
    let n = req.ids.len();
    let (missing, documents) = update_index(s.0.clone(), move |index| {
        let missing = index.remove(&req.ids)?;
        let changed = missing.len() < n;
        Ok((missing, changed))
    })
    .await?;
    Ok(Json(DeleteResponse {
        deleted: n - missing.len(),
        missing,
        documents,
    }))
}

/// Token ids and spans, as TEI's `/tokenize`.
#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest,
    responses(
        (status = 200, description = "Tokens of each input", body = Vec<Vec<SimpleToken>>),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Too many inputs, or an input over the byte or token limit", body = ErrorBody),
        (status = 422, description = "Malformed request or untokenizable text", body = ErrorBody),
    ))]
pub(crate) async fn tokenize(
    s: St,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Vec<Vec<SimpleToken>>>, ApiError> {
    let texts = req.inputs.into_vec();
    s.check_batch(texts.len(), "inputs")?;
    // The same bounds as embedding: a text too long to embed is too long to tokenize.
    let texts = texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| s.within_bytes(i, t, None, "inputs"))
        .collect::<Result<Vec<_>, _>>()?;
    let state = s.0.clone();
    let special = req.add_special_tokens.unwrap_or(true);
    blocking(move || tokens_of(&state, &texts, special))
        .await
        .map(Json)
}

/// `/tokenize`'s answer, computed on a blocking thread: the text-only encoding every route
/// embeds with, so what it shows is what the model reads.
fn tokens_of(
    s: &AppState,
    texts: &[String],
    add_special_tokens: bool,
) -> Result<Vec<Vec<SimpleToken>>, ApiError> {
    let tok = s.embedder.model.tokenizer.text_tokenizer();
    let limit = s.max_input_length;
    let mut out = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let enc = tok
            .encode(text.as_str(), add_special_tokens)
            .map_err(|e| ApiError::tokenizer(format!("`inputs[{i}]`: {e}")))?;
        if enc.len() > limit {
            return Err(ApiError::too_large(format!(
                "`inputs[{i}]` has {} tokens, more than the limit of {limit} \
                 (--max-input-length)",
                enc.len()
            )));
        }
        let tokens = enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .zip(enc.get_offsets())
            .zip(enc.get_special_tokens_mask())
            .map(|(((&id, token), &(start, stop)), &special)| {
                let span = (start < stop).then(|| text.get(start..stop)).flatten();
                SimpleToken {
                    id,
                    text: span.map_or_else(|| token.clone(), str::to_string),
                    special: special == 1,
                    start,
                    stop,
                }
            })
            .collect();
        out.push(tokens);
    }
    Ok(out)
}

/// What the server runs and its limits.
#[utoipa::path(get, path = "/info", responses((status = 200, body = Info)))]
pub(crate) async fn info(s: St) -> Json<Info> {
    let mut info = s.info.clone();
    if let Some(i) = info.index.as_mut() {
        // The gauge follows every saved write; reading it never waits for an index save.
        i.documents = s.metrics.index_documents.get() as usize;
    }
    Json(info)
}

/// 200 while the model workers run, 503 otherwise. Needs no API key.
#[utoipa::path(get, path = "/health",
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
pub(crate) async fn health(s: St) -> Result<Json<Health>, ApiError> {
    let workers = s.queue.alive();
    if workers == 0 || *s.closing.borrow() {
        return Err(ApiError::unhealthy("the model workers are not running"));
    }
    Ok(Json(Health {
        status: "ok".into(),
        workers,
    }))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(s: St) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Unknown routes get the error shape too.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

/// So do known routes called with the wrong method.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// The OpenAPI document.
pub(crate) async fn openapi() -> Response {
    (StatusCode::OK, Json(crate::openapi_doc())).into_response()
}
