//! [`CorpusError`], the error of every reader in this module (corpus, queries, qrels). Every
//! message names the file, and the 1-based line where there is one, and says what was
//! expected.

use std::io;
use std::path::PathBuf;

use super::report::CorpusReport;

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
