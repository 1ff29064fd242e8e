//! Typed errors of the host library.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a driver library was rejected. Each kind has its own test in `tests/tests/integration/loader.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoadErrorKind {
    /// The path does not exist.
    NotFound,
    /// A directory, device or other non-regular file, or a file we may not read.
    NotAFile,
    /// Empty, not ELF, not a shared object, or truncated.
    NotElf,
    /// An ELF shared object for another machine or word size.
    WrongMachine,
    /// The dynamic loader refused the file (e.g. undefined symbols).
    DlopenFailed,
    /// A shared library without a plughost root module.
    NotADriver,
    /// Built with an abi_stable whose ABI differs from the host's.
    IncompatibleAbiStable,
    /// Built against an incompatible plugin-api version.
    IncompatibleApiVersion,
    /// Interface types differ from the host's.
    LayoutMismatch,
    /// A valid driver of another kind than the one asked for.
    WrongKind,
    /// Name, version, option schema or build settings are unacceptable.
    InvalidMetadata,
    /// The options given do not match the driver's schema.
    InvalidOptions,
    /// The constructor returned an error.
    ConstructorFailed,
    /// The constructor panicked (contained inside the plugin).
    ConstructorPanicked,
    /// The driver's `init` failed.
    InitFailed,
    /// The host could not prepare what loading needs: its private copy of the file, a worker process,
    /// or a backend setting it cannot apply (`user`, `group`, `memory_limit`).
    RuntimeDir,
    /// Loading it killed, stopped or hung a probe process: it would have taken the host down.
    Crashed,
    /// Larger than the size cap for driver files.
    TooLarge,
    /// The file, a directory above it or a symlink on the way may be written by someone the host does
    /// not trust (the trust policy).
    UntrustedDriver,
    /// The content differs from the backend's pinned digest.
    DigestMismatch,
    /// The content is not in the allow list.
    NotAllowed,
}

impl LoadErrorKind {
    /// Every kind.
    pub const ALL: &'static [LoadErrorKind] = &[
        LoadErrorKind::NotFound,
        LoadErrorKind::NotAFile,
        LoadErrorKind::NotElf,
        LoadErrorKind::WrongMachine,
        LoadErrorKind::DlopenFailed,
        LoadErrorKind::NotADriver,
        LoadErrorKind::IncompatibleAbiStable,
        LoadErrorKind::IncompatibleApiVersion,
        LoadErrorKind::LayoutMismatch,
        LoadErrorKind::WrongKind,
        LoadErrorKind::InvalidMetadata,
        LoadErrorKind::InvalidOptions,
        LoadErrorKind::ConstructorFailed,
        LoadErrorKind::ConstructorPanicked,
        LoadErrorKind::InitFailed,
        LoadErrorKind::RuntimeDir,
        LoadErrorKind::Crashed,
        LoadErrorKind::TooLarge,
        LoadErrorKind::UntrustedDriver,
        LoadErrorKind::DigestMismatch,
        LoadErrorKind::NotAllowed,
    ];

    /// The kind of a snake_case name.
    pub fn from_name(name: &str) -> Option<LoadErrorKind> {
        LoadErrorKind::ALL.iter().copied().find(|k| k.as_str() == name)
    }

    /// Whether the trust policy, a pin or the allow list refused it (rather than the file being broken).
    pub fn is_trust(self) -> bool {
        matches!(self, LoadErrorKind::UntrustedDriver | LoadErrorKind::DigestMismatch | LoadErrorKind::NotAllowed)
    }

    /// The snake_case name used in `--json` output and on the control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadErrorKind::NotFound => "not_found",
            LoadErrorKind::NotAFile => "not_a_file",
            LoadErrorKind::NotElf => "not_elf",
            LoadErrorKind::WrongMachine => "wrong_machine",
            LoadErrorKind::DlopenFailed => "dlopen_failed",
            LoadErrorKind::NotADriver => "not_a_driver",
            LoadErrorKind::IncompatibleAbiStable => "incompatible_abi_stable",
            LoadErrorKind::IncompatibleApiVersion => "incompatible_api_version",
            LoadErrorKind::LayoutMismatch => "layout_mismatch",
            LoadErrorKind::WrongKind => "wrong_kind",
            LoadErrorKind::InvalidMetadata => "invalid_metadata",
            LoadErrorKind::InvalidOptions => "invalid_options",
            LoadErrorKind::ConstructorFailed => "constructor_failed",
            LoadErrorKind::ConstructorPanicked => "constructor_panicked",
            LoadErrorKind::InitFailed => "init_failed",
            LoadErrorKind::RuntimeDir => "runtime_dir",
            LoadErrorKind::Crashed => "crashed",
            LoadErrorKind::TooLarge => "too_large",
            LoadErrorKind::UntrustedDriver => "untrusted_driver",
            LoadErrorKind::DigestMismatch => "digest_mismatch",
            LoadErrorKind::NotAllowed => "not_allowed",
        }
    }
}

impl fmt::Display for LoadErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected driver: `cannot load driver "PATH": REASON`, plus at most a few detail lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// What kind of rejection.
    pub kind: LoadErrorKind,
    /// The path the user gave.
    pub path: PathBuf,
    /// One line, lowercase, no trailing period.
    pub reason: String,
    /// Extra lines (Expected/Found, one per bad option), shown indented under the headline.
    pub details: Vec<String>,
}

impl LoadError {
    pub(crate) fn new(kind: LoadErrorKind, path: &Path, reason: impl Into<String>) -> LoadError {
        LoadError { kind, path: path.to_owned(), reason: reason.into(), details: Vec::new() }
    }
    pub(crate) fn with_details(mut self, details: Vec<String>) -> LoadError {
        self.details = details;
        self
    }
    /// The headline and the indented detail lines, as printed by the binary.
    pub fn report(&self) -> String {
        let mut s = self.to_string();
        for d in &self.details {
            s.push_str("\n  ");
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot load driver \"{}\": {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for LoadError {}
