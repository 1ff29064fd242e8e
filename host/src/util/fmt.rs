//! Text for people: sizes, tables, key-value lists (a leaf: it imports nothing of the host).

/// A size in binary units, for people.
pub(crate) fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// A JSON object as `key: value` lines (strings unquoted); anything else as one line.
pub(crate) fn key_values(result: &str) -> Result<String, String> {
    let map: Result<serde_json::Map<String, serde_json::Value>, _> = serde_json::from_str(result);
    Ok(match map {
        Ok(m) => m
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
                format!("{}: {}\n", printable(k), printable(&v))
            })
            .collect(),
        Err(_) => format!("{}\n", printable(result)),
    })
}

/// Text for a terminal: every control character (a newline, an escape sequence a driver or a client
/// put in a name) shown escaped, so that what plughost prints is what it says.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub(crate) fn table<'a, const N: usize>(rows: impl Iterator<Item = &'a [String; N]> + Clone, indent: &str) -> String {
    let mut widths = [0usize; N];
    for r in rows.clone() {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(printable(c).chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        s.push_str(indent);
        for (i, c) in r.iter().enumerate() {
            let c = &printable(c);
            s.push_str(c);
            if i + 1 < N {
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        let trimmed = s.trim_end().len();
        s.truncate(trimmed);
        s.push('\n');
    }
    s
}

/// Like [`table`], for rows of any length (the first row's length counts).
pub(crate) fn table_rows(rows: &[Vec<String>], indent: &str) -> String {
    let n = rows.first().map(Vec::len).unwrap_or(0);
    let mut widths = vec![0usize; n];
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            widths[i] = widths[i].max(printable(c).chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let mut line = indent.to_owned();
        for (i, c) in r.iter().enumerate().take(n) {
            let c = &printable(c);
            line.push_str(c);
            if i + 1 < n {
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// An I/O error's text without the `(os error N)` suffix, lowercase.
pub(crate) fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut c = text.chars();
    match c.next() {
        Some(first) => first.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Something a client sent, as a message echoes it: quoted and escaped (no control character reaches a
/// terminal or a log line), and at most 80 characters of it (a megabyte of name gives a line, not a
/// megabyte of answer).
pub(crate) fn echo(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_reaches_a_terminal_is_printable() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
        let t = table(
            [["NAME".to_owned(), "X".to_owned()], ["e\u{1b}]0;pwned\u{7}".to_owned(), "1".to_owned()]].iter(),
            "",
        );
        assert!(!t.contains('\u{1b}') && !t.contains('\u{7}'), "{t:?}");
        assert_eq!(t.lines().count(), 2);
    }

    #[test]
    fn echoes_are_escaped_and_capped() {
        assert_eq!(echo("v1"), "\"v1\"");
        assert_eq!(echo("a\nb\u{1b}[2J"), "\"a\\nb\\u{1b}[2J\"");
        let long = "x".repeat(1 << 20);
        let e = echo(&long);
        assert!(e.len() < 120 && e.ends_with("… (1048576 bytes)"), "{e}");
    }
}
