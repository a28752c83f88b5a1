//! `search-r3 data import` on the real Debian packages (300 items each): the output loads as a
//! BEIR dataset, splits are disjoint by item, names are masked out of queries, and a second run
//! writes the same bytes. Without the package data this prints SKIP outside CI and fails in CI
//! (where `.ci/run` installs it).

mod common;

use search_r3_core::corpus::ReadOptions;
use search_r3_core::dataset::load_split;
use search_r3_core::import::Source;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The package data of `source`: `$SEARCH_R3_FOLDOC` for FOLDOC when set (CI extracts the
/// `.deb` rather than installing the dictd daemon it depends on), else Debian's location.
fn data_dir(source: Source) -> Option<PathBuf> {
    let dir = match (source, std::env::var_os("SEARCH_R3_FOLDOC")) {
        (Source::Foldoc, Some(d)) => PathBuf::from(d),
        _ => source.default_dir().to_path_buf(),
    };
    if source.marker(&dir).exists() {
        return Some(dir);
    }
    let hint = format!(
        "{} data not at {} (install: {}; for foldoc SEARCH_R3_FOLDOC may name the directory)",
        source.name(),
        dir.display(),
        source.install_hint()
    );
    if std::env::var_os("CI").is_some() {
        panic!("CI needs the {hint}");
    }
    eprintln!("SKIP: {hint}");
    None
}

fn import(source: Source, from: &Path, out: &Path) {
    let (ok, stdout, stderr) = common::run(&[
        "data",
        "import",
        source.name(),
        "--from",
        from.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-items",
        "300",
    ]);
    assert!(ok, "import {} failed:\n{stdout}\n{stderr}", source.name());
}

/// Every file under `dir`, relative path → bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// Whether `text` holds `name` as a whole word, case-insensitively. Written apart from the
/// importer's masking so that a bug there is not repeated here.
fn holds_word(text: &str, name: &str) -> bool {
    let (text, name) = (text.to_lowercase(), name.to_lowercase());
    let edge = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric());
    text.match_indices(&name).any(|(i, m)| {
        let before = text[..i].chars().next_back();
        let after = text[i + m.len()..].chars().next();
        (edge(before) || !name.starts_with(char::is_alphanumeric))
            && (edge(after) || !name.ends_with(char::is_alphanumeric))
    })
}

fn check(source: Source) {
    let Some(from) = data_dir(source) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    import(source, &from, &a);
    import(source, &from, &b);
    assert_eq!(
        files(&a),
        files(&b),
        "{}: a second run differs",
        source.name()
    );

    // An existing output is refused, not overwritten.
    let (ok, _, stderr) = common::run(&[
        "data",
        "import",
        source.name(),
        "--from",
        from.to_str().unwrap(),
        "--out",
        a.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");

    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join(format!("{}.json", source.name()))).unwrap())
            .unwrap();
    assert_eq!(meta["counts"]["items"], 300, "{meta}");
    assert_eq!(meta["seed"], 0);
    assert!(meta["packages"][0]["version"].as_str().is_some(), "{meta}");

    let read = ReadOptions::default();
    let mut seen_queries: HashSet<String> = HashSet::new();
    let mut seen_docs: HashSet<String> = HashSet::new();
    let mut judged = 0;
    for split in ["train", "dev", "test"] {
        let s = load_split(&a, split, &read)
            .unwrap_or_else(|e| panic!("{}: {split}: {e}", source.name()));
        assert_eq!(s.corpus.len(), 300);
        assert!(!s.queries.is_empty(), "{}: {split} is empty", source.name());
        assert!(s.unknown_docs.is_empty());
        let titles: BTreeMap<&str, &str> = s
            .corpus
            .iter()
            .map(|d| (d.id.as_str(), d.title.as_str()))
            .collect();
        for (qid, text) in &s.queries {
            assert!(
                seen_queries.insert(qid.clone()),
                "query {qid} in two splits"
            );
            for doc in s.qrels.judgments(qid).unwrap().keys() {
                assert!(
                    seen_docs.insert(doc.clone()),
                    "document {doc} in two splits"
                );
                let name = match source {
                    Source::Wordnet => continue,
                    Source::Foldoc => titles[doc.as_str()].to_string(),
                    Source::Manpages => titles[doc.as_str()].split('(').next().unwrap().to_string(),
                };
                assert!(
                    !holds_word(text, &name),
                    "{}: query {qid} gives away `{name}`: {text}",
                    source.name()
                );
            }
            judged += 1;
        }
    }
    assert_eq!(judged, 300, "every item judged in exactly one split");
}

#[test]
fn wordnet_import() {
    check(Source::Wordnet);
}

#[test]
fn foldoc_import() {
    check(Source::Foldoc);
}

#[test]
fn manpages_import() {
    check(Source::Manpages);
}

#[test]
fn holds_word_is_word_bounded() {
    assert!(holds_word("uses STRCPY()", "strcpy"));
    assert!(!holds_word("uses strcpyx", "strcpy"));
    assert!(holds_word("C++ rocks", "c++"));
    assert!(!holds_word("___ rocks", "c++"));
}
