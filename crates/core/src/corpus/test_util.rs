//! Helpers shared by the corpus module's unit tests.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{read_corpus, CorpusReport, Document, OnError, ReadOptions};

pub(super) fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().write_all(bytes).unwrap();
    path
}

pub(super) fn opts(on_error: OnError) -> ReadOptions {
    ReadOptions {
        on_error,
        ..ReadOptions::default()
    }
}

pub(super) fn read_ok(path: &Path, on_error: OnError) -> (Vec<Document>, CorpusReport) {
    read_corpus(path, &opts(on_error)).unwrap()
}

pub(super) fn read_err(path: &Path, on_error: OnError) -> String {
    read_corpus(path, &opts(on_error)).unwrap_err().to_string()
}

pub(super) fn ids(docs: &[Document]) -> Vec<&str> {
    docs.iter().map(|d| d.id.as_str()).collect()
}

pub(super) fn doc(id: &str, title: &str, text: &str) -> Document {
    Document {
        id: id.into(),
        title: title.into(),
        text: text.into(),
    }
}

/// The SciFact dataset beside the checkout; `None` (and a SKIP line) when it is absent outside
/// CI.
pub(super) fn scifact_dir() -> Option<PathBuf> {
    crate::dataset::dataset_for_tests("scifact")
}
