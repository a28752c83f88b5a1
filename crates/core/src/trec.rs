//! TREC run files (`qid Q0 docid rank score tag`), trec_eval's ranking order and
//! reciprocal-rank fusion.
//!
//! trec_eval ignores the rank column: it re-sorts each query's documents by score, highest
//! first, breaking ties by document id in *descending* byte order (`strcmp`). Everything here
//! that needs a ranking uses that same order ([`cmp_trec`]), so a run written by
//! [`write_run`] and scored by trec_eval ranks exactly as it does in memory.

use std::cmp::Ordering;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A retrieval run: query id → that query's `(doc id, score)` pairs.
///
/// The pairs are in no particular order (a run read from a file keeps the file's order); code
/// that needs ranks sorts them with [`rank_trec`]. Each document appears at most once per
/// query.
pub type Run = BTreeMap<String, Vec<(String, f64)>>;

/// The `k` of reciprocal-rank fusion from Cormack et al. (2009), the usual default.
pub const RRF_K: f64 = 60.0;

/// One scored document for one query, as on one line of a run file.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEntry {
    /// The query id (column 1).
    pub query_id: String,
    /// The document id (column 3).
    pub doc_id: String,
    /// The retrieval score (column 5); higher ranks first.
    pub score: f64,
}

/// Errors reading, building or writing TREC runs.
#[derive(Debug, thiserror::Error)]
pub enum TrecError {
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
    #[error("{} line {line}: read error: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The line being read.
        line: usize,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A line is not valid UTF-8.
    #[error("{} line {line}: invalid UTF-8 at byte offset {offset} of the line", path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// Byte offset of the first invalid byte within the line.
        offset: usize,
    },
    /// A line does not hold the six columns of the TREC run format.
    #[error(
        "{} line {line}: expected 6 whitespace-separated columns (qid Q0 docid rank score tag), \
         got {got}",
        path.display()
    )]
    Columns {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// How many columns it has.
        got: usize,
    },
    /// The rank column is not an integer.
    #[error("{} line {line}: column 4 (rank): expected an integer, got `{got}`", path.display())]
    Rank {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// The text found.
        got: String,
    },
    /// The score column is not a finite number.
    #[error(
        "{} line {line}: column 5 (score): expected a finite number, got `{got}`",
        path.display()
    )]
    Score {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// The text found.
        got: String,
    },
    /// A document appears twice for the same query in a file; trec_eval refuses such runs.
    #[error(
        "{} line {line}: query `{query}` lists document `{doc}` again (first on line {first_line})",
        path.display()
    )]
    DuplicateInFile {
        /// The file.
        path: PathBuf,
        /// The line of the repeat.
        line: usize,
        /// The first line that listed the pair.
        first_line: usize,
        /// The query id.
        query: String,
        /// The document id.
        doc: String,
    },
    /// A document appears twice for the same query in an in-memory run.
    #[error("query `{query}` lists document `{doc}` twice")]
    Duplicate {
        /// The query id.
        query: String,
        /// The document id.
        doc: String,
    },
    /// A score that cannot be written or read back as a number.
    #[error("query `{query}`, document `{doc}`: score {score} is not finite")]
    NonFinite {
        /// The query id.
        query: String,
        /// The document id.
        doc: String,
        /// The score.
        score: f64,
    },
    /// An id or tag that would not survive the whitespace-separated format.
    #[error(
        "{what} `{value}` cannot be written to a TREC run: it is empty or contains whitespace"
    )]
    BadField {
        /// Which field: "query id", "document id" or "run tag".
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// Writing the output failed.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// trec_eval's ranking order: score descending, then document id descending by bytes.
///
/// A NaN score (only possible in runs built in memory) sorts after every number so the order
/// stays total; `-0.0` and `0.0` tie, as they do for trec_eval's `>`/`<` comparison.
pub fn cmp_trec(a: (&str, f64), b: (&str, f64)) -> Ordering {
    let by_score = match (a.1.is_nan(), b.1.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal),
    };
    by_score.then_with(|| b.0.as_bytes().cmp(a.0.as_bytes()))
}

/// Sorts one query's `(doc id, score)` pairs into trec_eval's ranking order ([`cmp_trec`]).
pub fn rank_trec(hits: &mut [(String, f64)]) {
    hits.sort_by(|a, b| cmp_trec((&a.0, a.1), (&b.0, b.1)));
}

/// Builds a [`Run`] from entries, refusing a document listed twice for one query.
pub fn run_from_entries<I>(entries: I) -> Result<Run, TrecError>
where
    I: IntoIterator<Item = RunEntry>,
{
    let mut run = Run::new();
    let mut seen: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
    for e in entries {
        if !seen
            .entry(e.query_id.clone())
            .or_default()
            .insert(e.doc_id.clone())
        {
            return Err(TrecError::Duplicate {
                query: e.query_id,
                doc: e.doc_id,
            });
        }
        run.entry(e.query_id).or_default().push((e.doc_id, e.score));
    }
    Ok(run)
}

/// Reads a TREC run file (`qid Q0 docid rank score tag`, whitespace-separated).
///
/// The `Q0` and tag columns are not checked and the rank must be an integer but is otherwise
/// ignored, as trec_eval ignores it. Blank lines are skipped. Wrong column counts, bad ranks
/// or scores, invalid UTF-8 and a document listed twice for one query are errors naming the
/// file and line.
pub fn read_run(path: &Path) -> Result<Run, TrecError> {
    let file = File::open(path).map_err(|source| TrecError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let mut run = Run::new();
    // (query, doc) → line, to point a duplicate back at its first occurrence.
    let mut first_seen: HashMap<(String, String), usize> = HashMap::new();
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        number += 1;
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| TrecError::Read {
                path: path.to_path_buf(),
                line: number,
                source,
            })?;
        if n == 0 {
            break;
        }
        let text = std::str::from_utf8(&buf).map_err(|e| TrecError::InvalidUtf8 {
            path: path.to_path_buf(),
            line: number,
            offset: e.valid_up_to(),
        })?;
        let columns: Vec<&str> = text.split_whitespace().collect();
        if columns.is_empty() {
            continue;
        }
        if columns.len() != 6 {
            return Err(TrecError::Columns {
                path: path.to_path_buf(),
                line: number,
                got: columns.len(),
            });
        }
        let (query, doc, rank, score) = (columns[0], columns[2], columns[3], columns[4]);
        if rank.parse::<i64>().is_err() {
            return Err(TrecError::Rank {
                path: path.to_path_buf(),
                line: number,
                got: rank.to_string(),
            });
        }
        let score = match score.parse::<f64>() {
            Ok(s) if s.is_finite() => s,
            _ => {
                return Err(TrecError::Score {
                    path: path.to_path_buf(),
                    line: number,
                    got: score.to_string(),
                })
            }
        };
        match first_seen.entry((query.to_string(), doc.to_string())) {
            std::collections::hash_map::Entry::Occupied(o) => {
                return Err(TrecError::DuplicateInFile {
                    path: path.to_path_buf(),
                    line: number,
                    first_line: *o.get(),
                    query: query.to_string(),
                    doc: doc.to_string(),
                })
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(number);
            }
        }
        match run.entry(query.to_string()) {
            Entry::Occupied(mut o) => o.get_mut().push((doc.to_string(), score)),
            Entry::Vacant(v) => {
                v.insert(vec![(doc.to_string(), score)]);
            }
        }
    }
    Ok(run)
}

fn check_field(what: &'static str, value: &str) -> Result<(), TrecError> {
    if value.is_empty() || value.chars().any(char::is_whitespace) {
        return Err(TrecError::BadField {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Writes `run` as a TREC run file, atomically (a temporary file beside `path`, then a
/// rename), so a crash never leaves a half-written run that would silently score low.
///
/// Queries come in id order; each query's documents in trec_eval's order ([`cmp_trec`]) with
/// ranks 1, 2, … Scores use the shortest representation that parses back to the same `f64`,
/// since rounding could create ties that trec_eval would then break differently.
pub fn write_run(path: &Path, run: &Run, tag: &str) -> Result<(), TrecError> {
    check_field("run tag", tag)?;
    for (query, hits) in run {
        check_field("query id", query)?;
        let mut seen = std::collections::HashSet::new();
        for (doc, score) in hits {
            check_field("document id", doc)?;
            if !score.is_finite() {
                return Err(TrecError::NonFinite {
                    query: query.clone(),
                    doc: doc.clone(),
                    score: *score,
                });
            }
            if !seen.insert(doc.as_str()) {
                return Err(TrecError::Duplicate {
                    query: query.clone(),
                    doc: doc.clone(),
                });
            }
        }
    }
    let write_err = |source| TrecError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
    let mut out = BufWriter::new(tmp);
    for (query, hits) in run {
        let mut ranked = hits.clone();
        rank_trec(&mut ranked);
        for (i, (doc, score)) in ranked.iter().enumerate() {
            writeln!(out, "{query} Q0 {doc} {} {score} {tag}", i + 1).map_err(write_err)?;
        }
    }
    let tmp = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(path).map_err(|e| write_err(e.error))?;
    Ok(())
}

/// Reciprocal-rank fusion: each document scores Σ 1/(k + rank) over the runs that retrieved
/// it, with 1-based ranks in trec_eval's order ([`cmp_trec`]) within each run.
///
/// A run that lacks a document (or a whole query) adds nothing for it. Each fused query keeps
/// its best `depth` documents, in trec_eval's order, so ties at the cut are settled the same
/// way trec_eval would settle them when the fused run is scored.
pub fn fuse_rrf(runs: &[&Run], k: f64, depth: usize) -> Run {
    let mut ranks: BTreeMap<String, HashMap<String, Vec<usize>>> = BTreeMap::new();
    for run in runs {
        for (query, hits) in run.iter() {
            let mut ranked = hits.clone();
            rank_trec(&mut ranked);
            let docs = ranks.entry(query.clone()).or_default();
            for (i, (doc, _)) in ranked.into_iter().enumerate() {
                docs.entry(doc).or_default().push(i + 1);
            }
        }
    }
    ranks
        .into_iter()
        .map(|(query, docs)| {
            let mut hits: Vec<(String, f64)> = docs
                .into_iter()
                .map(|(doc, mut r)| {
                    // Summing in rank order, not run order, makes the fused score depend only
                    // on the ranks, so documents with the same ranks tie exactly.
                    r.sort_unstable();
                    let score = r.iter().map(|&r| 1.0 / (k + r as f64)).sum();
                    (doc, score)
                })
                .collect();
            rank_trec(&mut hits);
            hits.truncate(depth);
            (query, hits)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trec_order_breaks_ties_by_descending_doc_id() {
        let mut hits = vec![
            ("d1".to_string(), 1.0),
            ("d10".to_string(), 1.0),
            ("d2".to_string(), 1.0),
            ("a".to_string(), 2.0),
            ("z".to_string(), -0.0),
            ("y".to_string(), 0.0),
        ];
        rank_trec(&mut hits);
        let ids: Vec<&str> = hits.iter().map(|h| h.0.as_str()).collect();
        assert_eq!(ids, ["a", "d2", "d10", "d1", "z", "y"]);
    }
}
