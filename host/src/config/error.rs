//! Configuration errors, naming the file or the flag concerned.

use std::path::PathBuf;

/// A configuration error, naming the file or the flag concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config \"{path}\": {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file (or a directory above it) could have been written by another user: whoever can write
    /// the config decides what code the host runs.
    #[error("config \"{path}\": untrusted: {reason}", path = .path.display())]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// The offending path and why, with its owner and mode.
        reason: String,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config \"{path}\": line {line}, column {column}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Why.
        reason: String,
    },
    /// A value given on the command line, in the environment or in the file is unusable.
    #[error("{0}")]
    Invalid(String),
}
