//! Exporting an embedder as a sentence-transformers model directory: what
//! `SentenceTransformer(path)` loads as is, and whose `encode(texts)` and
//! `encode(queries, prompt_name="query")` give this system's document and direct-query vectors.
//!
//! The directory is the merged HF checkpoint ([`search_r3_model::merge::save_hf_dir`]) plus
//! the sentence-transformers modules in their long-standing layout (`modules.json`:
//! Transformer → `1_Pooling` with last-token pooling → `2_Normalize`), which every
//! sentence-transformers release since 2.x reads and whose `1_Pooling/config.json` keys are the
//! ones text-embeddings-inference reads (`pooling_mode_lasttoken`).
//!
//! The Search-R3 prompt goes into `tokenizer.json`'s post-processor: a `TemplateProcessing`
//! whose single-sequence template is *prefix ids, the text, suffix ids* — the chat template's
//! system and user turns before the text, `<|im_end|>`, the assistant header and
//! `The embedding is <|embed_token|>` after it — so any reader of `tokenizer.json` that adds
//! special tokens (sentence-transformers, transformers, TEI) builds exactly our prompt, and
//! last-token pooling reads the state at `<|embed_token|>`. Truncation counts the template's
//! tokens as added tokens and cuts the text alone, as ours does; `max_seq_length` is our
//! document limit plus the template. The prompts `query` and `document` are both empty because
//! the two prompts are the same token sequence; a template set where they differ is refused.
//!
//! Not carried over: reasoning mode (it needs generation) and a query tower (a second set of
//! weights); the export is refused for the latter. Texts that spell out a control token
//! (`<|im_end|>`) are read as text here but parsed as that token by Hugging Face tokenizers.

use crate::embedder::{EmbedError, Embedder};
use search_r3_model::merge::{staging_dir, write_json};
use search_r3_model::Error;
use serde_json::{json, Value};
use std::path::Path;

/// The error of an export that cannot represent the embedder.
fn refuse(msg: String) -> EmbedError {
    Error::Invalid(msg).into()
}

/// Writes `e` (adapters merged) as a sentence-transformers directory at `dir`, which must not
/// exist yet; everything is written into a sibling temporary directory renamed into place last.
/// `extra` is recorded under `config.json`'s `search_r3` key, as for the plain HF export.
pub fn save_sentence_transformers(
    e: &Embedder,
    dir: &Path,
    extra: &Value,
) -> Result<(), EmbedError> {
    let tmp = staging_dir(dir, ".export-")?;
    if e.query_tower.is_some() {
        return Err(refuse(
            "the adapter has a query tower: queries and documents run through different \
             weights, which one sentence-transformers model cannot hold"
                .into(),
        ));
    }
    if e.doc.prefix != e.query.prefix || e.doc.suffix != e.query.suffix {
        return Err(refuse(
            "the templates' document and query prompts differ; the exported tokenizer holds \
             one prompt (sentence-transformers prompts can only prepend text)"
                .into(),
        ));
    }
    let out = tmp.path().join("model");
    search_r3_model::merge::save_hf_dir(&e.model.model, &e.model.tokenizer, &out, extra)?;
    let write = |name: &str, v: &Value| -> Result<(), EmbedError> {
        let p = out.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|err| Error::io(d, err))?;
        }
        Ok(write_json(&p, v)?)
    };

    let tj = out.join("tokenizer.json");
    let text = std::fs::read_to_string(&tj).map_err(|err| Error::io(&tj, err))?;
    let mut tok: Value = serde_json::from_str(&text)
        .map_err(|err| Error::file(&tj, format!("reading back the tokenizer: {err}")))?;
    tok["post_processor"] = prompt_processor(e, &tok["post_processor"])?;
    // Padding and truncation are the caller's (sentence-transformers sets both per call).
    tok["padding"] = Value::Null;
    tok["truncation"] = Value::Null;
    write("tokenizer.json", &tok)?;

    let template_len = e.doc.prefix.len() + e.doc.suffix.len();
    let max_seq_length = e.max_doc_tokens + template_len;
    let modules = |i: usize, name: &str, path: &str| {
        json!({"idx": i, "name": i.to_string(), "path": path,
               "type": format!("sentence_transformers.models.{name}")})
    };
    write(
        "modules.json",
        &json!([
            modules(0, "Transformer", ""),
            modules(1, "Pooling", "1_Pooling"),
            modules(2, "Normalize", "2_Normalize"),
        ]),
    )?;
    write(
        "sentence_bert_config.json",
        &json!({"max_seq_length": max_seq_length, "do_lower_case": false}),
    )?;
    write(
        "config_sentence_transformers.json",
        &json!({
            "model_type": "SentenceTransformer",
            "prompts": {"query": "", "document": ""},
            "default_prompt_name": null,
            "similarity_fn_name": "cosine",
        }),
    )?;
    write(
        "1_Pooling/config.json",
        &json!({
            "word_embedding_dimension": e.dim(),
            "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": false,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": true,
            "include_prompt": true,
        }),
    )?;
    let norm = out.join("2_Normalize");
    std::fs::create_dir_all(&norm).map_err(|err| Error::io(&norm, err))?;
    let card = out.join("README.md");
    std::fs::write(&card, model_card(e, max_seq_length, extra))
        .map_err(|err| Error::io(&card, err))?;

    std::fs::rename(&out, dir).map_err(|err| Error::io(dir, err))?;
    Ok(())
}

/// The tokenizer post-processor that puts the embedding prompt around a text: a
/// `TemplateProcessing` with the prompt's prefix and suffix as two multi-token special
/// "tokens", after the tokenizer's own post-processor when it has one that adds no tokens
/// (byte-level offset trimming).
fn prompt_processor(e: &Embedder, original: &Value) -> Result<Value, EmbedError> {
    let tok = &e.model.tokenizer;
    let special = |name: &str, ids: &[u32]| -> Result<Value, EmbedError> {
        let tokens = ids
            .iter()
            .map(|&id| {
                tok.id_to_token(id)
                    .ok_or_else(|| refuse(format!("token id {id} has no text in the tokenizer")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(json!({"id": name, "ids": ids, "tokens": tokens}))
    };
    let piece = |id: &str| json!({"SpecialToken": {"id": id, "type_id": 0}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let template = json!({
        "type": "TemplateProcessing",
        "single": [piece("SEARCH_R3_PREFIX"), seq("A", 0), piece("SEARCH_R3_SUFFIX")],
        "pair": [piece("SEARCH_R3_PREFIX"), seq("A", 0), seq("B", 1), piece("SEARCH_R3_SUFFIX")],
        "special_tokens": {
            "SEARCH_R3_PREFIX": special("SEARCH_R3_PREFIX", &e.doc.prefix)?,
            "SEARCH_R3_SUFFIX": special("SEARCH_R3_SUFFIX", &e.doc.suffix)?,
        },
    });
    Ok(match original["type"].as_str() {
        // Ours encodes text without the tokenizer's own template, so one is replaced.
        None | Some("TemplateProcessing") | Some("BertProcessing") | Some("RobertaProcessing") => {
            template
        }
        Some(_) => json!({"type": "Sequence", "processors": [original, template]}),
    })
}

fn model_card(e: &Embedder, max_seq_length: usize, extra: &Value) -> String {
    format!(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\ntags:\n\
         - sentence-transformers\n- search-r3\n---\n\n\
         # {id} + Search-R3 adapter (sentence-transformers export)\n\n\
         Written by `search-r3 adapter merge --format sentence-transformers`. The vectors are \
         the final hidden state at `<|embed_token|>` after the Search-R3 prompt, L2-normalised: \
         the prompt is in `tokenizer.json`'s post-processor, so plain `encode(texts)` builds it; \
         `prompt_name=\"query\"` and `\"document\"` are accepted and add nothing (the direct \
         query prompt is the document prompt).\n\n\
         ```python\nfrom sentence_transformers import SentenceTransformer\n\n\
         model = SentenceTransformer(\"path/to/this/directory\")\n\
         docs = model.encode([\"Aspirin inhibits platelet aggregation.\"])\n\
         query = model.encode([\"does aspirin thin the blood\"], prompt_name=\"query\")\n\
         print(model.similarity(query, docs))\n```\n\n\
         - Texts are cut to {max_doc} tokens (`max_seq_length` {max_seq_length} counts the \
         template's {template} tokens too).\n\
         - Reasoning mode (the model writes an analysis of the query before the embed token) \
         needs generation and is not part of this export: use `search-r3 serve`/`search`.\n\
         - Source: {extra}\n",
        id = e.model.id,
        max_doc = e.max_doc_tokens,
        template = max_seq_length - e.max_doc_tokens,
        extra = extra,
    )
}
