//! [`CorpusReport`]: what a corpus read returned and every line it skipped or flagged
//! ([`LineIssue`]), with a human summary as its `Display` (counts, then the first few issues of
//! each kind).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::format::CorpusFormat;

/// How many issues of each kind the report's `Display` spells out before summarising the rest.
const REPORT_EXAMPLES: usize = 5;

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

/// What [`read_corpus`](super::read_corpus) did: how many documents it returned and every line
/// it skipped or flagged. Its `Display` is a human summary: counts, then the first few issues
/// of each kind.
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

pub(super) fn record(list: &mut Vec<LineIssue>, line: usize, id: Option<String>, problem: String) {
    tracing::debug!(line, ?id, "{problem}");
    list.push(LineIssue { line, id, problem });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::format::OnError;
    use crate::corpus::test_util::{read_ok, write_file};

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
}
