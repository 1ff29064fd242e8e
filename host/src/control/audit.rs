//! The audit log: `STATE_DIR/audit.log`, one JSON object per line ([`AuditEntry`]) for every mutation,
//! swap and reload asked on the control socket, and every request refused for lack of permission: when,
//! who (the peer's uid and pid from `SO_PEERCRED`), what, and how it ended. Appended (`O_APPEND`, one
//! `write` per entry), private (0600) like the rest of the state dir; `plughost ctl audit` reads it.
//!
//! Bounded, so that whoever may connect cannot fill the disk or the host's memory through it: an entry
//! keeps at most [`MAX_ARGS`] bytes of arguments (larger ones are noted by size) and short operation
//! names and messages; refusals of peers that are not admins are recorded at most [`REFUSED_PER_WINDOW`]
//! per peer uid and [`WINDOW_SECS`] seconds, the rest summed up in one entry; `audit` answers at most
//! the [`MAX_ANSWER`] latest entries. Rotating the file (`mv`) is noticed at the next entry, which starts
//! a new file.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::control::protocol::{ApiError, AuditEntry};
use crate::control::server::Peer;

/// The audit log file, in the state dir.
pub(crate) const AUDIT_FILE: &str = "audit.log";

/// Arguments larger than this are not kept in an entry (their size is).
pub(crate) const MAX_ARGS: usize = 4096;
/// Refusals recorded per peer uid and window; the rest are counted.
pub(crate) const REFUSED_PER_WINDOW: u32 = 100;
/// The window of [`REFUSED_PER_WINDOW`], in seconds.
pub(crate) const WINDOW_SECS: u64 = 10;
/// The most entries one `audit` answer holds (the latest).
pub(crate) const MAX_ANSWER: usize = 5000;

/// Refusals of one peer uid in the current window.
#[derive(Debug, Default)]
struct Window {
    /// Whose window it is.
    peer: Option<Peer>,
    start: u64,
    recorded: u32,
    dropped: u64,
}

/// An open audit log.
#[derive(Debug)]
pub(crate) struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    refused: Mutex<HashMap<String, Window>>,
}

fn via(peer: &Peer) -> &'static str {
    if peer.remote.is_some() {
        "fleet"
    } else {
        "socket"
    }
}

fn cap(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], text.len()),
    }
}

impl AuditLog {
    /// Opens (creating it 0600) `STATE_DIR/audit.log` for appending.
    pub(crate) fn open(state_dir: &Path) -> Result<AuditLog, String> {
        let path = state_dir.join(AUDIT_FILE);
        let file = Self::open_file(&path)?;
        Ok(AuditLog { path, file: Mutex::new(file), refused: Mutex::default() })
    }

    fn open_file(path: &Path) -> Result<std::fs::File, String> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| format!("audit log \"{}\": {}", path.display(), crate::util::fmt::io_text(&e)))
    }

    /// Whether a refusal of `peer` is recorded (or counted); writes the summary of a window that ended.
    fn admit_refusal(&self, peer: &Peer, at: u64) -> bool {
        let who = peer.who();
        let mut windows = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows.entry(who.clone()).or_default();
        if at >= w.start + WINDOW_SECS {
            let ended = std::mem::replace(w, Window { peer: Some(peer.clone()), start: at, recorded: 0, dropped: 0 });
            drop(windows);
            if ended.dropped > 0 {
                self.summary(&ended);
            }
            windows = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        }
        let w = windows.entry(who).or_default();
        if w.recorded < REFUSED_PER_WINDOW {
            w.recorded += 1;
            true
        } else {
            w.dropped += 1;
            false
        }
    }

    fn summary(&self, w: &Window) {
        let at = crate::util::time::now();
        let Some(peer) = &w.peer else { return };
        let message = format!(
            "{} more refused requests of {} between {} and {} were not recorded (at most {REFUSED_PER_WINDOW} per {WINDOW_SECS}s)",
            w.dropped,
            peer.who(),
            crate::util::time::utc(w.start),
            crate::util::time::utc(w.start + WINDOW_SECS)
        );
        self.append(&AuditEntry {
            time: crate::util::time::utc(at),
            at,
            uid: peer.remote.is_none().then_some(peer.uid),
            pid: None,
            via: via(peer).to_owned(),
            user: peer.remote.as_ref().and_then(|r| r.user.clone()),
            service: None,
            op: "(refusals not recorded)".to_owned(),
            args: None,
            args_bytes: None,
            outcome: "summary".to_owned(),
            message: Some(message),
        });
    }

    /// Writes the summaries of every window that has ended.
    fn flush_windows(&self) {
        let now = crate::util::time::now();
        let ended: Vec<Window> = {
            let mut windows = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            let done: Vec<String> = windows
                .iter()
                .filter(|(_, w)| now >= w.start + WINDOW_SECS && w.dropped > 0)
                .map(|(u, _)| u.clone())
                .collect();
            done.into_iter().filter_map(|u| windows.remove(&u)).collect()
        };
        for w in ended {
            self.summary(&w);
        }
    }

    /// Appends one line to the file now at the log's path (a new one if the old one was moved away).
    fn append(&self, entry: &AuditEntry) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(l) => l,
            Err(e) => return log::error!("audit log: cannot encode an entry: {e}"),
        };
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let moved = match (f.metadata(), std::fs::symlink_metadata(&self.path)) {
            (Ok(open), Ok(there)) => open.ino() != there.ino() || open.dev() != there.dev(),
            _ => true,
        };
        if moved {
            match Self::open_file(&self.path) {
                Ok(new) => {
                    log::info!("audit log {}: moved away; a new file is started", self.path.display());
                    *f = new;
                }
                Err(e) => log::error!("{e}"),
            }
        }
        if let Err(e) = f.write_all(&line) {
            log::error!("audit log {}: cannot append: {e}", self.path.display());
        }
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
        self.record_at(crate::util::time::now(), peer, service, op, args, outcome);
    }

    /// [`record`](Self::record) at time `at` (seconds since the epoch).
    fn record_at(
        &self,
        at: u64,
        peer: &Peer,
        service: Option<&str>,
        op: &str,
        args: Option<Box<serde_json::value::RawValue>>,
        outcome: Result<(), &ApiError>,
    ) {
        if outcome.is_err() && !peer.is_admin() && !self.admit_refusal(peer, at) {
            return;
        }
        let kind = match outcome {
            Ok(()) => "ok",
            Err(e) => e.kind.as_str(),
        };
        log::info!(
            target: "plughost::audit",
            service = service.unwrap_or("-"),
            op = op,
            name = crate::control::request::arg_name(args.as_deref()).as_deref().unwrap_or("-"),
            peer = peer.tag().as_str(),
            outcome = kind;
            "audit"
        );
        let (args, args_bytes) = match args {
            Some(a) if a.get().len() > MAX_ARGS => (None, Some(a.get().len() as u64)),
            a => (a, None),
        };
        self.append(&AuditEntry {
            time: crate::util::time::utc(at),
            at,
            uid: peer.remote.is_none().then_some(peer.uid),
            pid: peer.remote.is_none().then_some(peer.pid),
            via: via(peer).to_owned(),
            user: peer.remote.as_ref().and_then(|r| r.user.as_deref().map(|u| cap(u, 64))),
            service: service.map(|s| cap(s, 64)),
            op: cap(op, 64),
            args,
            args_bytes,
            outcome: match outcome {
                Ok(()) => "ok".to_owned(),
                Err(e) => e.kind.as_str().to_owned(),
            },
            message: outcome.err().map(|e| cap(&e.message, 1024)),
        });
    }

    /// The latest entries (at most [`MAX_ANSWER`]) at or after `since` (seconds since the epoch), oldest
    /// first, read with bounded memory. Lines that do not parse (a partial last line after a crash) are
    /// skipped.
    pub(crate) fn read(&self, since: Option<u64>) -> Result<Vec<AuditEntry>, ApiError> {
        self.flush_windows();
        let f = std::fs::File::open(&self.path)
            .map_err(|e| ApiError::internal(format!("audit log \"{}\": {}", self.path.display(), e)))?;
        let mut latest = VecDeque::with_capacity(MAX_ANSWER.min(1024));
        for entry in std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<AuditEntry>(&l).ok())
            .filter(|e| since.is_none_or(|s| e.at >= s))
        {
            if latest.len() == MAX_ANSWER {
                latest.pop_front();
            }
            latest.push_back(entry);
        }
        Ok(latest.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::ErrorKind;

    fn log(tag: &str) -> (AuditLog, PathBuf) {
        let dir = std::env::temp_dir().join(format!("plughost-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (AuditLog::open(&dir).unwrap(), dir)
    }

    fn raw(text: &str) -> Option<Box<serde_json::value::RawValue>> {
        Some(serde_json::value::RawValue::from_string(text.to_owned()).unwrap())
    }

    #[test]
    fn a_reader_cannot_flood_it_and_what_it_drops_is_summed_up() {
        let (log, dir) = log("flood");
        let reader = Peer { uid: 65534, gid: 65534, pid: 7, remote: None };
        let denied = ApiError::new(ErrorKind::PermissionDenied, "no");
        for i in 0..1000 {
            log.record_at(1_000 + i / 100, &reader, Some("volume"), "delete", raw("{}"), Err(&denied));
        }
        // Ten seconds: the first window keeps 100 and drops 900; the next refusal closes it.
        log.record_at(1_020, &reader, Some("volume"), "delete", raw("{}"), Err(&denied));
        let entries = log.read(None).unwrap();
        assert_eq!(entries.iter().filter(|e| e.outcome == "permission_denied").count(), 101);
        let summary: Vec<&AuditEntry> = entries.iter().filter(|e| e.outcome == "summary").collect();
        assert_eq!(summary.len(), 1, "{summary:?}");
        assert!(summary[0].message.as_deref().unwrap().starts_with("900 more refused requests of uid 65534"));
        // An admin's entries are never dropped.
        let admin = Peer::this_process();
        for _ in 0..300 {
            log.record_at(1_030, &admin, Some("volume"), "delete", raw("{}"), Err(&denied));
        }
        let admins = log.read(Some(1_030)).unwrap().into_iter().filter(|e| e.uid == Some(admin.uid)).count();
        assert_eq!(admins, 300);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_are_bounded_and_the_answer_too() {
        let (log, dir) = log("bounded");
        let admin = Peer::this_process();
        let big = format!("{{\"name\":\"{}\"}}", "x".repeat(100_000));
        let long_op = "o".repeat(10_000);
        log.record(&admin, Some("volume"), &long_op, raw(&big), Ok(()));
        let e = &log.read(None).unwrap()[0];
        assert_eq!((e.args.is_none(), e.args_bytes), (true, Some(big.len() as u64)));
        assert!(e.op.len() < 200, "{}", e.op.len());
        assert!(std::fs::metadata(dir.join(AUDIT_FILE)).unwrap().len() < 1024);
        for i in 0..(MAX_ANSWER + 100) {
            log.record_at(2_000 + i as u64, &admin, None, "reload", None, Ok(()));
        }
        let answer = log.read(None).unwrap();
        assert_eq!(answer.len(), MAX_ANSWER);
        assert_eq!(answer.last().unwrap().at, 2_000 + (MAX_ANSWER + 99) as u64, "the latest are kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_moved_away_is_started_again() {
        let (log, dir) = log("rotate");
        let admin = Peer::this_process();
        log.record(&admin, None, "reload", None, Ok(()));
        std::fs::rename(dir.join(AUDIT_FILE), dir.join("audit.log.1")).unwrap();
        log.record(&admin, None, "reload", None, Ok(()));
        assert_eq!(log.read(None).unwrap().len(), 1, "the new file has the new entry");
        let old = std::fs::read_to_string(dir.join("audit.log.1")).unwrap();
        assert_eq!(old.lines().count(), 1, "the moved file keeps the old one");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
