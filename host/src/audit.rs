//! The audit log: `STATE_DIR/audit.log`, one JSON object per line ([`AuditEntry`]) for every mutation,
//! swap and reload asked on the control socket, and every request refused for lack of permission: when,
//! who (the peer's uid and pid from `SO_PEERCRED`), what, and how it ended. Appended (`O_APPEND`, one
//! `write` per entry), private (0600) like the rest of the state dir; `plughost ctl audit` reads it.

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::protocol::{ApiError, AuditEntry};
use crate::server::Peer;

/// The audit log file, in the state dir.
pub const AUDIT_FILE: &str = "audit.log";

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (creating it 0600) `STATE_DIR/audit.log` for appending.
    pub fn open(state_dir: &Path) -> Result<AuditLog, String> {
        let path = state_dir.join(AUDIT_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("audit log \"{}\": {}", path.display(), crate::error::io_text(&e)))?;
        Ok(AuditLog { path, file: Mutex::new(file) })
    }

    /// Appends one entry. A failure to write is logged, never fatal to the request it describes.
    pub fn record(
        &self,
        peer: &Peer,
        service: Option<&str>,
        op: &str,
        args: Option<Box<serde_json::value::RawValue>>,
        outcome: Result<(), &ApiError>,
    ) {
        let at = crate::services::records::now();
        let entry = AuditEntry {
            time: utc(at),
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
    pub fn read(&self, since: Option<u64>) -> Result<Vec<AuditEntry>, ApiError> {
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

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `--since`: seconds since the epoch, a time `YYYY-MM-DDTHH:MM:SSZ` (or just the date), or an age
/// (`90s`, `15m`, `2h`, `7d`) before `now`.
pub fn parse_since(text: &str, now: u64) -> Result<u64, String> {
    let bad = || {
        format!("--since {text:?}: expected seconds since the epoch, YYYY-MM-DD[THH:MM:SSZ] or an age like 15m, 2h, 7d")
    };
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    for (suffix, unit) in [("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)] {
        if let Some(n) = text.strip_suffix(suffix).and_then(|n| n.parse::<u64>().ok()) {
            return Ok(now.saturating_sub(n.saturating_mul(unit)));
        }
    }
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00:00Z"));
    let num = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.trim_end_matches('Z').split(':').collect();
    let ([y, mo, da], [h, mi, se]) = (d.as_slice(), t.as_slice()) else { return Err(bad()) };
    let (y, mo, da, h, mi, se) = (num(y)?, num(mo)?, num(da)?, num(h)?, num(mi)?, num(se)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let days = days_from_civil(i64::from(y), mo, da);
    u64::try_from(days * 86_400 + i64::from(h * 3600 + mi * 60 + se)).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_648_985), "2026-11-25T23:23:05Z");
        assert_eq!(utc(951_825_600), "2000-02-29T12:00:00Z");
        for t in [0, 951_825_600, 1_795_648_985, 4_102_444_800] {
            assert_eq!(parse_since(&utc(t), 0).unwrap(), t);
        }
        assert_eq!(parse_since("2026-11-25", 0).unwrap(), 1_795_564_800);
        assert_eq!(parse_since("15m", 10_000).unwrap(), 10_000 - 900);
        assert_eq!(parse_since("1795648985", 0).unwrap(), 1_795_648_985);
        assert!(parse_since("yesterday", 0).is_err());
        assert!(parse_since("2026-13-01", 0).is_err());
    }
}
