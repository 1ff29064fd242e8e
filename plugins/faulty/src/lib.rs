//! `faulty`: a volume driver that misbehaves on request, so that tests can drive every failure path of
//! the host (constructor errors and panics, init failures, unhealthy backends, methods that fail, panic
//! or are slow), and faults only a process boundary can contain (`crash`: a segfault, an abort, an exit,
//! a hang, a deadlock, a leak, on `crash_on` after `crash_after` calls). When told nothing it behaves
//! like a minimal in-memory volume driver. Never load it with `crash` set in-process outside a test.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use plughost_api::{CapacityStats, DriverError, OptionSpec, Options, Volume, VolumeDriver};

/// The options this driver takes.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::boolean("fail_new", "the constructor returns an error").default("false"),
    OptionSpec::boolean("panic_new", "the constructor panics").default("false"),
    OptionSpec::boolean("fail_init", "init() returns an error").default("false"),
    OptionSpec::boolean("unhealthy", "health() reports the backend unhealthy").default("false"),
    OptionSpec::string("fail_in", "comma-separated methods that return an internal error").default(""),
    OptionSpec::string("panic_in", "comma-separated methods that panic").default(""),
    OptionSpec::integer("delay_ms", "sleep this long in every method (see delay_in)").default("0"),
    OptionSpec::string("delay_in", "comma-separated methods that sleep delay_ms (default: every one)").default(""),
    OptionSpec::string("password", "a secret that must never be logged or shown").secret(),
    OptionSpec::string("crash", "a fault that takes the whole process: segv, abort, exit, hang, deadlock or leak")
        .default(""),
    OptionSpec::string(
        "crash_on",
        "comma-separated methods that fault (new for the constructor; init, health, cleanup; default: every volume method)",
    )
    .default(""),
    OptionSpec::integer("crash_after", "fault only after this many matching calls succeeded").default("0"),
    OptionSpec::boolean(
        "fork_child",
        "the constructor forks a child that sleeps forever, holding every descriptor of the process (as a driver starting a helper without exec)",
    )
    .default("false"),
    OptionSpec::boolean("page_ignores_limit", "list_after() answers every volume after the name given, whatever the limit (a page too large)")
        .default("false"),
    OptionSpec::integer("list_entries", "list() and list_after() report this many made-up volumes besides its own (a huge answer)")
        .default("0"),
    OptionSpec::integer(
        "stderr_flood",
        "every health() writes this many bytes to stderr without a newline, then as many short lines (at most 200,000): a chatty or hostile driver",
    )
    .default("0"),
];

/// A fault that takes the whole process down or makes it unresponsive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    Segv,
    Abort,
    Exit,
    Hang,
    Deadlock,
    Leak,
}

impl Crash {
    fn parse(s: &str) -> Result<Option<Crash>, DriverError> {
        Ok(Some(match s {
            "" => return Ok(None),
            "segv" => Crash::Segv,
            "abort" => Crash::Abort,
            "exit" => Crash::Exit,
            "hang" => Crash::Hang,
            "deadlock" => Crash::Deadlock,
            "leak" => Crash::Leak,
            other => {
                return Err(DriverError::invalid_argument(format!(
                    "option \"crash\": expected segv, abort, exit, hang, deadlock or leak, got {other:?}"
                )))
            }
        }))
    }

    /// Does it. Never returns.
    fn strike(self) -> ! {
        match self {
            // SAFETY: signal and raise have no memory-safety preconditions. The Rust runtime's SIGSEGV
            // handler (for stack overflows) would swallow a raised signal: back to the default action
            // first, which ends the process as a real segfault does.
            Crash::Segv => unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
                std::process::abort()
            },
            Crash::Abort => std::process::abort(),
            Crash::Exit => std::process::exit(3),
            Crash::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            Crash::Deadlock => {
                static HELD: Mutex<()> = Mutex::new(());
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _g = HELD.lock();
                    let _ = tx.send(());
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                });
                let _ = rx.recv();
                let _never = HELD.lock();
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            Crash::Leak => {
                let mut kept: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Touched, so that it is really used; until the allocator gives up.
                    kept.push(vec![1u8; 64 << 20]);
                }
            }
        }
    }
}

/// The driver.
pub struct Faulty {
    fail_init: bool,
    unhealthy: bool,
    fail_in: Vec<String>,
    panic_in: Vec<String>,
    delay: Duration,
    delay_in: Vec<String>,
    volumes: Mutex<BTreeMap<String, u64>>,
    crash: Option<Crash>,
    crash_on: Vec<String>,
    crash_after: u64,
    calls: std::sync::atomic::AtomicU64,
    list_entries: u64,
    page_ignores_limit: bool,
    stderr_flood: u64,
}

fn list_option(options: &Options, name: &str) -> Vec<String> {
    options.get(name).unwrap_or_default().split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()
}

impl Faulty {
    /// Builds the driver; fails or panics here if told to.
    pub fn new(options: &Options) -> Result<Faulty, DriverError> {
        let crash = Crash::parse(&options.string("crash")?)?;
        let crash_on = list_option(options, "crash_on");
        let crash_after = u64::try_from(options.integer("crash_after")?).unwrap_or(0);
        if let Some(c) = crash {
            if crash_on.iter().any(|m| m == "new") && crash_after == 0 {
                c.strike();
            }
        }
        if options.boolean("panic_new")? {
            panic!("faulty: constructor panicked as asked (panic_new=true)");
        }
        if options.boolean("fail_new")? {
            return Err(DriverError::invalid_argument("faulty: constructor failed as asked (fail_new=true)"));
        }
        if options.boolean("fork_child")? {
            // SAFETY: the child only sleeps (async-signal-safe) until it is killed; it touches no
            // memory the parent's other threads may have locked.
            unsafe {
                if libc::fork() == 0 {
                    loop {
                        libc::pause();
                    }
                }
            }
        }
        let delay = options.integer("delay_ms")?;
        Ok(Faulty {
            fail_init: options.boolean("fail_init")?,
            unhealthy: options.boolean("unhealthy")?,
            fail_in: list_option(options, "fail_in"),
            panic_in: list_option(options, "panic_in"),
            delay: Duration::from_millis(u64::try_from(delay).unwrap_or(0)),
            delay_in: list_option(options, "delay_in"),
            volumes: Mutex::new(BTreeMap::new()),
            crash,
            crash_on,
            crash_after,
            calls: std::sync::atomic::AtomicU64::new(0),
            list_entries: u64::try_from(options.integer("list_entries")?).unwrap_or(0),
            page_ignores_limit: options.boolean("page_ignores_limit")?,
            stderr_flood: u64::try_from(options.integer("stderr_flood")?).unwrap_or(0),
        })
    }

    /// Applies the configured misbehaviour for `method`.
    fn enter(&self, method: &str) -> Result<(), DriverError> {
        if let Some(c) = self.crash {
            let lifecycle = matches!(method, "init" | "cleanup" | "health");
            let chosen = if self.crash_on.is_empty() { !lifecycle } else { self.crash_on.iter().any(|m| m == method) };
            if chosen && self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= self.crash_after {
                c.strike();
            }
        }
        if !self.delay.is_zero() && (self.delay_in.is_empty() || self.delay_in.iter().any(|m| m == method)) {
            std::thread::sleep(self.delay);
        }
        if self.panic_in.iter().any(|m| m == method) {
            panic!("faulty: {method} panicked as asked");
        }
        if self.fail_in.iter().any(|m| m == method) {
            return Err(DriverError::internal(format!("faulty: {method} failed as asked")));
        }
        Ok(())
    }

    fn map(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, u64>>, DriverError> {
        self.volumes.lock().map_err(|_| DriverError::internal("faulty: state lock poisoned"))
    }
}

/// Made-up volume number `i` of `list_entries`.
fn bulk(i: u64) -> Volume {
    let pad = "x".repeat(40);
    Volume {
        name: format!("bulk-{i:09}-{pad}"),
        size: 1 << 20,
        location: format!("made-up:{pad}"),
        ..Volume::default()
    }
}

fn vol(name: &str, size: u64) -> Volume {
    Volume { name: name.to_owned(), size, location: format!("faulty:{name}"), ..Volume::default() }
}

fn not_found(name: &str) -> DriverError {
    DriverError::not_found(format!("volume {name:?} not found"))
}

impl VolumeDriver for Faulty {
    fn init(&self) -> Result<(), DriverError> {
        self.enter("init")?;
        if self.fail_init {
            return Err(DriverError::internal("faulty: init failed as asked (fail_init=true)"));
        }
        Ok(())
    }
    fn cleanup(&self) -> Result<(), DriverError> {
        self.enter("cleanup")
    }
    fn health(&self) -> Result<(), DriverError> {
        self.enter("health")?;
        if self.stderr_flood > 0 {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let chunk = [b'x'; 65536];
            let mut left = self.stderr_flood;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                let _ = err.write_all(&chunk[..n]);
                left -= n as u64;
            }
            let _ = err.write_all(b"\n");
            for i in 0..self.stderr_flood.min(200_000) {
                let _ = writeln!(err, "faulty: line {i}");
            }
        }
        if self.unhealthy {
            return Err(DriverError::internal("faulty: backend unhealthy as asked (unhealthy=true)"));
        }
        Ok(())
    }
    fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {
        self.enter("create")?;
        let mut m = self.map()?;
        if m.contains_key(name) {
            return Err(DriverError::already_exists(format!("volume {name:?} already exists")));
        }
        m.insert(name.to_owned(), size);
        Ok(vol(name, size))
    }
    fn delete(&self, name: &str) -> Result<(), DriverError> {
        self.enter("delete")?;
        self.map()?.remove(name).map(drop).ok_or_else(|| not_found(name))
    }
    fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {
        self.enter("extend")?;
        let mut m = self.map()?;
        let s = m.get_mut(name).ok_or_else(|| not_found(name))?;
        if new_size < *s {
            return Err(DriverError::invalid_argument(format!(
                "volume {name:?}: cannot shrink from {} to {new_size}",
                *s
            )));
        }
        *s = new_size;
        Ok(vol(name, *s))
    }
    fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
        self.enter("snapshot")?;
        let mut m = self.map()?;
        let size = *m.get(name).ok_or_else(|| not_found(name))?;
        if m.contains_key(snapshot) {
            return Err(DriverError::already_exists(format!("volume {snapshot:?} already exists")));
        }
        m.insert(snapshot.to_owned(), size);
        Ok(Volume { source: Some(name.to_owned()), ..vol(snapshot, size) })
    }
    fn list(&self) -> Result<Vec<Volume>, DriverError> {
        self.enter("list")?;
        let mut all: Vec<Volume> = self.map()?.iter().map(|(n, s)| vol(n, *s)).collect();
        all.extend((0..self.list_entries).map(bulk));
        Ok(all)
    }
    fn list_after(&self, after: &str, limit: u64) -> Result<Vec<Volume>, DriverError> {
        self.enter("list_after")?;
        // Its own volumes and the made-up ones, in name order (made-up names sort by their number).
        let mut page: Vec<Volume> = self
            .map()?
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .map(|(n, s)| vol(n, *s))
            .collect();
        // The first made-up volume after `after` (their names grow with their number).
        let (mut first, mut end) = (0, self.list_entries);
        while first < end {
            let mid = first + (end - first) / 2;
            if bulk(mid).name.as_str() <= after {
                first = mid + 1;
            } else {
                end = mid;
            }
        }
        let limit = if self.page_ignores_limit { u64::MAX } else { limit };
        let want = usize::try_from(limit).unwrap_or(usize::MAX);
        page.extend((first..self.list_entries).take(want).map(bulk));
        page.sort_by(|a, b| a.name.cmp(&b.name));
        page.truncate(want);
        Ok(page)
    }
    fn get(&self, name: &str) -> Result<Volume, DriverError> {
        self.enter("get")?;
        self.map()?.get(name).map(|s| vol(name, *s)).ok_or_else(|| not_found(name))
    }
    fn stats(&self) -> Result<CapacityStats, DriverError> {
        self.enter("stats")?;
        let m = self.map()?;
        let provisioned = m.values().sum();
        Ok(CapacityStats {
            total_bytes: u64::MAX,
            free_bytes: u64::MAX - provisioned,
            provisioned_bytes: provisioned,
            allocated_bytes: 0,
            volumes: m.len() as u64,
        })
    }
}

plughost_api::export_driver! {
    kind: volume,
    driver: Faulty,
    name: "faulty",
    version: env!("CARGO_PKG_VERSION"),
    summary: "volume driver that fails, panics or stalls on request (for tests)",
    options: OPTIONS,
    new: Faulty::new,
}
