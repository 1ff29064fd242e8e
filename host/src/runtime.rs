//! The running host: builds services from settings, serves the control socket, runs periodic tasks
//! and stops gracefully.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use plugin_api::{ComputeClient, VolumeClient};
use serde_json::{json, Value};

use crate::backend::{ApiError, Backend, BuildContext, Configured, DriverOps, Health};
use crate::config::ServiceSpec;
use crate::managers::{Backends, ComputeManager, VolumeManager};
use crate::Loader;

/// Everything `plughost run` needs, already merged from flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// State directory (created if missing).
    pub state_dir: PathBuf,
    /// Control socket path.
    pub socket: PathBuf,
    /// Driver directories for NAME lookups.
    pub driver_dirs: Vec<PathBuf>,
    /// The volume service, if enabled.
    pub volume: Option<ServiceSpec>,
    /// The compute service, if enabled.
    pub compute: Option<ServiceSpec>,
    /// How long a graceful stop waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Spacing of periodic tasks.
    pub periodic_interval: Duration,
    /// The `plughost` executable, to load new driver content in a child process first (see
    /// `Loader::with_probe`); `None` loads in-process only.
    pub probe: Option<PathBuf>,
}

/// Shared state of a running host.
pub struct Host {
    volume: Option<VolumeManager>,
    compute: Option<ComputeManager>,
    loader: Loader,
    heartbeats: Mutex<BTreeMap<&'static str, SystemTime>>,
    stopping: AtomicBool,
    in_flight: AtomicUsize,
    started: Instant,
    socket: PathBuf,
    settings: Settings,
    reloader: Mutex<Option<Reloader>>,
}

/// Re-reads the configuration (file and the original flags) into fresh service specs.
pub type Reloader = Box<dyn Fn() -> Result<(Option<ServiceSpec>, Option<ServiceSpec>), String> + Send>;

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("socket", &self.socket).field("stopping", &self.stopping).finish()
    }
}

fn build_all<D: DriverOps>(
    ctx: BuildContext<'_>,
    spec: Option<&ServiceSpec>,
    errors: &mut Vec<String>,
) -> Vec<Arc<Backend<D>>> {
    let mut out = Vec::new();
    for b in spec.map(|s| s.backends.as_slice()).unwrap_or_default() {
        let configured = Configured { driver: b.driver.clone(), options: b.options.clone() };
        match Backend::build(ctx, &b.name, configured) {
            Ok(b) => out.push(Arc::new(b)),
            Err(e) => errors.push(e.report()),
        }
    }
    out
}

impl Host {
    /// Loads every driver; returns every error found (nothing is served then).
    pub fn start(settings: &Settings) -> Result<Arc<Host>, Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = std::fs::create_dir_all(&settings.state_dir) {
            return Err(vec![format!("cannot create state dir \"{}\": {e}", settings.state_dir.display())]);
        }
        let mut loader = Loader::new(&settings.state_dir.join("run/libs")).map_err(|e| vec![e.report()])?;
        if let Some(exe) = &settings.probe {
            loader = loader.with_probe(exe.clone());
        }
        let ctx = BuildContext { loader: &loader, state_dir: &settings.state_dir, driver_dirs: &settings.driver_dirs };
        let volume_backends = build_all::<VolumeClient>(ctx, settings.volume.as_ref(), &mut errors);
        let compute_backends = build_all::<ComputeClient>(ctx, settings.compute.as_ref(), &mut errors);
        if settings.volume.is_none() && settings.compute.is_none() {
            errors.push("both services are disabled: nothing to run".to_owned());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let volume = settings.volume.as_ref().map(|s| {
            VolumeManager::new(
                Backends { list: volume_backends, default: s.default_backend.clone() },
                settings.state_dir.join("volumes.json"),
            )
        });
        let compute = settings
            .compute
            .as_ref()
            .map(|s| ComputeManager::new(Backends { list: compute_backends, default: s.default_backend.clone() }));
        let now = SystemTime::now();
        let mut heartbeats = BTreeMap::new();
        if volume.is_some() {
            heartbeats.insert("volume", now);
        }
        if compute.is_some() {
            heartbeats.insert("compute", now);
        }
        Ok(Arc::new(Host {
            volume,
            compute,
            loader,
            heartbeats: Mutex::new(heartbeats),
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            started: Instant::now(),
            socket: settings.socket.clone(),
            settings: settings.clone(),
            reloader: Mutex::new(None),
        }))
    }

    /// Handles one request line and returns the answer line (without newline).
    pub fn handle_line(&self, line: &str) -> String {
        let req: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return answer(&Value::Null, Err(ApiError::new("invalid_request", "request must be a JSON object")))
            }
            Err(e) => {
                return answer(&Value::Null, Err(ApiError::new("invalid_request", format!("malformed JSON: {e}"))))
            }
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        if self.stopping.load(Ordering::SeqCst) {
            return answer(&id, Err(ApiError::new("shutting_down", "plughost is stopping")));
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = self.dispatch(&req);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        answer(&id, result)
    }

    fn dispatch(&self, req: &Value) -> Result<Value, ApiError> {
        let op =
            req.get("op").and_then(Value::as_str).ok_or_else(|| ApiError::new("invalid_request", "missing \"op\""))?;
        let empty = json!({});
        let args = req.get("args").unwrap_or(&empty);
        if !args.is_object() {
            return Err(ApiError::new("invalid_request", "\"args\" must be an object"));
        }
        if op == "swap" {
            return self.swap(req.get("service").and_then(Value::as_str).unwrap_or(""), args);
        }
        match req.get("service").and_then(Value::as_str) {
            None if op == "status" => Ok(self.status()),
            None if op == "reload" => self.reload_from_config(),
            None if op == "ping" => Ok(json!({"pong": true})),
            None => Err(ApiError::new("invalid_request", format!("unknown operation {op:?} (missing \"service\"?)"))),
            Some("volume") => match &self.volume {
                Some(m) => m.handle(op, args),
                None => Err(ApiError::new("unknown_service", "the volume service is not enabled")),
            },
            Some("compute") => match &self.compute {
                Some(m) => m.handle(op, args),
                None => Err(ApiError::new("unknown_service", "the compute service is not enabled")),
            },
            Some(other) => {
                Err(ApiError::new("unknown_service", format!("unknown service {other:?} (volume, compute)")))
            }
        }
    }

    fn service_status<D: DriverOps>(
        &self,
        name: &'static str,
        backends: &Backends<D>,
        extra: impl Fn(&str) -> Value,
    ) -> Value {
        let states: Vec<Health> = backends.list.iter().map(|b| b.health()).collect();
        let up = states.iter().filter(|h| **h == Health::Up).count();
        let state = if up == states.len() {
            "up"
        } else if up == 0 {
            "down"
        } else {
            "degraded"
        };
        let reasons: Vec<String> = backends
            .list
            .iter()
            .filter_map(|b| match b.health() {
                Health::Down(r) => Some(format!("{}: {r}", b.name)),
                Health::Up => None,
            })
            .collect();
        let age = self
            .heartbeats
            .lock()
            .ok()
            .and_then(|h| h.get(name).copied())
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_millis() as u64);
        json!({
            "name": name,
            "state": state,
            "reason": if reasons.is_empty() { Value::Null } else { Value::String(reasons.join("; ")) },
            "heartbeat_age_ms": age,
            "default_backend": backends.default,
            "backends": backends.list.iter().map(|b| {
                let mut s = b.status(b.name == backends.default);
                if let Value::Object(m) = &mut s {
                    m.insert("capacity".to_owned(), extra(&b.name));
                }
                s
            }).collect::<Vec<_>>(),
        })
    }

    /// The `status` answer.
    pub fn status(&self) -> Value {
        let mut services = Vec::new();
        if let Some(m) = &self.volume {
            services.push(self.service_status("volume", m.backends(), |b| {
                m.stats_of(b)
                    .map(|s| {
                        json!({"total_bytes": s.total_bytes, "free_bytes": s.free_bytes,
                    "provisioned_bytes": s.provisioned_bytes, "volumes": s.volumes})
                    })
                    .unwrap_or(Value::Null)
            }));
        }
        if let Some(m) = &self.compute {
            services.push(self.service_status("compute", m.backends(), |_| Value::Null));
        }
        let mapped = self.loader.mapped();
        let mut active: Vec<String> = Vec::new();
        if let Some(m) = &self.volume {
            active.extend(m.backends().list.iter().map(|b| b.with_active(|a| a.library.digest.clone())));
        }
        if let Some(m) = &self.compute {
            active.extend(m.backends().list.iter().map(|b| b.with_active(|a| a.library.digest.clone())));
        }
        let retired: Vec<_> = mapped.iter().filter(|m| !active.contains(&m.digest)).collect();
        json!({
            "pid": std::process::id(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "socket": self.socket.display().to_string(),
            "in_flight": self.in_flight.load(Ordering::SeqCst),
            "services": services,
            "libraries": {
                "mapped": mapped.len(),
                "mapped_bytes": mapped.iter().map(|m| m.size).sum::<u64>(),
                "retired": retired.len(),
                "retired_bytes": retired.iter().map(|m| m.size).sum::<u64>(),
                "note": "driver libraries are never unloaded; each distinct file content stays mapped until exit",
            },
        })
    }

    fn ctx(&self) -> BuildContext<'_> {
        BuildContext {
            loader: &self.loader,
            state_dir: &self.settings.state_dir,
            driver_dirs: &self.settings.driver_dirs,
        }
    }

    /// `swap`: `args.backend` (default: the service's default backend), `args.driver` (PATH or NAME;
    /// default: the configured one, reloaded from disk).
    pub fn swap(&self, service: &str, args: &Value) -> Result<Value, ApiError> {
        let backend = args.get("backend").and_then(Value::as_str);
        let driver = args.get("driver").and_then(Value::as_str).filter(|d| !d.is_empty());
        let timeout = self.settings.shutdown_timeout;
        fn pick<'a, D>(b: &'a Backends<D>, service: &str, name: Option<&str>) -> Result<&'a Arc<Backend<D>>, ApiError> {
            let name = name.unwrap_or(&b.default);
            b.list
                .iter()
                .find(|x| x.name == name)
                .ok_or_else(|| ApiError::not_found(format!("unknown {service} backend {name:?}")))
        }
        match (service, &self.volume, &self.compute) {
            ("volume", Some(m), _) => pick(m.backends(), service, backend)?.swap(self.ctx(), driver, None, timeout),
            ("compute", _, Some(m)) => pick(m.backends(), service, backend)?.swap(self.ctx(), driver, None, timeout),
            ("volume" | "compute", _, _) => {
                Err(ApiError::new("unknown_service", format!("the {service} service is not enabled")))
            }
            _ => Err(ApiError::new(
                "unknown_service",
                format!("swap needs \"service\": volume or compute, got {service:?}"),
            )),
        }
    }

    /// Sets how `reload` (and SIGHUP) re-reads the configuration.
    pub fn set_reloader(&self, r: Reloader) {
        if let Ok(mut g) = self.reloader.lock() {
            *g = Some(r);
        }
    }

    /// Re-reads the configuration and swaps each backend whose driver or options changed. An invalid
    /// configuration changes nothing.
    pub fn reload_from_config(&self) -> Result<Value, ApiError> {
        let specs = {
            let g = self.reloader.lock().map_err(|_| ApiError::new("internal", "reloader lock poisoned"))?;
            let r =
                g.as_ref().ok_or_else(|| ApiError::new("unsupported", "this host has no configuration to reload"))?;
            r()
        };
        let (volume, compute) = specs.map_err(|e| {
            log::error!("reload: configuration rejected, nothing changed: {e}");
            ApiError::new("invalid_config", format!("configuration rejected, nothing changed: {e}"))
        })?;
        let mut report = Vec::new();
        if let Some(m) = &self.volume {
            self.reload_service("volume", m.backends(), volume.as_ref(), &mut report);
        }
        if let Some(m) = &self.compute {
            self.reload_service("compute", m.backends(), compute.as_ref(), &mut report);
        }
        if volume.is_some() && self.volume.is_none() || compute.is_some() && self.compute.is_none() {
            report.push(json!({"outcome": "ignored", "reason": "enabling a service needs a restart"}));
        }
        for r in &report {
            log::info!("reload: {r}");
        }
        Ok(Value::Array(report))
    }

    fn reload_service<D: DriverOps>(
        &self,
        service: &str,
        backends: &Backends<D>,
        spec: Option<&ServiceSpec>,
        report: &mut Vec<Value>,
    ) {
        let Some(spec) = spec else {
            report.push(
                json!({"service": service, "outcome": "ignored", "reason": "disabling a service needs a restart"}),
            );
            return;
        };
        for b in &backends.list {
            let Some(wanted) = spec.backends.iter().find(|s| s.name == b.name) else {
                report.push(json!({"service": service, "backend": b.name, "outcome": "ignored",
                    "reason": "removing a backend needs a restart"}));
                continue;
            };
            let wanted = Configured { driver: wanted.driver.clone(), options: wanted.options.clone() };
            if wanted == b.configured() {
                report.push(json!({"service": service, "backend": b.name, "outcome": "unchanged"}));
                continue;
            }
            match b.swap(self.ctx(), Some(&wanted.driver), Some(wanted.options.clone()), self.settings.shutdown_timeout)
            {
                Ok(r) => report.push(json!({"service": service, "backend": b.name, "outcome": "swapped", "swap": r})),
                Err(e) => {
                    log::error!("reload: {service} backend {:?}: {}", b.name, e.message);
                    report.push(json!({"service": service, "backend": b.name, "outcome": "failed", "error": e.message}))
                }
            }
        }
        for s in &spec.backends {
            if !backends.list.iter().any(|b| b.name == s.name) {
                report.push(json!({"service": service, "backend": s.name, "outcome": "ignored",
                    "reason": "adding a backend needs a restart"}));
            }
        }
    }

    /// One round of periodic work for a service, and its heartbeat.
    pub fn periodic(&self, service: &'static str) {
        match service {
            "volume" => {
                if let Some(m) = &self.volume {
                    m.periodic();
                }
            }
            _ => {
                if let Some(m) = &self.compute {
                    m.sync();
                }
            }
        }
        if let Ok(mut h) = self.heartbeats.lock() {
            h.insert(service, SystemTime::now());
        }
    }

    /// Whether a stop has begun.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

fn answer(id: &Value, result: Result<Value, ApiError>) -> String {
    let v = match result {
        Ok(r) => json!({"id": id, "ok": true, "result": r}),
        Err(e) => json!({"id": id, "ok": false, "error": {"kind": e.kind, "message": e.message}}),
    };
    v.to_string()
}

/// A host serving its socket.
#[derive(Debug)]
pub struct Running {
    host: Arc<Host>,
    listener_fd: i32,
    accept: Option<JoinHandle<()>>,
    periodic: Vec<JoinHandle<()>>,
    shutdown_timeout: Duration,
}

fn bind(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!("socket \"{}\": another plughost is already serving there", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("socket \"{}\": cannot remove stale socket: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("socket \"{}\": cannot create its directory: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("socket \"{}\": cannot bind: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("socket \"{}\": cannot set mode 0600: {e}", path.display()))?;
    Ok(l)
}

fn serve_connection(host: Arc<Host>, stream: UnixStream) {
    let Ok(write_half) = stream.try_clone() else { return };
    let mut out = std::io::BufWriter::new(write_half);
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let reply = host.handle_line(&line);
        if out.write_all(reply.as_bytes()).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}

fn jitter(max: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let ms = max.as_millis().max(1) as u64;
    Duration::from_millis(u64::from(nanos) % ms)
}

impl Running {
    /// Starts serving `settings.socket` and the periodic tasks.
    pub fn serve(host: Arc<Host>, settings: &Settings) -> Result<Running, String> {
        let listener = bind(&settings.socket)?;
        let listener_fd = listener.as_raw_fd();
        let h = host.clone();
        let accept = std::thread::Builder::new()
            .name("accept".to_owned())
            .spawn(move || {
                for conn in listener.incoming() {
                    if h.stopping() {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            let h = h.clone();
                            let _ = std::thread::Builder::new()
                                .name("conn".to_owned())
                                .spawn(move || serve_connection(h, stream));
                        }
                        Err(e) => log::warn!("control socket: accept failed: {e}"),
                    }
                }
            })
            .map_err(|e| format!("cannot start the accept thread: {e}"))?;
        let mut periodic = Vec::new();
        let services: Vec<&'static str> = [("volume", host.volume.is_some()), ("compute", host.compute.is_some())]
            .iter()
            .filter(|s| s.1)
            .map(|s| s.0)
            .collect();
        for service in services {
            let h = host.clone();
            let every = settings.periodic_interval;
            let t = std::thread::Builder::new()
                .name(format!("periodic-{service}"))
                .spawn(move || {
                    let mut next = Instant::now() + jitter(every);
                    while !h.stopping() {
                        if Instant::now() >= next {
                            h.periodic(service);
                            next += every;
                        }
                        std::thread::sleep(Duration::from_millis(50).min(every));
                    }
                })
                .map_err(|e| format!("cannot start periodic task: {e}"))?;
            periodic.push(t);
        }
        Ok(Running { host, listener_fd, accept: Some(accept), periodic, shutdown_timeout: settings.shutdown_timeout })
    }

    /// The shared host state.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Graceful stop: refuse new requests, let in-flight ones finish (up to the timeout), stop periodic
    /// tasks, run driver cleanup, remove the socket.
    pub fn stop(mut self) {
        let host = &self.host;
        host.stopping.store(true, Ordering::SeqCst);
        // SAFETY: `listener_fd` belongs to the listener owned by the accept thread, which is still
        // alive; shutting it down only wakes the blocked accept() so that the thread can exit.
        unsafe {
            libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&host.socket);
        let deadline = Instant::now() + self.shutdown_timeout;
        while host.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = host.in_flight.load(Ordering::SeqCst);
        if left > 0 {
            log::warn!("stopping with {left} request(s) still in flight after {:?}", self.shutdown_timeout);
        }
        for t in self.periodic.drain(..) {
            let _ = t.join();
        }
        if let Some(m) = &host.volume {
            m.cleanup();
        }
        if let Some(m) = &host.compute {
            m.cleanup();
        }
        log::info!("stopped");
    }
}
