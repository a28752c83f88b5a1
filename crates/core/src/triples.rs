//! Training examples for stage 1: a query, its positive documents and hard negatives.
//!
//! Two sources: a BEIR split (every judged query with its relevant documents; negatives come
//! from mining) and a JSONL file of `{"query", "pos": [...], "neg": [...]}` objects (texts, as
//! sentence-transformers and FlagEmbedding write them). Mined files add `query_id`, `pos_ids`
//! and `neg_ids` so a run can be traced back to the corpus.

use crate::corpus::{CorpusError, Document};
use crate::dataset::BeirSplit;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;

/// One training example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Triple {
    /// The query text.
    pub query: String,
    /// Texts of relevant documents (at least one).
    pub pos: Vec<String>,
    /// Texts of hard negatives (may be empty: in-batch negatives still apply).
    #[serde(default)]
    pub neg: Vec<String>,
    /// The query's id, when the example comes from a dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_id: Option<String>,
    /// Document ids of `pos`, when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pos_ids: Vec<String>,
    /// Document ids of `neg`, when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neg_ids: Vec<String>,
}

/// Builds one example per judged query of `split`: positives are its documents of grade ≥ 1
/// (in corpus order), no negatives yet. A judged query without any relevant document present
/// in the corpus is an error naming it, since it cannot be trained on.
pub fn triples_from_split(split: &BeirSplit) -> Result<Vec<Triple>, CorpusError> {
    let pos_of = split.doc_positions();
    let mut out = Vec::with_capacity(split.queries.len());
    for (qid, text) in &split.queries {
        let mut pos: Vec<&Document> = split
            .qrels
            .judgments(qid)
            .into_iter()
            .flatten()
            .filter(|(_, &g)| g >= 1)
            .filter_map(|(d, _)| pos_of.get(d.as_str()).map(|&i| &split.corpus[i]))
            .collect();
        if pos.is_empty() {
            return Err(CorpusError::Malformed {
                path: split.dir.join("qrels").join(format!("{}.tsv", split.split)),
                line: 0,
                id: Some(qid.clone()),
                problem: format!(
                    "query `{qid}` has no relevant document (grade ≥ 1) in the corpus; a \
                     training query needs at least one positive"
                ),
            });
        }
        pos.sort_by_key(|d| pos_of[d.id.as_str()]);
        out.push(Triple {
            query: text.clone(),
            pos: pos.iter().map(|d| d.full_text()).collect(),
            neg: Vec::new(),
            query_id: Some(qid.clone()),
            pos_ids: pos.iter().map(|d| d.id.clone()).collect(),
            neg_ids: Vec::new(),
        });
    }
    Ok(out)
}

/// Reads a triples JSONL file. Every line must hold a non-empty `query` string and a non-empty
/// `pos` list of non-empty strings; `neg` is optional. Errors name the file and line.
pub fn read_triples(path: &Path) -> Result<Vec<Triple>, CorpusError> {
    let file = std::fs::File::open(path).map_err(|source| CorpusError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line_no = i + 1;
        let bytes = line.map_err(|source| CorpusError::Read {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|e| CorpusError::InvalidUtf8 {
            path: path.to_path_buf(),
            line: line_no,
            offset: e.valid_up_to(),
            file_offset: 0,
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let bad = |problem: String| CorpusError::Malformed {
            path: path.to_path_buf(),
            line: line_no,
            id: None,
            problem,
        };
        let t: Triple = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "expected a JSON object {{\"query\": str, \"pos\": [str, ...], \"neg\": [str, ...]}}: {e}"
            ))
        })?;
        if t.query.trim().is_empty() {
            return Err(bad("`query` is empty".into()));
        }
        if t.pos.is_empty() {
            return Err(bad(
                "`pos` is empty: every query needs at least one positive document".into(),
            ));
        }
        for (field, list) in [("pos", &t.pos), ("neg", &t.neg)] {
            if let Some(j) = list.iter().position(|x| x.trim().is_empty()) {
                return Err(bad(format!("`{field}[{j}]` is an empty text")));
            }
        }
        out.push(t);
    }
    if out.is_empty() {
        return Err(CorpusError::NoRecords {
            path: path.to_path_buf(),
            what: "training examples",
        });
    }
    Ok(out)
}

/// Writes triples as JSONL through a temporary file renamed into place.
pub fn write_triples(path: &Path, triples: &[Triple]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        for t in triples {
            serde_json::to_writer(&mut w, t)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Hard-negative selection from a ranking: walks `ranked` (best first), skips the first `skip`
/// candidates (the top of a lexical or dense ranking is where unjudged positives hide) and
/// every document `judgments` grades relevant (≥ 1), and keeps up to `count`. Documents judged
/// non-relevant (grade 0) stay eligible: they are the best negatives there are.
pub fn pick_negatives<'a>(
    ranked: &'a [String],
    judgments: &HashMap<String, i32>,
    skip: usize,
    count: usize,
) -> Vec<&'a String> {
    ranked
        .iter()
        .filter(|d| judgments.get(*d).is_none_or(|&g| g < 1))
        .skip(skip)
        .take(count)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::ReadOptions;
    use crate::dataset::load_split;
    use std::fs;

    #[test]
    fn split_examples_carry_relevant_documents_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir_all(d.join("qrels")).unwrap();
        fs::write(
            d.join("corpus.jsonl"),
            "{\"_id\":\"a\",\"title\":\"A\",\"text\":\"alpha\"}\n{\"_id\":\"b\",\"title\":\"\",\"text\":\"beta\"}\n",
        )
        .unwrap();
        fs::write(
            d.join("queries.jsonl"),
            "{\"_id\":\"q1\",\"text\":\"first\"}\n{\"_id\":\"q2\",\"text\":\"second\"}\n",
        )
        .unwrap();
        fs::write(d.join("qrels/train.tsv"), "q1\ta\t1\nq1\tb\t0\n").unwrap();
        let s = load_split(d, "train", &ReadOptions::default()).unwrap();
        let t = triples_from_split(&s).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].pos, vec!["A\nalpha".to_string()]);
        assert_eq!(t[0].pos_ids, vec!["a".to_string()]);

        fs::write(d.join("qrels/train.tsv"), "q1\ta\t1\nq2\tb\t0\n").unwrap();
        let s = load_split(d, "train", &ReadOptions::default()).unwrap();
        let err = triples_from_split(&s).unwrap_err().to_string();
        assert!(err.contains("`q2` has no relevant document"), "{err}");
    }

    #[test]
    fn triples_file_errors_name_the_line() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("t.jsonl");
        let good = Triple {
            query: "q".into(),
            pos: vec!["p".into()],
            neg: vec!["n".into()],
            query_id: None,
            pos_ids: vec![],
            neg_ids: vec![],
        };
        write_triples(&p, std::slice::from_ref(&good)).unwrap();
        assert_eq!(read_triples(&p).unwrap(), vec![good]);
        for (body, want) in [
            (
                "{\"query\":\"q\",\"pos\":[\"p\"]}\n{\"query\":\"q\",\"pos\":[]}\n",
                "t.jsonl:2: `pos` is empty",
            ),
            ("\n{\"query\":\"q\"}\n", "t.jsonl:2: expected a JSON object"),
            (
                "{\"query\":\" \",\"pos\":[\"p\"]}\n",
                "t.jsonl:1: `query` is empty",
            ),
            (
                "{\"query\":\"q\",\"pos\":[\"p\"],\"neg\":[\"\"]}\n",
                "`neg[0]` is an empty text",
            ),
        ] {
            fs::write(&p, body).unwrap();
            let err = read_triples(&p).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn negatives_skip_relevant_documents_and_the_top() {
        let ranked: Vec<String> = ["a", "b", "c", "d", "e", "f"].map(String::from).to_vec();
        let judged: HashMap<String, i32> = [("b".to_string(), 1), ("d".to_string(), 0)].into();
        let picked: Vec<&str> = pick_negatives(&ranked, &judged, 1, 2)
            .into_iter()
            .map(String::as_str)
            .collect();
        assert_eq!(picked, ["c", "d"]);
    }
}
