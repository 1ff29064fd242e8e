//! The audit log: `STATE_DIR/audit.log`, one JSON object per line ([`AuditEntry`]) for every mutation,
//! swap and reload asked on the control socket, and every request refused for lack of permission: when,
//! who (the peer's uid and pid from `SO_PEERCRED`), what, and how it ended. Appended (`O_APPEND`, one
//! `write` per entry), private (0600) like the rest of the state dir; `plughost ctl audit` reads it.

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::control::protocol::{ApiError, AuditEntry};
use crate::control::server::Peer;

/// The audit log file, in the state dir.
pub(crate) const AUDIT_FILE: &str = "audit.log";

/// An open audit log.
#[derive(Debug)]
pub(crate) struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (creating it 0600) `STATE_DIR/audit.log` for appending.
    pub(crate) fn open(state_dir: &Path) -> Result<AuditLog, String> {
        let path = state_dir.join(AUDIT_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("audit log \"{}\": {}", path.display(), crate::util::fmt::io_text(&e)))?;
        Ok(AuditLog { path, file: Mutex::new(file) })
    }

    /// Appends one entry. A failure to write is logged, never fatal to the request it describes.
    pub(crate) fn record(
        &self,
        peer: &Peer,
        service: Option<&str>,
        op: &str,
        args: Option<Box<serde_json::value::RawValue>>,
        outcome: Result<(), &ApiError>,
    ) {
        let at = crate::util::time::now();
        let entry = AuditEntry {
            time: crate::util::time::utc(at),
            at,
            uid: peer.uid,
            pid: peer.pid,
            service: service.map(str::to_owned),
            op: op.to_owned(),
            args,
            outcome: match outcome {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.kind.as_str().to_owned(),
            },
            message: outcome.err().map(|e| e.message.clone()),
        };
        let mut line = match serde_json::to_vec(&entry) {
            Ok(l) => l,
            Err(e) => return log::error!("audit log: cannot encode an entry: {e}"),
        };
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&line) {
            log::error!("audit log {}: cannot append: {e}", self.path.display());
        }
    }

    /// The entries at or after `since` (seconds since the epoch), oldest first. Lines that do not parse
    /// (a partial last line after a crash) are skipped.
    pub(crate) fn read(&self, since: Option<u64>) -> Result<Vec<AuditEntry>, ApiError> {
        let f = std::fs::File::open(&self.path)
            .map_err(|e| ApiError::internal(format!("audit log \"{}\": {}", self.path.display(), e)))?;
        Ok(std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<AuditEntry>(&l).ok())
            .filter(|e| since.is_none_or(|s| e.at >= s))
            .collect())
    }
}
