//! What a client command (`ctl`, `fleet`, `place`) ends with: its output and exit code, or why it failed.

/// Why `ctl` failed: a usage error (exit 2) or a failure (exit 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtlError {
    /// The arguments make no valid request.
    Usage(String),
    /// The server could not be reached, or answered with an error.
    Failed(String),
}

/// What `ctl` prints on stdout, and its exit code: 0 the server answered `ok`, 1 it answered an error;
/// `ctl health`: 0 up, 1 degraded, 2 down or unreachable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtlOutput {
    /// For stdout.
    pub stdout: String,
    /// The exit code.
    pub code: u8,
}

impl CtlOutput {
    /// Output of a command that succeeded.
    pub fn ok(stdout: String) -> CtlOutput {
        CtlOutput { stdout, code: 0 }
    }
}
