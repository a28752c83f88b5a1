//! Reading document collections for indexing, and BEIR queries and relevance judgements for
//! evaluation.
//!
//! Three corpus formats are understood:
//!
//! * **BEIR** `corpus.jsonl`: one object per line, `{"_id", "title"?, "text", "metadata"?}`;
//!   a BEIR dataset *directory* is accepted too and resolves to its `corpus.jsonl`.
//! * **plain JSONL**: `{"id", "text", "title"?}`.
//! * **text**: one document per non-blank line, the id being the 1-based line number.
//!
//! Files are streamed line by line as bytes, so one undecodable line is reported with its line
//! number instead of aborting the whole read with a generic I/O error. Nothing is dropped
//! silently: every skipped or questionable line is listed in the [`CorpusReport`], and every
//! error names the file and the 1-based line.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// How many issues of each kind the report's `Display` spells out before summarising the rest.
const REPORT_EXAMPLES: usize = 5;

/// How many non-blank lines format detection looks at before giving up. Bounded so that a huge
/// file of garbage fails fast instead of being read twice.
const DETECT_MAX_LINES: usize = 1000;

/// One document of a corpus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The document id, unique within the corpus (numeric ids are stringified).
    pub id: String,
    /// The title; empty when the source has none.
    pub title: String,
    /// The body text.
    pub text: String,
}

impl Document {
    /// The text to embed: `"title\ntext"` when the title is non-empty (the BEIR convention of
    /// encoding title and body together), otherwise just the text.
    pub fn full_text(&self) -> String {
        if self.title.trim().is_empty() {
            self.text.clone()
        } else if self.text.trim().is_empty() {
            // A title-only document would otherwise end in a dangling newline, which changes
            // its tokenisation for no benefit.
            self.title.clone()
        } else {
            format!("{}\n{}", self.title, self.text)
        }
    }
}

/// The layout of a corpus file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorpusFormat {
    /// BEIR `corpus.jsonl` (`_id`, `title`, `text`), or a BEIR dataset directory.
    Beir,
    /// Plain JSON Lines (`id`, `text`, optional `title`).
    Jsonl,
    /// One document per non-blank line; the id is the 1-based line number.
    Text,
}

impl CorpusFormat {
    /// The lowercase name used on the command line and in metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            CorpusFormat::Beir => "beir",
            CorpusFormat::Jsonl => "jsonl",
            CorpusFormat::Text => "text",
        }
    }
}

impl fmt::Display for CorpusFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CorpusFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "beir" => Ok(CorpusFormat::Beir),
            "jsonl" | "json" => Ok(CorpusFormat::Jsonl),
            "text" | "txt" => Ok(CorpusFormat::Text),
            other => Err(format!(
                "unknown corpus format `{other}` (expected beir, jsonl or text)"
            )),
        }
    }
}

/// What to do with a malformed line (bad JSON, missing or ill-typed field, non-UTF-8 bytes) or
/// a duplicate id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop at the first such line with an error naming the file and line.
    #[default]
    Fail,
    /// Skip the line and record it in the [`CorpusReport`].
    Skip,
}

impl FromStr for OnError {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            other => Err(format!(
                "unknown error policy `{other}` (expected fail or skip)"
            )),
        }
    }
}

/// Options for [`read_corpus`]. The default detects the format, fails on the first malformed
/// line and skips (but reports) empty documents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Force a format instead of detecting it.
    pub format: Option<CorpusFormat>,
    /// Whether malformed lines and duplicate ids are fatal or skipped.
    pub on_error: OnError,
    /// Keep documents whose text and title are both empty (they are reported either way).
    pub allow_empty: bool,
}

/// A line that was skipped or deserves the user's attention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineIssue {
    /// 1-based physical line number (blank lines count).
    pub line: usize,
    /// The document id, when the line got far enough for it to be known.
    pub id: Option<String>,
    /// What was wrong and what happened to the line.
    pub problem: String,
}

impl fmt::Display for LineIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(id) = &self.id {
            write!(f, " (id `{id}`)")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// What [`read_corpus`] did: how many documents it returned and every line it skipped or
/// flagged. Its `Display` is a human summary: counts, then the first few issues of each kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusReport {
    /// The file actually read (a BEIR directory resolves to its `corpus.jsonl`).
    pub path: PathBuf,
    /// The format used, detected or forced; `None` only in a default-constructed report.
    pub format: Option<CorpusFormat>,
    /// Number of documents returned.
    pub read: usize,
    /// Lines skipped for bad JSON or a missing, ill-typed or empty required field.
    pub skipped_malformed: Vec<LineIssue>,
    /// Documents whose text and title are both empty; kept when `empty_kept`, else skipped.
    pub empty: Vec<LineIssue>,
    /// Later occurrences of an id already seen; the first occurrence is the one kept.
    pub duplicates: Vec<LineIssue>,
    /// Lines skipped because they are not valid UTF-8.
    pub non_utf8: Vec<LineIssue>,
    /// Whether the documents listed in `empty` were kept (`allow_empty`) rather than skipped.
    pub empty_kept: bool,
}

impl CorpusReport {
    /// True when no line was skipped or flagged.
    pub fn is_clean(&self) -> bool {
        self.skipped_malformed.is_empty()
            && self.empty.is_empty()
            && self.duplicates.is_empty()
            && self.non_utf8.is_empty()
    }

    /// Number of non-blank lines that did not become a document.
    pub fn skipped(&self) -> usize {
        let empty_skipped = if self.empty_kept { 0 } else { self.empty.len() };
        self.skipped_malformed.len() + self.duplicates.len() + self.non_utf8.len() + empty_skipped
    }

    fn categories(&self) -> [(&'static str, &'static str, &[LineIssue]); 4] {
        let empty_verb = if self.empty_kept { "kept" } else { "skipped" };
        [
            ("malformed line", "skipped", &self.skipped_malformed),
            ("non-UTF-8 line", "skipped", &self.non_utf8),
            ("duplicate id", "skipped", &self.duplicates),
            ("empty document", empty_verb, &self.empty),
        ]
    }
}

fn plural(n: usize, noun: &str) -> String {
    format!("{n} {}", noun_form(n, noun))
}

fn noun_form(n: usize, noun: &str) -> String {
    if n == 1 {
        noun.to_owned()
    } else {
        format!("{noun}s")
    }
}

impl fmt::Display for CorpusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "read {} from {}",
            plural(self.read, "document"),
            self.path.display()
        )?;
        if let Some(format) = self.format {
            write!(f, " ({format})")?;
        }
        if self.is_clean() {
            return write!(f, "; no problems");
        }
        let categories = self.categories();
        let counts: Vec<String> = categories
            .iter()
            .filter(|(_, _, issues)| !issues.is_empty())
            .map(|(noun, verb, issues)| format!("{} {verb}", plural(issues.len(), noun)))
            .collect();
        write!(f, "; {}", counts.join(", "))?;
        for (noun, _, issues) in categories {
            for issue in issues.iter().take(REPORT_EXAMPLES) {
                write!(f, "\n  {issue}")?;
            }
            if issues.len() > REPORT_EXAMPLES {
                let more = issues.len() - REPORT_EXAMPLES;
                write!(f, "\n  ... and {more} more {}", noun_form(more, noun))?;
            }
        }
        Ok(())
    }
}

/// Why a corpus, query or qrels file could not be read. Every message names the file, and the
/// 1-based line where there is one, and says what was expected.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// The file could not be opened.
    #[error("{}: cannot open: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading failed part-way through.
    #[error("{}:{line}: read error: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The line being read when it failed.
        line: usize,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A directory was given where a file was expected.
    #[error("{}: is a directory; expected {expected}", path.display())]
    IsDirectory {
        /// The directory.
        path: PathBuf,
        /// What should have been given instead.
        expected: &'static str,
    },
    /// A BEIR dataset directory lacks the file needed.
    #[error(
        "{}: no {file} in this directory (a BEIR dataset directory holds corpus.jsonl, \
         queries.jsonl and qrels/*.tsv)",
        dir.display()
    )]
    MissingBeirFile {
        /// The directory.
        dir: PathBuf,
        /// The file that should be in it.
        file: &'static str,
    },
    /// The file is of a kind this reader does not handle (e.g. compressed).
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The corpus format could not be detected from the file's first records.
    #[error(
        "{}: cannot detect the corpus format: {reason}; pass an explicit format (beir, jsonl \
         or text)",
        path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// What detection saw.
        reason: String,
    },
    /// A line is not a valid record: bad JSON, a missing, ill-typed or empty field, a wrong
    /// column count.
    #[error("{}:{line}: {problem}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The record's id, when it could be read.
        id: Option<String>,
        /// What was wrong and what was expected.
        problem: String,
    },
    /// A line is not valid UTF-8.
    #[error(
        "{}:{line}: invalid UTF-8 at byte offset {offset} of the line (byte {file_offset} of the \
         file); the file must be UTF-8 encoded",
        path.display()
    )]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// 0-based byte offset of the first bad byte within the line.
        offset: usize,
        /// 0-based byte offset of the first bad byte within the file.
        file_offset: u64,
    },
    /// An id occurs twice.
    #[error("{}:{line}: duplicate id `{id}` (first seen on line {first_line})", path.display())]
    DuplicateId {
        /// The file.
        path: PathBuf,
        /// 1-based line of the repeated occurrence.
        line: usize,
        /// The id.
        id: String,
        /// 1-based line of the first occurrence.
        first_line: usize,
    },
    /// The corpus yielded no document at all (empty file, or everything skipped).
    #[error("no documents could be read: {report}")]
    NoDocuments {
        /// What was read and skipped.
        report: Box<CorpusReport>,
    },
    /// A queries or qrels file holds no records.
    #[error("{}: no {what} found", path.display())]
    NoRecords {
        /// The file.
        path: PathBuf,
        /// What was expected, e.g. "queries".
        what: &'static str,
    },
}

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

/// Works out which file to read and in which format: a directory is a BEIR dataset (its
/// `corpus.jsonl`); a `.jsonl`/`.json` file is BEIR when its first JSON object has `_id` and
/// plain JSONL when it has `id`; anything else is text.
pub fn detect_format(path: &Path) -> Result<(PathBuf, CorpusFormat), CorpusError> {
    if path.is_dir() {
        return Ok((resolve_corpus_path(path)?, CorpusFormat::Beir));
    }
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
    if !is_json {
        return Ok((path.to_path_buf(), CorpusFormat::Text));
    }

    let mut lines = LineReader::open(path)?;
    // Looking past unparsable lines lets a skip-mode read survive a bad first line; a fail-mode
    // read then reports that line precisely instead of a vaguer detection error.
    let mut first_problem: Option<String> = None;
    let mut looked = 0;
    while let Some(line) = lines.next_line()? {
        let number = line.number;
        let text = match line.decode() {
            Decoded::Blank => continue,
            Decoded::BadUtf8 { offset, .. } => {
                first_problem.get_or_insert_with(|| {
                    format!("line {number}: invalid UTF-8 at byte offset {offset}")
                });
                looked += 1;
                if looked >= DETECT_MAX_LINES {
                    break;
                }
                continue;
            }
            Decoded::Text(text) => text,
        };
        looked += 1;
        match parse_object(text) {
            Ok(object) => {
                return if object.contains_key("_id") {
                    Ok((path.to_path_buf(), CorpusFormat::Beir))
                } else if object.contains_key("id") {
                    Ok((path.to_path_buf(), CorpusFormat::Jsonl))
                } else {
                    Err(CorpusError::UnknownFormat {
                        path: path.to_path_buf(),
                        reason: format!(
                            "the first record (line {number}) has neither `_id` (BEIR) nor `id` \
                             (plain JSONL); its keys are {}",
                            key_list(&object)
                        ),
                    })
                };
            }
            Err(bad) => {
                first_problem.get_or_insert_with(|| format!("line {number}: {}", bad.problem));
            }
        }
        if looked >= DETECT_MAX_LINES {
            break;
        }
    }
    match first_problem {
        Some(problem) => Err(CorpusError::UnknownFormat {
            path: path.to_path_buf(),
            reason: format!("no JSON object in the first {looked} non-blank lines ({problem})"),
        }),
        // Nothing but blank lines: the format does not matter, the read will report that no
        // document was found.
        None => Ok((path.to_path_buf(), CorpusFormat::Beir)),
    }
}

/// Fingerprint of a corpus for index metadata: SHA-256 (lowercase hex) over every document's
/// id, title and text, in order. Each field is length-prefixed so that moving bytes between
/// fields or documents changes the hash; the order of documents matters because it fixes the
/// index's internal numbering.
pub fn corpus_fingerprint(docs: &[Document]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"search-r3 corpus v1\0");
    hasher.update((docs.len() as u64).to_le_bytes());
    for doc in docs {
        for field in [&doc.id, &doc.title, &doc.text] {
            hasher.update((field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

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
pub struct Judgement {
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
pub fn read_qrels_lines(path: &Path) -> Result<Vec<Judgement>, CorpusError> {
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

fn record(list: &mut Vec<LineIssue>, line: usize, id: Option<String>, problem: String) {
    tracing::debug!(line, ?id, "{problem}");
    list.push(LineIssue { line, id, problem });
}

fn resolve_corpus_path(path: &Path) -> Result<PathBuf, CorpusError> {
    resolve_beir_file(path, "corpus.jsonl")
}

fn resolve_beir_file(path: &Path, name: &'static str) -> Result<PathBuf, CorpusError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let file = path.join(name);
    if file.is_file() {
        Ok(file)
    } else {
        Err(CorpusError::MissingBeirFile {
            dir: path.to_path_buf(),
            file: name,
        })
    }
}

/// A problem with one record, before it is tied to a file and line.
struct BadRecord {
    id: Option<String>,
    problem: String,
}

impl BadRecord {
    fn new(problem: String) -> Self {
        BadRecord { id: None, problem }
    }

    fn with_id(mut self, id: &str) -> Self {
        self.id = Some(id.to_owned());
        self
    }

    fn into_error(self, path: &Path, line: usize) -> CorpusError {
        CorpusError::Malformed {
            path: path.to_path_buf(),
            line,
            id: self.id,
            problem: self.problem,
        }
    }
}

fn parse_document(line: &str, id_field: &str) -> Result<Document, BadRecord> {
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

fn parse_object(line: &str) -> Result<Map<String, Value>, BadRecord> {
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
fn take_id(object: &Map<String, Value>, field: &str) -> Result<String, BadRecord> {
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

fn take_text(object: &mut Map<String, Value>) -> Result<String, BadRecord> {
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

fn key_list(object: &Map<String, Value>) -> String {
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

/// Streams a file line by line as raw bytes, so that a line which is not UTF-8 can be reported
/// (with its number) rather than ending the read with an opaque I/O error. One buffer is reused
/// for every line.
struct LineReader<'p> {
    path: &'p Path,
    reader: BufReader<File>,
    buf: Vec<u8>,
    number: usize,
    next_offset: u64,
}

/// One physical line without its terminator (`\n` or `\r\n`) and, on line 1, without a BOM.
struct RawLine<'a> {
    number: usize,
    /// File offset of `bytes[0]`.
    offset: u64,
    bytes: &'a [u8],
}

enum Decoded<'a> {
    Blank,
    Text(&'a str),
    BadUtf8 { offset: usize, file_offset: u64 },
}

impl<'p> LineReader<'p> {
    fn open(path: &'p Path) -> Result<Self, CorpusError> {
        if path.is_dir() {
            return Err(CorpusError::IsDirectory {
                path: path.to_path_buf(),
                expected: "a file",
            });
        }
        let file = File::open(path).map_err(|source| CorpusError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let head = reader.fill_buf().map_err(|source| CorpusError::Read {
            path: path.to_path_buf(),
            line: 1,
            source,
        })?;
        if let Some(kind) = compression(head) {
            return Err(CorpusError::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "this is a {kind}-compressed file; decompress it first (corpora are read as \
                     plain UTF-8 text)"
                ),
            });
        }
        Ok(LineReader {
            path,
            reader,
            buf: Vec::new(),
            number: 0,
            next_offset: 0,
        })
    }

    fn next_line(&mut self) -> Result<Option<RawLine<'_>>, CorpusError> {
        self.buf.clear();
        let read = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|source| CorpusError::Read {
                path: self.path.to_path_buf(),
                line: self.number + 1,
                source,
            })?;
        if read == 0 {
            return Ok(None);
        }
        self.number += 1;
        let mut end = read;
        if self.buf[end - 1] == b'\n' {
            end -= 1;
        }
        // Also strips a stray CR on a last line that has no final newline.
        if end > 0 && self.buf[end - 1] == b'\r' {
            end -= 1;
        }
        let start = if self.number == 1 && self.buf[..end].starts_with(UTF8_BOM) {
            UTF8_BOM.len()
        } else {
            0
        };
        let offset = self.next_offset + start as u64;
        self.next_offset += read as u64;
        Ok(Some(RawLine {
            number: self.number,
            offset,
            bytes: &self.buf[start..end],
        }))
    }
}

impl<'a> RawLine<'a> {
    fn decode(&self) -> Decoded<'a> {
        match std::str::from_utf8(self.bytes) {
            Ok(text) if text.trim().is_empty() => Decoded::Blank,
            Ok(text) => Decoded::Text(text),
            Err(e) => Decoded::BadUtf8 {
                offset: e.valid_up_to(),
                file_offset: self.offset + e.valid_up_to() as u64,
            },
        }
    }
}

fn compression(head: &[u8]) -> Option<&'static str> {
    const MAGIC: [(&[u8], &str); 4] = [
        (b"\x1f\x8b", "gzip"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh", "bzip2"),
        (b"\xfd7zXZ\x00", "xz"),
    ];
    // "BZh" alone could begin an ordinary text line, so bzip2 also needs its block-size digit
    // and block magic.
    MAGIC.iter().find_map(|(magic, kind)| {
        let matched = head.starts_with(magic)
            && (*kind != "bzip2"
                || (head.len() >= 10
                    && head[3].is_ascii_digit()
                    && head[4..10] == *b"\x31\x41\x59\x26\x53\x59"));
        matched.then_some(*kind)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    fn opts(on_error: OnError) -> ReadOptions {
        ReadOptions {
            on_error,
            ..ReadOptions::default()
        }
    }

    fn read_ok(path: &Path, on_error: OnError) -> (Vec<Document>, CorpusReport) {
        read_corpus(path, &opts(on_error)).unwrap()
    }

    fn read_err(path: &Path, on_error: OnError) -> String {
        read_corpus(path, &opts(on_error)).unwrap_err().to_string()
    }

    fn ids(docs: &[Document]) -> Vec<&str> {
        docs.iter().map(|d| d.id.as_str()).collect()
    }

    fn doc(id: &str, title: &str, text: &str) -> Document {
        Document {
            id: id.into(),
            title: title.into(),
            text: text.into(),
        }
    }

    /// The SciFact dataset shipped with the project; `None` (and a note) when it is absent.
    fn scifact_dir() -> Option<PathBuf> {
        let candidates = [
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/scifact"),
            PathBuf::from("/work/shared/datasets/scifact"),
        ];
        let found = candidates
            .into_iter()
            .find(|dir| dir.join("corpus.jsonl").is_file());
        if found.is_none() {
            eprintln!("note: SciFact not found under shared/datasets/scifact; test skipped");
        }
        found
    }

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
    fn full_text_of_title_only_document_has_no_dangling_newline() {
        assert_eq!(doc("a", "Only title", "").full_text(), "Only title");
        assert_eq!(doc("a", "  ", "text").full_text(), "text");
    }

    #[test]
    fn reads_beir_directory() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "corpus.jsonl", br#"{"_id":"a","text":"x"}"#);
        let (docs, report) = read_ok(dir.path(), OnError::Fail);
        assert_eq!(ids(&docs), ["a"]);
        assert_eq!(report.path, dir.path().join("corpus.jsonl"));
        assert_eq!(
            detect_format(dir.path()).unwrap(),
            (dir.path().join("corpus.jsonl"), CorpusFormat::Beir)
        );
    }

    #[test]
    fn directory_without_corpus_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_err(dir.path(), OnError::Fail);
        assert!(err.contains("no corpus.jsonl in this directory"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
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
    fn detects_formats() {
        let dir = tempfile::tempdir().unwrap();
        let beir = write_file(dir.path(), "a.jsonl", b"\n{\"_id\":\"1\",\"text\":\"t\"}\n");
        let plain = write_file(dir.path(), "b.json", b"{\"id\":\"1\",\"text\":\"t\"}\n");
        let upper = write_file(dir.path(), "c.JSONL", b"{\"id\":\"1\",\"text\":\"t\"}\n");
        let text = write_file(dir.path(), "d.txt", b"{\"_id\":\"1\",\"text\":\"t\"}\n");
        let bare = write_file(dir.path(), "e", b"hello\n");
        let format = |p: &Path| detect_format(p).unwrap().1;
        assert_eq!(format(&beir), CorpusFormat::Beir);
        assert_eq!(format(&plain), CorpusFormat::Jsonl);
        assert_eq!(format(&upper), CorpusFormat::Jsonl);
        assert_eq!(format(&text), CorpusFormat::Text);
        assert_eq!(format(&bare), CorpusFormat::Text);
        // BEIR wins when a record has both keys.
        let both = write_file(
            dir.path(),
            "f.jsonl",
            b"{\"_id\":\"1\",\"id\":2,\"text\":\"t\"}\n",
        );
        assert_eq!(format(&both), CorpusFormat::Beir);
    }

    #[test]
    fn detection_looks_past_a_malformed_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "a.jsonl",
            b"{broken\n{\"id\":\"1\",\"text\":\"t\"}\n",
        );
        assert_eq!(detect_format(&path).unwrap().1, CorpusFormat::Jsonl);
        let (docs, report) = read_ok(&path, OnError::Skip);
        assert_eq!(ids(&docs), ["1"]);
        assert_eq!(report.skipped_malformed[0].line, 1);
        let err = read_err(&path, OnError::Fail);
        assert!(err.contains("a.jsonl:1: invalid JSON"), "{err}");
    }

    #[test]
    fn undetectable_jsonl_asks_for_an_explicit_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "a.jsonl", b"{\"doc\":\"1\",\"body\":\"t\"}\n");
        let err = read_err(&path, OnError::Skip);
        assert!(err.contains("cannot detect the corpus format"), "{err}");
        assert!(
            err.contains("`body`, `doc`") || err.contains("`doc`, `body`"),
            "{err}"
        );
        assert!(err.contains("pass an explicit format"), "{err}");

        let garbage = write_file(dir.path(), "b.jsonl", b"not json\n[1]\n");
        let err = read_err(&garbage, OnError::Skip);
        assert!(
            err.contains("no JSON object in the first 2 non-blank lines"),
            "{err}"
        );
        assert!(err.contains("line 1: invalid JSON"), "{err}");
    }

    #[test]
    fn explicit_format_overrides_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "a.jsonl", b"{\"_id\":\"1\",\"text\":\"t\"}\n");
        let forced = ReadOptions {
            format: Some(CorpusFormat::Text),
            ..ReadOptions::default()
        };
        let (docs, report) = read_corpus(&path, &forced).unwrap();
        assert_eq!(docs, vec![doc("1", "", "{\"_id\":\"1\",\"text\":\"t\"}")]);
        assert_eq!(report.format, Some(CorpusFormat::Text));

        let forced = ReadOptions {
            format: Some(CorpusFormat::Jsonl),
            ..ReadOptions::default()
        };
        let err = read_corpus(&path, &forced).unwrap_err().to_string();
        assert!(
            err.contains("a.jsonl:1: missing field `id`") && err.contains("as in the beir format"),
            "{err}"
        );
    }

    #[test]
    fn parses_format_and_policy_names() {
        assert_eq!("BEIR".parse::<CorpusFormat>(), Ok(CorpusFormat::Beir));
        assert_eq!("jsonl".parse::<CorpusFormat>(), Ok(CorpusFormat::Jsonl));
        assert_eq!("text".parse::<CorpusFormat>(), Ok(CorpusFormat::Text));
        assert!("csv".parse::<CorpusFormat>().unwrap_err().contains("csv"));
        assert_eq!("skip".parse::<OnError>(), Ok(OnError::Skip));
        assert_eq!(OnError::default(), OnError::Fail);
        assert_eq!(CorpusFormat::Beir.to_string(), "beir");
    }

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
    fn line_numbers_count_blank_lines_crlf_and_bom() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            dir.path(),
            "corpus.jsonl",
            b"\xEF\xBB\xBF{\"_id\":\"a\",\"text\":\"x\"}\r\n\r\n  \r\n\n{\"_id\":\"b\",\"text\":\"y\"}\r\n{\"_id\":\"c\"}\r\n",
        );
        let err = read_err(&path, OnError::Fail);
        assert!(
            err.contains("corpus.jsonl:6: missing field `text`"),
            "{err}"
        );
        let (docs, report) = read_ok(&path, OnError::Skip);
        assert_eq!(docs, vec![doc("a", "", "x"), doc("b", "", "y")]);
        assert_eq!(report.skipped_malformed[0].line, 6);
    }

    #[test]
    fn json_columns_ignore_the_bom() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "corpus.jsonl", b"\xEF\xBB\xBF{\"_id\" 1}\n");
        let forced = ReadOptions {
            format: Some(CorpusFormat::Beir),
            ..ReadOptions::default()
        };
        let err = read_corpus(&path, &forced).unwrap_err().to_string();
        assert!(
            err.contains("corpus.jsonl:1: invalid JSON (expected `:` at column 8)"),
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
    fn missing_file_and_compressed_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        let err = read_err(&missing, OnError::Fail);
        assert!(err.contains("nope.jsonl: cannot open"), "{err}");

        let gz = write_file(dir.path(), "corpus.jsonl.gz", b"\x1f\x8b\x08\x00rest");
        let err = read_err(&gz, OnError::Skip);
        assert!(
            err.contains("corpus.jsonl.gz: this is a gzip-compressed file"),
            "{err}"
        );

        // Text that merely starts like a bzip2 header is still text.
        let bz = write_file(dir.path(), "words.txt", b"BZh is not compressed\n");
        assert_eq!(read_ok(&bz, OnError::Fail).0.len(), 1);
    }

    #[test]
    fn report_display_summarises_counts_and_first_issues() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = String::from("{\"_id\":\"a\",\"text\":\"x\"}\n");
        for _ in 0..7 {
            body.push_str("{oops\n");
        }
        body.push_str("{\"_id\":\"a\",\"text\":\"dup\"}\n{\"_id\":\"e\",\"text\":\"\"}\n");
        let path = write_file(dir.path(), "corpus.jsonl", body.as_bytes());
        let (_, report) = read_ok(&path, OnError::Skip);
        let shown = report.to_string();
        assert!(shown.starts_with("read 1 document from "), "{shown}");
        assert!(
            shown.contains(
                "(beir); 7 malformed lines skipped, 1 duplicate id skipped, 1 empty document \
                 skipped"
            ),
            "{shown}"
        );
        assert!(shown.contains("\n  line 2: invalid JSON"), "{shown}");
        assert!(shown.contains("\n  line 6: invalid JSON"), "{shown}");
        assert!(!shown.contains("\n  line 7: invalid JSON"), "{shown}");
        assert!(shown.contains("... and 2 more malformed lines"), "{shown}");
        assert!(
            shown.contains("line 9 (id `a`): duplicate id `a`"),
            "{shown}"
        );
        assert!(
            shown.contains("line 10 (id `e`): empty text and title"),
            "{shown}"
        );

        let clean = CorpusReport {
            read: 3,
            path: "c.jsonl".into(),
            format: Some(CorpusFormat::Beir),
            ..CorpusReport::default()
        };
        assert_eq!(
            clean.to_string(),
            "read 3 documents from c.jsonl (beir); no problems"
        );
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let docs = vec![doc("1", "T", "hello"), doc("2", "", "world")];
        let fp = corpus_fingerprint(&docs);
        assert_eq!(fp.len(), 64);
        assert!(fp
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(fp, corpus_fingerprint(&docs.clone()));
        // Pinned so that an accidental change of the hashing scheme (which would invalidate
        // every stored index) is caught.
        assert_eq!(
            fp,
            "70430fe6e3f44ec804ea09486ab6f5e1102b060ca48c32359f21bf42d96801dd"
        );

        let mut changed = docs.clone();
        changed[1].text.push('!');
        assert_ne!(corpus_fingerprint(&changed), fp);
        let mut changed = docs.clone();
        changed[0].title = "U".into();
        assert_ne!(corpus_fingerprint(&changed), fp);
        let mut changed = docs.clone();
        changed[0].id = "3".into();
        assert_ne!(corpus_fingerprint(&changed), fp);
        let reversed: Vec<_> = docs.iter().rev().cloned().collect();
        assert_ne!(corpus_fingerprint(&reversed), fp);
        // Moving bytes across a field boundary must not collide.
        assert_ne!(
            corpus_fingerprint(&[doc("1", "ab", "c")]),
            corpus_fingerprint(&[doc("1", "a", "bc")])
        );
        assert_ne!(
            corpus_fingerprint(&[]),
            corpus_fingerprint(&[doc("", "", "")])
        );
    }

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
