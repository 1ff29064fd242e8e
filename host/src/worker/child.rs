//! The worker's side (`plughost __worker`): hygiene, then loading the sealed library and serving typed
//! calls on its threads.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use plughost_api::host::Interface;

use super::wire::*;
use crate::loading::error::{LoadError, LoadErrorKind};

/// Threads serving calls in a worker.
const WORKER_THREADS: usize = 16;
/// Set when a worker that switched users made itself dumpable again to open its library.
static REOPENED_PROC: AtomicBool = AtomicBool::new(false);
/// The stack of each serving thread (Rust's default, fixed so that `memory_limit` can account for it).
const WORKER_STACK: usize = 2 << 20;
/// Address space a worker keeps beyond its measured start for the loader's own allocations.
const LIMIT_HEADROOM: u64 = 16 << 20;

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
    let lib = match crate::loading::loader::Loader::for_verified_copy()
        .load(&PathBuf::from(format!("/proc/self/fd/{LIBRARY_FD}")))
    {
        Ok(l) => l,
        Err(e) => refuse(&stream, e),
    };
    if REOPENED_PROC.load(Ordering::SeqCst) {
        // Loaded: close /proc/PID (environ, mem, fd) and ptrace to the other processes of the user we
        // switched to, which would otherwise read the host's environment or steer the driver.
        let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
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
                    read_frame(&mut *r, MAX_CALL_FRAME)
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
    let page_size = rustix::param::page_size() as u64;
    let library = std::fs::metadata(format!("/proc/self/fd/{LIBRARY_FD}")).map(|m| m.len()).unwrap_or(0);
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
    let r = rustix::process::Rlimit { current: Some(limit), maximum: Some(limit) };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::As, r) {
        return Err(format!("memory_limit: cannot set RLIMIT_AS: {}", crate::util::fmt::io_text(&e.into())));
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
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // The parent may have died before the death signal was armed.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) != Some(args.parent) {
        return "the host is gone".to_owned();
    }
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        return format!("no_new_privs: {}", std::io::Error::from(e));
    }
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        // SAFETY: setgroups/setgid/setuid with integer arguments; single-threaded here. (libc, not rustix:
        // these change the whole process's credentials, which rustix leaves to libc on purpose.)
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return format!("cannot switch to uid {uid} gid {gid}: {}", std::io::Error::last_os_error());
            }
        }
        // The library is opened through /proc/self/fd, which a uid change closes to the process; open
        // again until it is loaded (see `serve`).
        let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable);
        REOPENED_PROC.store(true, Ordering::SeqCst);
    }
    // What the driver starts (a compute driver's instances) must not inherit the socket or the
    // library: a child holding the socket would keep the host from noticing this worker's death.
    // SAFETY: fd 3 was set up by the host as this worker's end of the socketpair; nothing else owns it.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(SOCKET_FD) });
    let _ = rustix::io::fcntl_setfd(&stream, rustix::io::FdFlags::CLOEXEC);
    // SAFETY: fd 4 is the sealed library copy the host passed; it stays open for the process's life
    // (the loader reads it through /proc/self/fd), so borrowing it here is sound.
    let library = unsafe { std::os::fd::BorrowedFd::borrow_raw(LIBRARY_FD) };
    let _ = rustix::io::fcntl_setfd(library, rustix::io::FdFlags::CLOEXEC);
    let setup = match read_frame(&mut &stream, MAX_CALL_FRAME) {
        Ok(Some((0, payload))) => match postcard::from_bytes::<(String, Setup)>(&payload) {
            Ok(s) => s,
            Err(e) => return format!("bad setup frame: {e}"),
        },
        Ok(_) => return "no setup frame".to_owned(),
        Err(e) => return format!("reading the setup frame: {e}"),
    };
    serve_kind(&setup.0, stream, setup.1)
}
