//! Names that become subject tokens: fleets, hosts, labels.

/// Checks that `name` (what `what` names, for the message) matches `[A-Za-z0-9_-]{1,64}`; the error names
/// the first character that does not.
pub fn check(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty (use 1 to 64 of A-Z a-z 0-9 _ -)"));
    }
    if let Some((i, c)) = name.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(format!(
            "{what} {name:?}: character {c:?} at byte {i} is not allowed (use 1 to 64 of A-Z a-z 0-9 _ -)"
        ));
    }
    if name.len() > 64 {
        return Err(format!("{what} {name:?} is {} characters long (at most 64)", name.len()));
    }
    Ok(())
}

/// The default host name: this machine's hostname with dots turned into `-`.
pub fn default_host() -> Result<String, String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("fleet host: cannot read the hostname (/proc/sys/kernel/hostname): {e}"))?;
    let name = raw.trim().replace('.', "-");
    check("fleet host (from the hostname; set fleet.host or --host-name)", &name)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_subject_tokens() {
        assert!(check("host", "h-1_A").is_ok());
        assert_eq!(
            check("host", "a.b").unwrap_err(),
            "host \"a.b\": character '.' at byte 1 is not allowed (use 1 to 64 of A-Z a-z 0-9 _ -)"
        );
        assert!(check("host", "a*").unwrap_err().contains("'*'"));
        assert!(check("host", "a>").unwrap_err().contains("'>'"));
        assert!(check("host", "a b").unwrap_err().contains("' '"));
        assert!(check("host", "").unwrap_err().contains("empty"));
        assert!(check("host", &"x".repeat(65)).unwrap_err().contains("65 characters"));
        assert!(check("host", &"x".repeat(64)).is_ok());
    }
}
