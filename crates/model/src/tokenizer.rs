//! Tokenizer and chat template: built from GGUF metadata or from an HF directory
//! (`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`).

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use std::path::Path;
use tokenizers::{
    normalizers::{unicode::NFC, NormalizerWrapper},
    pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, split::Split,
        split::SplitPattern, PreTokenizerWrapper,
    },
    tokenizer::SplitDelimiterBehavior,
    AddedToken, Tokenizer,
};

/// The special token whose final hidden state is the Search-R3 embedding.
pub const EMBED_TOKEN: &str = "<|embed_token|>";

/// Tokens that end a turn across the supported families; any of them present in the vocabulary
/// stops generation, as `generation_config.json` lists for Qwen2.5 (`<|im_end|>`,
/// `<|endoftext|>`).
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
];

/// ChatML, used when a model carries no template of its own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A tokenizer plus the model's special tokens and chat template.
///
/// Two encodings, so that text can never inject control tokens: [`TextTokenizer::encode`]
/// reads its input as *text only* (a document containing `<|im_end|>` or `<|embed_token|>`
/// gets the byte-level tokens of those characters), while
/// [`TextTokenizer::encode_markup`] maps special tokens written in the input to their ids —
/// for chat-template output and other markup the program itself writes.
#[derive(Clone)]
pub struct TextTokenizer {
    /// Matches added tokens (the markup encoding; also what is saved as `tokenizer.json`).
    inner: Tokenizer,
    /// The same tokenizer with every added token read as plain text.
    text: Tokenizer,
    /// Beginning-of-sequence token text, as chat templates reference it.
    pub bos_token: String,
    /// End-of-sequence token text.
    pub eos_token: String,
    /// Token ids that stop generation.
    pub eos_ids: Vec<u32>,
    /// Id used to fill padding positions (masked out, so its value never matters).
    pub pad_id: u32,
    /// Raw Jinja chat template; `None` → [`CHATML_TEMPLATE`] fallback.
    pub chat_template: Option<String>,
    /// Id of `<|embed_token|>` once [`TextTokenizer::add_embed_token`] ran.
    pub embed_token_id: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.vocab_size())
            .field("eos_ids", &self.eos_ids)
            .field("embed_token_id", &self.embed_token_id)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// `inner` with every added token marked special and special tokens encoded as text: user
/// text then never yields an added token's id. (`tokenizers` only skips tokens marked special,
/// and HF directories may carry control tokens that are not.)
fn text_only(inner: &Tokenizer) -> Result<Tokenizer> {
    let mut text = inner.clone();
    let mut added: Vec<(u32, AddedToken)> = inner.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let unmarked: Vec<AddedToken> = added
        .into_iter()
        .filter(|(_, t)| !t.special)
        .map(|(_, t)| t.special(true))
        .collect();
    if !unmarked.is_empty() {
        text.add_special_tokens(unmarked).map_err(tok_err)?;
    }
    text.set_encode_special_tokens(true);
    Ok(text)
}

/// Pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` names with the HF `tokenizer.json`
/// each one was converted from. candle's generic fallback adds a prefix space, which HF's
/// SmolLM2/GPT-2-style tokenizers do not, so the common cases are spelled out here.
fn pre_tokenizer_for(pre: &str) -> Result<(Option<NormalizerWrapper>, PreTokenizerWrapper)> {
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    Ok(match pre {
        "qwen2" | "deepseek-r1-qwen" => (Some(NFC.into()), split(QWEN2)?),
        "llama-bpe" | "llama3" | "smaug-bpe" => (None, split(LLAMA3)?),
        "smollm" | "starcoder" | "refact" => (
            None,
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
        ),
        _ => (None, ByteLevel::new(false, true, true).into()),
    })
}

impl TextTokenizer {
    /// Builds the tokenizer from GGUF metadata (BPE/gpt2-style vocabularies).
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_gguf(ct).map_err(|e| {
            Error::file(
                path,
                format!("cannot build tokenizer from GGUF metadata: {e}"),
            )
        })?;
        let md_str = |k: &str| ct.metadata.get(k).and_then(|v| v.to_string().ok().cloned());
        let md_u32 = |k: &str| ct.metadata.get(k).and_then(|v| v.to_u32().ok());
        let pre = md_str("tokenizer.ggml.pre").unwrap_or_else(|| "gpt2".into());
        let (norm, pre_tok) = pre_tokenizer_for(&pre)?;
        inner.with_normalizer(norm).map_err(tok_err)?;
        inner.with_pre_tokenizer(Some(pre_tok));
        // Ids only; byte-level offsets trimming is irrelevant and the BOS template would add
        // tokens the chat template already writes.
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let id_text = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
        let bos_id = md_u32("tokenizer.ggml.bos_token_id");
        let eos_id = md_u32("tokenizer.ggml.eos_token_id");
        let bos_token = id_text(bos_id).unwrap_or_default();
        let eos_token = id_text(eos_id).unwrap_or_default();
        let pad_id = md_u32("tokenizer.ggml.padding_token_id")
            .or(eos_id)
            .unwrap_or(0);
        let chat_template = md_str("tokenizer.chat_template");
        Self::finish(inner, bos_token, eos_token, eos_id, pad_id, chat_template)
    }

    /// Loads `tokenizer.json` and the special tokens / chat template of an HF directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(Error::file(
                &tj,
                "missing tokenizer: an HF model directory needs tokenizer.json",
            ));
        }
        let inner = Tokenizer::from_file(&tj)
            .map_err(|e| Error::file(&tj, format!("cannot parse tokenizer: {e}")))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::file(&p, format!("invalid JSON: {e}")))
        };
        let tc = read_json("tokenizer_config.json")?.unwrap_or_default();
        // Special tokens are written either as strings or as AddedToken objects.
        let tok_str = |k: &str| -> Option<String> {
            match tc.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content")?.as_str().map(str::to_string),
            }
        };
        let bos_token = tok_str("bos_token").unwrap_or_default();
        let eos_token = tok_str("eos_token").unwrap_or_default();
        let eos_id = inner.token_to_id(&eos_token);
        let pad_id = tok_str("pad_token")
            .and_then(|t| inner.token_to_id(&t))
            .or(eos_id)
            .unwrap_or(0);
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            match tc.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // Named templates: pick "default", as transformers does.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            }
        };
        let mut t = Self::finish(inner, bos_token, eos_token, eos_id, pad_id, chat_template)?;
        if let Some(gc) = read_json("generation_config.json")? {
            let ids: Vec<u32> = match gc.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().map(|v| v as u32).into_iter().collect()
                }
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                _ => vec![],
            };
            for id in ids {
                if !t.eos_ids.contains(&id) {
                    t.eos_ids.push(id);
                }
            }
        }
        Ok(t)
    }

    fn finish(
        inner: Tokenizer,
        bos_token: String,
        eos_token: String,
        eos_id: Option<u32>,
        pad_id: u32,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        for t in END_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let embed_token_id = inner.token_to_id(EMBED_TOKEN);
        Ok(TextTokenizer {
            text: text_only(&inner)?,
            inner,
            bos_token,
            eos_token,
            eos_ids,
            pad_id,
            chat_template,
            embed_token_id,
        })
    }

    /// Adds `<|embed_token|>` as a special token (idempotent) and returns its id.
    pub fn add_embed_token(&mut self) -> Result<u32> {
        if let Some(id) = self.inner.token_to_id(EMBED_TOKEN) {
            self.embed_token_id = Some(id);
            return Ok(id);
        }
        self.inner
            .add_special_tokens([AddedToken::from(EMBED_TOKEN, true)])
            .map_err(tok_err)?;
        let id = self
            .inner
            .token_to_id(EMBED_TOKEN)
            .ok_or_else(|| Error::Tokenizer(format!("{EMBED_TOKEN} was not added")))?;
        self.text = text_only(&self.inner)?;
        self.embed_token_id = Some(id);
        Ok(id)
    }

    /// Number of ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text as text only, without adding BOS/EOS: a special token written in it
    /// (`<|im_end|>`, `<|embed_token|>`) becomes the tokens of its characters, never its id.
    /// Every document, query, thought or training text goes through here.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.text.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes markup the program wrote (a rendered chat template, a prompt suffix): special
    /// tokens written in it (e.g. `<|im_start|>`) map to their ids. Never pass user text here.
    pub fn encode_markup(&self, markup: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(markup, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text-only `tokenizers` object behind [`TextTokenizer::encode`] (for offsets and
    /// token strings of user text, as `/tokenize` reports them).
    pub fn text_tokenizer(&self) -> &Tokenizer {
        &self.text
    }

    /// Decodes ids to text; `skip_special` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The text of one token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of one token text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Renders messages through the model's own chat template (ChatML when it has none), with
    /// the whitespace rules transformers uses (`trim_blocks`, `lstrip_blocks`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let src = self.chat_template.as_deref().unwrap_or(CHATML_TEMPLATE);
        render_chat_template(
            src,
            messages,
            add_generation_prompt,
            &self.bos_token,
            &self.eos_token,
        )
    }
}

/// Renders a Jinja chat template as transformers' `apply_chat_template` would.
pub(crate) fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::Template(e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        // Templates use this for "Today's date"; a fixed, reproducible date keeps embeddings
        // deterministic across days.
        fmt.replace("%Y", "2026")
            .replace("%m", "01")
            .replace("%d", "01")
            .replace("%B", "January")
    });
    env.add_template_owned("chat", template.to_string())
        .map_err(|e| Error::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
            .collect::<minijinja::Value>(),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
        tools => minijinja::Value::from(()),
    })
    .map_err(|e| Error::Template(e.to_string()))
}
