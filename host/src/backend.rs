//! A backend: one constructed driver serving a service, with its health and per-method call statistics.
//! Managers call drivers only through [`Backend::call`].

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use plugin_api::{ComputeClient, DriverError, DriverKind, Options, VolumeClient};
use serde_json::{json, Value};

use crate::config::expand;
use crate::drivers::resolve;
use crate::loader::{Library, Loader};
use crate::rcu::{RcuCell, Retired};
use crate::stats::CallStats;
use crate::{LoadError, LoadErrorKind};

/// An error answered on the control socket: a snake_case kind and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// `not_found`, `invalid_argument`, `unavailable`, … (driver kinds pass through).
    pub kind: String,
    /// One line, lowercase, naming the resource.
    pub message: String,
}

impl ApiError {
    /// Any kind.
    pub fn new(kind: &str, message: impl Into<String>) -> ApiError {
        ApiError { kind: kind.to_owned(), message: message.into() }
    }
    /// `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new("invalid_argument", message)
    }
    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new("not_found", message)
    }
}

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> ApiError {
        ApiError { kind: e.kind().as_str().to_owned(), message: e.message().to_owned() }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// A driver operation, for call statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    Create,
    Delete,
    Extend,
    Snapshot,
    List,
    Get,
    Stats,
    WriteAt,
    ReadAt,
    Spawn,
    Destroy,
    Start,
    Stop,
    Reboot,
    Health,
}

impl Op {
    const ALL: [Op; 15] = [
        Op::Create,
        Op::Delete,
        Op::Extend,
        Op::Snapshot,
        Op::List,
        Op::Get,
        Op::Stats,
        Op::WriteAt,
        Op::ReadAt,
        Op::Spawn,
        Op::Destroy,
        Op::Start,
        Op::Stop,
        Op::Reboot,
        Op::Health,
    ];
    /// The method name shown in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Delete => "delete",
            Op::Extend => "extend",
            Op::Snapshot => "snapshot",
            Op::List => "list",
            Op::Get => "get",
            Op::Stats => "stats",
            Op::WriteAt => "write_at",
            Op::ReadAt => "read_at",
            Op::Spawn => "spawn",
            Op::Destroy => "destroy",
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Reboot => "reboot",
            Op::Health => "health",
        }
    }
}

/// Whether a backend can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Initialised and last health check passed.
    Up,
    /// `init` failed, or the last health check failed; the reason says which.
    Down(String),
}

/// What a backend needs from a driver client, whatever its kind.
pub trait DriverOps: Sized + Send + Sync + 'static {
    /// The kind of driver this client talks to.
    const KIND: DriverKind;
    /// Constructs the driver from a verified library.
    fn construct(lib: &Library, options: &Options) -> Result<Self, LoadError>;
    /// See `VolumeDriver::init`.
    fn init(&self) -> Result<(), DriverError>;
    /// See `VolumeDriver::cleanup`.
    fn cleanup(&self) -> Result<(), DriverError>;
    /// See `VolumeDriver::health`.
    fn health(&self) -> Result<(), DriverError>;
}

impl DriverOps for VolumeClient {
    const KIND: DriverKind = DriverKind::VOLUME;
    fn construct(lib: &Library, options: &Options) -> Result<Self, LoadError> {
        lib.new_volume(options)
    }
    fn init(&self) -> Result<(), DriverError> {
        VolumeClient::init(self)
    }
    fn cleanup(&self) -> Result<(), DriverError> {
        VolumeClient::cleanup(self)
    }
    fn health(&self) -> Result<(), DriverError> {
        VolumeClient::health(self)
    }
}

impl DriverOps for ComputeClient {
    const KIND: DriverKind = DriverKind::COMPUTE;
    fn construct(lib: &Library, options: &Options) -> Result<Self, LoadError> {
        lib.new_compute(options)
    }
    fn init(&self) -> Result<(), DriverError> {
        ComputeClient::init(self)
    }
    fn cleanup(&self) -> Result<(), DriverError> {
        ComputeClient::cleanup(self)
    }
    fn health(&self) -> Result<(), DriverError> {
        ComputeClient::health(self)
    }
}

/// What a backend needs from the host to build drivers.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The process's loader.
    pub loader: &'a Loader,
    /// For `${state_dir}` in option values.
    pub state_dir: &'a Path,
    /// For NAME lookups.
    pub driver_dirs: &'a [PathBuf],
}

/// The driver currently serving a backend, with what it was built from.
#[derive(Debug)]
pub struct Active<D> {
    /// The constructed driver.
    pub driver: D,
    /// The library it came from.
    pub library: Library,
    /// Options as shown in status (secrets replaced by `(secret)`).
    pub shown_options: Vec<(String, String)>,
    /// Why `init` failed, if it did: the backend is then down and refuses calls.
    pub init_error: Option<String>,
    /// 0 for the driver loaded at start, +1 for each swap.
    pub generation: u64,
}

/// The configured driver (PATH or NAME, as given) and raw options: what a reload rebuilds from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// PATH or NAME.
    pub driver: String,
    /// Raw options, before `${...}` expansion and validation.
    pub options: Vec<(String, String)>,
}

/// One backend: the active driver (swappable while serving) and its bookkeeping.
#[derive(Debug)]
pub struct Backend<D> {
    /// Backend name within its service.
    pub name: String,
    active: RcuCell<Active<D>>,
    configured: Mutex<Configured>,
    swap_lock: Mutex<()>,
    health: Mutex<(Health, SystemTime)>,
    calls: CallStats,
}

fn shown_options(lib: &Library, given: &Options) -> Vec<(String, String)> {
    given
        .pairs()
        .iter()
        .map(|(k, v)| {
            let secret = lib.options().iter().any(|o| o.name() == k && o.is_secret());
            (k.clone(), if secret { "(secret)".to_owned() } else { v.clone() })
        })
        .collect()
}

/// Resolves, loads, validates, constructs and initialises a driver. Load, option and constructor
/// errors are `Err`; an `init` failure is recorded in `Active::init_error`.
fn prepare<D: DriverOps>(
    ctx: BuildContext<'_>,
    backend: &str,
    configured: &Configured,
    generation: u64,
) -> Result<Active<D>, LoadError> {
    let path = resolve(&configured.driver, ctx.driver_dirs).map_err(|e| {
        LoadError::new(
            LoadErrorKind::NotFound,
            Path::new(&configured.driver),
            format!("{} backend {backend:?}: {e}", D::KIND),
        )
    })?;
    let library = ctx.loader.load_kind(&path, D::KIND)?;
    let mut given: Vec<(String, String)> =
        configured.options.iter().map(|(k, v)| (k.clone(), expand(v, ctx.state_dir, backend))).collect();
    for o in library.options() {
        if let Some(d) = o.default_value() {
            if d.contains("${") && !given.iter().any(|(k, _)| k == o.name()) {
                given.push((o.name().to_owned(), expand(d, ctx.state_dir, backend)));
            }
        }
    }
    let options = library.validate_options(&given)?;
    let driver = D::construct(&library, &options)?;
    let init_error = driver.init().err().map(|e| format!("driver init failed: {}", e.message()));
    let shown_options = shown_options(&library, &options);
    Ok(Active { driver, library, shown_options, init_error, generation })
}

fn one_line(e: &LoadError) -> String {
    let mut s = e.to_string();
    for d in &e.details {
        s.push_str("; ");
        s.push_str(d);
    }
    s
}

impl<D: DriverOps> Backend<D> {
    /// Builds a backend at start. Load, option and constructor errors are returned (the host then
    /// refuses to start); an `init` failure only marks the backend down.
    pub fn build(ctx: BuildContext<'_>, name: &str, configured: Configured) -> Result<Backend<D>, LoadError> {
        let active: Active<D> = prepare(ctx, name, &configured, 0)?;
        let health = match &active.init_error {
            None => Health::Up,
            Some(e) => {
                log::error!("{} backend {name:?} ({}): {e}; the service reports down", D::KIND, active.library.name());
                Health::Down(e.clone())
            }
        };
        Ok(Backend {
            name: name.to_owned(),
            active: RcuCell::new(active),
            configured: Mutex::new(configured),
            swap_lock: Mutex::new(()),
            health: Mutex::new((health, SystemTime::now())),
            calls: CallStats::new(Op::ALL.len()),
        })
    }

    /// Calls the active driver, recording count, errors and sampled latency under `op`. Refuses with
    /// `unavailable` when that driver failed to initialise. Never waits for a swap, and a swap never
    /// waits for it: the call keeps the driver it started with (inside an RCU read section) until it
    /// returns.
    #[inline]
    pub fn call<T>(&self, op: Op, f: impl FnOnce(&D) -> Result<T, DriverError>) -> Result<T, ApiError> {
        self.active.read(|active| {
            if let Some(e) = &active.init_error {
                return Err(ApiError::new("unavailable", format!("backend {:?} is down: {e}", self.name)));
            }
            let pending = self.calls.begin(op as usize);
            let r = f(&active.driver);
            self.calls.end(pending, r.is_err());
            r.map_err(ApiError::from)
        })
    }

    /// Runs `f` on the active driver and what it was built from.
    pub fn with_active<R>(&self, f: impl FnOnce(&Active<D>) -> R) -> R {
        self.active.read(f)
    }

    /// The configured driver and raw options.
    pub fn configured(&self) -> Configured {
        self.configured.lock().map(|c| c.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Whether the active driver initialised.
    pub fn initialised(&self) -> bool {
        self.active.read(|a| a.init_error.is_none())
    }

    /// Runs the driver's health check and records the result (a periodic task).
    pub fn check_health(&self) {
        let h = self.active.read(|active| match &active.init_error {
            Some(e) => Health::Down(e.clone()),
            None => match active.driver.health() {
                Ok(()) => Health::Up,
                Err(e) => Health::Down(format!("driver unhealthy: {}", e.message())),
            },
        });
        self.set_health(h);
    }

    fn set_health(&self, h: Health) {
        if let Ok(mut g) = self.health.lock() {
            if g.0 != h {
                match &h {
                    Health::Up => log::info!("{} backend {:?} is up", D::KIND, self.name),
                    Health::Down(r) => log::warn!("{} backend {:?}: {r}", D::KIND, self.name),
                }
            }
            *g = (h, SystemTime::now());
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.health.lock().map(|h| h.0.clone()).unwrap_or(Health::Down("health lock poisoned".to_owned()))
    }

    /// Runs the active driver's cleanup (host stop).
    pub fn cleanup(&self) {
        self.active.read(|active| {
            if active.init_error.is_none() {
                if let Err(e) = active.driver.cleanup() {
                    log::warn!("{} backend {:?}: cleanup failed: {e}", D::KIND, self.name);
                }
            }
        });
    }

    /// Replaces the active driver without stopping service.
    ///
    /// The new driver is loaded, verified, constructed with the backend's options (the configured ones,
    /// or `options` when given) and initialised first, outside anything a request waits on. Only then is
    /// the active pointer swapped: calls already running finish on the old driver, new calls go to the
    /// new one. The old driver's `cleanup` runs once it is drained (waiting up to `drain_timeout`, then
    /// in the background). On any failure the old driver keeps serving, untouched.
    pub fn swap(
        &self,
        ctx: BuildContext<'_>,
        driver: Option<&str>,
        options: Option<Vec<(String, String)>>,
        drain_timeout: Duration,
    ) -> Result<Value, ApiError> {
        let _one_swap_at_a_time = self.swap_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.configured();
        let wanted = Configured {
            driver: driver.map(str::to_owned).unwrap_or_else(|| current.driver.clone()),
            options: options.unwrap_or_else(|| current.options.clone()),
        };
        let generation = self.active.read(|a| a.generation) + 1;
        let fresh: Active<D> = prepare(ctx, &self.name, &wanted, generation).map_err(|e| {
            ApiError::new("swap_failed", format!("{} backend {:?}: {}", D::KIND, self.name, one_line(&e)))
        })?;
        if let Some(e) = &fresh.init_error {
            let _ = fresh.driver.cleanup();
            return Err(ApiError::new(
                "swap_failed",
                format!(
                    "{} backend {:?}: new driver {:?}: {e}; the old driver keeps serving",
                    D::KIND,
                    self.name,
                    fresh.library.name()
                ),
            ));
        }
        let new_info = json!({"name": fresh.library.name(), "version": fresh.library.version(),
            "digest": fresh.library.digest, "path": fresh.library.path.display().to_string()});
        let started = Instant::now();
        let old = self.active.replace(fresh);
        let swapped_in = started.elapsed();
        if let Ok(mut c) = self.configured.lock() {
            *c = wanted;
        }
        self.set_health(Health::Up);
        log::info!("{} backend {:?}: swapped in {new_info} (generation {generation})", D::KIND, self.name);
        let old_info = retire(old, drain_timeout, &self.name);
        Ok(json!({
            "backend": self.name,
            "generation": generation,
            "old": old_info,
            "new": new_info,
            "swap_us": swapped_in.as_micros() as u64,
        }))
    }

    /// The status object for this backend.
    pub fn status(&self, default: bool) -> Value {
        let (state, reason) = match self.health() {
            Health::Up => ("up", None),
            Health::Down(r) => ("down", Some(r)),
        };
        let calls: serde_json::Map<String, Value> = Op::ALL
            .iter()
            .filter_map(|op| {
                let t = self.calls.totals(*op as usize);
                if t.count == 0 {
                    return None;
                }
                let mean_us = (t.total_ns / 1000).checked_div(t.sampled).unwrap_or(0);
                Some((
                    op.as_str().to_owned(),
                    json!({"count": t.count, "errors": t.errors, "sampled": t.sampled,
                        "mean_us": mean_us, "max_us": t.max_ns / 1000}),
                ))
            })
            .collect();
        let configured = self.configured().driver;
        self.active.read(|active| {
            let options: serde_json::Map<String, Value> =
                active.shown_options.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            let lib = &active.library;
            json!({
                "name": self.name,
                "default": default,
                "state": state,
                "reason": reason,
                "driver": {
                    "name": lib.name(),
                    "kind": lib.kind().as_str(),
                    "version": lib.version(),
                    "api_version": lib.api_version(),
                    "path": lib.path.display().to_string(),
                    "configured": configured,
                    "digest": lib.digest,
                    "size": lib.size,
                    "loaded_at": unix_secs(lib.loaded_at),
                    "generation": active.generation,
                },
                "options": options,
                "calls": calls,
            })
        })
    }
}

/// Waits for every call that may still use `old` to return, then runs its cleanup and frees it; in
/// the background once `timeout` has passed. Returns a description of the old driver.
fn retire<D: DriverOps>(old: Retired<Active<D>>, timeout: Duration, backend: &str) -> Value {
    fn finish<D: DriverOps>(old: Active<D>, backend: &str) -> Value {
        let info = json!({"name": old.library.name(), "version": old.library.version(), "digest": old.library.digest});
        if old.init_error.is_none() {
            if let Err(e) = old.driver.cleanup() {
                log::warn!("{} backend {backend:?}: retired driver's cleanup failed: {e}", D::KIND);
            }
        }
        info
    }
    match old.wait(timeout) {
        Ok(old) => finish(*old, backend),
        Err(old) => {
            let name = backend.to_owned();
            let spawned = std::thread::Builder::new().name("retire".to_owned()).spawn(move || {
                let mut old = old;
                loop {
                    match old.wait(Duration::from_secs(60)) {
                        Ok(done) => {
                            finish(*done, &name);
                            return;
                        }
                        Err(still) => {
                            log::warn!("{} backend {name:?}: old driver still has calls in flight", D::KIND);
                            old = still;
                        }
                    }
                }
            });
            if let Err(e) = spawned {
                log::error!("cannot start a thread to retire the old driver (it is leaked): {e}");
            }
            json!({"draining": true})
        }
    }
}

/// Seconds since the epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
