//! Who may have written what plughost reads, and keeping what it writes private.
//!
//! - **Driver files** (StrictModes, as sshd and sudo do): the file, every directory above it and every
//!   symlink followed on the way must be owned by root or by the host's uid, and nothing of it writable by
//!   group or others — except a sticky directory (as the temp dir), whose other users cannot rename or
//!   remove what they do not own: what lies in it still has to pass. Otherwise anyone who can write
//!   one of them can make the host (usually root) run their code.
//! - **Private directories** (the state dir, the control socket's directory): the same chain, and the
//!   directory itself owned by the host's uid (the state dir) and not writable by group or others.
//!
//! Checking the whole chain is what makes check-then-open safe: nobody else can change anything along
//! a trusted path between the check and the open.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Why a path is not trusted: the offending path (a directory above, a symlink, the file) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {why}", path = .path.display())]
pub(crate) struct Untrusted {
    /// The offending path.
    pub path: PathBuf,
    /// Why, with its owner and mode.
    pub why: String,
    /// The path (or a part of it) does not exist: nothing to trust or distrust.
    pub missing: bool,
}

impl Untrusted {
    /// The reason, naming the offending path only when it is not `subject` itself (which the caller's
    /// message names already).
    pub(crate) fn relative_to(&self, subject: &Path) -> String {
        let same = std::path::absolute(subject).is_ok_and(|a| a == self.path) || self.path == subject;
        if same {
            self.why.clone()
        } else {
            self.to_string()
        }
    }
}

/// The host's effective uid.
pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

fn describe(m: &fs::Metadata) -> String {
    format!("owner uid {}, mode {:04o}", m.uid(), m.permissions().mode() & 0o7777)
}

fn untrusted(path: &Path, why: impl Into<String>) -> Untrusted {
    Untrusted { path: path.to_owned(), why: why.into(), missing: false }
}

/// Checks one directory on a path: owned by root or us, and not writable by group or others unless
/// sticky.
fn check_dir(path: &Path, m: &fs::Metadata) -> Result<(), Untrusted> {
    if !trusted_owner(m.uid()) {
        return Err(untrusted(path, format!("directory owned by another user ({})", describe(m))));
    }
    let mode = m.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(untrusted(path, format!("directory writable by group or others and not sticky ({})", describe(m))));
    }
    Ok(())
}

/// Walks `path` as the kernel would, checking every directory traversed and every symlink followed;
/// returns the final, resolved path and its metadata (not checked here).
fn walk(path: &Path, depth: u32) -> Result<(PathBuf, fs::Metadata), Untrusted> {
    if depth > 40 {
        return Err(untrusted(path, "too many levels of symbolic links"));
    }
    let abs = std::path::absolute(path).map_err(|e| untrusted(path, e.to_string()))?;
    let mut current = PathBuf::from("/");
    let meta = |p: &Path| {
        fs::symlink_metadata(p).map_err(|e| Untrusted {
            missing: e.kind() == std::io::ErrorKind::NotFound,
            ..untrusted(p, crate::util::fmt::io_text(&e))
        })
    };
    let mut m = meta(&current)?;
    check_dir(&current, &m)?;
    let components: Vec<Component<'_>> = abs.components().collect();
    for (i, c) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => {
                current.pop();
                m = meta(&current)?;
                continue;
            }
            Component::Normal(name) => {
                let next = current.join(name);
                let nm = meta(&next)?;
                if nm.file_type().is_symlink() {
                    if !trusted_owner(nm.uid()) {
                        return Err(untrusted(&next, format!("symlink owned by another user ({})", describe(&nm))));
                    }
                    let target = fs::read_link(&next).map_err(|e| untrusted(&next, crate::util::fmt::io_text(&e)))?;
                    let (resolved, rm) = walk(&current.join(target), depth + 1)?;
                    if !last && !rm.is_dir() {
                        return Err(untrusted(&next, "not a directory"));
                    }
                    if !last {
                        check_dir(&resolved, &rm)?;
                    }
                    current = resolved;
                    m = rm;
                } else {
                    if !last {
                        if !nm.is_dir() {
                            return Err(untrusted(&next, "not a directory"));
                        }
                        check_dir(&next, &nm)?;
                    }
                    current = next;
                    m = nm;
                }
            }
        }
    }
    Ok((current, m))
}

/// The trust policy for a driver file: see the module docs.
pub(crate) fn check_driver_file(path: &Path) -> Result<(), Untrusted> {
    check_file(path)
}

/// The same policy for every file that decides what the host trusts: the config file and every file it
/// names (the allow list). Whoever can write one of them can set `trust.strict = false` or name their
/// own library, so they are held to the driver files' rule whatever `trust.strict` says.
pub(crate) fn check_config_file(path: &Path) -> Result<(), Untrusted> {
    check_file(path)
}

fn check_file(path: &Path) -> Result<(), Untrusted> {
    let (resolved, m) = walk(path, 0)?;
    if !trusted_owner(m.uid()) {
        return Err(untrusted(&resolved, format!("owned by another user ({})", describe(&m))));
    }
    if m.permissions().mode() & 0o022 != 0 {
        return Err(untrusted(&resolved, format!("writable by group or others ({})", describe(&m))));
    }
    Ok(())
}

/// Checks a directory plughost keeps to itself (the state dir) or serves from (the socket's directory):
/// the chain above it as for driver files, and the directory itself owned by `owners` and not writable
/// by group or others (sticky does not help here: plughost creates and replaces files in it). A missing
/// directory is created 0700 (with any missing parents). With `tighten`, group and other access to it is
/// removed.
pub(crate) fn private_dir(dir: &Path, what: &str, owner_may_be_root: bool, tighten: bool) -> Result<(), String> {
    if fs::symlink_metadata(dir).is_err() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {what} \"{}\": {}", dir.display(), crate::util::fmt::io_text(&e)))?;
    }
    let (resolved, m) = walk(dir, 0).map_err(|u| format!("{what} \"{}\": {u}", dir.display()))?;
    if !m.is_dir() {
        return Err(format!("{what} \"{}\" is not a directory", dir.display()));
    }
    let owner_ok = m.uid() == euid() || (owner_may_be_root && m.uid() == 0);
    if !owner_ok || m.permissions().mode() & 0o022 != 0 {
        let whose = if owner_ok { "writable by group or others" } else { "not owned by plughost's user" };
        return Err(format!(
            "{what} \"{}\" is {whose} (owner uid {}, mode {:04o}; plughost runs as uid {}): refusing to use it",
            dir.display(),
            m.uid(),
            m.permissions().mode() & 0o7777,
            euid()
        ));
    }
    if tighten && m.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(&resolved, fs::Permissions::from_mode(0o700)).map_err(|e| {
            format!("cannot make {what} \"{}\" private: {}", dir.display(), crate::util::fmt::io_text(&e))
        })?;
        log::info!("{what} {}: access for group and others removed (mode 0700)", dir.display());
    }
    Ok(())
}

/// From here on, files and directories this process creates are private to its user (0600 / 0700)
/// whatever the umask it was started with: volume files, logs, records, everything drivers create.
/// Returns the previous umask.
pub(crate) fn private_umask() -> u32 {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077)).as_raw_mode()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("plughost-trust-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn writable_files_and_directories_are_named() {
        let d = temp("modes");
        let lib = d.join("lib.so");
        fs::write(&lib, b"x").unwrap();
        fs::set_permissions(&lib, fs::Permissions::from_mode(0o644)).unwrap();
        check_driver_file(&lib).unwrap();
        fs::set_permissions(&lib, fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_driver_file(&lib).unwrap_err();
        let why = format!("writable by group or others (owner uid {}, mode 0666)", euid());
        assert_eq!((e.path.as_path(), e.why.as_str()), (lib.as_path(), why.as_str()));
        fs::set_permissions(&lib, fs::Permissions::from_mode(0o644)).unwrap();
        let open = d.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(open.join("lib.so"), b"x").unwrap();
        fs::set_permissions(open.join("lib.so"), fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_driver_file(&open.join("lib.so")).unwrap_err();
        assert_eq!(e.path, open);
        assert!(e.why.starts_with("directory writable by group or others and not sticky"), "{e}");
        // Sticky (as /tmp): fine, since nobody else can replace what we own in it.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        check_driver_file(&open.join("lib.so")).unwrap();
        // A symlink is followed, and its target's directories count.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(open.join("lib.so"), d.join("link.so")).unwrap();
        assert_eq!(check_driver_file(&d.join("link.so")).unwrap_err().path, open);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_private_dir_is_created_0700_and_an_open_one_refused() {
        let d = temp("private");
        let state = d.join("a/b/state");
        private_dir(&state, "state dir", false, true).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
        let shared = d.join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&shared, "state dir", false, true).unwrap_err();
        let tail = format!(
            "is writable by group or others (owner uid {0}, mode 0777; plughost runs as uid {0}): refusing to use it",
            euid()
        );
        assert!(e.ends_with(&tail), "{e}");
        let loose = d.join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&loose, "state dir", false, true).unwrap();
        assert_eq!(fs::metadata(&loose).unwrap().permissions().mode() & 0o777, 0o700, "tightened");
        fs::remove_dir_all(&d).unwrap();
    }
}
