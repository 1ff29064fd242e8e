//! systemd's notification protocol, without systemd's library: datagrams to `$NOTIFY_SOCKET` (`READY=1`,
//! `STATUS=…`, `RELOADING=1`, `STOPPING=1`, `WATCHDOG=1`). The variables are read once at start and
//! removed from the environment, so that no child (isolated workers, probes, instances) inherits them
//! and talks to systemd as if it were the host. Without `NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The variables systemd hands a service that no child of the host should see.
const PRIVATE: &[&str] =
    &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

#[derive(Debug)]
struct Notifier {
    socket: UnixDatagram,
    to: std::os::unix::net::SocketAddr,
    watchdog: Option<Duration>,
}

static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
/// When the last `STATUS=` went out, and what it said (a status is sent at most once a second).
static LAST_STATUS: std::sync::Mutex<Option<(Instant, String)>> = std::sync::Mutex::new(None);

fn address(path: &str) -> std::io::Result<std::os::unix::net::SocketAddr> {
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => std::os::unix::net::SocketAddr::from_pathname(path),
    }
}

/// Reads and removes the systemd variables. Call first thing, before any thread starts (removing
/// environment variables is only sound while no other thread reads the environment).
pub(crate) fn take_environment() {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let socket = get("NOTIFY_SOCKET");
    let watchdog_pid = get("WATCHDOG_PID").and_then(|p| p.parse::<u32>().ok());
    let watchdog = get("WATCHDOG_USEC")
        .and_then(|u| u.parse::<u64>().ok())
        .filter(|u| *u > 0)
        .filter(|_| watchdog_pid.is_none_or(|p| p == std::process::id()))
        .map(Duration::from_micros);
    crate::control::server::note_passed_sockets();
    for k in PRIVATE {
        std::env::remove_var(k);
    }
    let notifier = socket.and_then(|path| {
        let made = address(&path).and_then(|to| Ok((UnixDatagram::unbound()?, to)));
        match made {
            Ok((socket, to)) => Some(Notifier { socket, to, watchdog }),
            Err(e) => {
                log::warn!("NOTIFY_SOCKET {path:?}: {e}; not notifying systemd");
                None
            }
        }
    });
    let _ = NOTIFIER.set(notifier);
}

fn send(text: &str) {
    let Some(Some(n)) = NOTIFIER.get() else { return };
    if let Err(e) = n.socket.send_to_addr(text.as_bytes(), &n.to) {
        log::debug!("sd_notify {text:?}: {e}");
    }
}

/// How often systemd wants `WATCHDOG=1`, if it does: half its `WATCHDOG_USEC`.
pub(crate) fn watchdog_every() -> Option<Duration> {
    NOTIFIER.get().and_then(|n| n.as_ref()).and_then(|n| n.watchdog).map(|w| w / 2)
}

/// `READY=1` with a status line.
pub(crate) fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", one_line(status)));
    *LAST_STATUS.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), status.to_owned()));
}

/// `STATUS=…` when it says something new, at most once a second (`force` for the last word before
/// stopping).
pub(crate) fn status(text: &str) {
    let mut last = LAST_STATUS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, said)) = last.as_ref() {
        if said == text || at.elapsed() < Duration::from_secs(1) {
            return;
        }
    }
    send(&format!("STATUS={}", one_line(text)));
    *last = Some((Instant::now(), text.to_owned()));
}

/// `RELOADING=1` with the monotonic time, as `Type=notify-reload` expects.
pub(crate) fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0) / 1000;
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration"));
}

/// `READY=1` again after a reload.
pub(crate) fn reloaded(status: &str) {
    ready(status);
}

/// `STOPPING=1`.
pub(crate) fn stopping() {
    send("STOPPING=1\nSTATUS=stopping");
}

/// `WATCHDOG=1`.
pub(crate) fn watchdog() {
    send("WATCHDOG=1");
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}
