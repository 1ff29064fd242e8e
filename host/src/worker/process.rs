//! The host's side of one worker process: starting it with only the descriptors it needs, reading its
//! answers, noticing its death.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::wire::*;
use crate::loading::error::{LoadError, LoadErrorKind};

/// The host's environment variables a worker running as another `user` keeps (and `LC_*`).
const WORKER_USER_ENV: &[&str] = &["PATH", "LANG", "TZ", "RUST_LOG"];

// ---------------------------------------------------------------------------------------------------
// The host side: one worker process

/// How to start the workers of one backend.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The `plughost` executable.
    pub exe: PathBuf,
    /// The driver kind's name.
    pub kind: &'static str,
    /// What to tell it.
    pub setup: Setup,
    /// The user and group to run as.
    pub user: Option<(u32, u32)>,
    /// How long one call may take.
    pub call_timeout: Duration,
    /// The largest answer frame taken from the worker; a larger one kills it.
    pub max_frame_bytes: usize,
}

/// A call waiting for its answer.
type Waiter = mpsc::SyncSender<Result<Vec<u8>, String>>;

/// One running worker process.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) pid: u32,
    pub(super) writer: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    /// How it died, once it did.
    died: Mutex<Option<String>>,
    pub(super) started: Instant,
    /// Stopped on purpose (retired, or replaced by `ctl restart`): its end is not a crash.
    pub(super) retired: AtomicBool,
    /// Why the host killed it, when it did (a call or its setup outlasted `call_timeout`).
    killed_for: Mutex<Option<String>>,
}

impl Worker {
    /// Kills the worker's whole process group (a hung worker, or one that is retired).
    pub(super) fn kill(&self) {
        // The worker leads its own process group: everything it started goes too.
        if let Some(pid) = i32::try_from(self.pid).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }

    /// Kills it, remembering why: its death then reads "killed by plughost: WHY", not just SIGKILL.
    pub(super) fn kill_for(&self, why: String) {
        *lock(&self.killed_for) = Some(why);
        self.kill();
    }

    pub(super) fn dead(&self) -> Option<String> {
        lock(&self.died).clone()
    }

    /// Sends one call and waits for its answer.
    pub(super) fn call(&self, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
        if let Some(why) = self.dead() {
            return Err(CallError::Died(why));
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).insert(id, tx);
        if let Err(e) = write_frame(&mut *lock(&self.writer), id, payload) {
            lock(&self.pending).remove(&id);
            return Err(CallError::Died(self.dead().unwrap_or_else(|| format!("cannot write to the worker: {e}"))));
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(why)) => Err(CallError::Died(why)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&self.pending).remove(&id);
                Err(CallError::Timeout)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(CallError::Died(self.dead().unwrap_or_else(|| "the worker went away".to_owned())))
            }
        }
    }
}

/// Why a call got no answer.
#[derive(Debug)]
pub(super) enum CallError {
    /// The worker died (how).
    Died(String),
    /// No answer within the timeout.
    Timeout,
}

/// How a child ended, in words.
fn ended(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("was killed by signal {sig} ({})", crate::loading::loader::signal_name(sig)),
        (Some(code), _) => format!("exited with status {code}"),
        _ => "ended".to_owned(),
    }
}

/// Moves `fd` to a descriptor ≥ 10 (in the child, before the final dup2s).
///
/// # Safety
/// Only between fork and exec: calls fcntl, async-signal-safe.
unsafe fn high(fd: i32) -> std::io::Result<i32> {
    // SAFETY: fcntl F_DUPFD_CLOEXEC on a descriptor open in this (child) process.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Spawns `cmd` from one thread that lives as long as the process. The parent-death signal a worker
/// arms fires when the *thread* that forked it ends, not the process: workers started from a
/// connection's or a restart's thread would be killed with it.
fn spawn_from_keeper(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: std::sync::OnceLock<Mutex<mpsc::Sender<Request>>> = std::sync::OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new().name("worker-spawner".to_owned()).spawn(move || {
            for (mut cmd, answer) in rx {
                let _ = answer.send(cmd.spawn());
            }
        });
        if let Err(e) = started {
            log::error!("cannot start the worker-spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    lock(keeper).send((cmd, tx)).map_err(|_| std::io::Error::other("the worker-spawner thread is gone"))?;
    rx.recv().map_err(|_| std::io::Error::other("the worker-spawner thread is gone"))?
}

/// Starts a worker, sends it `setup` and waits for its answer (up to the call timeout). The reader
/// thread calls `on_death` with how it died, once, after answering every call in flight.
pub(super) fn start_worker(
    config: &WorkerConfig,
    library: &OwnedFd,
    on_death: impl FnOnce(String, bool) + Send + 'static,
) -> Result<(Arc<Worker>, SetupReply), LoadError> {
    let path = &config.setup.path;
    let fail = |kind: LoadErrorKind, reason: String| LoadError::new(kind, path, reason);
    let (host_end, worker_end) =
        UnixStream::pair().map_err(|e| fail(LoadErrorKind::RuntimeDir, format!("cannot make a socket pair: {e}")))?;
    let mut cmd = Command::new(&config.exe);
    cmd.arg("__worker").arg("--parent").arg(std::process::id().to_string());
    // The host's environment (instances a compute driver starts inherit it, as they would in-process);
    // a worker running as another user gets only what is needed to run programs and log, since the
    // host's environment may hold credentials that user should not see.
    if let Some((uid, gid)) = config.user {
        cmd.arg("--uid").arg(uid.to_string()).arg("--gid").arg(gid.to_string());
        cmd.env_clear();
        for (k, v) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| WORKER_USER_ENV.contains(&k) || k.starts_with("LC_")) {
                cmd.env(k, v);
            }
        }
    }
    cmd.env("RUST_BACKTRACE", "0").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
    let (sock, lib) = (worker_end.as_raw_fd(), library.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec and only makes async-signal-safe
    // system calls (fcntl, dup2, prctl, close_range) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let (s, l) = (high(sock)?, high(lib)?);
            if libc::dup2(s, SOCKET_FD) < 0 || libc::dup2(l, LIBRARY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Only 0-4 cross the exec (the rest is close-on-exec already; this is belt and braces).
            libc::syscall(libc::SYS_close_range, 5u32, u32::MAX, 0u32);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = spawn_from_keeper(cmd)
        .map_err(|e| fail(LoadErrorKind::RuntimeDir, format!("cannot start a worker {}: {e}", config.exe.display())))?;
    drop(worker_end);
    let pid = child.id();
    let label = format!("{} backend {:?} worker {pid}", config.setup.service, config.setup.backend);
    if let Some(err) = child.stderr.take() {
        let label = label.clone();
        let _ = std::thread::Builder::new().name("worker-stderr".to_owned()).spawn(move || {
            forward_stderr(err, &mut StderrBudget::new(), |line| log::info!("{label}: {line}"));
        });
    }
    let reader = host_end
        .try_clone()
        .map_err(|e| fail(LoadErrorKind::RuntimeDir, format!("cannot clone the worker socket: {e}")))?;
    // Its death is noticed by the process, not by the socket: a child the driver forked can hold the
    // worker's end of the socket open after the worker died.
    if let Err(e) = watch_process(pid, &host_end) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail(LoadErrorKind::RuntimeDir, format!("cannot watch worker {pid}: {e}")));
    }
    let worker = Arc::new(Worker {
        pid,
        writer: Mutex::new(host_end),
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        died: Mutex::new(None),
        started: Instant::now(),
        retired: AtomicBool::new(false),
        killed_for: Mutex::new(None),
    });
    let max_frame = config.max_frame_bytes;
    let (setup_tx, setup_rx) = mpsc::sync_channel::<Vec<u8>>(1);
    {
        let for_reader = worker.clone();
        let spawned = std::thread::Builder::new()
            .name("worker-reader".to_owned())
            .spawn(move || read_answers(for_reader, (reader, max_frame), child, setup_tx, on_death));
        if let Err(e) = spawned {
            worker.kill();
            return Err(fail(LoadErrorKind::RuntimeDir, format!("cannot start a reader thread: {e}")));
        }
    }
    let setup = postcard::to_stdvec(&(config.kind, &config.setup))
        .map_err(|e| fail(LoadErrorKind::RuntimeDir, format!("cannot encode the setup: {e}")))?;
    if write_frame(&mut *lock(&worker.writer), 0, &setup).is_err() {
        // It died at once; the reader says how.
    }
    match setup_rx.recv_timeout(config.call_timeout) {
        Ok(bytes) => {
            let reply = postcard::from_bytes::<SetupReply>(&bytes).map_err(|e| {
                worker.kill();
                fail(LoadErrorKind::Crashed, format!("worker {pid} answered the setup with garbage: {e}"))
            })?;
            Ok((worker, reply))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            worker.kill_for(format!(
                "loading did not finish within {}s (call_timeout)",
                config.call_timeout.as_secs_f64()
            ));
            Err(fail(
                LoadErrorKind::Crashed,
                format!(
                    "loading it hung worker {pid} for {}s (call_timeout); the worker was killed",
                    config.call_timeout.as_secs_f64()
                ),
            ))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The reader saw it die; wait for its verdict.
            let why = wait_dead(&worker);
            Err(fail(LoadErrorKind::Crashed, format!("loading it: the {why}; not loaded")))
        }
    }
}

/// Watches worker `pid` (a child not yet reaped, so its pid cannot be reused meanwhile) through a
/// pidfd: when it ends, however it ends, its whole process group is killed (what the driver forked goes
/// too) and the host's end of the socket is shut down, so that its reader sees the end of the stream
/// even while a descendant holds the worker's end.
fn watch_process(pid: u32, host_end: &UnixStream) -> std::io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    use rustix::process::{kill_process_group, pidfd_open, Pid, PidfdFlags, Signal};
    let raw = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or(std::io::ErrorKind::InvalidInput)?;
    let pidfd = pidfd_open(raw, PidfdFlags::empty())?;
    let end = host_end.try_clone()?;
    std::thread::Builder::new().name("worker-watch".to_owned()).spawn(move || {
        loop {
            match poll(&mut [PollFd::new(&pidfd, PollFlags::IN)], None) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return log::warn!("worker {pid}: cannot watch it: {e}"),
            }
        }
        let _ = kill_process_group(raw, Signal::KILL);
        let _ = end.shutdown(std::net::Shutdown::Both);
    })?;
    Ok(())
}

fn wait_dead(w: &Worker) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(why) = w.dead() {
            return why;
        }
        if Instant::now() > deadline {
            return "went away".to_owned();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The reader thread of one worker: hands each answer to its caller; at the end of the stream, reaps
/// the worker, answers every call still waiting with how it died, and reports the death.
fn read_answers(
    worker: Arc<Worker>,
    (mut reader, max_frame): (UnixStream, usize),
    mut child: Child,
    setup_tx: mpsc::SyncSender<Vec<u8>>,
    on_death: impl FnOnce(String, bool),
) {
    let mut setup_tx = Some(setup_tx);
    // Answers to no call waiting (a late answer after a timeout is one; a stream of them is a flood).
    let mut unsolicited = 0u32;
    loop {
        match read_frame(&mut reader, max_frame) {
            Ok(Some((0, payload))) => {
                if let Some(tx) = setup_tx.take() {
                    let _ = tx.send(payload);
                }
            }
            Ok(Some((id, payload))) => match lock(&worker.pending).remove(&id) {
                Some(tx) => {
                    unsolicited = 0;
                    let _ = tx.send(Ok(payload));
                }
                None => {
                    unsolicited += 1;
                    if unsolicited > 10_000 {
                        worker.kill_for("it sent more than 10000 answers in a row to no call".to_owned());
                        break;
                    }
                }
            },
            Ok(None) => break,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    worker.kill_for(format!("it sent {e}"));
                }
                break;
            }
        }
    }
    // The socket closed: the worker is dying or dead. Make sure, and learn how.
    let status = match child.wait_timeout_or_kill(Duration::from_secs(2)) {
        Some(s) => ended(s),
        None => "stopped answering".to_owned(),
    };
    let why = match lock(&worker.killed_for).take() {
        Some(because) if status.contains("SIGKILL") => {
            format!("worker (pid {}) was killed by plughost: {because}", worker.pid)
        }
        _ => format!("worker (pid {}) {status}", worker.pid),
    };
    *lock(&worker.died) = Some(why.clone());
    drop(setup_tx);
    let waiting: Vec<Waiter> = lock(&worker.pending).drain().map(|(_, tx)| tx).collect();
    for tx in waiting {
        let _ = tx.send(Err(why.clone()));
    }
    on_death(why, worker.retired.load(Ordering::SeqCst));
}

/// `Child::wait` with a bound: kills it if it does not end in time.
trait WaitTimeout {
    fn wait_timeout_or_kill(&mut self, timeout: Duration) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for Child {
    fn wait_timeout_or_kill(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Ok(None) => {
                    if let Some(pid) = i32::try_from(self.id()).ok().and_then(rustix::process::Pid::from_raw) {
                        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                    }
                    return self.wait().ok();
                }
                Err(_) => return None,
            }
        }
    }
}

/// The longest line of a worker's stderr that is logged whole; the rest of a longer line is cut.
pub(crate) const STDERR_LINE_MAX: usize = 4096;

/// How much of a worker's stderr reaches the log: a token bucket of lines (a burst of
/// [`StderrBudget::BURST`], refilled at [`StderrBudget::PER_SEC`] a second); what does not fit is counted
/// and summed up in one line once lines fit again.
#[derive(Debug)]
pub(crate) struct StderrBudget {
    tokens: f64,
    last: Instant,
    dropped: u64,
    /// When the last summary of dropped lines went out (at most one a second).
    summed: Option<Instant>,
    burst: f64,
    per_sec: f64,
}

impl StderrBudget {
    /// Lines logged at once after a quiet spell.
    pub(crate) const BURST: f64 = 200.0;
    /// Lines a second after that.
    pub(crate) const PER_SEC: f64 = 50.0;

    pub(crate) fn new() -> StderrBudget {
        StderrBudget::with_rate(Self::BURST, Self::PER_SEC)
    }

    /// A budget of `burst` lines refilled at `per_sec` a second.
    pub(crate) fn with_rate(burst: f64, per_sec: f64) -> StderrBudget {
        StderrBudget { tokens: burst, last: Instant::now(), dropped: 0, summed: None, burst, per_sec }
    }

    /// Whether a line may be logged now; `Some(n)` first when `n` lines were dropped before it.
    fn admit(&mut self, now: Instant) -> (bool, Option<u64>) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens < 1.0 {
            self.dropped += 1;
            return (false, None);
        }
        self.tokens -= 1.0;
        // What was dropped is said before the next line that fits, at most once a second.
        let due = self.summed.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if self.dropped > 0 && due {
            self.summed = Some(now);
            return (true, Some(std::mem::take(&mut self.dropped)));
        }
        (true, None)
    }

    /// What was dropped and not said yet (at the end of the stream).
    fn unsaid(&mut self) -> Option<u64> {
        (self.dropped > 0).then(|| std::mem::take(&mut self.dropped))
    }
}

/// Reads a worker's stderr to its end and hands `log` each line: control characters escaped, lines cut
/// at [`STDERR_LINE_MAX`] bytes (the rest of the line is skipped, never buffered), at most what `budget`
/// allows. A worker cannot fill the host's memory or its log through its stderr.
pub(crate) fn forward_stderr(mut from: impl std::io::Read, budget: &mut StderrBudget, mut log: impl FnMut(&str)) {
    let mut line: Vec<u8> = Vec::with_capacity(256);
    let mut cut = 0u64;
    let mut buf = [0u8; 8192];
    let mut emit = |line: &mut Vec<u8>, cut: &mut u64, budget: &mut StderrBudget| {
        let (ok, dropped) = budget.admit(Instant::now());
        if let Some(n) = dropped {
            log(&format!("({n} more lines of stderr were not logged: too many too fast)"));
        }
        if ok {
            let text = String::from_utf8_lossy(line);
            let text = crate::util::fmt::printable(&text);
            if *cut > 0 {
                log(&format!("{text}… ({cut} more bytes of this line cut)"));
            } else {
                log(&text);
            }
        }
        line.clear();
        *cut = 0;
    };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for part in buf[..n].split_inclusive(|b| *b == b'\n') {
            let (body, ends) = match part.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (part, false),
            };
            let room = STDERR_LINE_MAX.saturating_sub(line.len());
            line.extend_from_slice(&body[..body.len().min(room)]);
            cut += body.len().saturating_sub(room) as u64;
            if ends {
                emit(&mut line, &mut cut, budget);
            }
        }
    }
    if !line.is_empty() || cut > 0 {
        emit(&mut line, &mut cut, budget);
    }
    if let Some(n) = budget.unsaid() {
        log(&format!("({n} more lines of stderr were not logged: too many too fast)"));
    }
}

#[cfg(test)]
mod stderr_tests {
    use super::*;

    /// A reader that yields `total` bytes of `pattern` repeated, without keeping them.
    struct Endless {
        pattern: &'static [u8],
        left: usize,
        at: usize,
    }

    impl std::io::Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.left);
            for b in &mut buf[..n] {
                *b = self.pattern[self.at % self.pattern.len()];
                self.at += 1;
            }
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_huge_line_is_cut_not_buffered_and_escapes_are_shown() {
        let mut lines = Vec::new();
        let from = Endless { pattern: b"x", left: 64 << 20, at: 0 };
        let from = std::io::Read::chain(from, &b"\n\x1b[31mred\n"[..]);
        forward_stderr(from, &mut StderrBudget::new(), |l| lines.push(l.to_owned()));
        assert_eq!(lines.len(), 2, "{:?}", lines.iter().map(|l| &l[..l.len().min(80)]).collect::<Vec<_>>());
        assert!(lines[0].starts_with(&"x".repeat(STDERR_LINE_MAX)), "the first 4 KiB are kept");
        assert!(lines[0].ends_with(&format!("… ({} more bytes of this line cut)", (64 << 20) - STDERR_LINE_MAX)));
        assert_eq!(lines[1], "\\u{1b}[31mred");
    }

    #[test]
    fn a_flood_is_bounded_and_summed_up() {
        let mut lines = Vec::new();
        let from = Endless { pattern: b"spam\n", left: 5 * 100_000, at: 0 };
        // No refill while the flood lasts (however long this machine takes to read it): the burst only.
        let mut budget = StderrBudget::with_rate(200.0, 0.0);
        forward_stderr(from, &mut budget, |l| lines.push(l.to_owned()));
        // The burst, and at the end of the stream what was dropped.
        assert_eq!(lines.len(), 201);
        assert!(lines[200].contains("99800 more lines of stderr were not logged"), "{}", lines[200]);
        // Later lines that fit go out as they come.
        budget.tokens = 2.0;
        let mut more = Vec::new();
        forward_stderr(&b"after\n"[..], &mut budget, |l| more.push(l.to_owned()));
        assert_eq!(more, ["after"]);
        // Every line is either logged or counted in a summary.
        let dropped: u64 = lines
            .iter()
            .chain(&more)
            .filter(|l| l.contains("were not logged"))
            .map(|l| l.trim_start_matches('(').split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        let logged = lines.iter().filter(|l| *l == "spam").count() as u64;
        assert_eq!(dropped + logged, 100_000);
    }
}
