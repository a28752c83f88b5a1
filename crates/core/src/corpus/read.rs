//! [`read_corpus`]: streams a corpus file into [`Document`]s in file order. Blank lines are
//! ignored; malformed lines, non-UTF-8 lines and duplicate ids fail the read or are skipped
//! ([`OnError`]); empty documents are kept or skipped (`allow_empty`); whatever is skipped or
//! flagged is listed in the [`CorpusReport`]; a read that yields no document is an error.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::path::Path;

use super::document::Document;
use super::error::CorpusError;
use super::format::{detect_format, resolve_corpus_path, CorpusFormat, OnError, ReadOptions};
use super::lines::{Decoded, LineReader};
use super::record::parse_document;
use super::report::{record, CorpusReport};

/// Reads a corpus: a BEIR `corpus.jsonl` or dataset directory, a plain JSONL file or a text file
/// (see the module docs), detecting the format unless `opts.format` forces one.
///
/// Returns the documents in file order and a report of every line skipped or flagged. With
/// [`OnError::Fail`] the first malformed line, non-UTF-8 line or duplicate id is an error; empty
/// documents are governed by `allow_empty` alone, since they are valid records. A corpus that
/// yields no document is an error ([`CorpusError::NoDocuments`]).
pub fn read_corpus(
    path: &Path,
    opts: &ReadOptions,
) -> Result<(Vec<Document>, CorpusReport), CorpusError> {
    let (file, format) = match opts.format {
        Some(format) => (resolve_corpus_path(path)?, format),
        None => detect_format(path)?,
    };
    let mut lines = LineReader::open(&file)?;
    let mut report = CorpusReport {
        path: file.clone(),
        format: Some(format),
        empty_kept: opts.allow_empty,
        ..CorpusReport::default()
    };
    let mut docs = Vec::new();
    // The first occurrence of an id claims it even when that record is then skipped as empty,
    // so "first occurrence wins" holds no matter which copies are empty.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let skip = opts.on_error == OnError::Skip;

    while let Some(line) = lines.next_line()? {
        let number = line.number;
        let text = match line.decode() {
            Decoded::Blank => continue,
            Decoded::BadUtf8 {
                offset,
                file_offset,
            } => {
                if !skip {
                    return Err(CorpusError::InvalidUtf8 {
                        path: file.clone(),
                        line: number,
                        offset,
                        file_offset,
                    });
                }
                record(
                    &mut report.non_utf8,
                    number,
                    None,
                    format!(
                        "invalid UTF-8 at byte offset {offset} of the line (byte {file_offset} \
                         of the file); line skipped"
                    ),
                );
                continue;
            }
            Decoded::Text(text) => text,
        };

        let doc = match format {
            CorpusFormat::Text => Ok(Document {
                id: number.to_string(),
                title: String::new(),
                text: text.to_owned(),
            }),
            CorpusFormat::Beir => parse_document(text, "_id"),
            CorpusFormat::Jsonl => parse_document(text, "id"),
        };
        let doc = match doc {
            Ok(doc) => doc,
            Err(bad) => {
                if !skip {
                    return Err(bad.into_error(&file, number));
                }
                let problem = format!("{}; line skipped", bad.problem);
                record(&mut report.skipped_malformed, number, bad.id, problem);
                continue;
            }
        };

        match seen.entry(doc.id.clone()) {
            Entry::Occupied(first) => {
                let first_line = *first.get();
                if !skip {
                    return Err(CorpusError::DuplicateId {
                        path: file.clone(),
                        line: number,
                        id: doc.id,
                        first_line,
                    });
                }
                let problem = format!(
                    "duplicate id `{}`: first seen on line {first_line}, the occurrence on line \
                     {number} is skipped",
                    doc.id
                );
                record(&mut report.duplicates, number, Some(doc.id), problem);
                continue;
            }
            Entry::Vacant(slot) => {
                slot.insert(number);
            }
        }

        if doc.text.trim().is_empty() && doc.title.trim().is_empty() {
            let problem = if opts.allow_empty {
                "empty text and title; kept (allow_empty)"
            } else {
                "empty text and title; skipped (allow empty documents to keep it)"
            };
            record(
                &mut report.empty,
                number,
                Some(doc.id.clone()),
                problem.into(),
            );
            if !opts.allow_empty {
                continue;
            }
        }
        docs.push(doc);
    }

    report.read = docs.len();
    if docs.is_empty() {
        return Err(CorpusError::NoDocuments {
            report: Box::new(report),
        });
    }
    Ok((docs, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::corpus_fingerprint;
    use crate::corpus::test_util::{doc, ids, opts, read_err, read_ok, scifact_dir, write_file};

    #[test]
    fn reads_beir_with_numeric_ids_missing_titles_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "corpus.jsonl",
            br#"{"_id": "d1", "title": "Title one", "text": "Body one.", "metadata": {"x": 1}}
{"_id": 42, "text": "No title here."}
{"_id": "d3", "title": "", "text": "Empty title."}
{"_id": "d4", "title": null, "text": "Null title."}
"#,
        );
        let (docs, report) = read_ok(&path, OnError::Fail);
        assert_eq!(
            docs,
            vec![
                doc("d1", "Title one", "Body one."),
                doc("42", "", "No title here."),
                doc("d3", "", "Empty title."),
                doc("d4", "", "Null title."),
            ]
        );
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.read, 4);
        assert_eq!(report.format, Some(CorpusFormat::Beir));
        assert_eq!(docs[0].full_text(), "Title one\nBody one.");
        assert_eq!(docs[1].full_text(), "No title here.");
    }

    #[test]
    fn reads_plain_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "docs.jsonl",
            b"{\"id\": 1, \"text\": \"first\"}\n{\"id\": \"two\", \"text\": \"second\", \"title\": \"T\"}\n",
        );
        let (docs, report) = read_ok(&path, OnError::Fail);
        assert_eq!(docs, vec![doc("1", "", "first"), doc("two", "T", "second")]);
        assert_eq!(report.format, Some(CorpusFormat::Jsonl));
    }

    #[test]
    fn reads_text_one_document_per_line() {
        let dir = tempfile::tempdir().unwrap();
        // BOM, CRLF, blank and whitespace-only lines, no final newline.
        let path = write_file(
            dir.path(),
            "docs.txt",
            b"\xEF\xBB\xBFfirst line\r\n\r\n   \nthird doc\r\nlast without newline",
        );
        let (docs, report) = read_ok(&path, OnError::Fail);
        assert_eq!(
            docs,
            vec![
                doc("1", "", "first line"),
                doc("4", "", "third doc"),
                doc("5", "", "last without newline"),
            ]
        );
        assert_eq!(report.format, Some(CorpusFormat::Text));
        assert!(report.is_clean());
    }

    #[test]
    fn empty_documents_are_reported_and_skipped_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "corpus.jsonl",
            br#"{"_id":"a","text":"body"}
{"_id":"b","title":"","text":"  "}
{"_id":"c","title":"Title only","text":""}
{"_id":"d","text":""}
"#,
        );
        for on_error in [OnError::Fail, OnError::Skip] {
            let (docs, report) = read_ok(&path, on_error);
            assert_eq!(ids(&docs), ["a", "c"]);
            let empty: Vec<_> = report
                .empty
                .iter()
                .map(|i| (i.line, i.id.clone()))
                .collect();
            assert_eq!(empty, [(2, Some("b".into())), (4, Some("d".into()))]);
            assert!(report.empty[0].problem.contains("skipped"));
            assert_eq!(report.skipped(), 2);

            let allow = ReadOptions {
                on_error,
                allow_empty: true,
                ..ReadOptions::default()
            };
            let (docs, report) = read_corpus(&path, &allow).unwrap();
            assert_eq!(ids(&docs), ["a", "b", "c", "d"]);
            assert_eq!(report.empty.len(), 2);
            assert!(report.empty[0].problem.contains("kept"));
            assert!(report.empty_kept);
            assert_eq!(report.skipped(), 0);
        }
    }

    #[test]
    fn duplicate_ids_keep_the_first_occurrence() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "corpus.jsonl",
            b"{\"_id\":\"a\",\"text\":\"first\"}\n{\"_id\":\"b\",\"text\":\"b\"}\n\n{\"_id\":\"a\",\"text\":\"second\"}\n{\"_id\":1,\"text\":\"n\"}\n{\"_id\":\"1\",\"text\":\"s\"}\n",
        );
        let (docs, report) = read_ok(&path, OnError::Skip);
        assert_eq!(
            docs,
            vec![doc("a", "", "first"), doc("b", "", "b"), doc("1", "", "n")]
        );
        assert_eq!(report.duplicates.len(), 2);
        let dup = &report.duplicates[0];
        assert_eq!((dup.line, dup.id.as_deref()), (4, Some("a")));
        assert!(
            dup.problem.contains("line 1") && dup.problem.contains("line 4"),
            "{}",
            dup.problem
        );
        // A numeric id and its string form are the same id.
        assert_eq!(report.duplicates[1].line, 6);

        let err = read_err(&path, OnError::Fail);
        assert!(
            err.contains("corpus.jsonl:4: duplicate id `a` (first seen on line 1)"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_first_occurrence_still_claims_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "corpus.jsonl",
            b"{\"_id\":\"a\",\"text\":\"\"}\n{\"_id\":\"a\",\"text\":\"later\"}\n{\"_id\":\"b\",\"text\":\"x\"}\n",
        );
        let (docs, report) = read_ok(&path, OnError::Skip);
        assert_eq!(ids(&docs), ["b"]);
        assert_eq!((report.empty.len(), report.duplicates.len()), (1, 1));
        assert_eq!(report.skipped(), 2);
    }

    #[test]
    fn non_utf8_lines_are_reported_with_line_and_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = b"{\"_id\":\"a\",\"text\":\"ok\"}\r\n\r\n".to_vec();
        let bad_line_start = body.len();
        body.extend_from_slice(
            b"{\"_id\":\"b\",\"text\":\"caf\xE9\"}\r\n{\"_id\":\"c\",\"text\":\"ok\"}",
        );
        let path = write_file(dir.path(), "corpus.jsonl", &body);

        let (docs, report) = read_ok(&path, OnError::Skip);
        assert_eq!(ids(&docs), ["a", "c"]);
        assert_eq!(report.non_utf8.len(), 1);
        assert_eq!(report.non_utf8[0].line, 3);
        assert!(report.non_utf8[0].problem.contains("byte offset 22"));

        let err = read_corpus(&path, &opts(OnError::Fail)).unwrap_err();
        match &err {
            CorpusError::InvalidUtf8 {
                line,
                offset,
                file_offset,
                ..
            } => {
                assert_eq!((*line, *offset), (3, 22));
                assert_eq!(*file_offset, (bad_line_start + 22) as u64);
            }
            other => panic!("unexpected error {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("corpus.jsonl:3: invalid UTF-8 at byte offset 22"),
            "{msg}"
        );
    }

    #[test]
    fn non_utf8_in_text_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "docs.txt", b"good\n\xFF\xFEbad\nalso good\n");
        let (docs, report) = read_ok(&path, OnError::Skip);
        assert_eq!(ids(&docs), ["1", "3"]);
        assert_eq!(report.non_utf8[0].line, 2);
        let err = read_err(&path, OnError::Fail);
        assert!(
            err.contains("docs.txt:2: invalid UTF-8 at byte offset 0"),
            "{err}"
        );
    }

    #[test]
    fn nothing_to_read_is_an_error_that_carries_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write_file(dir.path(), "empty.jsonl", b"\n\n");
        let err = read_err(&empty, OnError::Fail);
        assert!(
            err.contains("no documents could be read") && err.contains("empty.jsonl"),
            "{err}"
        );

        let all_bad = write_file(dir.path(), "bad.jsonl", b"{\"_id\":\"a\",\"text\":\"\"}\n");
        let err = read_corpus(&all_bad, &opts(OnError::Skip)).unwrap_err();
        match &err {
            CorpusError::NoDocuments { report } => assert_eq!(report.empty.len(), 1),
            other => panic!("unexpected error {other}"),
        }
        assert!(
            err.to_string().contains("1 empty document skipped"),
            "{err}"
        );
    }

    #[test]
    fn scifact_corpus_reads_cleanly() {
        let Some(dir) = scifact_dir() else { return };
        for path in [dir.clone(), dir.join("corpus.jsonl")] {
            for on_error in [OnError::Fail, OnError::Skip] {
                let (docs, report) = read_ok(&path, on_error);
                assert_eq!(docs.len(), 5183);
                assert!(report.is_clean(), "{report}");
                assert_eq!(report.read, 5183);
                assert_eq!(report.format, Some(CorpusFormat::Beir));
                assert!(docs
                    .iter()
                    .all(|d| !d.title.is_empty() && !d.text.is_empty()));
                assert_eq!(corpus_fingerprint(&docs).len(), 64);
            }
        }
    }
}
