//! Opening input files and streaming them as numbered raw lines. A BEIR dataset directory
//! stands for one of its files; a directory, a missing file or a compressed file is refused
//! with an error naming it. Lines are yielded as bytes without their terminator (`\n` or
//! `\r\n`) and, on line 1, without a UTF-8 BOM, numbered from 1 with blank lines counted, so
//! a line that is not UTF-8 is reported with its number and byte offset instead of ending the
//! read with an opaque I/O error.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::error::CorpusError;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// `path` itself, or for a BEIR dataset directory its file `name` (which must exist).
pub(super) fn resolve_beir_file(path: &Path, name: &'static str) -> Result<PathBuf, CorpusError> {
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

/// Streams a file line by line as raw bytes, so that a line which is not UTF-8 can be reported
/// (with its number) rather than ending the read with an opaque I/O error. One buffer is reused
/// for every line.
pub(super) struct LineReader<'p> {
    path: &'p Path,
    reader: BufReader<File>,
    buf: Vec<u8>,
    number: usize,
    next_offset: u64,
}

/// One physical line without its terminator (`\n` or `\r\n`) and, on line 1, without a BOM.
pub(super) struct RawLine<'a> {
    pub(super) number: usize,
    /// File offset of `bytes[0]`.
    offset: u64,
    bytes: &'a [u8],
}

pub(super) enum Decoded<'a> {
    Blank,
    Text(&'a str),
    BadUtf8 { offset: usize, file_offset: u64 },
}

impl<'p> LineReader<'p> {
    pub(super) fn open(path: &'p Path) -> Result<Self, CorpusError> {
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

    pub(super) fn next_line(&mut self) -> Result<Option<RawLine<'_>>, CorpusError> {
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
    pub(super) fn decode(&self) -> Decoded<'a> {
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
    use crate::corpus::format::{CorpusFormat, OnError, ReadOptions};
    use crate::corpus::read_corpus;
    use crate::corpus::test_util::{doc, read_err, read_ok, write_file};

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
}
