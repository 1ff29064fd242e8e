//! Child processes that load driver code on plughost's behalf without being plughost: the probe that
//! tries new content before the host loads it, and the one that reads a library's metadata for
//! `inspect`, `list` and `config sample`, so that those never load library code in their own process.
//!
//! The parent passes the library as a sealed memfd on fd 3 and a fresh private directory; the child
//! calls [`enter`] before anything of the library is loaded: no new privileges, resource limits, an
//! unprivileged uid (65534) when it runs as root, that directory as its working directory and an empty
//! environment. The parent waits with a timeout, kills a child that hangs, and removes the directory
//! whatever became of the child.

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The uid and gid a sandboxed child runs as when plughost runs as root (`nobody`).
pub const UNPRIVILEGED: u32 = 65534;

/// The descriptor a child finds the library at.
pub const LIBRARY_FD: i32 = 3;

/// A fresh private directory for one child, removed when dropped.
#[derive(Debug)]
struct ChildDir(PathBuf);

impl ChildDir {
    fn new() -> std::io::Result<ChildDir> {
        let dir = crate::util::fs::fresh_private_dir(&std::env::temp_dir(), "plughost-child")?;
        if crate::loading::trust::euid() == 0 {
            std::os::unix::fs::chown(&dir, Some(UNPRIVILEGED), Some(UNPRIVILEGED))?;
        }
        Ok(ChildDir(dir))
    }
}

impl Drop for ChildDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a sandboxed child ended.
#[derive(Debug)]
pub enum Outcome {
    /// It exited; its status and what it printed.
    Exited(ExitStatus, String),
    /// It did not finish within the timeout and was killed.
    Hung,
}

/// Runs `exe ARGS... --dir DIR` with `library` on fd 3, waits up to `timeout`.
pub fn run(exe: &Path, args: &[&str], library: &impl AsRawFd, timeout: Duration) -> std::io::Result<Outcome> {
    let dir = ChildDir::new()?;
    let fd = library.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--dir")
        .arg(&dir.0)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls dup2, fcntl and
    // close_range, which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it explicitly then.
            let r = if fd == LIBRARY_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, LIBRARY_FD) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing else the caller had open without close-on-exec reaches the child.
            libc::syscall(libc::SYS_close_range, (LIBRARY_FD + 1) as u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take();
    // Read while waiting, so that a child printing a lot cannot block on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.take(1 << 20).read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait()? {
            Some(s) => break Some(s),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let printed = reader.join().unwrap_or_default();
    drop(dir);
    Ok(match status {
        Some(s) => Outcome::Exited(s, printed),
        None => Outcome::Hung,
    })
}

fn limit(resource: rustix::process::Resource, value: u64) {
    // Lowering a limit is always allowed.
    let _ =
        rustix::process::setrlimit(resource, rustix::process::Rlimit { current: Some(value), maximum: Some(value) });
}

/// The child side, before anything of the library is loaded: no new privileges, limits (memory, CPU,
/// files, no core dumps, no new processes), an unprivileged uid when running as root, `dir` as the
/// working directory. Returns an error naming what could not be done.
pub fn enter(dir: &Path) -> Result<(), String> {
    let os = |what: &str| format!("sandbox: {what}: {}", std::io::Error::last_os_error());
    rustix::thread::set_no_new_privs(true)
        .map_err(|e| format!("sandbox: no_new_privs: {}", std::io::Error::from(e)))?;
    use rustix::process::Resource;
    limit(Resource::As, 4 << 30);
    limit(Resource::Cpu, 30);
    limit(Resource::Nofile, 64);
    limit(Resource::Fsize, 64 << 20);
    limit(Resource::Core, 0);
    if crate::loading::trust::euid() == 0 {
        // SAFETY: setgroups with an empty list, then setgid and setuid: integer arguments only; this
        // process is single-threaded here (nothing was started before).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(os("setgroups"));
            }
            if libc::setgid(UNPRIVILEGED) != 0 {
                return Err(os("setgid"));
            }
            if libc::setuid(UNPRIVILEGED) != 0 {
                return Err(os("setuid"));
            }
        }
        // A uid change makes the process undumpable, which closes /proc/self/fd to it: the library is
        // opened through /proc/self/fd/3.
        let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable);
        limit(Resource::Nproc, 0);
    }
    std::env::set_current_dir(dir).map_err(|e| format!("sandbox: chdir {}: {e}", dir.display()))?;
    Ok(())
}

/// The path a child opens the library by.
pub fn library_path() -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{LIBRARY_FD}"))
}
