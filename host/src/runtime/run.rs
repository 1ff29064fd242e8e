//! `plughost run`: serving the socket, the periodic tasks, signals, and the bounded graceful stop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::host::Host;
use crate::config::ConfigSource;
use crate::control::server::Server;

/// A host serving its socket and running its periodic tasks.
#[derive(Debug)]
pub struct Running {
    host: Arc<Host>,
    server: Server,
    periodic: Vec<JoinHandle<()>>,
}

fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let ms = max.as_millis().max(1) as u64;
    Duration::from_millis(u64::from(nanos) % ms)
}

impl Running {
    /// Starts serving the socket and the periodic tasks (one thread per service, first run after a
    /// random delay so that services do not all wake at once).
    pub fn start(host: Arc<Host>) -> Result<Running, String> {
        let server = Server::serve(
            host.clone(),
            &host.settings.socket,
            host.settings.socket_group.as_deref(),
            host.settings.max_request_bytes,
            host.settings.max_connections,
        )?;
        let mut periodic = Vec::new();
        for i in 0..host.services.len() {
            let h = host.clone();
            let every = host.settings.periodic_interval;
            let t = std::thread::Builder::new()
                .name(format!("periodic-{}", host.services[i].kind().name))
                .spawn(move || {
                    let mut next = Instant::now() + jitter(every);
                    while !h.stopping() {
                        if Instant::now() >= next {
                            h.periodic(i);
                            next += every;
                        }
                        std::thread::sleep(Duration::from_millis(50).min(every));
                    }
                })
                .map_err(|e| format!("cannot start a periodic task: {e}"))?;
            periodic.push(t);
        }
        if let Some(addr) = host.settings.metrics_listen {
            super::metrics::listen(host.clone(), addr)?;
            if !addr.ip().is_loopback() {
                log::warn!("metrics are served on {addr}, beyond this machine: anyone who can reach it reads them");
            }
        }
        // The fleet last: a remote request finds everything serving.
        host.join_fleet()?;
        Ok(Running { host, server, periodic })
    }

    /// The shared host state.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Graceful stop: refuse new requests, let in-flight ones finish (up to the shutdown timeout), stop
    /// periodic tasks, run driver cleanup, remove the socket.
    pub fn stop(mut self) {
        let host = self.host.clone();
        super::notify::stopping();
        let deadline = Instant::now() + host.settings.shutdown_timeout;
        // First out of the fleet: report `stopping` (placement skips the host), stop listening (callers
        // get no responders at once rather than shutting_down), answer remote requests in flight, all
        // within the same shutdown timeout.
        host.leave_fleet(host.settings.shutdown_timeout);
        host.stopping.store(true, Ordering::SeqCst);
        self.server.stop();
        // Whatever the drivers do, the stop ends by then.
        let hard = deadline + STOP_MARGIN;
        while host.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = host.in_flight.load(Ordering::SeqCst);
        if left > 0 {
            log::warn!("stopping with {left} request(s) still in flight after {:?}", host.settings.shutdown_timeout);
        }
        // Periodic tasks notice the stop within 50 ms, unless one is inside a driver call that hangs:
        // that one gets half the margin, so that cleanups still have the other half.
        let periodic_until = hard.min(Instant::now() + STOP_MARGIN / 2);
        for t in self.periodic.drain(..) {
            while !t.is_finished() && Instant::now() < periodic_until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("a periodic task is still inside a driver call; not waiting for it");
            }
        }
        // Cleanups side by side, each as long as the deadline allows.
        let cleanups: Vec<_> = host
            .services
            .iter()
            .filter_map(|s| {
                let s = s.clone();
                let name = s.kind().name;
                std::thread::Builder::new()
                    .name(format!("cleanup-{name}"))
                    .spawn(move || s.cleanup())
                    .map(|t| (name, t))
                    .ok()
            })
            .collect();
        // Whatever came before, the stop ends by `hard` (it gave cleanups 2 s more after a hung
        // periodic task had taken the margin: 14 s against the documented 12 s).
        for (name, t) in cleanups {
            while !t.is_finished() && Instant::now() < hard {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !t.is_finished() {
                log::warn!("{name} cleanup did not finish in time; stopping without it");
            }
        }
        log::info!("stopped");
    }
}

/// Sends systemd's `WATCHDOG=1` every `every` while the host is alive: every service's periodic round
/// came back recently (a driver call that hangs holds its round) and the control socket answers a ping.
/// A host stuck in either stops pinging, and systemd restarts it (instances survive a restart).
fn watchdog(host: Arc<Host>, every: Duration) {
    let spawned = std::thread::Builder::new().name("watchdog".to_owned()).spawn(move || {
        // A round may take its time; one that has not come back in two intervals and a second is stuck.
        let stale = host.settings.periodic_interval * 2 + Duration::from_secs(1);
        while !host.stopping() {
            let fresh = host.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).values().all(|t| t.elapsed() < stale);
            if fresh && socket_answers(&host.settings.socket) {
                super::notify::watchdog();
            } else {
                log::warn!("watchdog: not pinging systemd (a periodic round is stuck, or the socket does not answer)");
            }
            std::thread::sleep(every);
        }
    });
    if let Err(e) = spawned {
        log::error!("cannot start the watchdog thread: {e}");
    }
}

/// Whether the control socket answers a ping within two seconds.
fn socket_answers(socket: &std::path::Path) -> bool {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"{\"op\":\"ping\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).is_ok() && line.contains("\"pong\":true")
}

/// Where `run` is, for the signal thread.
const STARTING: u8 = 0;
const SERVING: u8 = 1;
const STOPPING: u8 = 2;

/// How long past the shutdown timeout a graceful stop may take for periodic tasks and cleanups.
pub const STOP_MARGIN: Duration = Duration::from_secs(2);

/// `plughost run`: starts the host, serves until SIGTERM or SIGINT (SIGHUP reloads the configuration),
/// then stops gracefully. `ready` gets the startup lines once the socket is serving. Every start error
/// found is returned.
pub fn run(source: ConfigSource, ready: impl FnOnce(&[String])) -> Result<(), Vec<String>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    // Before any thread: systemd's variables are read and taken out of the environment children get.
    super::notify::take_environment();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| vec![format!("cannot install signal handlers: {e}")])?;
    // One thread takes every signal. While starting (a backend's first init and health check may take
    // up to its call_timeout) and once stopping, SIGTERM and SIGINT exit at once: nothing is served
    // yet, or the stop was asked for already. While serving, they ask for the graceful stop.
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(STARTING));
    let (asked, requests) = std::sync::mpsc::channel();
    let watcher = phase.clone();
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            for sig in signals.forever() {
                match (watcher.load(Ordering::SeqCst), sig) {
                    (SERVING, _) => {
                        if sig != SIGHUP {
                            watcher.store(STOPPING, Ordering::SeqCst);
                        }
                        let _ = asked.send(sig);
                    }
                    (STARTING, SIGHUP) => log::warn!("SIGHUP received while starting: ignored"),
                    (STARTING, _) => {
                        log::warn!("signal {sig} received while starting: exiting now (nothing was served yet)");
                        std::process::exit(1);
                    }
                    (_, SIGHUP) => {}
                    _ => {
                        log::warn!("signal {sig} received again: exiting now");
                        std::process::exit(1);
                    }
                }
            }
        })
        .map_err(|e| vec![format!("cannot start the signal thread: {e}")])?;
    // Everything created from here on (records, volume files, logs, drivers' files) is private.
    crate::loading::trust::private_umask();
    // Buffers of a megabyte and more (driver files read for a swap: tens of MB in debug builds) come
    // from and go back to the system at once. By default glibc raises this threshold after the first
    // large free, and each connection thread's arena then keeps what a swap read (20 MB per 100 swaps).
    // SAFETY: mallopt only changes allocator tuning; called before the host starts its threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let host = Host::start(source)?;
    let running = Running::start(host).map_err(|e| vec![e])?;
    let settings = running.host().settings();
    let mut lines = running.host().describe();
    lines.push(format!("serving on {} (state dir {})", settings.socket.display(), settings.state_dir.display()));
    lines.push(format!("try: plughost ctl --socket {} status", settings.socket.display()));
    phase.store(SERVING, Ordering::SeqCst);
    ready(&lines);
    super::notify::ready(&running.host().status_line());
    if let Some(every) = super::notify::watchdog_every() {
        watchdog(running.host().clone(), every);
    }
    for sig in requests.iter() {
        if sig == SIGHUP {
            log::info!("SIGHUP received: reloading the configuration");
            if let Err(e) = running.host().reload() {
                log::error!("reload failed: {}", e.message);
            }
            continue;
        }
        log::info!("signal {sig} received: stopping gracefully (a second SIGTERM or SIGINT exits at once)");
        break;
    }
    running.stop();
    Ok(())
}
