//! Running the real `plughost` binary.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use crate::plughost;

/// What a finished `plughost` command did.
#[derive(Debug)]
pub struct Ran {
    /// Exit code; the test fails if the process died by a signal.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Ran {
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        let code = match (o.status.code(), o.status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => panic!("plughost died by signal {s}; stderr:\n{stderr}"),
            (None, None) => panic!("plughost ended without code or signal"),
        };
        Ran { code, stdout: String::from_utf8_lossy(&o.stdout).into_owned(), stderr }
    }
}

/// Runs `plughost ARGS...` to completion.
pub fn run(args: &[&str]) -> Ran {
    command(args).output().expect("plughost can be started").into()
}

/// A `plughost ARGS...` command, not yet started, with logging left at its default.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(plughost());
    c.args(args).env_remove("RUST_LOG").env_remove("PLUGHOST_DRIVER_DIR");
    c
}
