//! [`read_queries`]: BEIR `queries.jsonl` as `(id, text)` pairs in file order. Unlike corpus
//! reading there is no skip mode: every bad line (missing or ill-typed field, empty text,
//! duplicate id, non-UTF-8) is an error naming the file and line.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;

use super::error::CorpusError;
use super::lines::{resolve_beir_file, Decoded, LineReader};
use super::record::{parse_object, take_id, take_text, BadRecord};

/// Reads BEIR queries (`queries.jsonl`, or a BEIR directory holding it): `(id, text)` pairs in
/// file order. Missing or ill-typed `_id`/`text`, empty text, duplicate ids and non-UTF-8 lines
/// are errors naming the file and line; blank lines are ignored.
pub fn read_queries(path: &Path) -> Result<Vec<(String, String)>, CorpusError> {
    let file = resolve_beir_file(path, "queries.jsonl")?;
    let mut lines = LineReader::open(&file)?;
    let mut queries = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    while let Some(line) = lines.next_line()? {
        let number = line.number;
        let text = match line.decode() {
            Decoded::Blank => continue,
            Decoded::BadUtf8 {
                offset,
                file_offset,
            } => {
                return Err(CorpusError::InvalidUtf8 {
                    path: file.clone(),
                    line: number,
                    offset,
                    file_offset,
                })
            }
            Decoded::Text(text) => text,
        };
        let (id, query) = parse_query(text).map_err(|bad| bad.into_error(&file, number))?;
        match seen.entry(id.clone()) {
            Entry::Occupied(first) => {
                return Err(CorpusError::DuplicateId {
                    path: file.clone(),
                    line: number,
                    id,
                    first_line: *first.get(),
                })
            }
            Entry::Vacant(slot) => {
                slot.insert(number);
            }
        }
        queries.push((id, query));
    }
    if queries.is_empty() {
        return Err(CorpusError::NoRecords {
            path: file,
            what: "queries",
        });
    }
    Ok(queries)
}

fn parse_query(line: &str) -> Result<(String, String), BadRecord> {
    let mut object = parse_object(line)?;
    let id = take_id(&object, "_id")?;
    let text = take_text(&mut object).map_err(|bad| bad.with_id(&id))?;
    if text.trim().is_empty() {
        return Err(BadRecord::new(
            "field `text`: expected the query text, got an empty string".into(),
        )
        .with_id(&id));
    }
    Ok((id, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::test_util::write_file;

    #[test]
    fn reads_queries_and_rejects_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "queries.jsonl",
            b"{\"_id\": \"q1\", \"text\": \"what?\", \"metadata\": {}}\r\n\r\n{\"_id\": 7, \"text\": \"why?\"}",
        );
        assert_eq!(
            read_queries(&path).unwrap(),
            vec![("q1".into(), "what?".into()), ("7".into(), "why?".into())]
        );
        assert_eq!(read_queries(dir.path()).unwrap().len(), 2);

        let cases: &[(&[u8], &str)] = &[
            (
                b"{\"_id\":\"q\"}\n",
                "queries.jsonl:1: missing field `text`",
            ),
            (
                b"{\"_id\":\"q\",\"text\":\"a\"}\n{\"_id\":\"q\",\"text\":1}\n",
                ":2: field `text`: expected a string, got number",
            ),
            (
                b"{\"_id\":\"q\",\"text\":\" \"}\n",
                ":1: field `text`: expected the query text, got an empty string",
            ),
            (
                b"{\"_id\":\"q\",\"text\":\"a\"}\n\n{\"_id\":\"q\",\"text\":\"b\"}\n",
                ":3: duplicate id `q` (first seen on line 1)",
            ),
            (
                b"{\"_id\":\"q\",\"text\":\"\xC3\"}\n",
                ":1: invalid UTF-8 at byte offset 19",
            ),
            (b"nope\n", ":1: invalid JSON (expected ident at column 2)"),
            (b"\n", "no queries found"),
        ];
        for (body, expected) in cases {
            let path = write_file(dir.path(), "queries.jsonl", body);
            let err = read_queries(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        let empty_dir = tempfile::tempdir().unwrap();
        let err = read_queries(empty_dir.path()).unwrap_err().to_string();
        assert!(err.contains("no queries.jsonl in this directory"), "{err}");
    }
}
