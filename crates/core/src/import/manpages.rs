//! Linux man pages (`manpages`, `manpages-dev`): one item per page.
//!
//! **Files.** The regular `man*/*.gz` files dpkg lists for the two packages
//! (`/var/lib/dpkg/info/PKG.list`) under the data directory — other packages' pages in
//! `/usr/share/man` would make the output depend on what else is installed. When dpkg lists
//! none there (an extracted `.deb`, another system), every regular `man*/*.gz` under it.
//! Symbolic links and `.so` redirections are aliases of another page, so they are not items.
//! Files are read in sorted path order.
//!
//! * **query** — the NAME line's description after `\-` ("copy or catenate a string"), with
//!   the page's names (those before `\-`, and the file's) masked.
//! * **document** — title: `name(section)` from the file name; text: the DESCRIPTION section
//!   as plain text ([`super::troff`]), cut to 2,000 characters.
//! * **id** — the file name without `.gz` (`strcpy.3`).
//! * **skipped** — pages without a NAME line with `\-` or without a DESCRIPTION, and pages
//!   whose masked query has no word left.

use super::{cut_chars, mask_terms, squash, troff, word_count, ImportError, Item, Parsed};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Longest document text, in characters: DESCRIPTIONs run to tens of kilobytes, and models
/// read a few hundred tokens.
pub(super) const MAX_TEXT_CHARS: usize = 2_000;

/// The page files to read, sorted.
fn page_files(dir: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let is_page = |p: &Path| {
        p.extension().is_some_and(|e| e == "gz")
            && p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|d| d.to_string_lossy().starts_with("man"))
            && p.symlink_metadata().is_ok_and(|m| m.file_type().is_file())
    };
    let mut files: Vec<PathBuf> = Vec::new();
    for pkg in super::Source::Manpages.packages() {
        let list = Path::new("/var/lib/dpkg/info").join(format!("{pkg}.list"));
        if let Ok(text) = std::fs::read_to_string(&list) {
            files.extend(
                text.lines()
                    .map(PathBuf::from)
                    .filter_map(|p| p.strip_prefix(dir).ok().map(|r| dir.join(r)))
                    .filter(|p| p.parent().and_then(Path::parent) == Some(dir) && is_page(p)),
            );
        }
    }
    if files.is_empty() {
        let rd = |d: &Path| {
            std::fs::read_dir(d).map_err(|source| ImportError::Io {
                path: d.to_path_buf(),
                source,
            })
        };
        for sub in rd(dir)? {
            let sub = sub
                .map_err(|source| ImportError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?
                .path();
            if sub.is_dir()
                && sub
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("man"))
            {
                for f in rd(&sub)? {
                    let f = f
                        .map_err(|source| ImportError::Io {
                            path: sub.clone(),
                            source,
                        })?
                        .path();
                    if is_page(&f) {
                        files.push(f);
                    }
                }
            }
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

pub(super) fn read(
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Parsed, ImportError> {
    let files = page_files(dir)?;
    let mut parsed = Parsed::default();
    for (i, path) in files.iter().enumerate() {
        progress(i, files.len());
        let mut src = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| flate2::read::MultiGzDecoder::new(f).read_to_end(&mut src))
            .map_err(|source| ImportError::Io {
                path: path.clone(),
                source,
            })?;
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        let stem = file_name.strip_suffix(".gz").unwrap_or(&file_name);
        match page_item(stem, &String::from_utf8_lossy(&src)) {
            Ok(it) => parsed.items.push(it),
            Err(why) => parsed.skip(why),
        }
    }
    progress(files.len(), files.len());
    Ok(parsed)
}

/// The item of page `stem` (`strcpy.3`) with troff source `src`, or why it is skipped.
pub(super) fn page_item(stem: &str, src: &str) -> Result<Item, &'static str> {
    let (file_name, section) = stem.rsplit_once('.').unwrap_or((stem, ""));
    if src.lines().any(|l| l.starts_with(".so ")) && !src.contains(".SH") {
        return Err("redirection (.so) to another page");
    }
    let sections = troff::sections(src);
    let body = |want: &str| {
        sections
            .iter()
            .find(|(name, _)| name == want)
            .map(|(_, l)| l)
    };
    let name_lines = body("NAME").ok_or("no NAME section")?;
    let description = body("DESCRIPTION").ok_or("no DESCRIPTION section")?;
    let at = name_lines
        .iter()
        .position(|l| l.contains(r"\-") || l.contains(" - "))
        .ok_or("NAME has no `\\-` between names and description")?;
    let sep = if name_lines[at].contains(r"\-") {
        r"\-"
    } else {
        " - "
    };
    let (before, after) = name_lines[at].split_once(sep).expect("found above");
    let mut names_src: Vec<&str> = name_lines[..at].to_vec();
    names_src.push(before);
    let mut desc_src: Vec<&str> = vec![after];
    desc_src.extend(&name_lines[at + 1..]);
    let names_text = troff::to_text(&names_src).replace('\n', " ");
    let mut names: Vec<&str> = names_text
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    names.push(file_name);
    let query = squash(&mask_terms(
        &troff::to_text(&desc_src).replace('\n', " "),
        &names,
    ));
    if word_count(&query) == 0 {
        return Err("masked NAME description has no word left");
    }
    let text = cut_chars(&troff::to_text(description), MAX_TEXT_CHARS);
    if text.is_empty() {
        return Err("DESCRIPTION is empty");
    }
    Ok(Item {
        id: stem.to_string(),
        query,
        title: format!("{file_name}({section})"),
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRCPY: &str = r#"'\" t
.\" Copyright 2022 Alejandro Colomar
.TH strcpy 3 2023-02-05 "Linux man-pages 6.03"
.SH NAME
stpcpy, strcpy, strcat \- copy or catenate a string
.SH SYNOPSIS
.nf
.B #include <string.h>
.fi
.SH DESCRIPTION
.TP
.BR stpcpy ()
These functions copy the string pointed to by
.IR src ,
into a buffer\(emsee
.BR strcat (3).
.SH "SEE ALSO"
.BR strdup (3)
"#;

    #[test]
    fn query_is_the_masked_name_line_and_the_document_the_description() {
        let it = page_item("strcpy.3", STRCPY).unwrap();
        assert_eq!(it.id, "strcpy.3");
        assert_eq!(it.title, "strcpy(3)");
        assert_eq!(it.query, "copy or catenate a string");
        assert_eq!(
            it.text,
            "stpcpy() These functions copy the string pointed to by src, into a buffer—see \
             strcat(3)."
        );
    }

    #[test]
    fn names_are_masked_in_the_query() {
        let src = ".SH NAME\nmalloc, free, calloc \\- allocate and free dynamic memory\n\
                   .SH DESCRIPTION\nThe \\fBmalloc\\fP() function allocates.\n";
        let it = page_item("malloc.3", src).unwrap();
        assert_eq!(it.query, "allocate and ___ dynamic memory");
        assert_eq!(it.text, "The malloc() function allocates.");
        // Names over several lines, and the file's own name.
        let src = ".SH NAME\nCIRCLEQ_EMPTY,\nCIRCLEQ_FIRST\n\\- CIRCLEQ_first macros for \
                   circleq lists\n.SH DESCRIPTION\nText.\n";
        let it = page_item("circleq.3", src).unwrap();
        assert_eq!(it.query, "___ macros for ___ lists");
    }

    #[test]
    fn pages_without_name_or_description_are_skipped_and_text_is_cut() {
        assert_eq!(
            page_item("x.3", ".so man3/y.3\n").unwrap_err(),
            "redirection (.so) to another page"
        );
        assert_eq!(
            page_item("x.3", ".SH DESCRIPTION\ntext\n").unwrap_err(),
            "no NAME section"
        );
        assert_eq!(
            page_item("x.3", ".SH NAME\nx \\- does y\n").unwrap_err(),
            "no DESCRIPTION section"
        );
        let long = format!(
            ".SH NAME\nx \\- does y\n.SH DESCRIPTION\n{}\n",
            "word ".repeat(1_000)
        );
        let it = page_item("x.3", &long).unwrap();
        assert!(it.text.chars().count() <= MAX_TEXT_CHARS);
        assert!(it.text.chars().count() > MAX_TEXT_CHARS - 10);
    }
}
