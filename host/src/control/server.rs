//! The control socket server: bind, accept, line framing, graceful stop. What a line means is the
//! [`Handler`]'s business (the host's dispatch); this module only moves bytes.
//!
//! Framing: one request per line. A line longer than the limit is answered with `invalid_request` and
//! the connection is closed (nothing after it can be trusted to be a line boundary); a line that is
//! not UTF-8 is answered with `invalid_request` and the connection stays usable.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Who is asking: the other end of a socket connection (`SO_PEERCRED`, taken when it connected), or a
/// remote caller through the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    /// Its uid (0 for remote callers, who have none here: see `remote`).
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its pid.
    pub pid: u32,
    /// Set for a request that came through the fleet.
    pub remote: Option<Remote>,
}

/// A caller through the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Remote {
    /// The broker user, as its reply subject names it.
    pub user: Option<String>,
    /// Whether it came on an `admin` subject (which the broker lets admins alone publish on).
    pub admin: bool,
}

impl Peer {
    /// Root and plughost's own user administer; everyone else who can connect (members of
    /// `socket_group`) only reads. A remote caller administers when it asked on an admin subject.
    pub(crate) fn is_admin(&self) -> bool {
        match &self.remote {
            Some(r) => r.admin,
            None => self.uid == 0 || self.uid == crate::loading::trust::euid(),
        }
    }

    /// A remote caller.
    pub(crate) fn remote(user: Option<&str>, admin: bool) -> Peer {
        Peer { uid: 0, gid: 0, pid: 0, remote: Some(Remote { user: user.map(str::to_owned), admin }) }
    }

    /// Who it is as one token, for log fields: `uid:N` or `fleet:USER`.
    pub(crate) fn tag(&self) -> String {
        match &self.remote {
            Some(r) => format!("fleet:{}", r.user.as_deref().unwrap_or("anonymous")),
            None => format!("uid:{}", self.uid),
        }
    }

    /// Who it is, for messages and the audit log's refusal windows: `uid N` or `fleet user U`.
    pub(crate) fn who(&self) -> String {
        match &self.remote {
            Some(r) => format!("fleet user {}", r.user.as_deref().unwrap_or("(anonymous)")),
            None => format!("uid {}", self.uid),
        }
    }

    /// This process, as a peer (for tests).
    #[cfg(test)]
    pub(crate) fn this_process() -> Peer {
        Peer {
            uid: crate::loading::trust::euid(),
            gid: rustix::process::getgid().as_raw(),
            pid: std::process::id(),
            remote: None,
        }
    }

    /// The peer of a connected Unix socket.
    pub(crate) fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let cred = rustix::net::sockopt::socket_peercred(stream)?;
        Ok(Peer {
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            pid: u32::try_from(cred.pid.as_raw_nonzero().get()).unwrap_or(0),
            remote: None,
        })
    }
}

/// What answers request lines.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Answers one request line (without its newline) from `peer`; returns the answer line without
    /// newline.
    fn handle(&self, line: &[u8], peer: &Peer) -> String;
    /// Answers a line that was longer than the limit (the connection is closed after it).
    fn too_long(&self, limit: usize) -> String;
}

/// A server accepting connections on a Unix socket.
#[derive(Debug)]
pub(crate) struct Server {
    socket: PathBuf,
    /// The listening socket again (a second descriptor): shutting it down wakes the accept thread.
    control: std::os::unix::net::UnixListener,
    accept: Option<JoinHandle<()>>,
    /// Passed by systemd (socket activation): systemd owns it, so a stop neither shuts it down (that
    /// would break it for systemd too) nor removes its file; the accept thread is woken by a flag and a
    /// connection of our own.
    activated: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// How many sockets systemd passed this process, read once (before the environment is cleaned).
static PASSED: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

fn passed_by_systemd() -> i32 {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<i32>().ok()).unwrap_or(0);
    if ours {
        count.max(0)
    } else {
        0
    }
}

/// Notes the sockets systemd passed (`LISTEN_PID`, `LISTEN_FDS`): call before those variables are
/// taken out of the environment.
pub(crate) fn note_passed_sockets() {
    let _ = PASSED.get_or_init(passed_by_systemd);
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The control socket systemd passed (`LISTEN_PID` is this process, `LISTEN_FDS` = 1), if any: it must
/// be a listening Unix stream socket bound to `path` (the unit's `ListenStream=` and plughost's socket
/// agree). Its file gets the modes [`bind`] gives, whatever the unit's `SocketMode=` says.
fn activated(path: &Path, group: Option<&str>) -> Result<Option<UnixListener>, String> {
    use std::os::fd::FromRawFd;
    let count = *PASSED.get_or_init(passed_by_systemd);
    if count == 0 {
        return Ok(None);
    }
    let what = "socket activation";
    if count != 1 {
        return Err(format!(
            "{what}: systemd passed {count} sockets (LISTEN_FDS); plughost takes exactly one, its control socket"
        ));
    }
    let fd = LISTEN_FDS_START;
    let int_opt = |name: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: fd is a descriptor number (getsockopt fails with EBADF/ENOTSOCK on anything else); v
        // and len are valid for writes of the sizes given.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&raw mut v).cast(), &raw mut len) };
        (r == 0).then_some(v)
    };
    let (kind, domain, listening) = (int_opt(libc::SO_TYPE), int_opt(libc::SO_DOMAIN), int_opt(libc::SO_ACCEPTCONN));
    if kind != Some(libc::SOCK_STREAM) || domain != Some(libc::AF_UNIX) || listening != Some(1) {
        return Err(format!(
            "{what}: descriptor 3 is not a listening Unix stream socket (use ListenStream=PATH in the socket unit)"
        ));
    }
    // SAFETY: descriptor 3 was passed to this process by the socket-activation protocol (LISTEN_PID is
    // us), checked above to be a listening socket; nothing else in this process owns or closes it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor we own; FD_CLOEXEC keeps it from workers and instances.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let bound = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let same = match &bound {
        Some(b) => {
            b == path || std::fs::canonicalize(b).ok().is_some_and(|b| std::fs::canonicalize(path).ok() == Some(b))
        }
        None => false,
    };
    if !same {
        return Err(format!(
            "{what}: the socket passed is {}, not the control socket \"{}\"; make ListenStream= and --socket (socket) agree",
            bound.map(|b| format!("\"{}\"", b.display())).unwrap_or_else(|| "not bound to a path".to_owned()),
            path.display()
        ));
    }
    secure(path, group)?;
    log::info!("control socket {}: passed by systemd (socket activation)", path.display());
    Ok(Some(listener))
}

/// Gives the socket file at `path` mode 0600, or 0660 with group `group`.
fn secure(path: &Path, group: Option<&str>) -> Result<(), String> {
    let gid =
        group.map(|g| crate::util::users::group_id(g).map_err(|e| format!("socket_group {g:?}: {e}"))).transpose()?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("socket \"{}\": cannot give it to group {gid}: {e}", path.display()))?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("socket \"{}\": cannot set mode {mode:04o}: {e}", path.display()))
}

/// Binds `path`: mode 0600, or 0660 with group `group` (its members may connect, as readers). An
/// existing socket nobody answers on is stale and replaced; anything else at `path` (a regular file, a
/// directory, a live server's socket) is left alone and refused.
pub(crate) fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, String> {
    if let Some(g) = group {
        crate::util::users::group_id(g).map_err(|e| format!("socket_group {g:?}: {e}"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("socket \"{}\": another plughost is already serving there", path.display()));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("socket \"{}\": cannot remove the stale socket: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "socket \"{}\": something that is not a socket is there; refusing to replace it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("socket \"{}\": cannot create its directory: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("socket \"{}\": cannot bind: {e}", path.display()))?;
    secure(path, group)?;
    Ok(l)
}

impl Server {
    /// Binds `socket` (or takes it from systemd) and serves each connection on its own thread.
    pub(crate) fn serve(
        handler: Arc<dyn Handler>,
        socket: &Path,
        group: Option<&str>,
        max_line: usize,
        max_connections: usize,
    ) -> Result<Server, String> {
        let (listener, activated) = match activated(socket, group)? {
            Some(l) => (l, Some(Arc::new(std::sync::atomic::AtomicBool::new(false)))),
            None => (bind(socket, group)?, None),
        };
        let stopping = activated.clone();
        let control = listener.try_clone().map_err(|e| format!("socket \"{}\": {e}", socket.display()))?;
        let budget = Arc::new(Budget::new(max_connections));
        let accept = std::thread::Builder::new()
            .name("accept".to_owned())
            .spawn(move || {
                // A descriptor kept in reserve: out of descriptors, it is given up to accept the
                // waiting connection, answer busy and close it, rather than leave the client hanging.
                let mut spare = std::fs::File::open("/dev/null").ok();
                loop {
                    match listener.accept() {
                        Ok(_) if stopping.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) => {
                            break
                        }
                        Ok((stream, _)) => {
                            let Some(slot) = budget.take(&stream) else { continue };
                            let h = handler.clone();
                            let spawned = std::thread::Builder::new().name("conn".to_owned()).spawn(move || {
                                let _slot = slot;
                                serve_connection(&*h, stream, max_line)
                            });
                            if let Err(e) = spawned {
                                log::warn!("control socket: cannot start a connection thread: {e}");
                            }
                        }
                        // The listener was shut down: stop accepting.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                            drop(spare.take());
                            if let Ok((stream, _)) = listener.accept() {
                                refuse_busy(stream, "plughost is out of file descriptors");
                            }
                            spare = std::fs::File::open("/dev/null").ok();
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                        Err(e) => {
                            log::warn!("control socket: accept failed: {e}");
                            // Out of memory: give the process a moment instead of spinning.
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the accept thread: {e}"))?;
        Ok(Server { socket: socket.to_owned(), control, accept: Some(accept), activated })
    }

    /// Stops accepting new connections and removes the socket. Open connections stay (the handler
    /// decides what they get).
    pub(crate) fn stop(mut self) {
        if let Some(flag) = &self.activated {
            // systemd's socket: leave it listening (connections wait in its backlog for the next start)
            // and its file in place; wake the accept thread with a connection of our own.
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            if UnixStream::connect(&self.socket).is_ok() {
                if let Some(t) = self.accept.take() {
                    let _ = t.join();
                }
            }
            return;
        }
        // Shutting the socket down wakes the blocked accept(), which then returns.
        let _ = rustix::net::shutdown(&self.control, rustix::net::Shutdown::Both);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Connections served at once, per role: admins `max`, readers a quarter of it (at least one), so that
/// readers cannot crowd admins out.
#[derive(Debug)]
struct Budget {
    admins: (std::sync::atomic::AtomicUsize, usize),
    readers: (std::sync::atomic::AtomicUsize, usize),
}

/// A connection's place in the budget, given back when it closes.
struct Slot(Arc<Budget>, bool);

impl Drop for Slot {
    fn drop(&mut self) {
        let (n, _) = if self.1 { &self.0.admins } else { &self.0.readers };
        n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Budget {
    fn new(max: usize) -> Budget {
        Budget {
            admins: (std::sync::atomic::AtomicUsize::new(0), max),
            readers: (std::sync::atomic::AtomicUsize::new(0), (max / 4).max(1)),
        }
    }

    /// A place for `stream`'s peer, or `None` after answering it busy and closing it.
    fn take(self: &Arc<Self>, stream: &UnixStream) -> Option<Slot> {
        let admin = Peer::of(stream).is_ok_and(|p| p.is_admin());
        let (n, max) = if admin { &self.admins } else { &self.readers };
        if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= *max {
            n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let who = if admin { "admins" } else { "readers" };
            let why = format!("too many connections ({max} for {who}, max_connections); try again later");
            refuse_busy(stream.try_clone().ok()?, &why);
            return None;
        }
        Some(Slot(self.clone(), admin))
    }
}

/// Answers a connection `busy` (id null) and closes it.
fn refuse_busy(mut stream: UnixStream, why: &str) {
    use crate::control::protocol::{ApiError, ErrorKind};
    let line = crate::control::request::answer(None, Err(ApiError::new(ErrorKind::Busy, why)));
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(100)));
    let _ = stream.write_all(format!("{line}\n").as_bytes());
}

/// One line read from a connection.
enum Line {
    /// A complete line (without its newline).
    Complete(Vec<u8>),
    /// Longer than the limit.
    TooLong,
    /// The peer closed the connection.
    End,
}

/// Reads one line of at most `max` bytes without ever buffering more than `max` bytes of it.
fn read_line(r: &mut impl BufRead, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { Line::End } else { Line::Complete(line) });
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if line.len() + i > max {
                    return Ok(Line::TooLong);
                }
                line.extend_from_slice(&buf[..i]);
                r.consume(i + 1);
                return Ok(Line::Complete(line));
            }
            None => {
                let n = buf.len();
                if line.len() + n > max {
                    return Ok(Line::TooLong);
                }
                line.extend_from_slice(buf);
                r.consume(n);
            }
        }
    }
}

fn serve_connection(handler: &dyn Handler, stream: UnixStream, max_line: usize) {
    let peer = match Peer::of(&stream) {
        Ok(p) => p,
        Err(e) => return log::warn!("control socket: cannot tell who connected (SO_PEERCRED): {e}"),
    };
    let Ok(write_half) = stream.try_clone() else { return };
    let mut out = std::io::BufWriter::new(write_half);
    let mut input = BufReader::with_capacity(64 << 10, stream);
    loop {
        let (reply, close) = match read_line(&mut input, max_line) {
            Ok(Line::End) | Err(_) => return,
            Ok(Line::TooLong) => (handler.too_long(max_line), true),
            Ok(Line::Complete(line)) => {
                let trimmed = line.strip_suffix(b"\r").unwrap_or(&line);
                if trimmed.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                (handler.handle(trimmed, &peer), false)
            }
        };
        if out.write_all(reply.as_bytes()).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()).is_err()
            || close
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_framed_and_capped() {
        let mut r = std::io::Cursor::new(b"one\ntwo\r\n\nthree".to_vec());
        let mut got = Vec::new();
        while let Line::Complete(l) = read_line(&mut r, 16).unwrap() {
            got.push(String::from_utf8(l).unwrap());
        }
        assert_eq!(got, ["one", "two\r", "", "three"]);
        let mut r = BufReader::with_capacity(4, std::io::Cursor::new(vec![b'x'; 100]));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::TooLong));
        let mut r = std::io::Cursor::new(b"0123456789\n".to_vec());
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Complete(l) if l.len() == 10));
    }

    #[test]
    fn bind_never_replaces_what_is_not_a_stale_socket() {
        let dir = std::env::temp_dir().join(format!("plughost-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("precious");
        std::fs::write(&file, "data").unwrap();
        assert!(bind(&file, None).unwrap_err().contains("not a socket"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
        let sock = dir.join("s.sock");
        let live = bind(&sock, None).unwrap();
        assert!(bind(&sock, None).unwrap_err().contains("already serving"));
        drop(live);
        assert!(bind(&sock, None).is_ok(), "a stale socket is replaced");
        assert_eq!(
            bind(&dir.join("g.sock"), Some("no-such-group-here")).unwrap_err(),
            "socket_group \"no-such-group-here\": no such group"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
