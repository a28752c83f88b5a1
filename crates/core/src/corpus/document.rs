//! The unit of a corpus, [`Document`], and [`corpus_fingerprint`], the hash of a document list
//! that index metadata records. The fingerprint scheme is pinned by a test: changing it
//! invalidates every stored index.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One document of a corpus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The document id, unique within the corpus (numeric ids are stringified).
    pub id: String,
    /// The title; empty when the source has none.
    pub title: String,
    /// The body text.
    pub text: String,
}

impl Document {
    /// The text to embed: `"title\ntext"` when the title is non-empty (the BEIR convention of
    /// encoding title and body together), otherwise just the text.
    pub fn full_text(&self) -> String {
        if self.title.trim().is_empty() {
            self.text.clone()
        } else if self.text.trim().is_empty() {
            // A title-only document would otherwise end in a dangling newline, which changes
            // its tokenisation for no benefit.
            self.title.clone()
        } else {
            format!("{}\n{}", self.title, self.text)
        }
    }
}

/// Fingerprint of a corpus for index metadata: SHA-256 (lowercase hex) over every document's
/// id, title and text, in order. Each field is length-prefixed so that moving bytes between
/// fields or documents changes the hash; the order of documents matters because it fixes the
/// index's internal numbering.
pub fn corpus_fingerprint(docs: &[Document]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"search-r3 corpus v1\0");
    hasher.update((docs.len() as u64).to_le_bytes());
    for doc in docs {
        for field in [&doc.id, &doc.title, &doc.text] {
            hasher.update((field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::test_util::doc;

    #[test]
    fn full_text_of_title_only_document_has_no_dangling_newline() {
        assert_eq!(doc("a", "Only title", "").full_text(), "Only title");
        assert_eq!(doc("a", "  ", "text").full_text(), "text");
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let docs = vec![doc("1", "T", "hello"), doc("2", "", "world")];
        let fp = corpus_fingerprint(&docs);
        assert_eq!(fp.len(), 64);
        assert!(fp
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(fp, corpus_fingerprint(&docs.clone()));
        // Pinned so that an accidental change of the hashing scheme (which would invalidate
        // every stored index) is caught.
        assert_eq!(
            fp,
            "70430fe6e3f44ec804ea09486ab6f5e1102b060ca48c32359f21bf42d96801dd"
        );

        let mut changed = docs.clone();
        changed[1].text.push('!');
        assert_ne!(corpus_fingerprint(&changed), fp);
        let mut changed = docs.clone();
        changed[0].title = "U".into();
        assert_ne!(corpus_fingerprint(&changed), fp);
        let mut changed = docs.clone();
        changed[0].id = "3".into();
        assert_ne!(corpus_fingerprint(&changed), fp);
        let reversed: Vec<_> = docs.iter().rev().cloned().collect();
        assert_ne!(corpus_fingerprint(&reversed), fp);
        // Moving bytes across a field boundary must not collide.
        assert_ne!(
            corpus_fingerprint(&[doc("1", "ab", "c")]),
            corpus_fingerprint(&[doc("1", "a", "bc")])
        );
        assert_ne!(
            corpus_fingerprint(&[]),
            corpus_fingerprint(&[doc("", "", "")])
        );
    }
}
