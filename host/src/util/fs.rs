//! Files and directories (a leaf: it imports nothing of the host).

use std::path::{Path, PathBuf};

/// A fresh directory `PREFIX-RANDOM` in `parent`, mode 0700, made by this call (never one that existed:
/// a name taken, by accident or by another user, is retried with another random name). Random names
/// (from the OS-seeded hasher keys) cannot be taken in advance by someone who wants a later creation
/// to fail.
pub(crate) fn fresh_private_dir(parent: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    use std::hash::BuildHasher;
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for attempt in 0..64u32 {
        let random = std::collections::hash_map::RandomState::new().hash_one((std::process::id(), attempt));
        let dir = parent.join(format!("{prefix}-{random:016x}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free directory name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_makes_a_new_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let parent = std::env::temp_dir();
        let a = fresh_private_dir(&parent, "plughost-fs-test").unwrap();
        let b = fresh_private_dir(&parent, "plughost-fs-test").unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::metadata(&a).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir(&a).unwrap();
        std::fs::remove_dir(&b).unwrap();
    }
}
