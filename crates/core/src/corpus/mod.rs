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
//!
//! One file per concept; the public names are re-exported here, so `corpus::X` is the only
//! path to each:
//!
//! * `document` — [`Document`] and [`corpus_fingerprint`].
//! * `format` — [`CorpusFormat`], [`OnError`], [`ReadOptions`] and format detection.
//! * `read` — [`read_corpus`], the corpus reader.
//! * `report` — [`CorpusReport`] and [`LineIssue`], what a read skipped or flagged.
//! * `error` — [`CorpusError`], shared by every reader here.
//! * `record` — parsing one JSON record (document or query) with precise field messages.
//! * `lines` — streaming a file as numbered raw lines (BOM, CRLF, non-UTF-8, compression).
//! * `queries` — [`read_queries`].
//! * `qrels` — [`read_qrels`].

mod document;
mod error;
mod format;
mod lines;
mod qrels;
mod queries;
mod read;
mod record;
mod report;
#[cfg(test)]
mod test_util;

pub use document::{corpus_fingerprint, Document};
pub use error::CorpusError;
pub use format::{CorpusFormat, OnError, ReadOptions};
pub use qrels::read_qrels;
pub(crate) use qrels::read_qrels_lines;
pub use queries::read_queries;
pub use read::read_corpus;
pub use report::{CorpusReport, LineIssue};
