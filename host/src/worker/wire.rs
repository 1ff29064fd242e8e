//! The wire between the host and a worker: frames (a little-endian `u32` length, a `u64` request id,
//! the postcard payload), the setup exchange (id 0), and what both ends share.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// The descriptor the worker finds its socket at.
pub(super) const SOCKET_FD: i32 = 3;
/// The descriptor the worker finds the library at.
pub(super) const LIBRARY_FD: i32 = 4;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------------
// Frames

pub(super) fn write_frame(w: &mut impl Write, id: u64, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len() + 8).map_err(|_| std::io::Error::other("frame too large"))?;
    let mut buf = Vec::with_capacity(12 + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// The largest frame a worker takes from the host (the host's own calls: trusted).
pub(super) const MAX_CALL_FRAME: usize = 256 << 20;

/// One frame, or `None` at the end of the stream. A frame longer than `max` bytes is an error of kind
/// `InvalidData` naming its length, read no further. The body is read as it arrives (memory grows with
/// what was really sent, not with what the length claims).
pub(super) fn read_frame(r: &mut impl Read, max: usize) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let mut head = [0u8; 4];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head) as usize;
    if len < 8 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes, too short")));
    }
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes, over the {max}-byte limit (max_frame_bytes)"),
        ));
    }
    let mut body = Vec::with_capacity(len.min(64 << 10));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let id = u64::from_le_bytes(body[..8].try_into().expect("8 bytes were read"));
    body.drain(..8);
    Ok(Some((id, body)))
}

// ---------------------------------------------------------------------------------------------------
// Setup

/// What the host tells a new worker: which driver to serve, with which options.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    /// `volume`, `compute`, ...
    pub service: String,
    /// The backend.
    pub backend: String,
    /// The path the library was read from (for messages).
    pub path: PathBuf,
    /// For `${state_dir}` in option values.
    pub state_dir: PathBuf,
    /// The configured options, before expansion.
    pub options: Vec<(String, String)>,
    /// Address-space limit (`RLIMIT_AS`), applied by the worker before the library is opened.
    pub memory_limit: Option<u64>,
}

/// What a worker answers to [`Setup`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SetupReply {
    /// Serving.
    Ready {
        /// Driver name.
        name: String,
        /// Driver version.
        version: String,
        /// Plugin API version it was built against.
        api_version: String,
        /// Extensions it provides.
        extensions: Vec<String>,
        /// Options as validated (secrets replaced).
        shown_options: std::collections::BTreeMap<String, String>,
        /// Why `init` failed, if it did.
        init_error: Option<String>,
    },
    /// Refused (as the in-process loader would have).
    Refused {
        /// The [`LoadErrorKind`](crate::LoadErrorKind) name.
        kind: String,
        /// One line.
        reason: String,
        /// Detail lines.
        details: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 7, b"hello").unwrap();
        write_frame(&mut buf, 0, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, MAX_CALL_FRAME).unwrap(), Some((7, b"hello".to_vec())));
        assert_eq!(read_frame(&mut r, MAX_CALL_FRAME).unwrap(), Some((0, Vec::new())));
        assert_eq!(read_frame(&mut r, MAX_CALL_FRAME).unwrap(), None);
        let bad = 3u32.to_le_bytes();
        assert!(read_frame(&mut &bad[..], MAX_CALL_FRAME).is_err());
        let mut big = Vec::new();
        write_frame(&mut big, 1, &[0u8; 100]).unwrap();
        let e = read_frame(&mut &big[..], 50).unwrap_err();
        assert_eq!(e.to_string(), "a frame of 108 bytes, over the 50-byte limit (max_frame_bytes)");
    }
}
