//! Search-R3 prompt templates, kept in versioned TOML files per model family (`templates/`
//! in the repository, compiled in as defaults; `--templates FILE` overrides). The hash of the
//! parsed template set is stored in index metadata so that an index is never queried with
//! prompts it was not built with.

use search_r3_model::{Arch, ChatMessage, TextTokenizer, EMBED_TOKEN};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Errors reading or applying templates.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The TOML file is unreadable or malformed.
    #[error("{path}: {msg}")]
    File {
        /// The template file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Rendering through the model's chat template failed.
    #[error(transparent)]
    Model(#[from] search_r3_model::Error),
}

/// One prompt: the system and user turns and the assistant text written for the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnTemplate {
    /// System turn.
    pub system: String,
    /// User turn; `{text}` is replaced by the input.
    pub user: String,
    /// Assistant text, ending with `<|embed_token|>`.
    pub assistant: String,
}

/// Reasoning-mode query prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonTemplate {
    /// System turn (asks for an analysis, then the embed sentence).
    pub system: String,
    /// User turn; `{text}` is replaced by the query.
    pub user: String,
    /// Appended when the model does not write `<|embed_token|>` within the budget.
    pub suffix: String,
    /// Budget of generated tokens for the analysis.
    pub max_reasoning_tokens: usize,
}

/// A complete template set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Templates {
    /// Format version of the file.
    pub version: u32,
    /// Human-readable name.
    pub name: String,
    /// How documents are embedded (no reasoning).
    pub document: TurnTemplate,
    /// How queries are embedded in direct mode.
    pub query: TurnTemplate,
    /// How queries are embedded in reasoning mode.
    pub reason: ReasonTemplate,
}

const DEFAULT: &str = include_str!("../../../templates/default.toml");
const LLAMA: &str = include_str!("../../../templates/llama.toml");
const QWEN2: &str = include_str!("../../../templates/qwen2.toml");

/// The only template format version this build reads.
pub const TEMPLATE_VERSION: u32 = 1;

impl Templates {
    /// The shipped templates for a model family.
    pub fn for_arch(arch: Arch) -> Templates {
        let src = match arch {
            Arch::Llama => LLAMA,
            Arch::Qwen2 => QWEN2,
            Arch::Qwen3 => DEFAULT,
        };
        Self::parse(src, "<built-in>").expect("built-in templates are valid")
    }

    /// Reads a template file.
    pub fn from_file(path: &Path) -> Result<Templates, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|e| TemplateError::File {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str, origin: &str) -> Result<Templates, TemplateError> {
        let err = |msg: String| TemplateError::File {
            path: origin.to_string(),
            msg,
        };
        let t: Templates = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if t.version != TEMPLATE_VERSION {
            return Err(err(format!(
                "template version {} is not supported (this build reads version {TEMPLATE_VERSION})",
                t.version
            )));
        }
        for (field, s) in [
            ("document.assistant", &t.document.assistant),
            ("query.assistant", &t.query.assistant),
            ("reason.suffix", &t.reason.suffix),
        ] {
            if s.matches(EMBED_TOKEN).count() != 1 || !s.trim_end().ends_with(EMBED_TOKEN) {
                return Err(err(format!(
                    "field `{field}`: must end with exactly one {EMBED_TOKEN}"
                )));
            }
        }
        for (field, s) in [
            ("document.user", &t.document.user),
            ("query.user", &t.query.user),
            ("reason.user", &t.reason.user),
        ] {
            if !s.contains("{text}") {
                return Err(err(format!(
                    "field `{field}`: must contain the {{text}} placeholder"
                )));
            }
        }
        Ok(t)
    }

    /// Stable hash of the template set (sha256 of its canonical JSON), for index metadata.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("templates serialise");
        hex::encode(Sha256::digest(json))[..16].to_string()
    }
}

/// A prompt split around the input text, so the text can be truncated by tokens without
/// touching the template: `prefix ++ text ++ suffix`.
#[derive(Debug, Clone)]
pub struct PromptParts {
    /// Token ids before the text.
    pub prefix: Vec<u32>,
    /// Token ids after the text (for embedding prompts, ending at `<|embed_token|>`).
    pub suffix: Vec<u32>,
    /// How many tokens at the end of `suffix` belong to the assistant text (the response a
    /// model is trained to write, e.g. `The embedding is <|embed_token|>`). Measured by
    /// tokenizing the rendered suffix with and without the assistant text: every token from the
    /// first one that differs is counted, so a token merged across the boundary belongs to the
    /// span. 0 when the assistant text is empty.
    pub assistant_len: usize,
}

const PLACEHOLDER: &str = "\u{2063}SEARCH_R3_TEXT\u{2063}";

/// Renders `system`/`user` (with `{text}` left as a placeholder) through the model's chat
/// template with the generation prompt, appends `assistant`, and splits the token ids around
/// the placeholder.
pub fn prompt_parts(
    tok: &TextTokenizer,
    system: &str,
    user: &str,
    assistant: &str,
) -> Result<PromptParts, TemplateError> {
    let msgs = [
        ChatMessage::new("system", system),
        ChatMessage::new("user", &user.replace("{text}", PLACEHOLDER)),
    ];
    let rendered = tok.apply_chat_template(&msgs, true)? + assistant;
    let (before, after) = rendered
        .split_once(PLACEHOLDER)
        .ok_or_else(|| TemplateError::File {
            path: "<chat template>".into(),
            msg: "the model's chat template dropped the user message".into(),
        })?;
    let suffix = tok.encode_markup(after)?;
    let assistant_len = if assistant.is_empty() {
        0
    } else {
        let header = after.strip_suffix(assistant).unwrap_or(after);
        let without = tok.encode_markup(header)?;
        let common = suffix
            .iter()
            .zip(&without)
            .take_while(|(a, b)| a == b)
            .count();
        suffix.len() - common
    };
    Ok(PromptParts {
        prefix: tok.encode_markup(before)?,
        suffix,
        assistant_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_templates_parse_and_hash_stably() {
        for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
            let t = Templates::for_arch(arch);
            assert_eq!(t.hash(), Templates::for_arch(arch).hash());
            assert_eq!(t.hash().len(), 16);
        }
        assert_ne!(
            Templates::for_arch(Arch::Llama).hash(),
            Templates::for_arch(Arch::Qwen2).hash()
        );
    }

    #[test]
    fn bad_templates_are_refused_with_the_field() {
        let good = DEFAULT.to_string();
        let no_token = good.replacen(
            "assistant = \"The embedding is <|embed_token|>\"",
            "assistant = \"The embedding is\"",
            1,
        );
        let e = Templates::parse(&no_token, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml") && e.contains("document.assistant"),
            "{e}"
        );
        let no_text = good.replacen("user = \"{text}\"", "user = \"hi\"", 1);
        let e = Templates::parse(&no_text, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("document.user"), "{e}");
        let v2 = good.replacen("version = 1", "version = 2", 1);
        assert!(Templates::parse(&v2, "t.toml")
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        let unknown = format!("{good}\n[extra]\nx = 1\n");
        assert!(Templates::parse(&unknown, "t.toml").is_err());
        let changed = good.replacen("Please represent user queries.", "Represent this.", 1);
        assert_ne!(
            Templates::parse(&changed, "a").unwrap().hash(),
            Templates::parse(&good, "a").unwrap().hash()
        );
    }
}
