//! Parsing one JSON record (a document or a query) from one line, field by field, so that a
//! bad record is described precisely: which field is missing or ill-typed, what was expected,
//! which keys the record does have. A [`BadRecord`] is tied to its file and line by the reader.

use std::path::Path;

use serde_json::{Map, Value};

use super::document::Document;
use super::error::CorpusError;

/// A problem with one record, before it is tied to a file and line.
pub(super) struct BadRecord {
    pub(super) id: Option<String>,
    pub(super) problem: String,
}

impl BadRecord {
    pub(super) fn new(problem: String) -> Self {
        BadRecord { id: None, problem }
    }

    pub(super) fn with_id(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }

    pub(super) fn into_error(self, path: &Path, line: usize) -> CorpusError {
        CorpusError::Malformed {
            path: path.to_path_buf(),
            line,
            id: self.id,
            problem: self.problem,
        }
    }
}

pub(super) fn parse_document(line: &str, id_field: &str) -> Result<Document, BadRecord> {
    let mut object = parse_object(line)?;
    let id = take_id(&object, id_field)?;
    let text = take_text(&mut object).map_err(|bad| bad.with_id(&id))?;
    let title = match object.remove("title") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(title)) => title,
        Some(other) => {
            return Err(BadRecord::new(format!(
                "field `title`: expected a string, got {}",
                type_name(&other)
            ))
            .with_id(&id))
        }
    };
    Ok(Document { id, title, text })
}

pub(super) fn parse_object(line: &str) -> Result<Map<String, Value>, BadRecord> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(BadRecord::new(format!(
            "expected a JSON object, got {}",
            type_name(&other)
        ))),
        Err(e) => Err(BadRecord::new(format!(
            "invalid JSON ({})",
            describe_json_error(&e)
        ))),
    }
}

/// serde_json reports positions as "line 1 column N", but each record is parsed on its own, so
/// only the column means anything to the user; and "EOF" really means the line ended.
fn describe_json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let message = full
        .rfind(" at line ")
        .map_or(full.as_str(), |i| &full[..i]);
    let message = message.replace("EOF while parsing", "line ended while parsing");
    format!("{message} at column {}", e.column())
}

/// Reads the id without removing it so that a later "missing field" message can still list
/// every key of the record.
pub(super) fn take_id(object: &Map<String, Value>, field: &str) -> Result<String, BadRecord> {
    let expected = "expected a string or integer";
    match object.get(field) {
        None => {
            let mut problem = format!(
                "missing field `{field}` ({expected} id; keys present: {})",
                key_list(object)
            );
            // The commonest cause is a file of the other JSONL flavour read with a forced format.
            let other = if field == "_id" { "id" } else { "_id" };
            if object.contains_key(other) {
                let format = if other == "_id" { "beir" } else { "jsonl" };
                problem.push_str(&format!(
                    "; this record has `{other}`, as in the {format} format"
                ));
            }
            Err(BadRecord::new(problem))
        }
        Some(Value::String(id)) if id.trim().is_empty() => Err(BadRecord::new(format!(
            "field `{field}`: expected a non-empty id, got an empty string"
        ))),
        Some(Value::String(id)) => Ok(id.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        // A float id would stringify unpredictably ("1e3" vs "1000.0"), so it is refused.
        Some(Value::Number(n)) => Err(BadRecord::new(format!(
            "field `{field}`: {expected}, got non-integer number {n}"
        ))),
        Some(other) => Err(BadRecord::new(format!(
            "field `{field}`: {expected}, got {}",
            type_name(other)
        ))),
    }
}

pub(super) fn take_text(object: &mut Map<String, Value>) -> Result<String, BadRecord> {
    match object.remove("text") {
        None => Err(BadRecord::new(format!(
            "missing field `text` (expected a string; keys present: {})",
            key_list(object)
        ))),
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(BadRecord::new(format!(
            "field `text`: expected a string, got {}",
            type_name(&other)
        ))),
    }
}

pub(super) fn key_list(object: &Map<String, Value>) -> String {
    if object.is_empty() {
        return "none".into();
    }
    object
        .keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use crate::corpus::format::OnError;
    use crate::corpus::read_corpus;
    use crate::corpus::test_util::{ids, opts, read_err, read_ok, write_file};
    use crate::corpus::CorpusError;

    /// Each malformed record, with the message fragment that must name the field.
    const MALFORMED: &[(&str, &str)] = &[
        (
            "{\"_id\": \"a\", \"text\": ",
            "invalid JSON (line ended while parsing",
        ),
        ("{\"_id\" \"a\"}", "invalid JSON (expected `:` at column 8)"),
        ("[1, 2]", "expected a JSON object, got array"),
        (
            "{\"text\": \"t\"}",
            "missing field `_id` (expected a string or integer id",
        ),
        (
            "{\"_id\": [1], \"text\": \"t\"}",
            "field `_id`: expected a string or integer, got array",
        ),
        (
            "{\"_id\": 1.5, \"text\": \"t\"}",
            "got non-integer number 1.5",
        ),
        (
            "{\"_id\": \" \", \"text\": \"t\"}",
            "field `_id`: expected a non-empty id",
        ),
        (
            "{\"_id\": \"a\"}",
            "missing field `text` (expected a string; keys present: `_id`)",
        ),
        (
            "{\"_id\": \"a\", \"text\": 5}",
            "field `text`: expected a string, got number",
        ),
        (
            "{\"_id\": \"a\", \"text\": null}",
            "field `text`: expected a string, got null",
        ),
        (
            "{\"_id\": \"a\", \"text\": \"t\", \"title\": 3}",
            "field `title`: expected a string, got number",
        ),
        (
            "{\"_id\": \"a\", \"text\": \"t\"} {}",
            "invalid JSON (trailing characters at column",
        ),
    ];

    #[test]
    fn malformed_lines_fail_with_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        for (bad, expected) in MALFORMED {
            let body = format!("{{\"_id\":\"ok\",\"text\":\"fine\"}}\n\n{bad}\n");
            let path = write_file(dir.path(), "corpus.jsonl", body.as_bytes());
            let err = read_err(&path, OnError::Fail);
            assert!(err.contains("corpus.jsonl:3: "), "{bad}: {err}");
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn malformed_lines_are_skipped_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        for (bad, expected) in MALFORMED {
            let body = format!(
                "{{\"_id\":\"ok\",\"text\":\"fine\"}}\n\n{bad}\n{{\"_id\":\"z\",\"text\":\"t\"}}"
            );
            let path = write_file(dir.path(), "corpus.jsonl", body.as_bytes());
            let (docs, report) = read_ok(&path, OnError::Skip);
            assert_eq!(ids(&docs), ["ok", "z"], "{bad}");
            assert_eq!(report.skipped_malformed.len(), 1, "{bad}");
            let issue = &report.skipped_malformed[0];
            assert_eq!(issue.line, 3, "{bad}");
            assert!(issue.problem.contains(expected), "{bad}: {}", issue.problem);
            assert!(issue.problem.ends_with("line skipped"), "{}", issue.problem);
            assert_eq!(report.skipped(), 1);
        }
    }

    #[test]
    fn malformed_record_keeps_its_id_when_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "corpus.jsonl",
            b"{\"_id\":\"a\",\"text\":1}\n{\"_id\":\"b\",\"text\":\"t\"}\n",
        );
        let (_, report) = read_ok(&path, OnError::Skip);
        assert_eq!(report.skipped_malformed[0].id.as_deref(), Some("a"));
        match read_corpus(&path, &opts(OnError::Fail)).unwrap_err() {
            CorpusError::Malformed { line, id, .. } => {
                assert_eq!((line, id.as_deref()), (1, Some("a")));
            }
            other => panic!("unexpected error {other}"),
        }
    }
}
