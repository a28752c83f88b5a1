//! What to read and how: the corpus formats ([`CorpusFormat`]), the policy for bad lines
//! ([`OnError`]), the reader's [`ReadOptions`], and format detection. Detection resolves a BEIR
//! directory to its `corpus.jsonl` and decides by file extension and the first JSON object's
//! id key; it reads at most a bounded number of lines.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::CorpusError;
use super::lines::{resolve_beir_file, Decoded, LineReader};
use super::record::{key_list, parse_object};

/// How many non-blank lines format detection looks at before giving up. Bounded so that a huge
/// file of garbage fails fast instead of being read twice.
const DETECT_MAX_LINES: usize = 1000;

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
    /// Skip the line and record it in the [`CorpusReport`](super::CorpusReport).
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

/// Options for [`read_corpus`](super::read_corpus). The default detects the format, fails on
/// the first malformed line and skips (but reports) empty documents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Force a format instead of detecting it.
    pub format: Option<CorpusFormat>,
    /// Whether malformed lines and duplicate ids are fatal or skipped.
    pub on_error: OnError,
    /// Keep documents whose text and title are both empty (they are reported either way).
    pub allow_empty: bool,
}

/// Works out which file to read and in which format: a directory is a BEIR dataset (its
/// `corpus.jsonl`); a `.jsonl`/`.json` file is BEIR when its first JSON object has `_id` and
/// plain JSONL when it has `id`; anything else is text.
pub(crate) fn detect_format(path: &Path) -> Result<(PathBuf, CorpusFormat), CorpusError> {
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

pub(super) fn resolve_corpus_path(path: &Path) -> Result<PathBuf, CorpusError> {
    resolve_beir_file(path, "corpus.jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::read_corpus;
    use crate::corpus::test_util::{doc, ids, read_err, read_ok, write_file};

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
}
