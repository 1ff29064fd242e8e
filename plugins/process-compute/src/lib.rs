//! `process-compute`: each instance is a local process with stdout and stderr appended to
//! `<log_dir>/<name>.stdout` / `.stderr`.
//!
//! Containment: each instance runs in its own process group and, where cgroup v2 is available (option
//! `cgroup`, default `auto`), in its own cgroup `<parent>/i-<name>`. Stop and destroy signal the whole
//! instance, even when its first process already exited: SIGTERM to every process, SIGKILL (through
//! `cgroup.kill`) to whatever is left after `stop_timeout_ms`, and they return once nothing of the
//! instance runs. A `setsid` child leaves the process group but not the cgroup; without cgroups it
//! escapes (documented in the README's driver table).
//!
//! Instances outlive the driver and the host: `cleanup` leaves them running. Each instance's spec, pid,
//! process group, `/proc` start time and cgroup are kept in `<log_dir>/.process-compute.json`
//! (rewritten whole, synced, renamed into place); a new driver on the same `log_dir` (a restarted host,
//! a swap, a reload) re-adopts the live ones: the same pid with the same start time since the same
//! boot, watched through a pidfd. An adopted process that is not this process's child cannot be waited
//! for, so its exit status is reported as unknown, never invented.
//!
//! Networks (`spawn_in`, plughost-api 1.2): an instance given a network namespace runs every run in it
//! (`setns` between fork and exec, after joining the cgroup and before dropping to `user`); the path is
//! kept in the state file with the instance, and checked to be a network namespace (`NS_GET_NSTYPE`)
//! before anything is recorded.
//!
//! Locking: one short lock for the name → instance map, one lock per instance held while it is
//! stopped; a slow stop holds up nothing else.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use plughost_api::{ComputeDriver, DriverError, Instance, InstanceSpec, InstanceState, OptionSpec, Options};
use serde::{Deserialize, Serialize};

/// The options this driver takes. `${state_dir}` and `${backend}` are expanded by the host.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::path("log_dir", "directory for each instance's stdout/stderr logs, the driver's state and the default working dir")
        .default("${state_dir}/instances/${backend}"),
    OptionSpec::integer("stop_timeout_ms", "how long stop waits after SIGTERM before SIGKILL").default("5000"),
    OptionSpec::integer("max_instances", "how many instances may exist at once").default("256"),
    OptionSpec::string(
        "cgroup",
        "per-instance cgroups: `auto` (cgroup v2 when available and writable, else process groups only), `none`, or the cgroup v2 directory to create them in",
    )
    .default("auto"),
    OptionSpec::size(
        "log_max_bytes",
        "an instance's stdout or stderr log larger than this is rotated (copied to NAME.stdout.1, ... and emptied), checked every health round",
    )
    .default("64MiB"),
    OptionSpec::integer("log_max_files", "rotated copies kept per log (0: a full log is only emptied)").default("3"),
    OptionSpec::string(
        "user",
        "run instances as this user (name or uid; plughost must run as root): a process that is not root cannot move itself out of its cgroup, so destroy reaches everything it started. Default: plughost's own user",
    )
    .default(""),
];

/// The uid and gid of `user` (a name, or a number), looked up with `getpwnam_r`.
fn lookup_user(user: &str) -> Result<(u32, u32), DriverError> {
    if let Ok(uid) = user.parse::<u32>() {
        // A bare uid keeps its own number as the group, unless the password database knows it.
        return Ok(lookup_uid(uid).unwrap_or((uid, uid)));
    }
    let name = CString::new(user)
        .map_err(|_| DriverError::invalid_argument(format!("option \"user\": {user:?} has a NUL byte")))?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: passwd is plain data filled in by getpwnam_r; `buf` outlives the call and its length is
    // passed; `found` is only read after the call returned.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut found);
        if rc != 0 || found.is_null() {
            return Err(DriverError::invalid_argument(format!("option \"user\": no user named {user:?}")));
        }
        Ok((pw.pw_uid, pw.pw_gid))
    }
}

fn lookup_uid(uid: u32) -> Option<(u32, u32)> {
    let mut buf = vec![0u8; 16384];
    // SAFETY: as in lookup_user.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut found);
        (rc == 0 && !found.is_null()).then_some((pw.pw_uid, pw.pw_gid))
    }
}

/// Opens the network namespace bound at `path` (for `setns`), checking that it is one.
fn open_netns(name: &str, path: &Path) -> Result<OwnedFd, DriverError> {
    /// `NS_GET_NSTYPE` (linux/nsfs.h): the type of the namespace a namespace file refers to.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // Without waiting: a FIFO at that path opens at once, and is then refused as no namespace.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err(format!("instance {name:?}: opening network namespace {}", path.display())))?;
    // SAFETY: an ioctl without an argument on a descriptor we hold; any other file fails (ENOTTY).
    let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if nstype != libc::CLONE_NEWNET {
        return Err(DriverError::invalid_argument(format!(
            "instance {name:?}: {} is not a network namespace",
            path.display()
        )));
    }
    Ok(file.into())
}

/// The driver's own state file, in `log_dir` (instance names cannot start with `.`).
const STATE_FILE: &str = ".process-compute.json";

/// How long stop and destroy wait, after SIGKILL, for the last processes to go.
const KILL_GRACE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------------
// What is kept on disk

/// The state file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    version: u32,
    instances: BTreeMap<String, SavedInstance>,
}

/// One instance in the state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedInstance {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<(String, String)>,
    #[serde(default)]
    workdir: Option<String>,
    /// The run in progress, as last known.
    #[serde(default)]
    run: Option<SavedRun>,
    /// How the last run ended.
    #[serde(default)]
    last_exit: Option<Exit>,
    /// The process group of the current or last run.
    #[serde(default)]
    pgid: Option<u32>,
    /// The instance's cgroup directory.
    #[serde(default)]
    cgroup: Option<PathBuf>,
    /// Set while a spawn is in progress: the process doing it (pid, start time). A spawn whose owner is
    /// gone was interrupted: whatever it started is killed at the next start.
    #[serde(default)]
    spawning: Option<(u32, u64)>,
    /// The network namespace its runs enter (`spawn_in`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    netns: Option<PathBuf>,
}

/// A run: identified by pid, start time (clock ticks since boot) and boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedRun {
    pid: u32,
    start_ticks: u64,
    boot_id: String,
    started_at_ms: u64,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended while it was not this process's child: nobody can say how.
    Unknown,
}

// ---------------------------------------------------------------------------------------------------
// In memory

/// A live run.
#[derive(Debug)]
struct Run {
    pid: u32,
    start_ticks: u64,
    started_at_ms: u64,
    /// Refers to this very process whatever happens to its pid.
    pidfd: OwnedFd,
    /// Adopted from the state file rather than started by this driver object.
    adopted: bool,
}

#[derive(Debug)]
struct Proc {
    spec: InstanceSpec,
    run: Option<Run>,
    last_exit: Option<Exit>,
    pgid: Option<u32>,
    cgroup: Option<PathBuf>,
    /// The network namespace its runs enter, if any.
    netns: Option<PathBuf>,
    /// Destroyed: a caller that waited for this instance's lock finds it gone.
    removed: bool,
}

/// One instance: its state, locked while an operation on it runs (a stop may take `stop_timeout_ms`),
/// and what it last looked like, for `list` to show without waiting for that lock.
#[derive(Debug)]
struct SlotInner {
    proc: Mutex<Proc>,
    shown: Mutex<Option<Instance>>,
}

type Slot = Arc<SlotInner>;

fn slot_of(p: Proc) -> Slot {
    Arc::new(SlotInner { proc: Mutex::new(p), shown: Mutex::new(None) })
}

/// How instances are contained.
#[derive(Debug, Clone)]
enum Containment {
    /// One cgroup per instance under this directory.
    Cgroup(PathBuf),
    /// Process groups only.
    ProcessGroup,
}

/// The driver.
pub struct ProcessCompute {
    log_dir: PathBuf,
    /// The uid and gid instances run as (`None`: plughost's own).
    run_as: Option<(u32, u32)>,
    /// Logs larger than this are rotated.
    log_max_bytes: u64,
    /// Rotated copies kept per log.
    log_max_files: u32,
    stop_timeout: Duration,
    max_instances: usize,
    cgroup_option: String,
    containment: Mutex<Containment>,
    boot_id: String,
    instances: Mutex<BTreeMap<String, Slot>>,
    /// Serializes rewrites of the state file (read, change one entry, write).
    state: Mutex<()>,
}

/// A line for the host's log (the host's stderr), naming the driver. Drivers have no logger of their
/// own: `log` in a plugin library is a separate, unset copy.
macro_rules! note {
    ($($arg:tt)*) => {
        eprintln!("process-compute: {}", format_args!($($arg)*))
    };
}

fn not_found(name: &str) -> DriverError {
    DriverError::not_found(format!("instance {name:?} not found"))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DriverError {
    move |e| DriverError::io(what, &e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------------
// /proc, pidfds and signals

/// Fields of /proc/PID/stat after the command name: (state, ppid, utime+stime ticks, start ticks).
fn proc_stat(pid: u32) -> Option<(char, u32, u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let start: u64 = f.get(19)?.parse().ok()?;
    Some((state, ppid, utime + stime, start))
}

fn rss_bytes(pid: u32) -> u64 {
    let pages = fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// When the machine booted, in milliseconds since the epoch (`btime` of /proc/stat).
fn boot_time_ms() -> u64 {
    fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok())))
        .unwrap_or(0)
        * 1000
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The process we are (pid, start ticks), to mark work in progress.
fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, proc_stat(pid).map(|s| s.3).unwrap_or(0))
}

/// Whether process `(pid, start ticks)` still runs.
fn process_alive(pid: u32, start_ticks: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.3 == start_ticks && !matches!(s.0, 'Z' | 'X'))
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind a pidfd has ended.
fn pidfd_ended(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

/// Collects the exit status of an ended child through its pidfd. `None` if it is not our child (or
/// someone else collected it).
fn pidfd_reap(fd: &OwnedFd) -> Option<Exit> {
    // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info`, which lives across the call; the fd is a valid pidfd.
    let r =
        unsafe { libc::waitid(libc::P_PIDFD, fd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG) };
    if r != 0 {
        return None;
    }
    // SAFETY: waitid succeeded with WEXITED, so the child fields of `info` are set (pid 0: not yet).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return None;
    }
    Some(match info.si_code {
        libc::CLD_EXITED => Exit::Code(status),
        _ => Exit::Signal(status),
    })
}

fn pidfd_signal(fd: &OwnedFd, sig: libc::c_int) {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal number, a null siginfo and flags.
    unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0);
    }
}

fn signal_group(pgid: u32, sig: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        if pgid > 1 {
            // SAFETY: kill has no memory-safety preconditions; a negative pid addresses a process group.
            unsafe {
                libc::kill(-pgid, sig);
            }
        }
    }
}

fn group_has_members(pgid: u32) -> bool {
    match libc::pid_t::try_from(pgid) {
        // SAFETY: signal 0 only checks that the group exists.
        Ok(p) if p > 1 => unsafe { libc::kill(-p, 0) == 0 },
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------------
// cgroup v2

mod cgroup {
    use std::fs;
    use std::path::{Path, PathBuf};

    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

    /// Whether `dir` is in a cgroup v2 filesystem.
    pub fn is_cgroup2(dir: &Path) -> bool {
        let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str())) else {
            return false;
        };
        // SAFETY: an all-zero statfs is a valid value for statfs to fill in.
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `s` a valid statfs, both alive across the call.
        let r = unsafe { libc::statfs(c.as_ptr(), &mut s) };
        r == 0 && s.f_type as i64 == CGROUP2_SUPER_MAGIC
    }

    /// Where cgroup v2 is mounted, and this process's cgroup in it.
    pub fn own() -> Option<PathBuf> {
        let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })?;
        let cg = fs::read_to_string("/proc/self/cgroup").ok()?;
        let own = cg.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
        Some(mount.join(own.trim_start_matches('/')))
    }

    /// The pids in a cgroup.
    pub fn procs(cg: &Path) -> Vec<u32> {
        fs::read_to_string(cg.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether anything runs in a cgroup (or below it).
    pub fn populated(cg: &Path) -> bool {
        match fs::read_to_string(cg.join("cgroup.events")) {
            Ok(s) => s.lines().any(|l| l == "populated 1"),
            Err(_) => !procs(cg).is_empty(),
        }
    }

    /// Sends `sig` to every process in a cgroup; SIGKILL goes through `cgroup.kill` where the kernel
    /// has it (nothing can fork its way out of that).
    pub fn signal(cg: &Path, sig: libc::c_int) {
        if sig == libc::SIGKILL && fs::write(cg.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in procs(cg) {
            if let Ok(p) = libc::pid_t::try_from(pid) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe {
                    libc::kill(p, sig);
                }
            }
        }
    }

    /// Removes an empty cgroup (retrying briefly: the kernel lets go of exited tasks asynchronously).
    pub fn remove(cg: &Path) -> std::io::Result<()> {
        let mut last = Ok(());
        for _ in 0..100 {
            match fs::remove_dir(cg) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Err(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        last
    }
}

// ---------------------------------------------------------------------------------------------------
// The driver

impl ProcessCompute {
    /// Builds the driver from validated options. Touches nothing on disk until `init`.
    pub fn new(options: &Options) -> Result<ProcessCompute, DriverError> {
        let log_dir = options.path("log_dir")?;
        let ms = options.integer("stop_timeout_ms")?;
        let max = options.integer("max_instances")?;
        let cgroup_option = options.string("cgroup")?;
        if !matches!(cgroup_option.as_str(), "auto" | "none") && !cgroup_option.starts_with('/') {
            return Err(DriverError::invalid_argument(format!(
                "option \"cgroup\": expected auto, none or an absolute path, got {cgroup_option:?}"
            )));
        }
        let log_max_bytes = options.size("log_max_bytes")?;
        let files = options.integer("log_max_files")?;
        let log_max_files = u32::try_from(files).ok().filter(|n| *n <= 100).ok_or_else(|| {
            DriverError::invalid_argument(format!("option \"log_max_files\": between 0 and 100, got {files}"))
        })?;
        let user = options.string("user")?;
        let run_as = if user.is_empty() { None } else { Some(lookup_user(&user)?) };
        Ok(ProcessCompute {
            run_as,
            log_max_bytes,
            log_max_files,
            log_dir,
            stop_timeout: Duration::from_millis(u64::try_from(ms).map_err(|_| {
                DriverError::invalid_argument(format!("option \"stop_timeout_ms\": must not be negative, got {ms}"))
            })?),
            max_instances: usize::try_from(max).map_err(|_| {
                DriverError::invalid_argument(format!("option \"max_instances\": must not be negative, got {max}"))
            })?,
            cgroup_option,
            containment: Mutex::new(Containment::ProcessGroup),
            boot_id: boot_id(),
            instances: Mutex::new(BTreeMap::new()),
            state: Mutex::new(()),
        })
    }

    /// An instance's log and its rotated copies: `NAME.stdout`, `NAME.stdout.1`, ...
    fn log_path(&self, name: &str, ext: &str, n: u32) -> PathBuf {
        match n {
            0 => self.log_dir.join(format!("{name}.{ext}")),
            n => self.log_dir.join(format!("{name}.{ext}.{n}")),
        }
    }

    /// Rotates every log over `log_max_bytes`: copies are shifted (`.1` → `.2`, ...), the log copied to
    /// `.1` and emptied in place. The instance keeps its descriptor (opened for appending, so its next
    /// write lands at the new end): instances outlive the driver, so nothing may stand between them and
    /// their files. Lines written during the copy may be lost, as with logrotate's copytruncate.
    fn rotate_logs(&self) {
        let names: Vec<String> = lock(&self.instances).keys().cloned().collect();
        for name in names {
            for ext in ["stdout", "stderr"] {
                let path = self.log_path(&name, ext, 0);
                if fs::metadata(&path).map_or(true, |m| m.len() <= self.log_max_bytes) {
                    continue;
                }
                if let Err(e) = self.rotate(&name, ext) {
                    note!("instance {name:?}: rotating {}: {e}", path.display());
                }
            }
        }
    }

    fn rotate(&self, name: &str, ext: &str) -> std::io::Result<()> {
        let path = self.log_path(name, ext, 0);
        if self.log_max_files > 0 {
            for n in (1..self.log_max_files).rev() {
                let from = self.log_path(name, ext, n);
                if from.exists() {
                    fs::rename(&from, self.log_path(name, ext, n + 1))?;
                }
            }
            fs::copy(&path, self.log_path(name, ext, 1))?;
        }
        OpenOptions::new().write(true).open(&path)?.set_len(0)
    }

    /// Removes an instance's logs and their rotated copies (on destroy).
    fn remove_logs(&self, name: &str) {
        for ext in ["stdout", "stderr"] {
            for n in 0..=self.log_max_files.max(1) {
                let _ = fs::remove_file(self.log_path(name, ext, n));
            }
        }
    }

    fn state_path(&self) -> PathBuf {
        self.log_dir.join(STATE_FILE)
    }

    fn read_state(&self) -> Result<Saved, DriverError> {
        let path = self.state_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                DriverError::internal(format!("process-compute state {} is unreadable: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved { version: 1, ..Saved::default() }),
            Err(e) => Err(DriverError::io(format!("reading {}", path.display()), &e)),
        }
    }

    /// Changes one instance's entry in the state file (none: removes it): read, change, write to a
    /// temporary file, sync, rename into place. Entries other driver objects wrote are kept.
    fn save(&self, name: &str, entry: Option<SavedInstance>) -> Result<(), DriverError> {
        let _one = lock(&self.state);
        let mut saved = self.read_state()?;
        saved.version = 1;
        match entry {
            Some(e) => saved.instances.insert(name.to_owned(), e),
            None => saved.instances.remove(name),
        };
        let path = self.state_path();
        let tmp = self.log_dir.join(format!("{STATE_FILE}.{}.tmp", std::process::id()));
        let text = serde_json::to_vec_pretty(&saved)
            .map_err(|e| DriverError::internal(format!("cannot encode process-compute state: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.log_dir)?.sync_all()
        };
        write().map_err(io_err(format!("writing {}", path.display())))
    }

    fn saved_of(&self, p: &Proc) -> SavedInstance {
        SavedInstance {
            command: p.spec.command.clone(),
            args: p.spec.args.clone(),
            env: p.spec.env.clone(),
            workdir: p.spec.workdir.clone(),
            run: p.run.as_ref().map(|r| SavedRun {
                pid: r.pid,
                start_ticks: r.start_ticks,
                boot_id: self.boot_id.clone(),
                started_at_ms: r.started_at_ms,
            }),
            last_exit: p.last_exit,
            pgid: p.pgid,
            cgroup: p.cgroup.clone(),
            spawning: None,
            netns: p.netns.clone(),
        }
    }

    fn persist(&self, name: &str, p: &Proc) -> Result<(), DriverError> {
        self.save(name, Some(self.saved_of(p)))
    }

    /// Turns a state-file entry into an instance: its run is adopted if the same process still runs
    /// (same pid, start time and boot); otherwise it ended while nobody watched.
    fn adopt(&self, name: &str, s: &SavedInstance) -> (Proc, bool) {
        let spec = InstanceSpec {
            name: name.to_owned(),
            command: s.command.clone(),
            args: s.args.clone(),
            env: s.env.clone(),
            workdir: s.workdir.clone(),
        };
        let mut p = Proc {
            spec,
            run: None,
            last_exit: s.last_exit,
            pgid: s.pgid,
            cgroup: s.cgroup.clone(),
            netns: s.netns.clone(),
            removed: false,
        };
        let mut changed = false;
        if let Some(r) = &s.run {
            let same = r.boot_id == self.boot_id && process_alive(r.pid, r.start_ticks);
            // Open first, check again: the pidfd then refers to the recorded process, never to a reuse of
            // its pid.
            let fd = same.then(|| pidfd_open(r.pid).ok()).flatten().filter(|_| process_alive(r.pid, r.start_ticks));
            match fd {
                Some(pidfd) => {
                    p.run = Some(Run {
                        pid: r.pid,
                        start_ticks: r.start_ticks,
                        started_at_ms: r.started_at_ms,
                        pidfd,
                        adopted: true,
                    });
                }
                None => {
                    note!("instance {name:?}: pid {} ended while not watched; exit status unknown", r.pid);
                    p.last_exit = Some(Exit::Unknown);
                    changed = true;
                }
            }
        }
        (p, changed)
    }

    /// The instance named `name`: in memory, or adopted now from the state file (another driver object
    /// on the same `log_dir` may have started it: a swap, a restarted worker).
    fn slot(&self, name: &str) -> Result<Slot, DriverError> {
        if let Some(s) = lock(&self.instances).get(name) {
            return Ok(s.clone());
        }
        let saved = self.read_state()?;
        let entry = saved.instances.get(name).filter(|e| e.spawning.is_none()).ok_or_else(|| not_found(name))?;
        let (p, changed) = self.adopt(name, entry);
        if changed {
            self.persist(name, &p)?;
        }
        let mut map = lock(&self.instances);
        Ok(map.entry(name.to_owned()).or_insert_with(|| slot_of(p)).clone())
    }

    /// The instance locked, refreshed (an ended run collected), or `not_found`.
    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Proc) -> Result<T, DriverError>) -> Result<T, DriverError> {
        let slot = self.slot(name)?;
        let mut p = lock(&slot.proc);
        if p.removed {
            return Err(not_found(name));
        }
        self.refresh(name, &mut p)?;
        let out = f(&mut p);
        *lock(&slot.shown) = Some(self.info(name, &p));
        out
    }

    /// Notices an ended run: its exit status if it was our child, else unknown.
    fn refresh(&self, name: &str, p: &mut Proc) -> Result<(), DriverError> {
        let Some(run) = &p.run else { return Ok(()) };
        if !pidfd_ended(&run.pidfd) {
            return Ok(());
        }
        let exit = pidfd_reap(&run.pidfd).or_else(|| self.recorded_exit(name, run)).unwrap_or(Exit::Unknown);
        p.last_exit = Some(exit);
        p.run = None;
        self.persist(name, p)
    }

    /// The exit status another driver object recorded for this very run, if it collected it.
    fn recorded_exit(&self, name: &str, run: &Run) -> Option<Exit> {
        let saved = self.read_state().ok()?;
        let e = saved.instances.get(name)?;
        let same_run_ended = e.run.as_ref().is_none_or(|r| r.pid != run.pid || r.start_ticks != run.start_ticks);
        same_run_ended.then_some(e.last_exit).flatten().filter(|x| *x != Exit::Unknown)
    }

    fn containment(&self) -> Containment {
        lock(&self.containment).clone()
    }

    /// Decides how instances are contained (`cgroup` option) and prepares the cgroup parent.
    fn setup_containment(&self) -> Result<(), DriverError> {
        let c = match self.cgroup_option.as_str() {
            "none" => Containment::ProcessGroup,
            "auto" => match cgroup::own() {
                Some(own) => {
                    // One parent per log_dir, so that two backends (or two hosts) never share one.
                    let parent =
                        own.join(format!("plughost-compute-{:016x}", fnv64(self.log_dir.as_os_str().as_bytes())));
                    // Created here to see that it can be; removed again while empty (see `prepare_cgroup`).
                    match fs::create_dir_all(&parent) {
                        Ok(()) if cgroup::is_cgroup2(&parent) => {
                            let _ = fs::remove_dir(&parent);
                            Containment::Cgroup(parent)
                        }
                        Ok(()) => {
                            note!("{} is not in a cgroup v2 filesystem; using process groups only", parent.display());
                            Containment::ProcessGroup
                        }
                        Err(e) => {
                            note!("cannot create cgroup {}: {e}; using process groups only", parent.display());
                            Containment::ProcessGroup
                        }
                    }
                }
                None => {
                    note!("no cgroup v2 hierarchy found; using process groups only (setsid children escape)");
                    Containment::ProcessGroup
                }
            },
            path => {
                let parent = PathBuf::from(path);
                fs::create_dir_all(&parent).map_err(io_err(format!("option \"cgroup\": creating {path}")))?;
                if !cgroup::is_cgroup2(&parent) {
                    return Err(DriverError::invalid_argument(format!(
                        "option \"cgroup\": {path} is not in a cgroup v2 filesystem"
                    )));
                }
                Containment::Cgroup(parent)
            }
        };
        *lock(&self.containment) = c;
        Ok(())
    }

    /// At start: adopts every instance of the state file, and kills what interrupted spawns left
    /// behind (an entry whose spawning process is gone, a cgroup no entry claims).
    fn recover(&self) -> Result<(), DriverError> {
        let saved = self.read_state()?;
        let mut claimed = Vec::new();
        let (mut live, mut ended) = (0, 0);
        for (name, entry) in &saved.instances {
            if let Some((pid, start)) = entry.spawning {
                if process_alive(pid, start) {
                    claimed.extend(entry.cgroup.clone()); // in progress in a live process: not ours to touch
                    continue;
                }
                note!("instance {name:?}: its spawn was interrupted; killing what it started");
                if let Some(cg) = &entry.cgroup {
                    kill_cgroup(cg);
                }
                self.save(name, None)?;
                continue;
            }
            claimed.extend(entry.cgroup.clone());
            let (p, changed) = self.adopt(name, entry);
            if changed {
                self.persist(name, &p)?;
            }
            match p.run.is_some() {
                true => live += 1,
                false => ended += 1,
            }
            lock(&self.instances).insert(name.clone(), slot_of(p));
        }
        if let Containment::Cgroup(parent) = self.containment() {
            for entry in fs::read_dir(&parent).into_iter().flatten().flatten() {
                let path = entry.path();
                let is_instance = entry.file_name().as_bytes().starts_with(b"i-") && path.is_dir();
                if is_instance && !claimed.contains(&path) {
                    note!("cgroup {} belongs to no instance (an interrupted spawn); killing it", path.display());
                    kill_cgroup(&path);
                }
            }
            let _ = fs::remove_dir(&parent); // only if empty
        }
        if live + ended > 0 {
            note!("re-adopted {live} running instance(s); {ended} not running");
        }
        Ok(())
    }

    fn launch(&self, spec: &InstanceSpec, cg: Option<&Path>, netns: Option<&Path>) -> Result<Run, DriverError> {
        let name = &spec.name;
        let log = |ext: &str| -> Result<fs::File, DriverError> {
            let p = self.log_dir.join(format!("{name}.{ext}"));
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(io_err(format!("instance {name:?}: opening log {}", p.display())))
        };
        let workdir = match (&spec.workdir, self.run_as) {
            (Some(w), _) => PathBuf::from(w),
            // The log dir is private to plughost's user: an instance of another user starts in /.
            (None, Some(_)) => PathBuf::from("/"),
            (None, None) => self.log_dir.clone(),
        };
        let mut cmd = Command::new(&spec.command);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(log("stdout")?)
            .stderr(log("stderr")?)
            .process_group(0);
        if let Some(cg) = cg {
            let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|_| DriverError::internal(format!("cgroup path {} has a NUL byte", cg.display())))?;
            // SAFETY: the closure runs in the child between fork and exec and only calls open, write
            // and close (async-signal-safe) on memory prepared before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(e);
                    }
                    Ok(())
                });
            }
        }
        // Held open until the child is started; closed in the child at exec.
        let netns_fd = match netns {
            Some(path) => Some(open_netns(name, path)?),
            None => None,
        };
        if let Some(fd) = netns_fd.as_ref().map(AsRawFd::as_raw_fd) {
            // SAFETY: the closure runs in the child between fork and exec and only calls setns
            // (async-signal-safe) on a descriptor opened before the fork and still open.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // After joining the cgroup and the namespace (which need root): the instance's own user, for
        // good. (Not `Command::uid`, which std applies before the closures above run.)
        if let Some((uid, gid)) = self.run_as {
            // SAFETY: setgroups, setgid and setuid are async-signal-safe system calls on plain values.
            unsafe {
                cmd.pre_exec(move || {
                    let groups = [gid];
                    if libc::setgroups(1, groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // Last: nothing of plughost's but stdin, stdout and stderr reaches the instance, not even what
        // plughost itself inherited without close-on-exec (a pipe of whoever started it).
        // SAFETY: one async-signal-safe system call on plain values; descriptors std still needs
        // before exec stay open until the exec.
        unsafe {
            cmd.pre_exec(|| {
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;
                libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io_err(format!("instance {name:?}: starting {:?}", spec.command)))?;
        drop(netns_fd);
        let pid = child.id();
        // Not reaped until we reap it through the pidfd: the pid cannot be reused before this.
        drop(child);
        let pidfd = pidfd_open(pid).map_err(io_err(format!("instance {name:?}: pidfd_open({pid})")))?;
        let start_ticks = proc_stat(pid).map(|s| s.3).unwrap_or(0);
        let started_at_ms = match start_ticks {
            0 => now_ms(),
            t => boot_time_ms() + t * 1000 / ticks_per_sec(),
        };
        Ok(Run { pid, start_ticks, started_at_ms, pidfd, adopted: false })
    }

    /// Whether anything of the instance still runs: its first process, or (after that one ended)
    /// anything left in its cgroup or process group.
    fn anything_runs(p: &mut Proc) -> bool {
        if let Some(r) = &p.run {
            if !pidfd_ended(&r.pidfd) {
                return true;
            }
        }
        match (&p.cgroup, p.pgid) {
            (Some(cg), _) => cgroup::populated(cg),
            (None, Some(pgid)) => group_has_members(pgid),
            (None, None) => false,
        }
    }

    fn signal_all(p: &Proc, sig: libc::c_int) {
        if let Some(r) = &p.run {
            pidfd_signal(&r.pidfd, sig);
        }
        if let Some(pgid) = p.pgid {
            signal_group(pgid, sig);
        }
        if let Some(cg) = &p.cgroup {
            cgroup::signal(cg, sig);
        }
    }

    /// Collects the first process if it ended.
    fn collect(p: &mut Proc) {
        if let Some(r) = &p.run {
            if pidfd_ended(&r.pidfd) {
                p.last_exit = Some(pidfd_reap(&r.pidfd).unwrap_or(Exit::Unknown));
                p.run = None;
            }
        }
    }

    /// Waits until nothing of the instance runs (collecting its first process), up to `deadline`.
    fn wait_gone(p: &mut Proc, deadline: Instant) -> bool {
        loop {
            Self::collect(p);
            if !Self::anything_runs(p) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ends the whole instance: SIGTERM to every process of it, SIGKILL to what is left after the stop
    /// timeout; returns once nothing of it runs. The caller holds this instance's lock only.
    fn terminate(&self, name: &str, p: &mut Proc) -> Result<(), DriverError> {
        if Self::anything_runs(p) {
            Self::signal_all(p, libc::SIGTERM);
            if !Self::wait_gone(p, Instant::now() + self.stop_timeout) {
                note!("instance {name:?}: still running {:?} after SIGTERM; SIGKILL", self.stop_timeout);
            }
            // Whatever is left (the first process may have exited and left children behind).
            Self::signal_all(p, libc::SIGKILL);
            if !Self::wait_gone(p, Instant::now() + KILL_GRACE) {
                return Err(DriverError::internal(format!(
                    "instance {name:?}: processes still running {KILL_GRACE:?} after SIGKILL (uninterruptible sleep?)"
                )));
            }
        }
        Self::collect(p);
        Ok(())
    }

    /// The instance's cgroup, created (or emptied of leftovers) for a new run.
    fn prepare_cgroup(&self, name: &str) -> Result<Option<PathBuf>, DriverError> {
        let Containment::Cgroup(parent) = self.containment() else { return Ok(None) };
        let cg = parent.join(format!("i-{name}"));
        // The parent exists while an instance does (a destroy removes it once empty, possibly between
        // these two steps: then again).
        let mut made = Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        for _ in 0..3 {
            made = fs::create_dir_all(&parent).and_then(|()| fs::create_dir(&cg));
            if !matches!(&made, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
                break;
            }
        }
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if cgroup::populated(&cg) {
                    note!("instance {name:?}: killing leftovers in {}", cg.display());
                    kill_cgroup_processes(&cg);
                }
            }
            Err(e) => return Err(DriverError::io(format!("instance {name:?}: creating cgroup {}", cg.display()), &e)),
        }
        Ok(Some(cg))
    }

    /// Starts a new run of `p` (whose previous run, if any, has ended).
    fn start_run(&self, name: &str, p: &mut Proc) -> Result<(), DriverError> {
        if p.cgroup.is_none() {
            p.cgroup = self.prepare_cgroup(name)?;
        } else if let Some(cg) = &p.cgroup {
            if !cg.is_dir() {
                fs::create_dir_all(cg)
                    .map_err(io_err(format!("instance {name:?}: creating cgroup {}", cg.display())))?;
            }
        }
        let run = self.launch(&p.spec, p.cgroup.as_deref(), p.netns.as_deref())?;
        p.pgid = Some(run.pid);
        p.run = Some(run);
        self.persist(name, p)
    }

    fn info(&self, name: &str, p: &Proc) -> Instance {
        let mut command = p.spec.command.clone();
        for a in &p.spec.args {
            command.push(' ');
            command.push_str(a);
        }
        let mut i = Instance { name: name.to_owned(), command, ..Instance::default() };
        let mut details =
            vec![("containment".to_owned(), if p.cgroup.is_some() { "cgroup" } else { "process-group" }.to_owned())];
        if let Some(pgid) = p.pgid {
            details.push(("pgid".to_owned(), pgid.to_string()));
        }
        if let Some(cg) = &p.cgroup {
            details.push(("cgroup".to_owned(), cg.display().to_string()));
        }
        if let Some(ns) = &p.netns {
            details.push(("netns".to_owned(), ns.display().to_string()));
        }
        match &p.run {
            Some(r) => {
                i.pid = Some(r.pid);
                let (st, _, ticks, _) = proc_stat(r.pid).unwrap_or(('R', 0, 0, 0));
                i.state = match st {
                    'T' | 't' => InstanceState::Paused,
                    _ => InstanceState::Running,
                };
                i.cpu_time_ms = ticks * 1000 / ticks_per_sec();
                i.rss_bytes = rss_bytes(r.pid);
                i.started_at_ms = Some(r.started_at_ms);
                i.uptime_ms = now_ms().saturating_sub(r.started_at_ms);
                if r.adopted {
                    details.push(("adopted".to_owned(), "true".to_owned()));
                }
            }
            None => {
                i.state = InstanceState::Stopped;
                match p.last_exit {
                    Some(Exit::Code(c)) => i.exit_code = Some(c),
                    Some(Exit::Signal(s)) => i.exit_signal = Some(s),
                    Some(Exit::Unknown) => i.exit_unknown = true,
                    None => {}
                }
                let left = match (&p.cgroup, p.pgid) {
                    (Some(cg), _) => cgroup::procs(cg).len(),
                    _ => 0,
                };
                if left > 0 {
                    details.push(("leftover_processes".to_owned(), left.to_string()));
                }
            }
        }
        i.details = details;
        i
    }
}

/// Kills everything in a cgroup and removes it.
fn kill_cgroup(cg: &Path) {
    kill_cgroup_processes(cg);
    if let Err(e) = cgroup::remove(cg) {
        note!("cannot remove cgroup {}: {e}", cg.display());
    }
}

fn kill_cgroup_processes(cg: &Path) {
    cgroup::signal(cg, libc::SIGKILL);
    let deadline = Instant::now() + KILL_GRACE;
    while cgroup::populated(cg) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// FNV-1a, for short stable names.
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl ProcessCompute {
    /// Spawns an instance, its runs in network namespace `netns` if given.
    fn spawn_with(&self, spec: &InstanceSpec, netns: Option<&Path>) -> Result<Instance, DriverError> {
        let name = spec.name.as_str();
        plughost_api::check_name("instance", name)?;
        if spec.command.is_empty() {
            return Err(DriverError::invalid_argument(format!("instance {name:?}: empty command")));
        }
        let taken = || DriverError::already_exists(format!("instance {name:?} already exists"));
        if self.read_state()?.instances.contains_key(name) {
            // Known to the state file (another driver object on this log_dir may have started it).
            self.slot(name)?;
            return Err(taken());
        }
        let slot = slot_of(Proc {
            spec: spec.clone(),
            run: None,
            last_exit: None,
            pgid: None,
            cgroup: None,
            netns: netns.map(Path::to_path_buf),
            removed: false,
        });
        let mut p = lock(&slot.proc);
        {
            let mut map = lock(&self.instances);
            if map.contains_key(name) {
                return Err(taken());
            }
            if map.len() >= self.max_instances {
                return Err(DriverError::no_capacity(format!("limit of {} instances reached", self.max_instances)));
            }
            map.insert(name.to_owned(), slot.clone());
        }
        let started = (|| {
            // The intent first: a crash from here on leaves an entry naming this process, and the next
            // start kills whatever this spawn had started.
            p.cgroup = match self.containment() {
                Containment::Cgroup(parent) => Some(parent.join(format!("i-{name}"))),
                Containment::ProcessGroup => None,
            };
            self.save(name, Some(SavedInstance { spawning: Some(me()), ..self.saved_of(&p) }))?;
            p.cgroup = self.prepare_cgroup(name)?;
            self.start_run(name, &mut p)
        })();
        if let Err(e) = started {
            p.removed = true;
            if let Some(cg) = &p.cgroup {
                kill_cgroup(cg);
            }
            let _ = self.save(name, None);
            lock(&self.instances).remove(name);
            return Err(e);
        }
        let info = self.info(name, &p);
        *lock(&slot.shown) = Some(info.clone());
        Ok(info)
    }
}

impl ComputeDriver for ProcessCompute {
    fn init(&self) -> Result<(), DriverError> {
        // SAFETY: geteuid has no preconditions.
        if self.run_as.is_some_and(|(uid, _)| uid != unsafe { libc::geteuid() }) && unsafe { libc::geteuid() } != 0 {
            return Err(DriverError::invalid_argument(
                "option \"user\": running instances as another user needs plughost to run as root",
            ));
        }
        fs::create_dir_all(&self.log_dir).map_err(io_err(format!("creating log dir {}", self.log_dir.display())))?;
        self.setup_containment()?;
        self.recover()
    }

    /// Leaves every instance running: they outlive the driver, and the next driver on this `log_dir`
    /// re-adopts them.
    fn cleanup(&self) -> Result<(), DriverError> {
        let running = lock(&self.instances).values().filter(|s| lock(&s.proc).run.is_some()).count();
        if running > 0 {
            note!("leaving {running} instance(s) running; they are re-adopted at the next start");
        }
        Ok(())
    }

    fn health(&self) -> Result<(), DriverError> {
        if !Path::new("/proc/self/stat").exists() {
            return Err(DriverError::internal("/proc is not mounted"));
        }
        if !self.log_dir.is_dir() {
            return Err(DriverError::internal(format!("log dir {} is missing", self.log_dir.display())));
        }
        self.rotate_logs();
        Ok(())
    }

    fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, DriverError> {
        self.spawn_with(spec, None)
    }

    fn spawn_in(&self, spec: &InstanceSpec, netns: &str) -> Result<Instance, DriverError> {
        let path = Path::new(netns);
        if !path.is_absolute() {
            return Err(DriverError::invalid_argument(format!(
                "instance {:?}: network namespace {netns:?} is not an absolute path",
                spec.name
            )));
        }
        // Checked before anything is recorded, so that a wrong path is a clean refusal.
        drop(open_netns(&spec.name, path)?);
        self.spawn_with(spec, Some(path))
    }

    fn destroy(&self, name: &str) -> Result<(), DriverError> {
        let slot = self.slot(name)?;
        let mut p = lock(&slot.proc);
        if p.removed {
            return Err(not_found(name));
        }
        self.terminate(name, &mut p)?;
        if let Some(cg) = &p.cgroup {
            cgroup::remove(cg).map_err(io_err(format!("instance {name:?}: removing cgroup {}", cg.display())))?;
            if let Some(parent) = cg.parent() {
                // The last instance takes the parent with it (this fails while others exist).
                let _ = fs::remove_dir(parent);
            }
        }
        self.save(name, None)?;
        p.removed = true;
        self.remove_logs(name);
        let mut map = lock(&self.instances);
        if map.get(name).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            map.remove(name);
        }
        Ok(())
    }

    fn start(&self, name: &str) -> Result<Instance, DriverError> {
        self.with(name, |p| {
            if p.run.is_some() {
                return Err(DriverError::busy(format!("instance {name:?} is already running")));
            }
            // Leftovers of the last run (its first process exited, children did not) go first.
            self.terminate(name, p)?;
            self.start_run(name, p)?;
            Ok(self.info(name, p))
        })
    }

    fn stop(&self, name: &str) -> Result<Instance, DriverError> {
        self.with(name, |p| {
            self.terminate(name, p)?;
            self.persist(name, p)?;
            Ok(self.info(name, p))
        })
    }

    fn reboot(&self, name: &str) -> Result<Instance, DriverError> {
        self.with(name, |p| {
            self.terminate(name, p)?;
            self.start_run(name, p)?;
            Ok(self.info(name, p))
        })
    }

    fn list(&self) -> Result<Vec<Instance>, DriverError> {
        // Instances other driver objects on this log_dir started are adopted here.
        let saved = self.read_state()?;
        let mut names: Vec<String> = lock(&self.instances).keys().cloned().collect();
        for (name, e) in &saved.instances {
            if e.spawning.is_none() && !names.contains(name) {
                names.push(name.clone());
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let slot = match self.slot(&name) {
                Ok(s) => s,
                Err(e) if e.kind() == plughost_api::ErrorKind::NOT_FOUND => continue,
                Err(e) => return Err(e),
            };
            // An instance an operation is working on (a stop waiting for its processes) is shown as it
            // last was: list never waits for it.
            let shown = match slot.proc.try_lock() {
                Ok(mut p) if !p.removed => {
                    self.refresh(&name, &mut p)?;
                    let i = self.info(&name, &p);
                    *lock(&slot.shown) = Some(i.clone());
                    Some(i)
                }
                Ok(_) => None,
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    let p = e.into_inner();
                    (!p.removed).then(|| self.info(&name, &p))
                }
                Err(std::sync::TryLockError::WouldBlock) => lock(&slot.shown).clone(),
            };
            out.extend(shown);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn get(&self, name: &str) -> Result<Instance, DriverError> {
        self.with(name, |p| Ok(self.info(name, p)))
    }
}

plughost_api::export_driver! {
    kind: compute,
    driver: ProcessCompute,
    name: "process-compute",
    version: env!("CARGO_PKG_VERSION"),
    summary: "each instance a local process in its own cgroup (v2) or process group; outlives the host, re-adopted at start",
    options: OPTIONS,
    new: ProcessCompute::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver(dir: &Path, cgroup: &str) -> ProcessCompute {
        let o = Options::for_schema(
            OPTIONS,
            [("log_dir", dir.to_str().unwrap()), ("stop_timeout_ms", "2000"), ("cgroup", cgroup)],
        );
        let d = ProcessCompute::new(&o).unwrap();
        d.init().unwrap();
        d
    }

    fn sh(name: &str, script: &str) -> InstanceSpec {
        InstanceSpec {
            name: name.into(),
            command: "sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }
    }

    fn alive(pid: u32) -> bool {
        proc_stat(pid).is_some_and(|s| !matches!(s.0, 'Z' | 'X'))
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("process-compute-unit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn processes_live_and_die_with_their_exit_status() {
        let dir = temp("live");
        let d = driver(&dir, "auto");
        let i = d.spawn(&sh("s", "echo hi; exec sleep 30")).unwrap();
        let pid = i.pid.unwrap();
        assert!(alive(pid));
        let stopped = d.stop("s").unwrap();
        assert_eq!((stopped.state, stopped.exit_signal), (InstanceState::Stopped, Some(libc::SIGTERM)));
        assert!(!alive(pid), "stop returns once the process is gone");
        d.spawn(&sh("q", "exit 3")).unwrap();
        wait_for("q to exit", || d.get("q").unwrap().state == InstanceState::Stopped);
        assert_eq!(d.get("q").unwrap().exit_code, Some(3));
        d.destroy("s").unwrap();
        d.destroy("q").unwrap();
        d.cleanup().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_instance_gets_no_descriptor_but_its_stdio() {
        let dir = temp("fds");
        let d = driver(&dir, "none");
        // A descriptor without close-on-exec, as plughost may inherit from whoever started it.
        // SAFETY: dup of stdin; the copy is closed below.
        let leaked = unsafe { libc::dup(0) };
        assert!(leaked > 2);
        d.spawn(&sh("fds", "ls /proc/$$/fd")).unwrap();
        wait_for("fds to exit", || d.get("fds").unwrap().state == InstanceState::Stopped);
        // SAFETY: closing the descriptor dup returned.
        unsafe { libc::close(leaked) };
        let listed = fs::read_to_string(dir.join("fds.stdout")).unwrap();
        assert_eq!(listed.split_whitespace().collect::<Vec<_>>(), ["0", "1", "2"], "{listed}");
        d.destroy("fds").unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn spawn_in_runs_every_run_in_the_namespace_and_refuses_what_is_not_one() {
        let dir = temp("netns");
        let d = driver(&dir, "none");
        let sleeper = sh("n", "exec sleep 30");
        // A FIFO is refused at once, not waited on for a writer.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let fifo = fifo.to_str().unwrap();
        for (path, why) in [
            ("/proc/self/ns/mnt", "is not a network namespace"),
            ("relative", "absolute path"),
            (fifo, "is not a network namespace"),
        ] {
            let e = d.spawn_in(&sleeper, path).unwrap_err();
            assert_eq!(e.kind(), plughost_api::ErrorKind::INVALID_ARGUMENT, "{e}");
            assert!(e.message().contains(why), "{e}");
        }
        assert!(d.list().unwrap().is_empty(), "a refused spawn leaves nothing");
        // The driver's own namespace, bound by /proc (a test cannot make one without root): the run is
        // in it, said so, and so is the run after a stop and start, and after an adoption.
        let ns = format!("/proc/{}/ns/net", std::process::id());
        let ino = |path: &str| fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
        let i = d.spawn_in(&sleeper, &ns).unwrap();
        assert!(i.details.contains(&("netns".to_owned(), ns.clone())), "{:?}", i.details);
        assert_eq!(ino(&format!("/proc/{}/ns/net", i.pid.unwrap())), ino(&ns));
        d.stop("n").unwrap();
        let again = d.start("n").unwrap();
        assert!(again.details.contains(&("netns".to_owned(), ns.clone())), "{:?}", again.details);
        let adopted = driver(&dir, "none").get("n").unwrap();
        assert!(adopted.details.contains(&("netns".to_owned(), ns.clone())), "{:?}", adopted.details);
        d.destroy("n").unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn logs_are_rotated_past_their_limit_and_removed_with_the_instance() {
        let dir = temp("logs");
        let o = Options::for_schema(
            OPTIONS,
            [
                ("log_dir", dir.to_str().unwrap()),
                ("cgroup", "none"),
                ("log_max_bytes", "100000"),
                ("log_max_files", "2"),
            ],
        );
        let d = ProcessCompute::new(&o).unwrap();
        d.init().unwrap();
        // 300 kB, then a marker once the test says so, then it waits.
        let go = dir.join("go");
        let script = format!(
            "head -c 300000 /dev/zero | tr '\\0' x; while [ ! -e {go} ]; do sleep 0.02; done; echo after; exec sleep 30",
            go = go.display()
        );
        d.spawn(&sh("chatty", &script)).unwrap();
        let log = dir.join("chatty.stdout");
        wait_for("300 kB of output", || fs::metadata(&log).is_ok_and(|m| m.len() >= 300_000));
        d.health().unwrap();
        assert_eq!(fs::metadata(dir.join("chatty.stdout.1")).unwrap().len(), 300_000);
        assert_eq!(fs::metadata(&log).unwrap().len(), 0, "the log is emptied in place");
        // The instance writes on into the same file, at its new end (no hole where the old bytes were).
        fs::write(&go, "").unwrap();
        wait_for("the line after", || fs::read_to_string(&log).is_ok_and(|t| t == "after\n"));
        // Small logs are left alone; at most log_max_files copies are kept.
        d.health().unwrap();
        assert!(!dir.join("chatty.stdout.2").exists());
        d.destroy("chatty").unwrap();
        for f in ["chatty.stdout", "chatty.stdout.1", "chatty.stderr"] {
            assert!(!dir.join(f).exists(), "{f} outlived the instance");
        }
        d.cleanup().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn instances_of_another_user_cannot_leave_their_cgroup() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // switching users needs root, as the option says
        }
        let dir = temp("user");
        let o =
            Options::for_schema(OPTIONS, [("log_dir", dir.to_str().unwrap()), ("user", "nobody"), ("cgroup", "auto")]);
        let d = ProcessCompute::new(&o).unwrap();
        d.init().unwrap();
        // The cgroup v2 root (where an escaping process would go), wherever it is mounted.
        let mounts = fs::read_to_string("/proc/mounts").unwrap();
        let root = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
        });
        let target = root.as_deref().unwrap_or("/sys/fs/cgroup");
        let script = format!(
            "id -u; id -G; pwd; echo $$ > {target}/cgroup.procs 2>/dev/null && echo escaped || echo stayed; exec sleep 30"
        );
        let i = d.spawn(&sh("n", &script)).unwrap();
        let out = dir.join("n.stdout");
        wait_for("the instance's report", || fs::read_to_string(&out).is_ok_and(|t| t.lines().count() >= 4));
        let text = fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "65534", "{text}");
        assert!(!lines[1].split(' ').any(|g| g == "0"), "no root group left: {text}");
        assert_eq!(lines[2], "/", "{text}");
        assert_eq!(lines[3], "stayed", "{text}");
        let pid = i.pid.unwrap();
        d.destroy("n").unwrap();
        assert!(!alive(pid));
        d.cleanup().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    /// A second driver object on the same log_dir (a restarted host, a swap) re-adopts running instances
    /// with their pids; the first one's cleanup leaves them running.
    #[test]
    fn a_new_driver_on_the_same_log_dir_readopts_running_instances() {
        let dir = temp("adopt");
        let first = driver(&dir, "auto");
        let pid = first.spawn(&sh("a", "exec sleep 30")).unwrap().pid.unwrap();
        first.spawn(&sh("b", "exit 4")).unwrap();
        wait_for("b to exit", || first.get("b").unwrap().state == InstanceState::Stopped);
        first.cleanup().unwrap();
        assert!(alive(pid), "cleanup leaves instances running");
        let second = driver(&dir, "auto");
        let a = second.get("a").unwrap();
        assert_eq!((a.state, a.pid), (InstanceState::Running, Some(pid)));
        assert!(a.details.contains(&("adopted".to_owned(), "true".to_owned())), "{:?}", a.details);
        assert_eq!(second.get("b").unwrap().exit_code, Some(4), "a recorded exit is kept");
        // Still our child (same process): its exit status is collected, not invented.
        let stopped = second.stop("a").unwrap();
        assert_eq!(stopped.exit_signal, Some(libc::SIGTERM));
        assert!(!alive(pid));
        let names: Vec<String> = second.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["a", "b"]);
        second.destroy("a").unwrap();
        second.destroy("b").unwrap();
        second.cleanup().unwrap();
        let third = driver(&dir, "auto");
        assert!(third.list().unwrap().is_empty());
        third.cleanup().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    /// Stop and destroy end every process of the instance: a background child, a `setsid` grandchild
    /// (through the cgroup), and the rest when the first process already exited.
    #[test]
    fn destroy_leaves_no_process_behind() {
        let dir = temp("contain");
        let d = driver(&dir, "auto");
        let cgroups = matches!(d.containment(), Containment::Cgroup(_));
        let pids = dir.join("pids");
        let script = format!(
            "sleep 300 & echo $! >> {p}; setsid sh -c 'echo $$ >> {p}; exec sleep 300' & sleep 0.2; exit 0",
            p = pids.display()
        );
        d.spawn(&sh("c", &script)).unwrap();
        wait_for("the leader to exit", || d.get("c").unwrap().state == InstanceState::Stopped);
        let left: Vec<u32> =
            fs::read_to_string(&pids).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect::<Vec<_>>();
        assert_eq!(left.len(), 2);
        assert!(left.iter().all(|p| alive(*p)), "children outlive their leader");
        d.destroy("c").unwrap();
        if cgroups {
            assert!(left.iter().all(|p| !alive(*p)), "nothing escapes the cgroup");
        } else {
            assert!(!alive(left[0]), "the background child is in the process group");
            // SAFETY: kill with a pid we read; only ends the test's own escaped process.
            unsafe { libc::kill(left[1] as i32, libc::SIGKILL) };
        }
        d.cleanup().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_cgroup_option_is_refused() {
        let o = Options::for_schema(OPTIONS, [("cgroup", "relative/path")]);
        let e = ProcessCompute::new(&o).err().unwrap();
        assert_eq!(e.message(), "option \"cgroup\": expected auto, none or an absolute path, got \"relative/path\"");
    }
}
