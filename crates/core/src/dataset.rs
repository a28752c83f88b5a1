//! BEIR datasets: a corpus, its queries and the judgements of one split, checked against each
//! other, plus the deterministic subsampling that quick evaluations and training slices use.
//!
//! Layout (as BEIR ships it): `DIR/corpus.jsonl`, `DIR/queries.jsonl`, `DIR/qrels/<split>.tsv`.

use crate::corpus::{
    read_corpus, read_qrels_lines, read_queries, CorpusError, CorpusReport, Document, ReadOptions,
};
use crate::metrics::Qrels;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Why a dataset split could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file could not be read or holds a bad record.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// `dir` is not a BEIR dataset directory at all (missing, a file, or without the files a
    /// BEIR directory has), so no split of it can exist.
    #[error(
        "{}: not a BEIR dataset directory: {problem} (a BEIR directory holds corpus.jsonl, \
         queries.jsonl and qrels/<split>.tsv)",
        dir.display()
    )]
    NotBeir {
        /// The path given as the dataset.
        dir: PathBuf,
        /// What is wrong with it ("it does not exist", "missing queries.jsonl, qrels/", ...).
        problem: String,
    },
    /// `qrels/<split>.tsv` does not exist.
    #[error(
        "{}: no split `{split}` (expected qrels/{split}.tsv); available: {}",
        dir.display(),
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    MissingSplit {
        /// The dataset directory.
        dir: PathBuf,
        /// The split asked for.
        split: String,
        /// The splits that exist.
        available: Vec<String>,
    },
    /// A judgement names a query that `queries.jsonl` does not contain.
    #[error("{}:{line}: query id `{id}` is not in queries.jsonl", path.display())]
    UnknownQuery {
        /// The qrels file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The query id.
        id: String,
    },
    /// The split judges no query as relevant to anything.
    #[error("{}: no query of split `{split}` has a relevant (grade ≥ 1) document", path.display())]
    NoRelevant {
        /// The qrels file.
        path: PathBuf,
        /// The split.
        split: String,
    },
}

/// One split of a BEIR dataset, loaded and cross-checked.
#[derive(Debug, Clone)]
pub struct BeirSplit {
    /// The dataset directory.
    pub dir: PathBuf,
    /// The split name (`test`, `train`, `dev`).
    pub split: String,
    /// Every document of the corpus, in file order.
    pub corpus: Vec<Document>,
    /// The split's judged queries `(id, text)`, in `queries.jsonl` order.
    pub queries: Vec<(String, String)>,
    /// The split's judgements.
    pub qrels: Qrels,
    /// What reading the corpus skipped or flagged.
    pub corpus_report: CorpusReport,
    /// Judgements whose document is not in the corpus: `(line, doc id)`. They stay in the
    /// qrels (trec_eval counts them as relevant but unretrievable), and callers report them.
    pub unknown_docs: Vec<(usize, String)>,
}

/// The BEIR dataset `name` for tests: `$SEARCH_R3_DATASETS/name`, else
/// `../shared/datasets/name` beside the checkout. Datasets are not shipped in the repository;
/// when it is absent this prints one SKIP line saying where it comes from and returns `None`,
/// except in CI (`CI` set), where a missing dataset fails the test.
#[doc(hidden)]
pub fn dataset_for_tests(name: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("SEARCH_R3_DATASETS") {
        Some(d) => PathBuf::from(d).join(name),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/datasets")
            .join(name),
    };
    if dir.join("corpus.jsonl").is_file() {
        return Some(dir);
    }
    let hint = format!(
        "dataset `{name}` not at {} (not shipped: BEIR's {name}, converted by \
         shared/tools/build_scifact.py; or set SEARCH_R3_DATASETS)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("CI needs the {hint}");
    }
    eprintln!("SKIP: {hint}");
    None
}

/// The splits present under `dir/qrels`, sorted.
pub fn available_splits(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir.join("qrels"))
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "tsv").then(|| p.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    out.sort();
    out
}

/// Refuses a path that is not a BEIR directory, naming what is missing, so that a wrong
/// `--dataset` is not reported as a missing split.
fn check_beir_dir(dir: &Path) -> Result<(), DatasetError> {
    let not_beir = |problem: String| DatasetError::NotBeir {
        dir: dir.to_path_buf(),
        problem,
    };
    if !dir.exists() {
        return Err(not_beir("it does not exist".into()));
    }
    if !dir.is_dir() {
        return Err(not_beir("it is a file, not a directory".into()));
    }
    let missing: Vec<&str> = [
        ("corpus.jsonl", dir.join("corpus.jsonl").is_file()),
        ("queries.jsonl", dir.join("queries.jsonl").is_file()),
        ("qrels/", dir.join("qrels").is_dir()),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(name, _)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(not_beir(format!("missing {}", missing.join(", "))))
    }
}

/// Loads corpus, queries and `qrels/<split>.tsv` from a BEIR directory. A judgement naming an
/// unknown query is an error (with its line); one naming an unknown document is recorded in
/// [`BeirSplit::unknown_docs`].
pub fn load_split(dir: &Path, split: &str, read: &ReadOptions) -> Result<BeirSplit, DatasetError> {
    check_beir_dir(dir)?;
    let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
    if !qrels_path.is_file() {
        return Err(DatasetError::MissingSplit {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            available: available_splits(dir),
        });
    }
    let judgements = read_qrels_lines(&qrels_path)?;
    let all_queries = read_queries(dir)?;
    let known: HashSet<&str> = all_queries.iter().map(|(id, _)| id.as_str()).collect();
    if let Some(j) = judgements
        .iter()
        .find(|j| !known.contains(j.query_id.as_str()))
    {
        return Err(DatasetError::UnknownQuery {
            path: qrels_path,
            line: j.line,
            id: j.query_id.clone(),
        });
    }
    if !judgements.iter().any(|j| j.grade >= 1) {
        return Err(DatasetError::NoRelevant {
            path: qrels_path,
            split: split.to_string(),
        });
    }
    let (corpus, corpus_report) = read_corpus(dir, read)?;
    let doc_ids: HashSet<&str> = corpus.iter().map(|d| d.id.as_str()).collect();
    let unknown_docs = judgements
        .iter()
        .filter(|j| !doc_ids.contains(j.doc_id.as_str()))
        .map(|j| (j.line, j.doc_id.clone()))
        .collect();
    let judged: HashSet<&str> = judgements.iter().map(|j| j.query_id.as_str()).collect();
    let queries = all_queries
        .iter()
        .filter(|(id, _)| judged.contains(id.as_str()))
        .cloned()
        .collect();
    let qrels = Qrels::from_triples(
        judgements
            .into_iter()
            .map(|j| (j.query_id, j.doc_id, j.grade)),
    );
    Ok(BeirSplit {
        dir: dir.to_path_buf(),
        split: split.to_string(),
        corpus,
        queries,
        qrels,
        corpus_report,
        unknown_docs,
    })
}

impl BeirSplit {
    /// Keeps at most `max_queries` queries (a seeded random choice, kept in file order) and, when
    /// `max_docs` is set, a corpus of that size made of every document judged for the kept
    /// queries plus seeded random others. Judgements of dropped queries are dropped too, so
    /// metrics stay exact on the subset (they are not comparable with full-corpus figures:
    /// fewer distractors make retrieval easier).
    pub fn subsample(&mut self, max_queries: Option<usize>, max_docs: Option<usize>, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        if let Some(n) = max_queries.filter(|&n| n < self.queries.len()) {
            let mut pick: Vec<usize> = (0..self.queries.len()).collect();
            pick.shuffle(&mut rng);
            let mut pick: Vec<usize> = pick.into_iter().take(n).collect();
            pick.sort_unstable();
            self.queries = pick.into_iter().map(|i| self.queries[i].clone()).collect();
            let keep: HashSet<&str> = self.queries.iter().map(|(id, _)| id.as_str()).collect();
            self.qrels = Qrels::from_triples(keep.iter().flat_map(|q| {
                self.qrels
                    .judgments(q)
                    .into_iter()
                    .flatten()
                    .map(move |(d, g)| (q.to_string(), d.clone(), *g))
            }));
        }
        if let Some(n) = max_docs.filter(|&n| n < self.corpus.len()) {
            let judged: HashSet<&str> = self
                .queries
                .iter()
                .flat_map(|(q, _)| self.qrels.judgments(q).into_iter().flat_map(|j| j.keys()))
                .map(String::as_str)
                .collect();
            let (mut keep, mut rest): (Vec<usize>, Vec<usize>) =
                (0..self.corpus.len()).partition(|&i| judged.contains(self.corpus[i].id.as_str()));
            rest.shuffle(&mut rng);
            keep.extend(rest.into_iter().take(n.saturating_sub(keep.len())));
            keep.sort_unstable();
            self.corpus = keep.into_iter().map(|i| self.corpus[i].clone()).collect();
        }
    }

    /// Positions of documents by id.
    pub fn doc_positions(&self) -> HashMap<&str, usize> {
        self.corpus
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.as_str(), i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write_dataset(dir: &Path, qrels: &str) {
        fs::create_dir_all(dir.join("qrels")).unwrap();
        fs::write(
            dir.join("corpus.jsonl"),
            (0..20)
                .map(|i| format!("{{\"_id\":\"d{i}\",\"title\":\"t{i}\",\"text\":\"text {i}\"}}\n"))
                .collect::<String>(),
        )
        .unwrap();
        fs::write(
            dir.join("queries.jsonl"),
            (0..6)
                .map(|i| format!("{{\"_id\":\"q{i}\",\"text\":\"query {i}\"}}\n"))
                .collect::<String>(),
        )
        .unwrap();
        fs::write(dir.join("qrels/test.tsv"), qrels).unwrap();
    }

    #[test]
    fn loads_judged_queries_and_reports_unknown_docs() {
        let tmp = tempfile::tempdir().unwrap();
        write_dataset(
            tmp.path(),
            "query-id\tcorpus-id\tscore\nq1\td3\t1\nq4\td9\t2\nq4\tgone\t1\n",
        );
        let s = load_split(tmp.path(), "test", &ReadOptions::default()).unwrap();
        assert_eq!(s.corpus.len(), 20);
        let ids: Vec<&str> = s.queries.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["q1", "q4"]);
        assert_eq!(s.unknown_docs, vec![(4, "gone".to_string())]);
    }

    #[test]
    fn missing_split_lists_the_available_ones() {
        let tmp = tempfile::tempdir().unwrap();
        write_dataset(tmp.path(), "q1\td3\t1\n");
        let err = load_split(tmp.path(), "train", &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no split `train`") && err.contains("available: test"),
            "{err}"
        );
    }

    #[test]
    fn a_directory_that_is_not_beir_says_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let err = |dir: &Path| {
            load_split(dir, "test", &ReadOptions::default())
                .unwrap_err()
                .to_string()
        };
        // Some other directory: what is missing, and what a BEIR directory holds.
        fs::write(tmp.path().join("notes.txt"), "x").unwrap();
        let e = err(tmp.path());
        assert!(
            e.contains(tmp.path().to_str().unwrap())
                && e.contains("not a BEIR dataset directory")
                && e.contains("missing corpus.jsonl, queries.jsonl, qrels/")
                && e.contains("qrels/<split>.tsv")
                && !e.contains("no split"),
            "{e}"
        );
        // Only the missing parts are named.
        write_dataset(tmp.path(), "q1\td3\t1\n");
        fs::remove_file(tmp.path().join("queries.jsonl")).unwrap();
        let e = err(tmp.path());
        assert!(e.contains("missing queries.jsonl (a BEIR"), "{e}");
        let e = err(&tmp.path().join("nowhere"));
        assert!(
            e.contains("nowhere: not a BEIR dataset directory: it does not exist"),
            "{e}"
        );
        let e = err(&tmp.path().join("notes.txt"));
        assert!(e.contains("it is a file, not a directory"), "{e}");
    }

    #[test]
    fn unknown_query_names_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        write_dataset(
            tmp.path(),
            "query-id\tcorpus-id\tscore\nq1\td3\t1\nq99\td3\t1\n",
        );
        let err = load_split(tmp.path(), "test", &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.tsv:3") && err.contains("`q99`"), "{err}");
    }

    #[test]
    fn subsample_keeps_judged_documents_and_is_deterministic() {
        let tmp = tempfile::tempdir().unwrap();
        write_dataset(tmp.path(), "q0\td0\t1\nq1\td5\t1\nq2\td10\t1\nq3\td15\t1\n");
        let full = load_split(tmp.path(), "test", &ReadOptions::default()).unwrap();
        let mut a = full.clone();
        a.subsample(Some(2), Some(6), 3);
        let mut b = full.clone();
        b.subsample(Some(2), Some(6), 3);
        assert_eq!(a.queries, b.queries);
        assert_eq!(a.corpus, b.corpus);
        assert_eq!(a.queries.len(), 2);
        assert_eq!(a.corpus.len(), 6);
        assert_eq!(a.qrels.len(), 2);
        for (q, _) in &a.queries {
            for d in a.qrels.judgments(q).unwrap().keys() {
                assert!(a.corpus.iter().any(|x| &x.id == d), "judged {d} kept");
            }
        }
    }
}
