//! Times and durations as plughost reads and writes them (a leaf: it imports nothing of the host).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch of `t` (0 before the epoch).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Seconds since the epoch, now.
pub(crate) fn now() -> u64 {
    unix_secs(SystemTime::now())
}

/// A duration setting: milliseconds (a bare number), or a number with a unit (`500ms`, `30s`, `2m`,
/// `1h`, or combined: `1m 30s`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(t)
        .map_err(|_| format!("{text:?}: expected milliseconds or a duration like 500ms, 30s, 2m"))
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn utc(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// `--since`: seconds since the epoch, a time `YYYY-MM-DDTHH:MM:SSZ` (or just the date), or an age
/// (`90s`, `15m`, `2h`, `7d`) before `now`.
pub(crate) fn parse_since(text: &str, now: u64) -> Result<u64, String> {
    let bad = || {
        format!("--since {text:?}: expected seconds since the epoch, YYYY-MM-DD[THH:MM:SSZ] or an age like 15m, 2h, 7d")
    };
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    if text.starts_with(|c: char| c.is_ascii_digit()) && !text.contains('-') {
        let age = humantime::parse_duration(text).map_err(|_| bad())?;
        return Ok(now.saturating_sub(age.as_secs()));
    }
    let full = if text.contains('T') { text.to_owned() } else { format!("{text}T00:00:00Z") };
    let at = humantime::parse_rfc3339(&full).map_err(|_| bad())?;
    Ok(unix_secs(at))
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
        assert_eq!(parse_since("7d", 1_000_000).unwrap(), 1_000_000 - 7 * 86_400);
        assert_eq!(parse_since("1795648985", 0).unwrap(), 1_795_648_985);
        assert!(parse_since("yesterday", 0).is_err());
        assert!(parse_since("2026-13-01", 0).is_err());
    }

    #[test]
    fn durations_are_milliseconds_or_carry_a_unit() {
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").unwrap_err().contains("expected milliseconds"));
    }
}
