//! Just enough troff (man macros) to plain text: enough for the man pages of `manpages` and
//! `manpages-dev` to read as prose, not a formatter.
//!
//! Font-change macros (`.B`, `.I`, `.BR`, `.IR`, …) keep their arguments, the alternating
//! ones glued together as troff prints them; headings (`.SS`) and `.IP` tags other than
//! bullets keep their text; paragraph macros end a paragraph; every other request is dropped
//! (`.de` definitions and table formats included). Escapes become the characters they print
//! (`\-`, `\(em`, `\[aq]`, `\e`) or nothing (`\fB`, `\s-1`, `\&`, `\c`).

/// A man page split into its `.SH` sections: `(name, raw lines)`, names upper-cased and
/// unquoted. Lines before the first `.SH` are dropped.
pub(super) fn sections(src: &str) -> Vec<(String, Vec<&str>)> {
    let mut out: Vec<(String, Vec<&str>)> = Vec::new();
    for line in src.lines() {
        if let Some(rest) = macro_line(line).and_then(|(name, rest)| (name == "SH").then_some(rest))
        {
            out.push((
                escape(&args(rest).join(" ")).trim().to_uppercase(),
                Vec::new(),
            ));
        } else if let Some((_, lines)) = out.last_mut() {
            lines.push(line);
        }
    }
    out
}

/// `(macro name, rest)` for a control line (`.XX args` or `'XX args`).
fn macro_line(line: &str) -> Option<(&str, &str)> {
    let rest = line
        .strip_prefix('.')
        .or_else(|| line.strip_prefix('\''))?
        .trim_start();
    let end = rest.find([' ', '\t']).unwrap_or(rest.len());
    Some((&rest[..end], rest[end..].trim_start()))
}

/// Macro arguments: space-separated, `"double quoted"` with `""` for a quote inside.
fn args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        let Some(&c) = chars.peek() else { break };
        let mut arg = String::new();
        if c == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.next_if_eq(&'"').is_some() {
                        arg.push('"');
                        continue;
                    }
                    break;
                }
                arg.push(c);
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ' ' && *c != '\t') {
                arg.push(c);
            }
        }
        out.push(arg);
    }
    out
}

/// Lines of troff as plain text: paragraphs separated by `\n`, whitespace squashed.
pub(super) fn to_text(lines: &[&str]) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut end_paragraph = |current: &mut String| {
        let p = super::squash(current);
        if !p.is_empty() {
            paragraphs.push(p);
        }
        current.clear();
    };
    let mut in_def = false;
    let mut table_format = false;
    let mut in_table = false;
    for line in lines {
        if in_def {
            in_def = line.trim() != "..";
            continue;
        }
        if table_format {
            // Table options and column formats end at the line ending with `.`.
            table_format = !line.trim_end().ends_with('.');
            continue;
        }
        let Some((name, rest)) = macro_line(line) else {
            let mut text = line.to_string();
            if in_table {
                let t = text.trim();
                if t == "_" || t == "=" {
                    continue;
                }
                text = text
                    .replace("T{", " ")
                    .replace("T}", " ")
                    .replace('\t', " ");
            }
            current.push(' ');
            current.push_str(&escape(&text));
            continue;
        };
        let text = match name {
            "B" | "I" | "SM" | "SB" | "SY" => args(rest).join(" "),
            "SS" => {
                end_paragraph(&mut current);
                args(rest).join(" ")
            }
            "BR" | "BI" | "IB" | "IR" | "RB" | "RI" => args(rest).concat(),
            "IP" | "TP" | "TQ" | "PP" | "P" | "LP" | "HP" | "sp" | "br" => {
                end_paragraph(&mut current);
                let tag = args(rest).into_iter().next().unwrap_or_default();
                let tag = escape(&tag);
                if name == "IP" && tag.chars().any(char::is_alphanumeric) {
                    tag
                } else {
                    String::new()
                }
            }
            "UE" | "ME" => args(rest).concat(),
            "de" | "de1" | "am" => {
                in_def = true;
                String::new()
            }
            "TS" => {
                end_paragraph(&mut current);
                table_format = true;
                in_table = true;
                String::new()
            }
            "TE" => {
                in_table = false;
                end_paragraph(&mut current);
                String::new()
            }
            _ => String::new(),
        };
        if !text.is_empty() {
            current.push(' ');
            current.push_str(&escape(&text));
        }
        if name == "SS" {
            end_paragraph(&mut current);
        }
    }
    end_paragraph(&mut current);
    paragraphs.join("\n")
}

/// The character a named glyph (`\(xx`, `\[name]`) prints; unknown ones print nothing.
fn glyph(name: &str) -> String {
    let s = match name {
        "em" => "—",
        "en" => "–",
        "hy" | "mi" | "-" => "-",
        "bu" => "•",
        "aq" | "oq" | "cq" => "'",
        "dq" | "lq" | "rq" | "Lq" | "Rq" => "\"",
        "co" => "©",
        "rg" => "®",
        "tm" => "™",
        "rs" => "\\",
        "ti" | "a~" => "~",
        "ha" | "a^" => "^",
        "mu" => "×",
        "di" => "÷",
        "+-" => "±",
        "<=" => "≤",
        ">=" => "≥",
        "!=" => "≠",
        "==" => "≡",
        "->" => "→",
        "<-" => "←",
        "ua" => "↑",
        "da" => "↓",
        "de" => "°",
        "ga" => "`",
        "aa" => "´",
        "ba" | "or" => "|",
        "pc" => "·",
        "sc" => "§",
        "ps" => "¶",
        "Fo" => "«",
        "Fc" => "»",
        "lB" => "[",
        "rB" => "]",
        "lC" => "{",
        "rC" => "}",
        "la" => "⟨",
        "ra" => "⟩",
        "R" => "®",
        "ss" => "ß",
        _ => {
            return name
                .strip_prefix('u')
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32)
                .map(String::from)
                .unwrap_or_default()
        }
    };
    s.to_string()
}

/// Reads an escape's name: `(xx`, `[name]`, or one character.
fn escape_name(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    match chars.next() {
        Some('(') => chars.by_ref().take(2).collect(),
        Some('[') => chars.by_ref().take_while(|&c| c != ']').collect(),
        Some(c) => c.to_string(),
        None => String::new(),
    }
}

/// Text with troff escapes replaced by what they print.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else { break };
        match e {
            'f' | 'n' | 'g' | 'k' | 'm' | 'M' | 'Y' | 'V' | '$' => {
                escape_name(&mut chars);
            }
            '(' | '[' => {
                let name: String = if e == '(' {
                    chars.by_ref().take(2).collect()
                } else {
                    chars.by_ref().take_while(|&c| c != ']').collect()
                };
                out.push_str(&glyph(&name));
            }
            '*' => out.push_str(&glyph(&escape_name(&mut chars))),
            's' => {
                chars.next_if(|c| *c == '+' || *c == '-');
                if chars.next_if_eq(&'(').is_some() {
                    chars.next();
                    chars.next();
                } else {
                    chars.next_if(char::is_ascii_digit);
                }
            }
            'N' | 'h' | 'v' | 'w' | 'o' | 'l' | 'L' | 'D' | 'X' | 'b' | 'x' | 'Z' | 'A' | 'B'
            | 'R' | 'H' | 'S' | 'C' => {
                if let Some(delim) = chars.next() {
                    chars.by_ref().take_while(|&c| c != delim).for_each(drop);
                }
            }
            '"' | '#' => break,
            'e' | '\\' => out.push('\\'),
            ' ' | '~' | '0' => out.push(' '),
            '&' | '|' | '^' | ':' | '%' | 'c' | 'd' | 'u' | '!' | 'p' | 'a' | 'r' | 'z' | '{'
            | '}' | 't' => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_print_their_characters() {
        assert_eq!(escape(r"\fBstrcpy\fP() \- copy"), "strcpy() - copy");
        assert_eq!(
            escape(r"a\(emb \[aq]x\[aq] \e0 \&.B \s-1SMALL\s0"),
            "a—b 'x' \\0 .B SMALL"
        );
        assert_eq!(
            escape(r"\f[CR]mono\f[] \*(lqq\*(rq \[u00E9]"),
            "mono \"q\" é"
        );
        assert_eq!(escape(r#"text \" a comment"#), "text ");
    }

    #[test]
    fn macros_keep_their_text_and_drop_the_rest() {
        let page = [
            r#".\" a comment"#,
            ".TP",
            ".BR stpcpy ()",
            "These functions copy the string pointed to by",
            ".IR src ,",
            "into",
            r#".I "a buffer""#,
            ".PP",
            ".in +4n",
            ".EX",
            "char *p;",
            ".EE",
            ".IP \\[bu] 3",
            "bullet item",
            ".SS Notes here",
            ".TS",
            "allbox;",
            "lb lb.",
            "Interface\tAttribute",
            "_",
            "T{",
            ".BR strcpy ()",
            "T}\tThread safety",
            ".TE",
            ".de XX",
            "dropped",
            "..",
            ".RB [ \\-n ]",
        ];
        assert_eq!(
            to_text(&page),
            "stpcpy() These functions copy the string pointed to by src, into a buffer\n\
             char *p;\nbullet item\nNotes here\nInterface Attribute strcpy() Thread safety\n[-n]"
        );
    }

    #[test]
    fn sections_are_split_at_sh() {
        let src = ".TH X 3\n.SH NAME\nx \\- y\n.SH \"SEE ALSO\"\nz\n";
        let s = sections(src);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], ("NAME".to_string(), vec![r"x \- y"]));
        assert_eq!(s[1].0, "SEE ALSO");
    }
}
