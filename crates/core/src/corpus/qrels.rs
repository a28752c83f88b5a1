//! [`read_qrels`]: BEIR relevance judgements (`query-id<TAB>corpus-id<TAB>score` TSV, optional
//! header) in file order. A wrong column count, an empty id, a non-integer score or two
//! scores for the same pair are errors naming the file and line; an exact repeat is dropped
//! with a warning.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;

use super::error::CorpusError;
use super::lines::{Decoded, LineReader};

/// Reads BEIR relevance judgements: a TSV file of `query-id<TAB>corpus-id<TAB>score` rows, with
/// an optional `query-id corpus-id score` header line. Returns `(query id, doc id, score)` in
/// file order. A wrong column count, an empty id, a non-integer score or two different scores
/// for the same pair are errors naming the file and line; an exact repeat of a row is dropped
/// with a warning so it cannot be counted twice.
pub fn read_qrels(path: &Path) -> Result<Vec<(String, String, i32)>, CorpusError> {
    Ok(read_qrels_lines(path)?
        .into_iter()
        .map(|j| (j.query_id, j.doc_id, j.grade))
        .collect())
}

/// One relevance judgement and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Judgement {
    /// The query id.
    pub query_id: String,
    /// The document id.
    pub doc_id: String,
    /// The relevance grade.
    pub grade: i32,
    /// 1-based line number in the qrels file.
    pub line: usize,
}

/// [`read_qrels`] keeping each judgement's line number, so later checks (unknown query or
/// document ids) can point at the line.
pub(crate) fn read_qrels_lines(path: &Path) -> Result<Vec<Judgement>, CorpusError> {
    if path.is_dir() {
        return Err(CorpusError::IsDirectory {
            path: path.to_path_buf(),
            expected: "a qrels TSV file such as qrels/test.tsv",
        });
    }
    let mut lines = LineReader::open(path)?;
    let mut qrels = Vec::new();
    let mut seen: HashMap<(String, String), (usize, i32)> = HashMap::new();
    let mut first_record = true;
    while let Some(line) = lines.next_line()? {
        let number = line.number;
        let text = match line.decode() {
            Decoded::Blank => continue,
            Decoded::BadUtf8 {
                offset,
                file_offset,
            } => {
                return Err(CorpusError::InvalidUtf8 {
                    path: path.to_path_buf(),
                    line: number,
                    offset,
                    file_offset,
                })
            }
            Decoded::Text(text) => text,
        };
        let columns: Vec<&str> = text.split('\t').map(str::trim).collect();
        let malformed = |problem: String| CorpusError::Malformed {
            path: path.to_path_buf(),
            line: number,
            id: None,
            problem,
        };
        if std::mem::take(&mut first_record) && is_qrels_header(&columns) {
            continue;
        }
        if columns.len() != 3 {
            let mut problem = format!(
                "expected 3 tab-separated columns (query-id, corpus-id, score), got {}",
                columns.len()
            );
            let words = text.split_whitespace().count();
            if columns.len() == 1 && words >= 3 {
                problem.push_str("; the columns must be separated by tabs, not spaces");
            } else if columns.len() == 4 {
                problem.push_str(
                    "; TREC-style qrels (query, iteration, doc, score) must be converted to the \
                     BEIR layout",
                );
            }
            return Err(malformed(problem));
        }
        for (index, name) in [(0, "query-id"), (1, "corpus-id")] {
            if columns[index].is_empty() {
                return Err(malformed(format!(
                    "column {} ({name}): expected an id, got an empty field",
                    index + 1
                )));
            }
        }
        let score: i32 = columns[2].parse().map_err(|_| {
            malformed(format!(
                "column 3 (score): expected an integer, got `{}`",
                columns[2]
            ))
        })?;
        let (query_id, doc_id) = (columns[0].to_owned(), columns[1].to_owned());
        match seen.entry((query_id.clone(), doc_id.clone())) {
            Entry::Occupied(first) => {
                let (first_line, first_score) = *first.get();
                if first_score != score {
                    return Err(malformed(format!(
                        "query `{query_id}`, document `{doc_id}`: score {score} contradicts \
                         score {first_score} on line {first_line}"
                    )));
                }
                tracing::warn!(
                    "{}:{number}: repeats the judgement on line {first_line} (query `{query_id}`, \
                     document `{doc_id}`); ignored",
                    path.display()
                );
                continue;
            }
            Entry::Vacant(slot) => {
                slot.insert((number, score));
            }
        }
        qrels.push(Judgement {
            query_id,
            doc_id,
            grade: score,
            line: number,
        });
    }
    if qrels.is_empty() {
        return Err(CorpusError::NoRecords {
            path: path.to_path_buf(),
            what: "relevance judgements",
        });
    }
    Ok(qrels)
}

/// A header is recognised by its score column's name rather than by "the score is not a number",
/// so that a corrupt first data row is reported instead of being swallowed as a header.
fn is_qrels_header(columns: &[&str]) -> bool {
    columns.len() == 3
        && ["score", "relevance", "rel", "label"]
            .iter()
            .any(|name| columns[2].eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::format::OnError;
    use crate::corpus::read_queries;
    use crate::corpus::test_util::{read_ok, scifact_dir, write_file};

    #[test]
    fn reads_qrels_with_and_without_header() {
        let dir = tempfile::tempdir().unwrap();
        let with_header = write_file(
            dir.path(),
            "test.tsv",
            b"query-id\tcorpus-id\tscore\r\n1\td1\t1\r\n\r\n1\td2\t2\r\n2\td1\t0",
        );
        let expected: Vec<(String, String, i32)> = vec![
            ("1".into(), "d1".into(), 1),
            ("1".into(), "d2".into(), 2),
            ("2".into(), "d1".into(), 0),
        ];
        assert_eq!(read_qrels(&with_header).unwrap(), expected);
        let without = write_file(dir.path(), "plain.tsv", b"1\td1\t1\n1\td2\t2\n2\td1\t0\n");
        assert_eq!(read_qrels(&without).unwrap(), expected);
        // An exact repeat is dropped rather than counted twice.
        let repeat = write_file(dir.path(), "repeat.tsv", b"1\td1\t1\n1\td1\t1\n");
        assert_eq!(read_qrels(&repeat).unwrap().len(), 1);
    }

    #[test]
    fn bad_qrels_lines_name_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&[u8], &str)] = &[
            (b"query-id\tcorpus-id\tscore\n1\td1\n", "qrels.tsv:2: expected 3 tab-separated columns (query-id, corpus-id, score), got 2"),
            (b"1 d1 1\n", "qrels.tsv:1: expected 3 tab-separated columns (query-id, corpus-id, score), got 1; the columns must be separated by tabs"),
            (b"1\t0\td1\t1\n", "got 4; TREC-style qrels"),
            (b"1\td1\t1\n\n1\td2\t1.0\n", "qrels.tsv:3: column 3 (score): expected an integer, got `1.0`"),
            (b"1\td1\tx\n", "qrels.tsv:1: column 3 (score): expected an integer, got `x`"),
            (b"\td1\t1\n", "qrels.tsv:1: column 1 (query-id): expected an id, got an empty field"),
            (b"1\td1\t1\n1\td1\t2\n", "qrels.tsv:2: query `1`, document `d1`: score 2 contradicts score 1 on line 1"),
            (b"1\td\xFF\t1\n", "qrels.tsv:1: invalid UTF-8 at byte offset 3"),
            (b"query-id\tcorpus-id\tscore\n", "qrels.tsv: no relevance judgements found"),
        ];
        for (body, expected) in cases {
            let path = write_file(dir.path(), "qrels.tsv", body);
            let err = read_qrels(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        let err = read_qrels(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("is a directory; expected a qrels TSV file"),
            "{err}"
        );
    }

    #[test]
    fn scifact_queries_and_qrels_read_and_agree() {
        let Some(dir) = scifact_dir() else { return };
        let queries = read_queries(&dir).unwrap();
        assert_eq!(queries.len(), 1109);
        let test = read_qrels(&dir.join("qrels/test.tsv")).unwrap();
        assert_eq!(test.len(), 339);
        let train = read_qrels(&dir.join("qrels/train.tsv")).unwrap();
        assert_eq!(train.len(), 919);

        let query_ids: std::collections::HashSet<&str> =
            queries.iter().map(|(id, _)| id.as_str()).collect();
        let (docs, _) = read_ok(&dir, OnError::Fail);
        let doc_ids: std::collections::HashSet<&str> = docs.iter().map(|d| d.id.as_str()).collect();
        for (q, d, score) in test.iter().chain(&train) {
            assert!(
                query_ids.contains(q.as_str()),
                "qrels query {q} not in queries.jsonl"
            );
            assert!(
                doc_ids.contains(d.as_str()),
                "qrels doc {d} not in corpus.jsonl"
            );
            assert!(*score > 0);
        }
        let test_queries: std::collections::HashSet<&str> =
            test.iter().map(|(q, _, _)| q.as_str()).collect();
        assert_eq!(test_queries.len(), 300);
    }
}
