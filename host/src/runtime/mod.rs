//! The running host: the composition root. Builds the services of the service table from the
//! settings, dispatches typed requests to them, assembles status, swaps and reloads backends, runs the
//! periodic tasks, and stops gracefully. The socket itself is `server.rs`'s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{BuildContext, Health};
use crate::config::{ConfigSource, Settings};
use crate::control::protocol::{
    ApiError, ErrorKind, HostStatus, LibrariesStatus, Outcome, Pong, ReloadEntry, ServiceStatus, State, SwapArgs,
    SwapReport, TrustStatus,
};
use crate::control::request::{answer, parse_request, to_json, Body, OpParser};
use crate::control::server::{Handler, Peer, Server};
use crate::loading::loader::Loader;
use crate::services::{DynService, ServiceContext};
use crate::state::{DirLock, StateDb};

/// Shared state of a running host.
pub struct Host {
    services: Vec<Arc<dyn DynService>>,
    loader: Loader,
    source: ConfigSource,
    settings: Settings,
    heartbeats: Mutex<BTreeMap<&'static str, Instant>>,
    stopping: AtomicBool,
    in_flight: AtomicU64,
    started: Instant,
    /// Keeps other hosts off the state dir while this one runs.
    _lock: DirLock,
    /// The trust settings in effect (changed by reload).
    trust: Mutex<crate::config::TrustSettings>,
    /// Who changed what (none for hosts built without a state dir of their own, in tests).
    audit: Option<crate::control::audit::AuditLog>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("socket", &self.settings.socket).field("stopping", &self.stopping).finish()
    }
}

impl Host {
    /// Reads the configuration and builds every service; every error found (nothing is served then).
    pub fn start(source: ConfigSource) -> Result<Arc<Host>, Vec<String>> {
        let settings = source.load().map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        Host::start_with(source, settings)
    }

    /// Builds every service from settings already loaded from `source`.
    pub fn start_with(source: ConfigSource, settings: Settings) -> Result<Arc<Host>, Vec<String>> {
        crate::loading::trust::private_dir(&settings.state_dir, "state dir", false, true).map_err(|e| vec![e])?;
        if let Some(dir) = settings.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::loading::trust::private_dir(dir, "socket directory", true, false).map_err(|e| vec![e])?;
        }
        let lock = DirLock::take(&settings.state_dir).map_err(|e| vec![e.to_string()])?;
        let db = Arc::new(StateDb::open(&settings.state_dir).map_err(|e| vec![e.to_string()])?);
        let audit = crate::control::audit::AuditLog::open(&settings.state_dir).map_err(|e| vec![e])?;
        let allowlist = match &settings.trust.allowlist {
            Some(p) => Some(crate::loading::loader::Allowlist::read(p).map_err(|e| vec![e])?),
            None => None,
        };
        if !settings.trust.strict {
            log::warn!("trust.strict is off: driver files that others could have written are loaded");
        }
        let mut loader = Loader::new().with_max_bytes(settings.max_driver_bytes);
        loader.set_trust(settings.trust.strict, allowlist);
        if let Some(exe) = &settings.probe {
            loader = loader.with_probe(exe.clone());
        }
        let build = BuildContext {
            loader: &loader,
            state_dir: &settings.state_dir,
            driver_dirs: &settings.driver_dirs,
            exe: settings.probe.as_deref(),
        };
        let mut errors = Vec::new();
        let mut services = Vec::new();
        // Services build side by side: a slow backend of one holds up no other.
        let built: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = settings
                .services
                .iter()
                .map(|spec| {
                    let db = &db;
                    let state_dir = &settings.state_dir;
                    scope.spawn(move || {
                        let ctx = ServiceContext {
                            build,
                            service: spec.kind.name,
                            backends: &spec.backends,
                            default_backend: &spec.default_backend,
                            state_dir,
                            db,
                        };
                        (spec.kind.build)(&ctx)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        for b in built {
            match b {
                Ok(Ok(s)) => services.push(s),
                Ok(Err(e)) => errors.extend(e),
                Err(_) => errors.push("building a service panicked".to_owned()),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let now = Instant::now();
        let heartbeats = services.iter().map(|s| (s.kind().name, now)).collect();
        let trust = settings.trust.clone();
        Ok(Arc::new(Host {
            services,
            loader,
            source,
            settings,
            heartbeats: Mutex::new(heartbeats),
            stopping: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            started: Instant::now(),
            _lock: lock,
            trust: Mutex::new(trust),
            audit: Some(audit),
        }))
    }

    /// The settings the host started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn service(&self, name: &str) -> Result<&Arc<dyn DynService>, ApiError> {
        self.services.iter().find(|s| s.kind().name == name).ok_or_else(|| {
            let what = if crate::services::kinds::kind(name).is_some() {
                format!("the {name} service is not enabled")
            } else {
                let known: Vec<&str> = crate::services::kinds::KINDS.iter().map(|k| k.name).collect();
                format!("unknown service {name:?} ({})", known.join(", "))
            };
            ApiError::new(ErrorKind::UnknownService, what)
        })
    }

    /// Refuses a peer that is not an admin.
    fn admin(peer: &Peer, what: &str) -> Result<(), ApiError> {
        if peer.is_admin() {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorKind::PermissionDenied,
            format!(
                "{what}: uid {} may only read (status, get, list, stats); changes need root or plughost's user",
                peer.uid
            ),
        ))
    }

    /// Runs one request for `peer`. Reads are open to every peer that can connect; mutations, swaps,
    /// reloads and the audit log need an admin. Every mutation, swap and reload (and every refusal) is
    /// audited.
    fn dispatch(&self, body: Body<'_>, peer: &Peer) -> Result<String, ApiError> {
        let audited = |service: Option<&str>,
                       op: &str,
                       args: Option<Box<serde_json::value::RawValue>>,
                       r: &Result<String, ApiError>| {
            if let Some(a) = &self.audit {
                a.record(peer, service, op, args, r.as_ref().map(drop));
            }
        };
        match body {
            Body::Ping => to_json(&Pong { pong: true }),
            Body::Status => to_json(&self.status()),
            Body::Audit(args) => {
                Self::admin(peer, "audit")?;
                let log = self.audit.as_ref().ok_or_else(|| ApiError::internal("this host keeps no audit log"))?;
                to_json(&log.read(args.since)?)
            }
            Body::Reload => {
                let r = Self::admin(peer, "reload").and_then(|()| to_json(&self.reload()?));
                audited(None, "reload", None, &r);
                r
            }
            Body::Swap { service, args } => {
                let r = Self::admin(peer, "swap").and_then(|()| to_json(&self.swap(&service, &args)?));
                audited(Some(&service), "swap", serde_json::value::to_raw_value(&args).ok(), &r);
                r
            }
            Body::Restart { service, args } => {
                let r = Self::admin(peer, "restart").and_then(|()| to_json(&self.restart(&service, &args)?));
                audited(Some(&service), "restart", serde_json::value::to_raw_value(&args).ok(), &r);
                r
            }
            Body::Service { service, op, args } => {
                let s = self.service(&service)?;
                if op.reads() {
                    return s.handle(op);
                }
                let name = op.name();
                let r = Self::admin(peer, &format!("{service} {name}")).and_then(|()| s.handle(op));
                audited(Some(&service), name, args.map(ToOwned::to_owned), &r);
                r
            }
        }
    }

    /// The `status` answer.
    pub fn status(&self) -> HostStatus {
        let heartbeats = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let services = self
            .services
            .iter()
            .map(|s| {
                let default = s.default_backend();
                let backends: Vec<_> =
                    s.backends().iter().map(|b| b.status(b.name() == default, s.capacity(b.name()))).collect();
                let up = backends.iter().filter(|b| b.state == State::Up).count();
                let state = match up {
                    n if n == backends.len() => State::Up,
                    0 => State::Down,
                    _ => State::Degraded,
                };
                let reasons: Vec<String> =
                    backends.iter().filter_map(|b| b.reason.as_ref().map(|r| format!("{}: {r}", b.name))).collect();
                ServiceStatus {
                    name: s.kind().name.to_owned(),
                    state,
                    reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
                    heartbeat_age_ms: heartbeats.get(s.kind().name).map(|t| t.elapsed().as_millis() as u64),
                    default_backend: default.to_owned(),
                    backends,
                    records: s.records() as u64,
                    last_reconcile: s.last_reconcile(),
                }
            })
            .collect();
        let mapped = self.loader.mapped();
        let active: Vec<String> =
            self.services.iter().flat_map(|s| s.backends().iter().map(|b| b.active_digest())).collect();
        let retired: Vec<_> = mapped.iter().filter(|m| !active.contains(&m.digest)).collect();
        HostStatus {
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            socket: self.settings.socket.display().to_string(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            services,
            libraries: LibrariesStatus {
                mapped: mapped.len() as u64,
                mapped_bytes: mapped.iter().map(|m| m.size).sum(),
                retired: retired.len() as u64,
                retired_bytes: retired.iter().map(|m| m.size).sum(),
                note: "driver libraries are never unloaded; each distinct file content stays mapped until exit"
                    .to_owned(),
            },
            trust: {
                let t = self.trust.lock().unwrap_or_else(|p| p.into_inner()).clone();
                TrustStatus {
                    strict: t.strict,
                    allowlist: t.allowlist.as_ref().map(|p| p.display().to_string()),
                    require_pins: t.require_pins,
                    allow_swap_paths: t.allow_swap_paths,
                    socket_group: self.settings.socket_group.clone(),
                    warning: (!t.strict).then(|| {
                        "trust.strict is off: driver files that others could have written are loaded".to_owned()
                    }),
                }
            },
        }
    }

    fn build_context(&self) -> BuildContext<'_> {
        BuildContext {
            loader: &self.loader,
            state_dir: &self.settings.state_dir,
            driver_dirs: &self.settings.driver_dirs,
            exe: self.settings.probe.as_deref(),
        }
    }

    /// `restart`: a fresh worker for an isolated backend (closing its circuit), or the configured driver
    /// loaded again for an in-process one.
    pub fn restart(
        &self,
        service: &str,
        args: &crate::control::protocol::RestartArgs,
    ) -> Result<crate::control::protocol::RestartReport, ApiError> {
        let backend = self.backend(service, args.backend.as_deref())?;
        backend.restart(self.build_context(), self.settings.shutdown_timeout)
    }

    /// A service's backend by name (default: its default backend), or `not_found` naming the known ones.
    fn backend(&self, service: &str, name: Option<&str>) -> Result<&Arc<dyn crate::backend::BackendControl>, ApiError> {
        self.service(service)?.table().pick(name)
    }

    /// `swap`: replaces a backend's driver (default: the service's default backend) with `args.driver`
    /// (PATH or NAME; default: the configured one, reloaded from disk).
    pub fn swap(&self, service: &str, args: &SwapArgs) -> Result<SwapReport, ApiError> {
        let backend = self.backend(service, args.backend.as_deref())?;
        let driver = args.driver.as_deref().filter(|d| !d.is_empty());
        if let Some(d) = driver.filter(|d| d.contains('/') || d.ends_with(".so")) {
            self.check_swap_path(d)?;
        }
        backend.swap(self.build_context(), driver, None, None, self.settings.shutdown_timeout)
    }

    /// A swap to a PATH (rather than a NAME looked up in the driver directories) must stay inside the
    /// driver directories unless `trust.allow_swap_paths` says otherwise: whoever can write the socket
    /// should not be able to point the host at any file on the machine.
    fn check_swap_path(&self, given: &str) -> Result<(), ApiError> {
        if self.trust.lock().unwrap_or_else(|p| p.into_inner()).allow_swap_paths {
            return Ok(());
        }
        let path = std::fs::canonicalize(given)
            .map_err(|e| ApiError::not_found(format!("swap to {given:?}: {}", crate::util::fmt::io_text(&e))))?;
        let inside =
            self.settings.driver_dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| path.starts_with(d));
        if inside {
            return Ok(());
        }
        let dirs: Vec<String> = self.settings.driver_dirs.iter().map(|d| d.display().to_string()).collect();
        Err(ApiError::new(
            ErrorKind::PermissionDenied,
            format!(
                "swap to {given:?}: outside the driver directories ({}); put it in one (--driver-dir, driver_dirs), or allow any path with --allow-swap-paths (trust.allow_swap_paths = true)",
                dirs.join(", ")
            ),
        ))
    }

    /// Re-reads the configuration (the file and the flags given at start) and swaps each backend whose
    /// driver or options changed. An invalid configuration changes nothing. Adding or removing
    /// services or backends needs a restart and is reported as `ignored`.
    pub fn reload(&self) -> Result<Vec<ReloadEntry>, ApiError> {
        let wanted = self.source.load().map_err(|errs| {
            let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
            log::error!("reload: configuration rejected, nothing changed: {}", text.join("; "));
            ApiError::new(
                ErrorKind::InvalidConfig,
                format!("configuration rejected, nothing changed: {}", text.join("; ")),
            )
        })?;
        // The trust policy and the allow list first: the swaps below load under the new ones. A reload
        // never relaxes them: the config is a trust root, and relaxing takes a restart.
        let relaxed = self.trust.lock().unwrap_or_else(|p| p.into_inner()).relaxed_by(&wanted.trust);
        if !relaxed.is_empty() {
            let text = format!(
                "configuration rejected, nothing changed: a reload cannot relax the trust policy ({}); restart the host to relax it",
                relaxed.join(", ")
            );
            log::error!("reload: {text}");
            return Err(ApiError::new(ErrorKind::InvalidConfig, text));
        }
        let allowlist = match &wanted.trust.allowlist {
            Some(p) => Some(crate::loading::loader::Allowlist::read(p).map_err(|e| {
                log::error!("reload: configuration rejected, nothing changed: {e}");
                ApiError::new(ErrorKind::InvalidConfig, format!("configuration rejected, nothing changed: {e}"))
            })?),
            None => None,
        };
        self.loader.set_trust(wanted.trust.strict, allowlist);
        *self.trust.lock().unwrap_or_else(|p| p.into_inner()) = wanted.trust.clone();
        let entry = |service: &str, backend: Option<&str>, outcome| ReloadEntry {
            service: Some(service.to_owned()),
            backend: backend.map(str::to_owned),
            outcome,
            error: None,
            reason: None,
            swap: None,
        };
        let mut report = Vec::new();
        for s in &self.services {
            let name = s.kind().name;
            let Some(spec) = wanted.services.iter().find(|w| w.kind.name == name) else {
                report.push(ReloadEntry {
                    reason: Some("disabling a service needs a restart".into()),
                    ..entry(name, None, Outcome::Ignored)
                });
                continue;
            };
            for b in s.backends() {
                let Some(w) = spec.backends.iter().find(|w| w.name == b.name()) else {
                    report.push(ReloadEntry {
                        reason: Some("removing a backend needs a restart".into()),
                        ..entry(name, Some(b.name()), Outcome::Ignored)
                    });
                    continue;
                };
                let current = b.configured();
                // A changed pin is checked against the file, as a swap would: not taken on trust.
                let same_pin = current.settings.digest == w.settings.digest;
                if current.driver == w.driver && current.options == w.options && same_pin {
                    let outcome = if current.settings == w.settings {
                        Outcome::Unchanged
                    } else {
                        b.set_settings(w.settings.clone());
                        Outcome::Updated
                    };
                    report.push(entry(name, Some(b.name()), outcome));
                    continue;
                }
                match b.swap(
                    self.build_context(),
                    Some(&w.driver),
                    Some(w.options.clone()),
                    Some(w.settings.clone()),
                    self.settings.shutdown_timeout,
                ) {
                    Ok(r) => {
                        report.push(ReloadEntry { swap: Some(r), ..entry(name, Some(b.name()), Outcome::Swapped) })
                    }
                    Err(e) => {
                        log::error!("reload: {name} backend {:?}: {}", b.name(), e.message);
                        report.push(ReloadEntry {
                            error: Some(e.message),
                            ..entry(name, Some(b.name()), Outcome::Failed)
                        });
                    }
                }
            }
            for w in &spec.backends {
                if !s.backends().iter().any(|b| b.name() == w.name) {
                    report.push(ReloadEntry {
                        reason: Some("adding a backend needs a restart".into()),
                        ..entry(name, Some(&w.name), Outcome::Ignored)
                    });
                }
            }
        }
        for w in &wanted.services {
            if !self.services.iter().any(|s| s.kind().name == w.kind.name) {
                report.push(ReloadEntry {
                    reason: Some("enabling a service needs a restart".into()),
                    ..entry(w.kind.name, None, Outcome::Ignored)
                });
            }
        }
        for r in &report {
            log::info!("reload: {:?}", r);
        }
        Ok(report)
    }

    /// One round of periodic work for service `i`, and its heartbeat.
    fn periodic(&self, i: usize) {
        let s = &self.services[i];
        s.periodic();
        self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).insert(s.kind().name, Instant::now());
    }

    /// Whether a stop has begun.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Startup lines: one per backend, with its driver and state.
    pub fn describe(&self) -> Vec<String> {
        self.status()
            .services
            .iter()
            .flat_map(|s| {
                s.backends.iter().map(move |b| {
                    format!("{} backend {:?}: {} {} ({})", s.name, b.name, b.driver.name, b.driver.version, b.state)
                })
            })
            .collect()
    }

    /// Whether any backend of any service is down.
    pub fn any_down(&self) -> bool {
        self.services.iter().any(|s| s.backends().iter().any(|b| b.health() != Health::Up))
    }
}

impl Handler for Host {
    fn handle(&self, line: &[u8], peer: &Peer) -> String {
        let Ok(line) = std::str::from_utf8(line) else {
            return answer(None, Err(ApiError::new(ErrorKind::InvalidRequest, "request is not valid UTF-8")));
        };
        let kind = |name: &str| -> Result<OpParser, ApiError> { Ok(self.service(name)?.kind().parse) };
        let req = match parse_request(line, &kind) {
            Ok(r) => r,
            Err(bad) => {
                // An attempt at a service operation that was not understood is audited as a change would
                // be: who tried what, and why it was refused.
                if let (Some(a), Some(log)) = (&bad.attempt, &self.audit) {
                    log.record(peer, Some(&a.service), &a.op, a.args.map(ToOwned::to_owned), Err(&bad.error));
                }
                return answer(bad.id, Err(bad.error));
            }
        };
        if self.stopping.load(Ordering::SeqCst) {
            return answer(req.id, Err(ApiError::new(ErrorKind::ShuttingDown, "plughost is stopping")));
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = self.dispatch(req.body, peer);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        answer(req.id, result)
    }

    fn too_long(&self, limit: usize) -> String {
        answer(
            None,
            Err(ApiError::new(
                ErrorKind::InvalidRequest,
                format!("request line longer than {limit} bytes (max_request_bytes); closing the connection"),
            )),
        )
    }
}

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
        host.stopping.store(true, Ordering::SeqCst);
        self.server.stop();
        let deadline = Instant::now() + host.settings.shutdown_timeout;
        // Whatever the drivers do, the stop ends by then.
        let hard = deadline + STOP_MARGIN;
        while host.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = host.in_flight.load(Ordering::SeqCst);
        if left > 0 {
            log::warn!("stopping with {left} request(s) still in flight after {:?}", host.settings.shutdown_timeout);
        }
        // Periodic tasks notice the stop within 50 ms, unless one is inside a driver call that hangs.
        for t in self.periodic.drain(..) {
            while !t.is_finished() && Instant::now() < hard {
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
        let budget = hard.max(Instant::now() + STOP_MARGIN);
        for (name, t) in cleanups {
            while !t.is_finished() && Instant::now() < budget {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !t.is_finished() {
                log::warn!("{name} cleanup did not finish in time; stopping without it");
            }
        }
        log::info!("stopped");
    }
}

/// How long past the shutdown timeout a graceful stop may take for periodic tasks and cleanups.
pub const STOP_MARGIN: Duration = Duration::from_secs(2);

/// `plughost run`: starts the host, serves until SIGTERM or SIGINT (SIGHUP reloads the configuration),
/// then stops gracefully. `ready` gets the startup lines once the socket is serving. Every start error
/// found is returned.
pub fn run(source: ConfigSource, ready: impl FnOnce(&[String])) -> Result<(), Vec<String>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| vec![format!("cannot install signal handlers: {e}")])?;
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
    ready(&lines);
    for sig in signals.forever() {
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
    let second = std::thread::Builder::new().name("signals".to_owned()).spawn(move || {
        for sig in signals.forever() {
            if sig != SIGHUP {
                log::warn!("signal {sig} received again: exiting now");
                std::process::exit(1);
            }
        }
    });
    if let Err(e) = second {
        log::warn!("cannot watch for a second signal: {e}");
    }
    running.stop();
    Ok(())
}
