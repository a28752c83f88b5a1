//! Masking a name out of the text that describes it, so a query cannot be answered by finding
//! the name in the document title.
//!
//! A term matches case-insensitively where it stands as a word: not glued to a letter or digit
//! on either side (a term that starts or ends with punctuation, like `C++`, needs no boundary
//! on that side). A plural or possessive ending (`s`, `es`, `'s`) goes with the match, since
//! "constructors" gives away "constructor" as surely as the word itself.

/// What replaces a masked term.
pub const MASK: &str = "___";

/// Function words not masked when they are one word of a multi-word name: masking "of" in
/// "Dictionary of Computing" would only garble the query.
const STOPWORDS: &[&str] = &[
    "a", "an", "and", "as", "at", "by", "for", "from", "in", "is", "of", "on", "or", "the", "to",
    "with",
];

/// The terms masked for `names`: each whole name, and each word of a multi-word name except
/// function words, longest first (so a whole name is masked before its parts).
fn terms(names: &[&str]) -> Vec<Vec<char>> {
    let mut out: Vec<Vec<char>> = Vec::new();
    let mut add = |t: &str| {
        let t: Vec<char> = t.trim().chars().flat_map(char::to_lowercase).collect();
        if !t.is_empty() && !out.contains(&t) {
            out.push(t);
        }
    };
    for name in names {
        add(name);
        let words: Vec<&str> = name.split_whitespace().collect();
        if words.len() > 1 {
            for w in words {
                if !STOPWORDS.contains(&w.to_lowercase().as_str()) {
                    add(w);
                }
            }
        }
    }
    out.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    out
}

/// Length (in chars of `text`) of a match of `term` at `i`, suffix included, if it matches
/// there as a word.
fn match_at(text: &[char], lower: &[char], i: usize, term: &[char]) -> Option<usize> {
    let n = term.len();
    if i + n > lower.len() || lower[i..i + n] != *term {
        return None;
    }
    if term[0].is_alphanumeric() && i > 0 && text[i - 1].is_alphanumeric() {
        return None;
    }
    let mut end = i + n;
    if term[n - 1].is_alphanumeric() {
        for suffix in [&['\'', 's'][..], &['e', 's'], &['s'], &[]] {
            let e = end + suffix.len();
            if e <= lower.len()
                && lower[end..e] == *suffix
                && (e == lower.len() || !text[e].is_alphanumeric())
            {
                end = e;
                return Some(end - i);
            }
        }
        return None;
    }
    Some(end - i)
}

/// Lowercases char by char so positions in the lowered text are positions in the original
/// (a char whose lowercase is several chars keeps only the first).
fn lower_chars(text: &[char]) -> Vec<char> {
    text.iter()
        .map(|c| c.to_lowercase().next().unwrap_or(*c))
        .collect()
}

/// `text` with every word-bounded, case-insensitive occurrence of each name — and of each
/// content word of a multi-word name — replaced by [`MASK`].
pub fn mask_terms(text: &str, names: &[&str]) -> String {
    let terms = terms(names);
    let chars: Vec<char> = text.chars().collect();
    let lower = lower_chars(&chars);
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        match terms.iter().find_map(|t| match_at(&chars, &lower, i, t)) {
            Some(len) => {
                out.push_str(MASK);
                i += len;
            }
            None => {
                out.push(chars[i]);
                i += 1;
            }
        }
    }
    out
}

/// Whether `text` holds `term` as a word (case-insensitive, the same rule [`mask_terms`]
/// masks by) — what a check that masking worked asks.
pub fn contains_term(text: &str, term: &str) -> bool {
    let t: Vec<char> = term.trim().chars().flat_map(char::to_lowercase).collect();
    if t.is_empty() {
        return false;
    }
    let chars: Vec<char> = text.chars().collect();
    let lower = lower_chars(&chars);
    (0..chars.len()).any(|i| match_at(&chars, &lower, i, &t).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_whole_words_case_insensitively() {
        assert_eq!(
            mask_terms(
                "Quicksort sorts; QUICKSORT is quick. quicksorts",
                &["quicksort"]
            ),
            "___ sorts; ___ is quick. ___"
        );
        // Not inside other words.
        assert_eq!(mask_terms("Cobol and C", &["C"]), "Cobol and ___");
        assert_eq!(mask_terms("tarball", &["tar"]), "tarball");
    }

    #[test]
    fn masks_multi_word_names_and_their_content_words() {
        assert_eq!(
            mask_terms(
                "The Quick Mail Queueing Protocol, a mail protocol.",
                &["Quick Mail Queueing Protocol", "QMQP"]
            ),
            "The ___, a ___ ___."
        );
        assert_eq!(
            mask_terms("a dictionary of terms", &["Dictionary of Computing"]),
            "a ___ of terms"
        );
    }

    #[test]
    fn punctuated_names_need_no_boundary_on_their_punctuation_side() {
        assert_eq!(
            mask_terms("C++ extends C; C++'s classes", &["C++"]),
            "___ extends C; ___'s classes"
        );
    }

    #[test]
    fn contains_term_uses_the_same_rule() {
        assert!(contains_term("Uses STRCPY here", "strcpy"));
        assert!(!contains_term("uses strcpyx", "strcpy"));
        assert!(!contains_term(
            &mask_terms("strcpy copies", &["strcpy"]),
            "strcpy"
        ));
    }
}
