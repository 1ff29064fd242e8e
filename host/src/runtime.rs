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

use plugin_api::DriverKind;
use serde_json::{json, Value};

use crate::backend::{ApiError, Backend, Health};
use crate::config::{expand, ServiceSpec};
use crate::drivers::resolve;
use crate::loader::Library;
use crate::managers::{Backends, ComputeManager, VolumeManager};
use crate::{LoadError, Loader};

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
}

/// Shared state of a running host.
#[derive(Debug)]
pub struct Host {
    volume: Option<VolumeManager>,
    compute: Option<ComputeManager>,
    loader: Loader,
    heartbeats: Mutex<BTreeMap<&'static str, SystemTime>>,
    stopping: AtomicBool,
    in_flight: AtomicUsize,
    started: Instant,
    socket: PathBuf,
}

fn shown_options(lib: &Library, given: &plugin_api::Options) -> Vec<(String, String)> {
    given
        .pairs()
        .iter()
        .map(|(k, v)| {
            let secret = lib.options().iter().any(|o| o.name() == k && o.is_secret());
            (k.clone(), if secret { "(secret)".to_owned() } else { v.clone() })
        })
        .collect()
}

/// Resolves, loads, validates and constructs one backend's driver; `init` is run but its failure
/// only marks the backend down.
fn build_backend<D>(
    loader: &Loader,
    settings: &Settings,
    kind: DriverKind,
    spec: &crate::config::BackendSpec,
    construct: impl Fn(&Library, &plugin_api::Options) -> Result<D, LoadError>,
    init: impl Fn(&D) -> Result<(), plugin_api::DriverError>,
) -> Result<Backend<D>, String> {
    let path =
        resolve(&spec.driver, &settings.driver_dirs).map_err(|e| format!("{kind} backend {:?}: {e}", spec.name))?;
    let lib = loader.load_kind(&path, kind).map_err(|e| e.report())?;
    let mut given: Vec<(String, String)> =
        spec.options.iter().map(|(k, v)| (k.clone(), expand(v, &settings.state_dir, &spec.name))).collect();
    for o in lib.options() {
        if let Some(d) = o.default_value() {
            if d.contains("${") && !given.iter().any(|(k, _)| k == o.name()) {
                given.push((o.name().to_owned(), expand(d, &settings.state_dir, &spec.name)));
            }
        }
    }
    let options = lib.validate_options(&given).map_err(|e| e.report())?;
    let driver = construct(&lib, &options).map_err(|e| e.report())?;
    let init_result = init(&driver);
    if let Err(e) = &init_result {
        log::error!(
            "{kind} backend {:?} ({}): driver init failed: {e}; the service reports down",
            spec.name,
            lib.name()
        );
    }
    let shown = shown_options(&lib, &options);
    Ok(Backend::new(&spec.name, lib, shown, driver, init_result))
}

impl Host {
    /// Loads every driver; returns every error found (nothing is served then).
    pub fn start(settings: &Settings) -> Result<Arc<Host>, Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = std::fs::create_dir_all(&settings.state_dir) {
            return Err(vec![format!("cannot create state dir \"{}\": {e}", settings.state_dir.display())]);
        }
        let loader = Loader::new(&settings.state_dir.join("run/libs")).map_err(|e| vec![e.report()])?;
        let mut volume_backends = Vec::new();
        if let Some(spec) = &settings.volume {
            for b in &spec.backends {
                match build_backend(&loader, settings, DriverKind::VOLUME, b, |l, o| l.new_volume(o), |d| d.init()) {
                    Ok(b) => volume_backends.push(Arc::new(b)),
                    Err(e) => errors.push(e),
                }
            }
        }
        let mut compute_backends = Vec::new();
        if let Some(spec) = &settings.compute {
            for b in &spec.backends {
                match build_backend(&loader, settings, DriverKind::COMPUTE, b, |l, o| l.new_compute(o), |d| d.init()) {
                    Ok(b) => compute_backends.push(Arc::new(b)),
                    Err(e) => errors.push(e),
                }
            }
        }
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
        match req.get("service").and_then(Value::as_str) {
            None if op == "status" => Ok(self.status()),
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

    fn service_status<D>(&self, name: &'static str, backends: &Backends<D>, extra: impl Fn(&str) -> Value) -> Value {
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
        json!({
            "pid": std::process::id(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "socket": self.socket.display().to_string(),
            "in_flight": self.in_flight.load(Ordering::SeqCst),
            "services": services,
            "libraries": {
                "mapped": mapped.len(),
                "mapped_bytes": mapped.iter().map(|m| m.size).sum::<u64>(),
                "note": "driver libraries are never unloaded; each distinct file content stays mapped until exit",
            },
        })
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
