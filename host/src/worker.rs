//! Isolated backends: the same driver `.so`, served by a worker process (`plughost __worker`) so that
//! nothing the driver does (a segfault, an abort, `exit`, a hang, a deadlock, a leak) can take the host
//! down. The managers do not know: an isolated backend's driver is the kind's remote client
//! (`plughost_api`'s `Remote*`) over a [`Transport`] that sends typed calls to the worker.
//!
//! **Wire.** One socketpair per worker. Frames: a little-endian `u32` length, a `u64` request id, then
//! the payload (postcard). Id 0 is the setup exchange ([`Setup`] → [`SetupReply`]); every other id is one
//! call (`I::Call` → `I::Reply`). Many calls are in flight at once; the worker answers each as it
//! finishes (its threads take turns reading: whoever reads a frame runs it, the next one reads on).
//!
//! **Worker hygiene.** Started by the host with only the descriptors it needs (stdin and stdout on
//! /dev/null, stderr a pipe into the host log with the backend's name, the socket on fd 3, the sealed
//! library copy on fd 4); its own process group; `PR_SET_PDEATHSIG` (SIGKILL), checked against the
//! parent right after; no new privileges; optionally another user and group and an address-space
//! limit.
//!
//! **Faults.** When a worker dies, every call in flight on it is answered at once with `driver_crashed`
//! naming the backend and how it died. A call that outlives `call_timeout` is answered `timeout` and the
//! worker is killed (a hung driver is not trusted again). The [`Supervisor`] restarts the worker with
//! exponential backoff (100 ms doubling to 30 s, back to 100 ms after a healthy minute); 5 crashes within
//! 60 s open the circuit: the backend is down until a swap, a reload or `plughost ctl restart`.
//!
//! Why this file is long: the wire, both ends of it and the supervisor share their invariants (who
//! answers a call whose worker died, when a worker counts as crashed), so they are kept together.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use plughost_api::host::{Interface, Transport};
use plughost_api::{DriverError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{LoadError, LoadErrorKind};
use crate::protocol::{Crash, WorkerState, WorkerStatus};

/// The descriptor the worker finds its socket at.
const SOCKET_FD: i32 = 3;
/// The descriptor the worker finds the library at.
const LIBRARY_FD: i32 = 4;
/// The first restart waits this long; each further one twice as long.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between restarts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that served this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// This many crashes within [`CIRCUIT_WINDOW`] open the circuit.
const CIRCUIT_CRASHES: usize = 5;
/// See [`CIRCUIT_CRASHES`].
const CIRCUIT_WINDOW: Duration = Duration::from_secs(60);
/// Threads serving calls in a worker.
const WORKER_THREADS: usize = 16;
/// The host's environment variables a worker running as another `user` keeps (and `LC_*`).
const WORKER_USER_ENV: &[&str] = &["PATH", "LANG", "TZ", "RUST_LOG"];
/// Set when a worker that switched users made itself dumpable again to open its library.
static REOPENED_PROC: AtomicBool = AtomicBool::new(false);
/// [`Supervisor::spawn_worker`]'s phases of a worker, as its death callback sees them.
const SETTING_UP: u8 = 0;
const SERVING: u8 = 1;
const DIED_SETTING_UP: u8 = 2;
/// The stack of each serving thread (Rust's default, fixed so that `memory_limit` can account for it).
const WORKER_STACK: usize = 2 << 20;
/// Address space a worker keeps beyond its measured start for the loader's own allocations.
const LIMIT_HEADROOM: u64 = 16 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------------
// Frames

fn write_frame(w: &mut impl Write, id: u64, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len() + 8).map_err(|_| std::io::Error::other("frame too large"))?;
    let mut buf = Vec::with_capacity(12 + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// One frame, or `None` at the end of the stream.
fn read_frame(r: &mut impl Read) -> std::io::Result<Option<(u64, Vec<u8>)>> {
    let mut head = [0u8; 4];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head) as usize;
    if !(8..=(256 << 20)).contains(&len) {
        return Err(std::io::Error::other(format!("bad frame length {len}")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
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
        /// The [`LoadErrorKind`] name.
        kind: String,
        /// One line.
        reason: String,
        /// Detail lines.
        details: Vec<String>,
    },
}

// ---------------------------------------------------------------------------------------------------
// The worker side

/// How a worker is started: `plughost __worker --parent PID [--uid U --gid G]`.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The host's pid: the worker exits if its parent is not (any more) the host.
    pub parent: u32,
    /// Run as this uid.
    pub uid: Option<u32>,
    /// Run as this gid.
    pub gid: Option<u32>,
}

/// Serves one driver of kind `I` on `stream` (after setup). Never returns: the worker exits when the
/// host closes the socket.
pub fn serve<I: Interface>(stream: UnixStream, setup: Setup) -> ! {
    let refuse = |stream: &UnixStream, e: LoadError| -> ! {
        let reply = SetupReply::Refused { kind: e.kind.as_str().to_owned(), reason: e.reason, details: e.details };
        send_setup(stream, &reply);
        std::process::exit(0)
    };
    if let Some(limit) = setup.memory_limit {
        if let Err(why) = limit_memory(limit) {
            refuse(&stream, LoadError::new(LoadErrorKind::RuntimeDir, &setup.path, why));
        }
    }
    let lib =
        match crate::loader::Loader::for_verified_copy().load(&PathBuf::from(format!("/proc/self/fd/{LIBRARY_FD}"))) {
            Ok(l) => l,
            Err(e) => refuse(&stream, e),
        };
    if REOPENED_PROC.load(Ordering::SeqCst) {
        // Loaded: close /proc/PID (environ, mem, fd) and ptrace to the other processes of the user we
        // switched to, which would otherwise read the host's environment or steer the driver.
        // SAFETY: prctl with integer arguments.
        unsafe {
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        }
    }
    if let Err(e) = lib.expect_kind(I::KIND) {
        refuse(&stream, e);
    }
    let options = match lib.prepare_options(&setup.options, &setup.state_dir, &setup.backend) {
        Ok(o) => o,
        Err(e) => refuse(&stream, e),
    };
    let shown = lib.shown_options(&options);
    let constructed = match lib.construct::<I>(&options) {
        Ok(c) => c,
        Err(e) => refuse(&stream, e),
    };
    let driver = constructed.driver;
    let object = I::as_object(&driver);
    let init_error = I::init(object).err().map(|e| format!("driver init failed: {}", e.message()));
    send_setup(
        &stream,
        &SetupReply::Ready {
            name: lib.name().to_owned(),
            version: lib.version().to_owned(),
            api_version: lib.api_version().to_owned(),
            extensions: constructed.extensions.iter().map(|e| (*e).to_owned()).collect(),
            shown_options: shown,
            init_error,
        },
    );
    let reader = Arc::new(Mutex::new(stream.try_clone().unwrap_or_else(|_| std::process::exit(1))));
    let writer = Arc::new(Mutex::new(stream));
    let driver = Arc::new(driver);
    std::thread::scope(|s| {
        for started in 0..WORKER_THREADS {
            let (reader, writer, driver) = (reader.clone(), writer.clone(), driver.clone());
            let thread = std::thread::Builder::new().name("worker".to_owned()).stack_size(WORKER_STACK);
            let spawned = thread.spawn_scoped(s, move || loop {
                // Whoever reads a frame runs it; the next thread reads on meanwhile.
                let frame = {
                    let mut r = lock(&reader);
                    read_frame(&mut *r)
                };
                let (id, payload) = match frame {
                    Ok(Some(f)) => f,
                    // The host closed the socket (or died): nothing more to serve.
                    _ => std::process::exit(0),
                };
                let reply = match postcard::from_bytes::<I::Call>(&payload) {
                    Ok(call) => I::invoke(I::as_object(&driver), call),
                    Err(e) => {
                        eprintln!("cannot decode a call: {e}");
                        std::process::exit(2)
                    }
                };
                let bytes = match postcard::to_stdvec(&reply) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("cannot encode a reply: {e}");
                        std::process::exit(2)
                    }
                };
                if write_frame(&mut *lock(&writer), id, &bytes).is_err() {
                    std::process::exit(0);
                }
            });
            if let Err(e) = spawned {
                // Fewer threads serve fewer calls at once; none serve nothing.
                eprintln!("cannot start a worker thread: {e}");
                if started == 0 {
                    std::process::exit(1);
                }
                break;
            }
        }
    });
    std::process::exit(0)
}

/// Applies `memory_limit` as `RLIMIT_AS`, refusing (in words) a limit the worker itself would already
/// exceed before its driver allocated anything: the plughost binary, its serving threads' stacks and
/// the library to be mapped. Under a limit, malloc keeps to one arena: each further arena reserves
/// 64 MiB of address space, which would count against the driver's budget unpredictably.
fn limit_memory(limit: u64) -> Result<(), String> {
    // SAFETY: mallopt only changes allocator tuning; the worker has no other threads yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let page = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .ok_or("memory_limit: cannot read /proc/self/statm")?;
    // SAFETY: sysconf has no preconditions.
    let page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    // SAFETY: fstat on a descriptor the host set up for this worker, into a zeroed stat.
    let library = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(LIBRARY_FD, &mut st) == 0 {
            u64::try_from(st.st_size).unwrap_or(0)
        } else {
            0
        }
    };
    let stacks = WORKER_THREADS as u64 * (WORKER_STACK as u64 + page_size);
    let need = page * page_size + stacks + library + LIMIT_HEADROOM;
    if limit < need {
        return Err(format!(
            "memory_limit {} is below the {} a worker may need before its driver allocates anything \
             (the plughost binary, {WORKER_THREADS} thread stacks, the library); give at least that plus what the driver needs",
            crate::util::fmt::human_size(limit),
            crate::util::fmt::human_size(need)
        ));
    }
    let r = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: setrlimit reads the struct passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &r) } != 0 {
        return Err(format!(
            "memory_limit: cannot set RLIMIT_AS: {}",
            crate::error::io_text(&std::io::Error::last_os_error())
        ));
    }
    Ok(())
}

fn send_setup(mut stream: &UnixStream, reply: &SetupReply) {
    match postcard::to_stdvec(reply) {
        Ok(b) => {
            let _ = write_frame(&mut stream, 0, &b);
        }
        Err(e) => eprintln!("cannot encode the setup reply: {e}"),
    }
}

/// The worker's `main`: hygiene first (parent death signal, parent check, no new privileges, the
/// configured user), then the setup frame, then [`serve`] for the kind it names. Returns only on an
/// error before serving.
pub fn child_main(args: &WorkerArgs, serve_kind: impl FnOnce(&str, UnixStream, Setup) -> String) -> String {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    // The parent may have died before the death signal was armed.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != args.parent {
        return "the host is gone".to_owned();
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return format!("no_new_privs: {}", std::io::Error::last_os_error());
    }
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        // SAFETY: setgroups/setgid/setuid with integer arguments; single-threaded here.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return format!("cannot switch to uid {uid} gid {gid}: {}", std::io::Error::last_os_error());
            }
            // The library is opened through /proc/self/fd, which a uid change closes to the process;
            // open again until it is loaded (see `serve`).
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
            REOPENED_PROC.store(true, Ordering::SeqCst);
        }
    }
    // What the driver starts (a compute driver's instances) must not inherit the socket or the
    // library: a child holding the socket would keep the host from noticing this worker's death.
    // SAFETY: fcntl on descriptors this process owns (set up by the host before exec).
    unsafe {
        libc::fcntl(SOCKET_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(LIBRARY_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: fd 3 was set up by the host as this worker's end of the socketpair; nothing else owns it.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(SOCKET_FD) });
    let setup = match read_frame(&mut &stream) {
        Ok(Some((0, payload))) => match postcard::from_bytes::<(String, Setup)>(&payload) {
            Ok(s) => s,
            Err(e) => return format!("bad setup frame: {e}"),
        },
        Ok(_) => return "no setup frame".to_owned(),
        Err(e) => return format!("reading the setup frame: {e}"),
    };
    serve_kind(&setup.0, stream, setup.1)
}

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
}

/// A call waiting for its answer.
type Waiter = mpsc::SyncSender<Result<Vec<u8>, String>>;

/// One running worker process.
#[derive(Debug)]
struct Worker {
    pid: u32,
    writer: Mutex<UnixStream>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    /// How it died, once it did.
    died: Mutex<Option<String>>,
    started: Instant,
    /// Stopped on purpose (retired, or replaced by `ctl restart`): its end is not a crash.
    retired: AtomicBool,
    /// Why the host killed it, when it did (a call or its setup outlasted `call_timeout`).
    killed_for: Mutex<Option<String>>,
}

impl Worker {
    /// Kills the worker's whole process group (a hung worker, or one that is retired).
    fn kill(&self) {
        if let Ok(pid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill has no memory-safety preconditions; the worker leads its own process group.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }

    /// Kills it, remembering why: its death then reads "killed by plughost: WHY", not just SIGKILL.
    fn kill_for(&self, why: String) {
        *lock(&self.killed_for) = Some(why);
        self.kill();
    }

    fn dead(&self) -> Option<String> {
        lock(&self.died).clone()
    }

    /// Sends one call and waits for its answer.
    fn call(&self, payload: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
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
enum CallError {
    /// The worker died (how).
    Died(String),
    /// No answer within the timeout.
    Timeout,
}

/// How a child ended, in words.
fn ended(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("was killed by signal {sig} ({})", crate::loader::signal_name(sig)),
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
fn start_worker(
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
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                log::warn!("{label}: {line}");
            }
        });
    }
    let reader = host_end
        .try_clone()
        .map_err(|e| fail(LoadErrorKind::RuntimeDir, format!("cannot clone the worker socket: {e}")))?;
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
    let (setup_tx, setup_rx) = mpsc::sync_channel::<Vec<u8>>(1);
    {
        let for_reader = worker.clone();
        let spawned = std::thread::Builder::new()
            .name("worker-reader".to_owned())
            .spawn(move || read_answers(for_reader, reader, child, setup_tx, on_death));
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
    mut reader: UnixStream,
    mut child: Child,
    setup_tx: mpsc::SyncSender<Vec<u8>>,
    on_death: impl FnOnce(String, bool),
) {
    let mut setup_tx = Some(setup_tx);
    loop {
        match read_frame(&mut reader) {
            Ok(Some((0, payload))) => {
                if let Some(tx) = setup_tx.take() {
                    let _ = tx.send(payload);
                }
            }
            Ok(Some((id, payload))) => {
                if let Some(tx) = lock(&worker.pending).remove(&id) {
                    let _ = tx.send(Ok(payload));
                }
            }
            Ok(None) | Err(_) => break,
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
                    if let Ok(pid) = libc::pid_t::try_from(self.id()) {
                        // SAFETY: kill has no memory-safety preconditions.
                        unsafe {
                            libc::kill(-pid, libc::SIGKILL);
                        }
                    }
                    return self.wait().ok();
                }
                Err(_) => return None,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The supervisor

struct SupervisorState {
    worker: Option<Arc<Worker>>,
    state: WorkerState,
    crashes: VecDeque<Instant>,
    total_crashes: u64,
    restarts: u64,
    last_crash: Option<Crash>,
    backoff: Duration,
    /// Bumped for each new worker, so that a death report of an old one is ignored.
    epoch: u64,
    /// Why the circuit is open, while it is.
    open_reason: Option<String>,
}

/// Keeps one isolated backend's worker running: restarts it after a crash (with backoff), opens the
/// circuit after too many, and answers calls while it is away.
pub struct Supervisor {
    config: WorkerConfig,
    library: OwnedFd,
    state: Mutex<SupervisorState>,
    changed: Condvar,
    /// Calls currently waiting on the worker, for `status`.
    in_flight: AtomicU64,
    /// Set once retired: no more restarts.
    stopped: AtomicBool,
    /// Bumped when a worker dies and when a new one takes over: an answer that spans a change says
    /// nothing about the current worker.
    incarnation: AtomicU64,
    /// Called with `Some(reason)` when the backend cannot serve (circuit open), `None` when it can again.
    on_health: Box<dyn Fn(Option<String>) + Send + Sync>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("backend", &self.config.setup.backend).finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Starts the first worker. A worker that dies or refuses during setup is an error (nothing is
    /// restarted for a driver that never served).
    pub fn start(
        config: WorkerConfig,
        library: OwnedFd,
        on_health: Box<dyn Fn(Option<String>) + Send + Sync>,
    ) -> Result<(Arc<Supervisor>, SetupReply), LoadError> {
        let sup = Arc::new(Supervisor {
            config,
            library,
            state: Mutex::new(SupervisorState {
                worker: None,
                state: WorkerState::Stopped,
                crashes: VecDeque::new(),
                total_crashes: 0,
                restarts: 0,
                last_crash: None,
                backoff: BACKOFF_START,
                epoch: 0,
                open_reason: None,
            }),
            changed: Condvar::new(),
            in_flight: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            incarnation: AtomicU64::new(0),
            on_health,
        });
        let reply = sup.spawn_worker()?;
        Ok((sup, reply))
    }

    fn label(&self) -> String {
        format!("{} backend {:?}", self.config.setup.service, self.config.setup.backend)
    }

    /// Starts a worker and makes it current; reports its death to [`Self::died`].
    fn spawn_worker(self: &Arc<Supervisor>) -> Result<SetupReply, LoadError> {
        let epoch = {
            let mut st = lock(&self.state);
            st.epoch += 1;
            st.epoch
        };
        let weak = Arc::downgrade(self);
        // A death during setup is this call's error, reported to its caller only (a failed first
        // start or swap must not leave restarts behind); a death after it is a crash, reported once,
        // by whichever side sees it second.
        let phase = Arc::new(AtomicU8::new(SETTING_UP));
        let seen = phase.clone();
        let (worker, reply) = start_worker(&self.config, &self.library, move |why, retired| {
            let during_setup = seen.compare_exchange(SETTING_UP, DIED_SETTING_UP, Ordering::SeqCst, Ordering::SeqCst);
            if let (Some(sup), false, Err(_)) = (weak.upgrade(), retired, during_setup) {
                sup.died(epoch, why);
            }
        })?;
        if let SetupReply::Refused { .. } = &reply {
            worker.retired.store(true, Ordering::SeqCst);
            worker.kill();
            return Ok(reply);
        }
        let died_meanwhile = phase.compare_exchange(SETTING_UP, SERVING, Ordering::SeqCst, Ordering::SeqCst).is_err();
        {
            let mut st = lock(&self.state);
            if st.epoch == epoch {
                st.worker = Some(worker.clone());
                st.state = WorkerState::Running;
                self.incarnation.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.changed.notify_all();
        if died_meanwhile {
            // It answered its setup and died before it was ours: a crash like any later one.
            self.died(epoch, worker.dead().unwrap_or_else(|| "the worker went away".to_owned()));
        }
        Ok(reply)
    }

    /// A worker died: counts the crash, then restarts it after the backoff or opens the circuit.
    fn died(self: &Arc<Supervisor>, epoch: u64, why: String) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let (wait, open) = {
            let mut st = lock(&self.state);
            // Every unexpected death is a crash, even of a worker already replaced (by `ctl restart`
            // right after the call that saw it die).
            let now = Instant::now();
            st.crashes.push_back(now);
            while st.crashes.front().is_some_and(|t| now.duration_since(*t) > CIRCUIT_WINDOW) {
                st.crashes.pop_front();
            }
            st.total_crashes += 1;
            let at = crate::util::time::unix_secs(SystemTime::now());
            st.last_crash = Some(Crash { reason: why.clone(), at });
            if st.epoch != epoch {
                return;
            }
            let served = st.worker.as_ref().map(|w| w.started.elapsed()).unwrap_or_default();
            st.worker = None;
            self.incarnation.fetch_add(1, Ordering::SeqCst);
            if served >= HEALTHY_AFTER {
                st.backoff = BACKOFF_START;
            }
            let open = st.crashes.len() >= CIRCUIT_CRASHES;
            st.state = if open { WorkerState::CircuitOpen } else { WorkerState::Restarting };
            let wait = st.backoff;
            st.backoff = (st.backoff * 2).min(BACKOFF_MAX);
            (wait, open)
        };
        self.changed.notify_all();
        if open {
            let reason = format!(
                "circuit open: {CIRCUIT_CRASHES} worker crashes within {}s, the last: {why}; not restarted until a swap, a reload or plughost ctl restart",
                CIRCUIT_WINDOW.as_secs()
            );
            lock(&self.state).open_reason = Some(reason.clone());
            log::error!("{}: {reason}", self.label());
            (self.on_health)(Some(reason));
            return;
        }
        log::warn!("{}: {why}; restarting in {wait:?}", self.label());
        let sup = self.clone();
        let spawned = std::thread::Builder::new().name("worker-restart".to_owned()).spawn(move || {
            std::thread::sleep(wait);
            sup.restart(epoch + 1);
        });
        if let Err(e) = spawned {
            log::error!("{}: cannot start a thread to restart the worker: {e}", self.label());
        }
    }

    /// Starts a new worker unless something else did meanwhile.
    fn restart(self: &Arc<Supervisor>, expected_epoch: u64) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        {
            let st = lock(&self.state);
            if st.epoch + 1 != expected_epoch || st.state != WorkerState::Restarting {
                return;
            }
        }
        match self.spawn_worker() {
            Ok(SetupReply::Ready { init_error: None, .. }) => {
                let pid = lock(&self.state).worker.as_ref().map(|w| w.pid);
                lock(&self.state).restarts += 1;
                log::info!("{}: worker restarted (pid {})", self.label(), pid.unwrap_or(0));
                (self.on_health)(None);
            }
            Ok(SetupReply::Ready { init_error: Some(e), .. }) => {
                // It serves, but its driver is unhealthy: periodic health checks will say so.
                lock(&self.state).restarts += 1;
                log::warn!("{}: worker restarted, but {e}", self.label());
            }
            Ok(SetupReply::Refused { reason, .. }) => {
                let epoch = lock(&self.state).epoch;
                self.died(epoch, format!("refused the driver on restart: {reason}"));
            }
            Err(e) => {
                let epoch = lock(&self.state).epoch;
                self.died(epoch, e.reason);
            }
        }
    }

    /// `ctl restart`: closes the circuit and starts a fresh worker now (killing the current one).
    pub fn restart_now(self: &Arc<Supervisor>) -> Result<u32, LoadError> {
        let old = {
            let mut st = lock(&self.state);
            st.crashes.clear();
            st.backoff = BACKOFF_START;
            st.state = WorkerState::Restarting;
            st.open_reason = None;
            st.epoch += 1; // the old worker's death is not a crash
            st.worker.take()
        };
        // Replacing a live worker is not a crash; one that already died (its death not yet counted)
        // was one, and is counted as such.
        if let Some(w) = old.filter(|w| w.dead().is_none()) {
            w.retired.store(true, Ordering::SeqCst);
            w.kill();
        }
        let failed = match self.spawn_worker() {
            Ok(SetupReply::Ready { .. }) => {
                (self.on_health)(None);
                lock(&self.state).restarts += 1;
                return Ok(lock(&self.state).worker.as_ref().map(|w| w.pid).unwrap_or(0));
            }
            Ok(SetupReply::Refused { kind, reason, details }) => {
                let kind = LoadErrorKind::from_name(&kind).unwrap_or(LoadErrorKind::InvalidMetadata);
                LoadError::new(kind, &self.config.setup.path, reason).with_details(details)
            }
            Err(e) => e,
        };
        // No worker: a crash like any other, so that the backoff (or the circuit) takes over rather
        // than leaving the backend without a worker and nothing to start one.
        let epoch = lock(&self.state).epoch;
        self.died(epoch, format!("restart failed: {}", failed.reason));
        Err(failed)
    }

    /// Stops for good: no restarts; the worker is told to go (its socket closes) and killed if it does
    /// not within a second.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let worker = {
            let mut st = lock(&self.state);
            st.state = WorkerState::Stopped;
            st.worker.take()
        };
        if let Some(w) = worker {
            w.retired.store(true, Ordering::SeqCst);
            // SAFETY: shutdown on a socket we own: the worker reads the end of the stream and exits.
            unsafe {
                libc::shutdown(lock(&w.writer).as_raw_fd(), libc::SHUT_RDWR);
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while w.dead().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if w.dead().is_none() {
                w.kill();
            }
        }
    }

    /// What status shows.
    pub fn status(&self) -> WorkerStatus {
        let st = lock(&self.state);
        WorkerStatus {
            pid: st.worker.as_ref().map(|w| w.pid),
            restarts: st.restarts,
            crashes: st.total_crashes,
            last_crash: st.last_crash.clone(),
            state: st.state,
        }
    }

    /// The current worker's pid.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.state).worker.as_ref().map(|w| w.pid)
    }

    /// Changes whenever a worker dies or a new one takes over.
    pub fn epoch(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    /// Sends one encoded call to the current worker.
    fn call(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>, DriverError> {
        let worker = {
            let st = lock(&self.state);
            match (&st.worker, st.state) {
                (Some(w), WorkerState::Running) => w.clone(),
                (_, WorkerState::CircuitOpen) if st.open_reason.is_some() => {
                    let reason = st.open_reason.clone().unwrap_or_default();
                    return Err(DriverError::new(ErrorKind::DRIVER_CRASHED, format!("{}: {reason}", self.label())));
                }
                (_, state) => {
                    let last = st.last_crash.as_ref().map(|c| c.reason.as_str()).unwrap_or("no worker");
                    let what = match state {
                        WorkerState::CircuitOpen => "circuit open",
                        WorkerState::Stopped => "stopped",
                        _ => "restarting",
                    };
                    return Err(DriverError::new(
                        ErrorKind::DRIVER_CRASHED,
                        format!("{}: worker {what}; the last one: {last}", self.label()),
                    ));
                }
            }
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let r = worker.call(payload, self.config.call_timeout);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        r.map_err(|e| match e {
            CallError::Died(why) => {
                DriverError::new(ErrorKind::DRIVER_CRASHED, format!("{}: {method}: the {why}", self.label()))
            }
            CallError::Timeout => {
                let late = format!(
                    "{method} did not answer within {}s (call_timeout)",
                    self.config.call_timeout.as_secs_f64()
                );
                log::error!("{}: {late}; killing worker {}", self.label(), worker.pid);
                worker.kill_for(late.clone());
                DriverError::new(
                    ErrorKind::TIMEOUT,
                    format!("{}: {late}; the worker was killed and is restarted", self.label()),
                )
            }
        })
    }
}

/// The transport of an isolated backend's remote driver: typed calls encoded for the supervisor.
pub struct SupervisedTransport<I: Interface> {
    supervisor: Arc<Supervisor>,
    _kind: std::marker::PhantomData<fn() -> I>,
}

impl<I: Interface> SupervisedTransport<I> {
    /// A transport to `supervisor`'s worker.
    pub fn new(supervisor: Arc<Supervisor>) -> SupervisedTransport<I> {
        SupervisedTransport { supervisor, _kind: std::marker::PhantomData }
    }
}

impl<I: Interface> Transport<I> for SupervisedTransport<I> {
    fn call(&self, call: I::Call) -> Result<I::Reply, DriverError> {
        let method = I::METHODS.get(I::method_index(I::method(&call))).copied().unwrap_or("call");
        let payload = postcard::to_stdvec(&call)
            .map_err(|e| DriverError::internal(format!("cannot encode a call of {method}: {e}")))?;
        let answer = self.supervisor.call(method, &payload)?;
        postcard::from_bytes(&answer)
            .map_err(|e| DriverError::internal(format!("cannot decode the answer to {method}: {e}")))
    }
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
        assert_eq!(read_frame(&mut r).unwrap(), Some((7, b"hello".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((0, Vec::new())));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let bad = 3u32.to_le_bytes();
        assert!(read_frame(&mut &bad[..]).is_err());
    }
}
