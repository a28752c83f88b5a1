//! FOLDOC (`dict-foldoc`): one item per entry of `foldoc.dict.dz`, located through
//! `foldoc.index`.
//!
//! The dictionary is dictzip, which is gzip with an index in the header, so it is read whole
//! with a gzip decoder. The index has a line per headword, `headword\toffset\tlength` with
//! offset and length in dictd's base64 (`A`–`Z`, `a`–`z`, `0`–`9`, `+`, `/`, most significant
//! digit first); several headwords can point at one entry, which is read once.
//!
//! An entry is its headword line(s) (the first is the title, the others aliases such as an
//! acronym), a blank line, then indented paragraphs separated by blank lines: the first usually
//! opens with a `<category>` tag, the last is often the `(YYYY-MM-DD)` of its last update.
//! Cross-references `{like this}` keep their text; `{name (url)}` keeps the name.
//!
//! * **query** — the first paragraph (sense number and category tag dropped) with every
//!   headword masked ([`super::mask_terms`]).
//! * **document** — title: the headword; text: the later paragraphs (the date dropped), or the
//!   headword alone when there are none. The first paragraph is not in it, so query and
//!   document do not share text.
//! * **id** — the headword, with characters outside `A–Z a–z 0–9 . _ + -` written as `%XX`
//!   (so ids have no spaces or tabs); `~2`, `~3`… for a repeated headword.
//! * **skipped** — dictd's `00-database-*` metadata entries, and entries whose masked query has
//!   fewer than 5 words (redirects such as `{ABEND}`).

use super::{mask_terms, squash, word_count, ImportError, Item, Parsed};
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

pub(super) fn read(dir: &Path) -> Result<Parsed, ImportError> {
    let dict_path = dir.join("foldoc.dict.dz");
    let index_path = dir.join("foldoc.index");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    let file = std::fs::File::open(&dict_path).map_err(io(&dict_path))?;
    let mut dict = Vec::new();
    flate2::read::MultiGzDecoder::new(file)
        .read_to_end(&mut dict)
        .map_err(io(&dict_path))?;
    let index = std::fs::read(&index_path).map_err(io(&index_path))?;
    let entries = parse_index(&index).map_err(|(line, problem)| ImportError::Malformed {
        path: index_path.clone(),
        at: format!("line {line}"),
        problem,
    })?;
    let mut parsed = Parsed::default();
    let mut seen_ids: HashMap<String, usize> = HashMap::new();
    for (offset, len, headword) in entries {
        let malformed = |problem: String| ImportError::Malformed {
            path: dict_path.clone(),
            at: format!("entry `{headword}` (offset {offset}, length {len})"),
            problem,
        };
        let bytes = dict.get(offset..offset + len).ok_or_else(|| {
            malformed(format!(
                "the index points past the end of the dictionary ({} bytes)",
                dict.len()
            ))
        })?;
        let text = std::str::from_utf8(bytes).map_err(|e| malformed(format!("not UTF-8 ({e})")))?;
        let entry = parse_entry(text);
        if entry
            .headwords
            .first()
            .is_none_or(|h| h.starts_with("00-database") || h.starts_with("00database"))
        {
            parsed.skip("dictd metadata entry");
            continue;
        }
        match item(&entry) {
            Some(mut it) => {
                let n = seen_ids.entry(it.id.clone()).or_default();
                *n += 1;
                if *n > 1 {
                    it.id = format!("{}~{n}", it.id);
                }
                parsed.items.push(it);
            }
            None => parsed.skip("masked query under 5 words"),
        }
    }
    Ok(parsed)
}

/// dictd's base64 number.
fn b64(s: &str) -> Option<usize> {
    s.bytes().try_fold(0usize, |acc, b| {
        let d = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc.checked_mul(64)?.checked_add(d as usize)
    })
}

/// An entry's place in the dictionary: `(offset, length, first headword naming it)`.
type IndexEntry = (usize, usize, String);

/// The distinct entries, by offset. An error is `(line, what was expected)`.
fn parse_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, (usize, String)> {
    let text = std::str::from_utf8(bytes).map_err(|e| (0, format!("not UTF-8 ({e})")))?;
    let mut by_offset: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut names: HashMap<(usize, usize), String> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let bad = || {
            (
                i + 1,
                format!("expected `headword<TAB>offset<TAB>length` in dictd base64, got `{line}`"),
            )
        };
        if cols.len() != 3 {
            return Err(bad());
        }
        let key = (b64(cols[1]).ok_or_else(bad)?, b64(cols[2]).ok_or_else(bad)?);
        by_offset.insert(key);
        names.entry(key).or_insert_with(|| cols[0].to_string());
    }
    Ok(by_offset
        .into_iter()
        .map(|k| (k.0, k.1, names.remove(&k).unwrap_or_default()))
        .collect())
}

/// An entry split into headwords and paragraphs (each squashed to one line).
#[derive(Debug, PartialEq)]
pub(super) struct Entry {
    pub headwords: Vec<String>,
    pub paragraphs: Vec<String>,
}

pub(super) fn parse_entry(text: &str) -> Entry {
    let mut lines = text.lines().skip_while(|l| l.trim().is_empty()).peekable();
    let mut headwords = Vec::new();
    while let Some(l) = lines.next_if(|l| !l.trim().is_empty()) {
        headwords.push(l.trim().to_string());
    }
    let mut paragraphs = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for l in lines {
        if l.trim().is_empty() {
            if !current.is_empty() {
                paragraphs.push(squash(&current.join(" ")));
                current.clear();
            }
        } else {
            current.push(l);
        }
    }
    if !current.is_empty() {
        paragraphs.push(squash(&current.join(" ")));
    }
    Entry {
        headwords,
        paragraphs,
    }
}

/// `{x}` → `x`, `{name (url)}` → `name`, `{(url)}` → `url`.
pub(super) fn strip_refs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let inner = after[..close].trim();
        let shown = match inner.rfind(" (").filter(|_| inner.ends_with(')')) {
            Some(p) => &inner[..p],
            None => inner
                .strip_prefix('(')
                .and_then(|u| u.strip_suffix(')'))
                .unwrap_or(inner),
        };
        out.push_str(shown);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Drops a leading sense number (`2.`) and `<category, tags>`.
fn strip_lead(p: &str) -> &str {
    let mut p = p.trim_start();
    if let Some((num, rest)) = p.split_once(". ") {
        if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
            p = rest.trim_start();
        }
    }
    if p.starts_with('<') {
        if let Some(end) = p.find('>') {
            p = p[end + 1..].trim_start();
        }
    }
    p
}

fn is_date(p: &str) -> bool {
    let b = p.as_bytes();
    b.len() == 12
        && b[0] == b'('
        && b[11] == b')'
        && b[5] == b'-'
        && b[8] == b'-'
        && [1, 2, 3, 4, 6, 7, 9, 10]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
}

/// Characters kept as they are in an id.
fn id_of(headword: &str) -> String {
    let mut id = String::new();
    for c in headword.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-') {
            id.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                id.push_str(&format!("%{b:02X}"));
            }
        }
    }
    id
}

/// The item of an entry, or `None` when its masked query is under 5 words.
pub(super) fn item(e: &Entry) -> Option<Item> {
    let title = e.headwords.first()?.clone();
    let names: Vec<&str> = e.headwords.iter().map(String::as_str).collect();
    let first = e.paragraphs.first()?;
    let query = squash(&mask_terms(&strip_refs(strip_lead(first)), &names));
    if word_count(&query) < 5 {
        return None;
    }
    let rest: Vec<String> = e.paragraphs[1..]
        .iter()
        .filter(|p| !is_date(p))
        .map(|p| squash(&strip_refs(p)))
        .filter(|p| !p.is_empty())
        .collect();
    let text = if rest.is_empty() {
        title.clone()
    } else {
        rest.join("\n")
    };
    Some(Item {
        id: id_of(&title),
        query,
        title,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const QMQP: &str = "Quick Mail Queueing Protocol\nQMQP\n\n   <communications> (QMQP) A \
        {protocol} that provides a central\n   {e-mail} queue for a {cluster} of {hosts}.  QMQP \
        is supposed\n   to provide fast transfers of mail.\n\n   {(http://cr.yp.to/mail.html)}\n\n   \
        See also {quick mail (qm.html)}.\n\n   (2007-05-25)\n\n";
    const CPP: &str = "C++\n\n   <language> One of the most used {object-oriented} languages, \
        a\n   superset of {C} developed by {Bjarne Stroustrup}.\n\n   (1996-06-06)\n";

    #[test]
    fn query_is_the_masked_first_paragraph_and_the_document_the_rest() {
        let e = parse_entry(QMQP);
        assert_eq!(e.headwords, ["Quick Mail Queueing Protocol", "QMQP"]);
        let it = item(&e).unwrap();
        assert_eq!(it.id, "Quick%20Mail%20Queueing%20Protocol");
        assert_eq!(it.title, "Quick Mail Queueing Protocol");
        // The acronym (an alias) and each content word of the headword are masked.
        assert_eq!(
            it.query,
            "(___) A ___ that provides a central e-___ queue for a cluster of hosts. ___ is \
             supposed to provide fast transfers of ___."
        );
        assert_eq!(it.text, "http://cr.yp.to/mail.html\nSee also quick mail.");
        assert!(!it.text.contains("central"));
    }

    #[test]
    fn an_entry_without_more_paragraphs_is_its_headword() {
        let it = item(&parse_entry(CPP)).unwrap();
        assert_eq!(
            it.query,
            "One of the most used object-oriented languages, a superset of C developed by \
             Bjarne Stroustrup."
        );
        assert_eq!(it.text, "C++");
        assert_eq!(it.id, "C++");
    }

    #[test]
    fn redirects_are_skipped() {
        let e = parse_entry("abend\n\n   {ABEND}\n\n");
        assert!(item(&e).is_none());
        let e = parse_entry("foo bar\n\n   1. <jargon> Foo, or bar, or FOO BAR.\n");
        assert!(item(&e).is_none(), "only masks and stopwords left");
    }

    #[test]
    fn index_offsets_are_dictd_base64_and_shared_entries_read_once() {
        assert_eq!(b64("A"), Some(0));
        assert_eq!(b64("BA"), Some(64));
        assert_eq!(
            b64("Gb9L"),
            Some(6 * 64 * 64 * 64 + 27 * 64 * 64 + 61 * 64 + 11)
        );
        let idx = parse_index(b"C++\tBA\tC\nc++\tBA\tC\nabend\tA\tB\n").unwrap();
        assert_eq!(
            idx,
            vec![(0, 1, "abend".to_string()), (64, 2, "C++".to_string())]
        );
        let (line, e) = parse_index(b"ok\tA\tB\nbad line\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(e.contains("headword<TAB>offset<TAB>length"), "{e}");
    }

    #[test]
    fn reads_a_dictzip_through_its_index() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let meta = "00-database-short\n\n   The Free On-line Dictionary of Computing\n\n";
        let dict = format!("{meta}{QMQP}{CPP}");
        let at = |s: &str| dict.find(s).unwrap();
        let enc = |mut n: usize| {
            let digits = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut s = Vec::new();
            loop {
                s.push(digits[n % 64]);
                n /= 64;
                if n == 0 {
                    break;
                }
            }
            s.reverse();
            String::from_utf8(s).unwrap()
        };
        let index = format!(
            "00-database-short\t{}\t{}\nC++\t{}\t{}\nQMQP\t{}\t{}\n",
            enc(0),
            enc(meta.len()),
            enc(at("C++\n")),
            enc(CPP.len()),
            enc(at("Quick")),
            enc(QMQP.len()),
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(dict.as_bytes()).unwrap();
        std::fs::write(tmp.path().join("foldoc.dict.dz"), gz.finish().unwrap()).unwrap();
        std::fs::write(tmp.path().join("foldoc.index"), index).unwrap();
        let p = read(tmp.path()).unwrap();
        let titles: Vec<&str> = p.items.iter().map(|i| i.title.as_str()).collect();
        assert_eq!(
            titles,
            ["Quick Mail Queueing Protocol", "C++"],
            "dictionary order"
        );
        assert_eq!(p.skipped["dictd metadata entry"], 1);
    }
}
