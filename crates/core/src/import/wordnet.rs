//! WordNet 3.0 (`wordnet-base`): one item per synset of `data.{noun,verb,adj,adv}`.
//!
//! * **query** — the gloss's definition: the gloss up to its first example (a `"`-quoted
//!   phrase opened after `;` or `:`), without trailing separators.
//! * **document** — title: the lemmas joined by `, ` (underscores as spaces, adjective markers
//!   like `(p)` dropped); text: the lemmas, the part of speech and the quoted examples. The
//!   definition is never in the document, so the pair is a paraphrase task, not string matching.
//! * **id** — the part-of-speech letter of the file plus the synset offset (`n08420278`),
//!   unique and stable across runs.
//! * **skipped** — synsets whose definition has fewer than 3 words.
//!
//! A data line reads `offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt ... | gloss`
//! (`w_cnt` in hex); lines starting with spaces are the licence header.

use super::{squash, word_count, ImportError, Item, Parsed};
use std::path::Path;

/// The files read, with their part-of-speech letter, in this order.
const FILES: [(&str, char); 4] = [("noun", 'n'), ("verb", 'v'), ("adj", 'a'), ("adv", 'r')];

pub(super) fn read(dir: &Path) -> Result<Parsed, ImportError> {
    let mut parsed = Parsed::default();
    for (name, pos) in FILES {
        let path = dir.join(format!("data.{name}"));
        let bytes = std::fs::read(&path).map_err(|source| ImportError::Io {
            path: path.clone(),
            source,
        })?;
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() || line[0] == b' ' {
                continue;
            }
            let malformed = |problem: String| ImportError::Malformed {
                path: path.clone(),
                at: format!("line {}", i + 1),
                problem,
            };
            let line =
                std::str::from_utf8(line).map_err(|e| malformed(format!("not UTF-8 ({e})")))?;
            let synset = parse_line(line).map_err(malformed)?;
            match item(pos, &synset) {
                Some(it) => parsed.items.push(it),
                None => parsed.skip("definition under 3 words"),
            }
        }
    }
    Ok(parsed)
}

/// The fields of one data line this importer uses.
#[derive(Debug, PartialEq)]
pub(super) struct Synset {
    pub offset: String,
    pub ss_type: char,
    pub lemmas: Vec<String>,
    pub definition: String,
    pub examples: Vec<String>,
}

pub(super) fn parse_line(line: &str) -> Result<Synset, String> {
    let (head, gloss) = line
        .split_once(" | ")
        .ok_or("expected `fields | gloss` (no ` | ` separator)")?;
    let fields: Vec<&str> = head.split_whitespace().collect();
    if fields.len() < 4 {
        return Err(format!(
            "expected `offset lex_filenum ss_type w_cnt words...`, got {} fields",
            fields.len()
        ));
    }
    let offset = fields[0];
    if offset.len() != 8 || !offset.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected an 8-digit synset offset, got `{offset}`"));
    }
    let ss_type = match fields[2] {
        t @ ("n" | "v" | "a" | "s" | "r") => t.chars().next().expect("one char"),
        t => return Err(format!("expected ss_type n, v, a, s or r, got `{t}`")),
    };
    let w_cnt = usize::from_str_radix(fields[3], 16)
        .map_err(|_| format!("expected a hex word count, got `{}`", fields[3]))?;
    if w_cnt == 0 || fields.len() < 4 + 2 * w_cnt {
        return Err(format!(
            "word count {w_cnt} but only {} word fields",
            (fields.len() - 4) / 2
        ));
    }
    let mut lemmas: Vec<String> = Vec::new();
    for k in 0..w_cnt {
        let mut w = fields[4 + 2 * k];
        // Adjective position markers: `(a)`, `(p)`, `(ip)` glued to the word.
        if let Some(open) = w.find('(').filter(|_| w.ends_with(')')) {
            w = &w[..open];
        }
        let w = w.replace('_', " ");
        if !lemmas.contains(&w) {
            lemmas.push(w);
        }
    }
    let (definition, examples) = split_gloss(gloss);
    Ok(Synset {
        offset: offset.into(),
        ss_type,
        lemmas,
        definition,
        examples,
    })
}

/// Splits a gloss into its definition and its quoted examples. An example opens with `"`
/// after `;` or `:` (quotes elsewhere belong to the definition, as in `as in "on the job"`).
pub(super) fn split_gloss(gloss: &str) -> (String, Vec<String>) {
    let gloss = gloss.trim();
    let mut def_end = gloss.len();
    for (i, _) in gloss.match_indices('"') {
        let before = gloss[..i].trim_end();
        if before.is_empty() || before.ends_with(';') || before.ends_with(':') {
            def_end = i;
            break;
        }
    }
    let definition = squash(gloss[..def_end].trim_end_matches([';', ':', ' ']));
    let examples = gloss[def_end..]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(squash)
        .filter(|e| !e.is_empty())
        .collect();
    (definition, examples)
}

fn pos_name(ss_type: char) -> &'static str {
    match ss_type {
        'n' => "noun",
        'v' => "verb",
        'a' | 's' => "adjective",
        _ => "adverb",
    }
}

/// The item of a synset from the file of part of speech `pos`, or `None` when its definition
/// is too short to be a query.
pub(super) fn item(pos: char, s: &Synset) -> Option<Item> {
    if word_count(&s.definition) < 3 {
        return None;
    }
    let title = s.lemmas.join(", ");
    let mut text = format!("{title} ({})", pos_name(s.ss_type));
    if !s.examples.is_empty() {
        let quoted: Vec<String> = s.examples.iter().map(|e| format!("\"{e}\"")).collect();
        text.push_str(": ");
        text.push_str(&quoted.join("; "));
    }
    Some(Item {
        id: format!("{pos}{}", s.offset),
        query: s.definition.clone(),
        title,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BANK: &str = "08420278 14 n 04 depository_financial_institution 0 bank 0 \
        banking_concern 0 banking_company 0 002 @ 08054721 n 0000 #m 08066491 n 0000 | a \
        financial institution that accepts deposits and channels the money into lending \
        activities; \"he cashed a check at the bank\"; \"that bank holds the mortgage on my home\"  ";
    const BREATHE: &str = "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 \
        001 * 00005041 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; \
        \"I can breathe better when the air is clean\"; \"The patient is respiring\"  ";
    const ABLE: &str = "00001740 00 a 01 able(p) 0 000 | (usually followed by `to') having \
        the necessary means or skill; \"able to swim\"";
    const JOB: &str = "00582388 04 n 01 workplace 0 000 | a workplace; as in the expression \
        \"on the job\";";
    const SHORT: &str = "00001740 02 r 01 a_cappella 0 000 | unaccompanied; \"they sang\"";

    #[test]
    fn query_is_the_definition_and_the_document_never_contains_it() {
        let s = parse_line(BANK).unwrap();
        let it = item('n', &s).unwrap();
        assert_eq!(it.id, "n08420278");
        assert_eq!(
            it.query,
            "a financial institution that accepts deposits and channels the money into \
             lending activities"
        );
        assert_eq!(
            it.title,
            "depository financial institution, bank, banking concern, banking company"
        );
        assert_eq!(
            it.text,
            "depository financial institution, bank, banking concern, banking company (noun): \
             \"he cashed a check at the bank\"; \"that bank holds the mortgage on my home\""
        );
        assert!(!it.text.contains(&it.query));
        assert!(!it.text.contains("financial institution that"));
    }

    #[test]
    fn verbs_with_frames_adjective_markers_and_quoted_definitions() {
        let it = item('v', &parse_line(BREATHE).unwrap()).unwrap();
        assert_eq!(it.query, "draw air into, and expel out of, the lungs");
        assert!(it
            .text
            .starts_with("breathe, take a breath, respire, suspire (verb): "));
        let it = item('a', &parse_line(ABLE).unwrap()).unwrap();
        assert_eq!(it.title, "able");
        assert_eq!(
            it.query,
            "(usually followed by `to') having the necessary means or skill"
        );
        assert_eq!(it.text, "able (adjective): \"able to swim\"");
        let it = item('n', &parse_line(JOB).unwrap()).unwrap();
        assert_eq!(it.query, "a workplace; as in the expression \"on the job\"");
        assert_eq!(it.text, "workplace (noun)");
    }

    #[test]
    fn short_definitions_are_skipped_and_bad_lines_explained() {
        assert!(item('r', &parse_line(SHORT).unwrap()).is_none());
        let e = parse_line("00001740 02 r 01 a_cappella 0 000 no gloss").unwrap_err();
        assert!(e.contains("` | `"), "{e}");
        let e = parse_line("0001740 02 r 01 x 0 000 | a b c").unwrap_err();
        assert!(e.contains("8-digit"), "{e}");
        let e = parse_line("00001740 02 r 05 x 0 000 | a b c").unwrap_err();
        assert!(e.contains("word count 5"), "{e}");
    }

    #[test]
    fn reads_a_data_directory_and_names_the_line_of_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let header = "  1 This software and database is being provided\n";
        std::fs::write(tmp.path().join("data.noun"), format!("{header}{BANK}\n")).unwrap();
        std::fs::write(tmp.path().join("data.verb"), format!("{BREATHE}\n")).unwrap();
        std::fs::write(tmp.path().join("data.adj"), format!("{ABLE}\n")).unwrap();
        std::fs::write(tmp.path().join("data.adv"), format!("{SHORT}\n")).unwrap();
        let p = read(tmp.path()).unwrap();
        let ids: Vec<&str> = p.items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["n08420278", "v00001740", "a00001740"]);
        assert_eq!(p.skipped["definition under 3 words"], 1);
        std::fs::write(tmp.path().join("data.adv"), "\n00001740 02 r zz\n").unwrap();
        let e = read(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("data.adv: line 2:"), "{e}");
    }
}
