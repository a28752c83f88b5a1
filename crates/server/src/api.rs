//! Request and response bodies: TEI's `/embed`, `/tokenize`, `/info`; OpenAI's
//! `/v1/embeddings`; and our `/search` and `/index/*`.

use crate::Limits;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// What a JSON value is, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The strings of a list, or which item is not one.
fn strings(items: Vec<Value>) -> Result<Vec<String>, String> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s),
            other => Err(format!("item {i} is {}, expected a string", kind(&other))),
        })
        .collect()
}

/// The token ids of a list, or which item is not one.
fn token_ids(items: &[Value], at: &str) -> Result<Vec<u32>, String> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    format!("item {at}{i} is {v}, expected a token id (an integer 0..2^32)")
                })
        })
        .collect()
}

/// One text or a list of texts.
// Deserialized through `TryFrom<Value>` so a wrong type is named, not "did not match any
// variant"; `untagged` still describes the schema.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, try_from = "Value")]
pub(crate) enum Inputs {
    /// A single text.
    One(String),
    /// Several texts, answered in order.
    Many(Vec<String>),
}

impl TryFrom<Value> for Inputs {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => Ok(Inputs::One(s)),
            Value::Array(items) => strings(items).map(Inputs::Many),
            other => Err(format!(
                "expected a string or a list of strings, got {}",
                kind(&other)
            )),
        }
    }
}

impl Inputs {
    /// The texts as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Inputs::One(s) => vec![s],
            Inputs::Many(v) => v,
        }
    }
}

/// Which prompt wraps a text before it is embedded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PromptName {
    /// The document prompt (what the index stores).
    #[default]
    Document,
    /// The direct query prompt (what `/search` with `"reason": false` embeds).
    Query,
}

impl PromptName {
    /// The side of the model whose prompt this is.
    pub fn side(self) -> search_r3_core::embedder::Side {
        match self {
            PromptName::Document => search_r3_core::embedder::Side::Document,
            PromptName::Query => search_r3_core::embedder::Side::Query,
        }
    }
}

/// Which end of an over-long input is cut (TEI's `truncation_direction`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub(crate) enum TruncationDirection {
    /// Keep the end.
    #[serde(alias = "left")]
    Left,
    /// Keep the start (default).
    #[default]
    #[serde(alias = "right")]
    Right,
}

// Optional fields are `Option`s so an explicit `null` means "the default", as clients that
// serialise every field send it.

/// `POST /embed` (TEI; also `POST /`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct EmbedRequest {
    /// Text(s) or token ids to embed.
    pub inputs: Input,
    /// L2-normalise the vectors (default true).
    #[serde(default)]
    pub normalize: Option<bool>,
    /// Truncation and prompt.
    #[serde(flatten)]
    pub prompt: PromptOptions,
    /// Must equal the model's width when given (the vectors cannot be shortened).
    #[serde(default)]
    pub dimensions: Option<usize>,
}

/// How inputs are cut and which prompt wraps them: the options TEI's `/embed`,
/// `/embed_all` and `/similarity` (its `parameters`) share.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub(crate) struct PromptOptions {
    /// Cut inputs longer than the token limit instead of answering 413 (default: the
    /// server's `--auto-truncate`).
    #[serde(default)]
    pub truncate: Option<bool>,
    /// `Right` (default: keep the start) or `Left`.
    #[serde(default)]
    pub truncation_direction: Option<TruncationDirection>,
    /// `document` (default) or `query`.
    #[serde(default)]
    pub prompt_name: Option<PromptName>,
}

/// `POST /embed_all` (TEI): the final hidden state of every token of each input's prompt.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct EmbedAllRequest {
    /// Text(s) or token ids.
    pub inputs: Input,
    /// Truncation and prompt.
    #[serde(flatten)]
    pub prompt: PromptOptions,
}

/// The sentences of `POST /similarity`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct SimilarityInput {
    /// The sentence the others are compared with.
    pub source_sentence: String,
    /// The sentences to compare with it.
    pub sentences: Vec<String>,
}

/// `POST /similarity` (TEI; also `POST /` when `inputs` is an object, as Hugging Face's
/// `sentence_similarity` clients send it).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct SimilarityRequest {
    /// The source sentence and the sentences to compare with it.
    pub inputs: SimilarityInput,
    /// Truncation and prompt.
    #[serde(default)]
    pub parameters: Option<PromptOptions>,
}

/// `POST /decode` (TEI).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct DecodeRequest {
    /// Token ids of one text, or a list of them.
    pub ids: InputIds,
    /// Leave special tokens out of the text (default true).
    #[serde(default)]
    pub skip_special_tokens: Option<bool>,
}

/// One list of token ids or several.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(try_from = "Value")]
pub(crate) struct InputIds(
    /// The id lists, in request order.
    pub Vec<Vec<u32>>,
);

impl TryFrom<Value> for InputIds {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        let Value::Array(items) = v else {
            return Err(format!(
                "expected a list of token ids or a list of lists of token ids, got {}",
                kind(&v)
            ));
        };
        match items.first() {
            Some(Value::Array(_)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(ids) => token_ids(ids, &format!("{i}.")),
                    other => Err(format!(
                        "item {i} is {}, expected a list of token ids",
                        kind(other)
                    )),
                })
                .collect::<Result<_, _>>()
                .map(InputIds),
            _ => token_ids(&items, "").map(|ids| InputIds(vec![ids])),
        }
    }
}

/// One input of an embedding request: a text, or the token ids of a text (as `/tokenize`
/// returns them; the prompt is put around them as around a text).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum InputItem {
    /// A text.
    Text(String),
    /// The token ids of a text.
    Ids(Vec<u32>),
}

/// TEI's `inputs` and OpenAI's `input`: a text, a list of token ids (one input), or a list
/// whose items are texts or lists of token ids.
// Deserialized through `TryFrom<Value>` so a wrong type is named; `untagged` describes the
// schema (TEI's `Input`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, try_from = "Value")]
pub(crate) enum Input {
    /// One input.
    One(InputItem),
    /// Several inputs, answered in order.
    Many(Vec<InputItem>),
}

impl TryFrom<Value> for Input {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        const WANT: &str = "a string, a list of token ids, or a list of strings and lists of \
                            token ids";
        let items = match v {
            Value::String(s) => return Ok(Input::One(InputItem::Text(s))),
            Value::Array(items) => items,
            other => return Err(format!("expected {WANT}, got {}", kind(&other))),
        };
        // A list of numbers is one input's token ids; any other list is a batch.
        if let Some(Value::Number(_)) = items.first() {
            return token_ids(&items, "").map(|ids| Input::One(InputItem::Ids(ids)));
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(InputItem::Text(s)),
                Value::Array(ids) => token_ids(&ids, &format!("{i}.")).map(InputItem::Ids),
                other => Err(format!(
                    "item {i} is {}, expected a string or a list of token ids",
                    kind(&other)
                )),
            })
            .collect::<Result<_, _>>()
            .map(Input::Many)
    }
}

impl Input {
    /// The inputs as a list.
    pub fn into_vec(self) -> Vec<InputItem> {
        match self {
            Input::One(i) => vec![i],
            Input::Many(v) => v,
        }
    }
}

/// `float` (default) or `base64` (little-endian f32 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EncodingFormat {
    /// JSON numbers.
    #[default]
    Float,
    /// Base64 of the little-endian f32 bytes.
    Base64,
}

/// `POST /v1/embeddings` (OpenAI).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct OpenAiRequest {
    /// Text(s) or token ids.
    pub input: Input,
    /// Echoed back; any value is accepted (the server runs one model).
    #[serde(default)]
    #[expect(dead_code, reason = "accepted and documented, never read")]
    pub model: Option<String>,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Must equal the model's width when given (the vectors cannot be shortened).
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// Ignored (OpenAI's end-user id).
    #[serde(default)]
    #[expect(dead_code, reason = "accepted and documented, never read")]
    pub user: Option<String>,
}

/// A vector as floats or base64.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum EmbeddingData {
    /// JSON numbers.
    Float(Vec<f32>),
    /// Base64 of the little-endian f32 bytes.
    Base64(String),
}

/// One vector of an OpenAI answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct OpenAiEmbedding {
    /// Always `embedding`.
    pub object: &'static str,
    /// The vector.
    pub embedding: EmbeddingData,
    /// Position in the request.
    pub index: usize,
}

/// Token counts of an OpenAI answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Usage {
    /// Input text tokens.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens` (nothing is generated).
    pub total_tokens: usize,
}

/// `POST /v1/embeddings` answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct OpenAiResponse {
    /// Always `list`.
    pub object: &'static str,
    /// One entry per input.
    pub data: Vec<OpenAiEmbedding>,
    /// The served model.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
}

/// `POST /tokenize` (TEI).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct TokenizeRequest {
    /// Text(s) to tokenize.
    pub inputs: Inputs,
    /// Add the tokenizer's special tokens (default true; SmolLM2 and Qwen2 add none, prompts
    /// are built by the chat template).
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

/// One token of `/tokenize`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub(crate) struct SimpleToken {
    /// Token id.
    pub id: u32,
    /// The covered input text (the token's own text when it has no span).
    pub text: String,
    /// Whether it is a special token.
    pub special: bool,
    /// Start byte offset in the input (start = stop for tokens with no span).
    pub start: usize,
    /// End byte offset in the input.
    pub stop: usize,
}

/// `POST /search`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct SearchRequest {
    /// The query text.
    pub query: String,
    /// Hits to return (default 10).
    #[serde(default)]
    pub k: Option<usize>,
    /// Let the model reason about the query before it embeds it (default false).
    #[serde(default)]
    pub reason: Option<bool>,
    /// Cut a query over the token limit instead of answering 413.
    #[serde(default)]
    pub truncate: Option<bool>,
}

/// One ranked document.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub(crate) struct Hit {
    /// 1-based rank.
    pub rank: usize,
    /// Document id.
    pub id: String,
    /// Cosine similarity.
    pub score: f32,
    /// Title (may be empty).
    pub title: String,
    /// The start of the text.
    pub snippet: String,
}

/// Where a search's time went, in seconds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct SearchTimings {
    /// Waiting for a model worker.
    pub queue_s: f64,
    /// The model's reasoning (0 without `reason`).
    pub generation_s: f64,
    /// The embedding forward pass (0 when the generation's own hidden state was used).
    pub embedding_s: f64,
    /// The index lookup.
    pub search_s: f64,
    /// The whole request.
    pub total_s: f64,
    /// Requests in the model batch this one ran in.
    pub batch_requests: usize,
}

/// `POST /search` answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct SearchResponse {
    /// The query as received.
    pub query: String,
    /// `direct` or `reason`.
    pub mode: String,
    /// The model's analysis of the query (`reason` only).
    pub reasoning: Option<String>,
    /// True when the model stopped without writing the embed token and it was appended.
    pub forced: bool,
    /// Tokens the model generated.
    pub generated_tokens: usize,
    /// Ranked documents.
    pub hits: Vec<Hit>,
    /// Timings.
    pub timings: SearchTimings,
}

/// A document to index.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct UpsertDocument {
    /// Unique id; an existing document with this id is replaced.
    pub id: String,
    /// Title (optional).
    #[serde(default)]
    pub title: String,
    /// Body text.
    pub text: String,
}

/// `POST /index/upsert`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct UpsertRequest {
    /// Documents to add or replace.
    pub documents: Vec<UpsertDocument>,
    /// Cut documents over the index's token limit (default true, as `search-r3 index` does);
    /// false answers 413 instead.
    #[serde(default)]
    pub truncate: Option<bool>,
}

/// `POST /index/upsert` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub(crate) struct UpsertResponse {
    /// Documents written.
    pub upserted: usize,
    /// Of those, how many were cut to the token limit.
    pub truncated: usize,
    /// Live documents in the index now.
    pub documents: usize,
}

/// `POST /index/delete`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub(crate) struct DeleteRequest {
    /// Ids to delete (each once; at most `max_client_batch_size`).
    pub ids: Vec<String>,
}

/// `POST /index/delete` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub(crate) struct DeleteResponse {
    /// Documents deleted.
    pub deleted: usize,
    /// Ids that were not in the index.
    pub missing: Vec<String>,
    /// Live documents in the index now.
    pub documents: usize,
}

/// TEI's `model_type`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct ModelType {
    /// Embedding model details.
    pub embedding: Pooling,
}

/// How the vector is taken.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Pooling {
    /// Always `embed_token`: the final hidden state at `<|embed_token|>`.
    pub pooling: String,
}

/// The index the server searches.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct IndexInfo {
    /// Directory.
    pub path: String,
    /// `hnsw` or `exact`.
    pub kind: String,
    /// Live documents.
    pub documents: usize,
}

/// `GET /info`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Info {
    /// The served model (what `--model` said).
    pub model_id: String,
    /// Same as `model_id` (TEI's name for the model clients ask for).
    pub served_model_name: String,
    /// sha256 of the base model.
    pub model_sha: String,
    /// sha256 of the adapter, if any.
    pub adapter_sha: Option<String>,
    /// Weights' dtype.
    pub model_dtype: String,
    /// Pooling.
    pub model_type: ModelType,
    /// Vector width.
    pub dimensions: usize,
    // Limits and batching (the server's flags, `max_input_length` resolved).
    #[serde(flatten)]
    #[schema(inline)]
    pub limits: Limits,
    /// Reasoning budget in tokens (per thought).
    pub max_reasoning_tokens: usize,
    /// How `/search` with `"reason": true` embeds a query: `greedy`, `greedy+direct` or
    /// `mean:N` (N sampled thoughts averaged with the direct embedding), with its token bounds.
    pub reasoning_mode: String,
    /// sha256 of the adapter's query tower, when queries run through one.
    pub query_adapter_sha: Option<String>,
    /// The index, when the server has one.
    pub index: Option<IndexInfo>,
    /// Server version.
    pub version: String,
    /// Threads that can tokenize at once: tokenizing runs on the runtime's blocking pool,
    /// which has the machine's cores to run on.
    pub tokenization_workers: usize,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`.
    pub status: String,
    /// Model workers running.
    pub workers: usize,
}
