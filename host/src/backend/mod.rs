//! A backend: one constructed driver serving a service, swappable while serving, with its health and
//! per-method call statistics. One type for every driver kind (`Backend<I>` over the plugin API's
//! [`Interface`]); services reach drivers only through [`Backend::call`].
//!
//! Why this file is long: build, call, health, swap and retirement share one state (the RCU cell and the
//! health gate); keeping them together keeps the swap invariants in one reviewable place.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use plughost_api::host::Interface;
use plughost_api::DriverError;

pub(crate) mod rcu;
pub mod settings;
pub mod stats;

pub use settings::{BackendSettings, BackendSpec, Isolation};

use crate::backend::rcu::{RcuCell, Retired};
use crate::backend::stats::CallStats;
use crate::control::protocol::{
    ApiError, BackendStatus, CallStatus, Capacity, DriverRef, DriverStatus, ErrorKind, State, SwapReport,
};
use crate::loading::drivers::resolve;
use crate::loading::error::LoadError;
use crate::loading::loader::{Library, Loader};
use crate::worker::{SetupReply, SupervisedTransport, Supervisor, WorkerConfig};

/// Whether a backend can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Initialised and the last health check passed.
    Up,
    /// `init` failed, or the last health check failed; the reason says which. Calls are refused with
    /// `unavailable` until a health check passes (or a swap brings a working driver).
    Down(String),
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
    /// The `plughost` executable, to start workers for isolated backends.
    pub exe: Option<&'a Path>,
}

/// The configured driver (PATH or NAME, as given) and raw options: what a reload rebuilds from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// PATH or NAME.
    pub driver: String,
    /// Raw options, before `${...}` expansion and validation.
    pub options: Vec<(String, String)>,
    /// Host-level settings (not the driver's business).
    pub settings: BackendSettings,
}

/// Why a backend's driver could not be built: the backend, and what went wrong (named once each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    /// `volume`, `compute`, ...
    pub service: &'static str,
    /// The backend.
    pub backend: String,
    /// What went wrong.
    pub cause: BackendCause,
}

/// What went wrong building a backend's driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendCause {
    /// The driver NAME is in none of the driver directories.
    NotFound(String),
    /// The file was refused, or the driver could not be constructed.
    Load(LoadError),
}

impl BackendError {
    fn details(&self) -> &[String] {
        match &self.cause {
            BackendCause::NotFound(_) => &[],
            BackendCause::Load(e) => &e.details,
        }
    }

    /// The headline and indented detail lines, as printed at start.
    pub fn report(&self) -> String {
        let mut s = self.to_string();
        for d in self.details() {
            s.push_str("\n  ");
            s.push_str(d);
        }
        s
    }

    /// Everything on one line, as answered on the socket.
    pub fn one_line(&self) -> String {
        let mut s = self.to_string();
        for d in self.details() {
            s.push_str("; ");
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} backend {:?}: ", self.service, self.backend)?;
        match &self.cause {
            BackendCause::NotFound(reason) => f.write_str(reason),
            BackendCause::Load(e) => write!(f, "{e}"),
        }
    }
}

/// What a driver was built from, as status shows it.
#[derive(Debug, Clone)]
pub struct DriverInfo {
    /// Driver name.
    pub name: String,
    /// Driver version.
    pub version: String,
    /// Plugin API version it was built against.
    pub api_version: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Content digest.
    pub digest: String,
    /// File size.
    pub size: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
}

impl DriverInfo {
    fn of(lib: &Library) -> DriverInfo {
        DriverInfo {
            name: lib.name().to_owned(),
            version: lib.version().to_owned(),
            api_version: lib.api_version().to_owned(),
            path: lib.path.clone(),
            digest: lib.digest.clone(),
            size: lib.size,
            loaded_at: lib.loaded_at,
        }
    }

    fn reference(&self, path: bool) -> DriverRef {
        DriverRef {
            name: self.name.clone(),
            version: self.version.clone(),
            digest: self.digest.clone(),
            path: path.then(|| self.path.display().to_string()),
            draining: false,
        }
    }
}

/// A constructed driver: in this process (called by its concrete type, without dynamic dispatch) or
/// any other implementation of the author trait (in-process test drivers; drivers in another process).
pub enum Driver<I: Interface> {
    /// A driver loaded in this process.
    Loaded(I::Client),
    /// Any other.
    Other(Box<I::Object>),
}

impl<I: Interface> Driver<I> {
    /// The driver as the author trait object.
    #[inline(always)]
    pub fn object(&self) -> &I::Object {
        match self {
            Driver::Loaded(c) => I::as_object(c),
            Driver::Other(o) => o,
        }
    }
}

/// The driver currently serving a backend, with what it was built from.
pub struct Active<I: Interface> {
    /// The constructed driver.
    pub driver: Driver<I>,
    /// What it was built from.
    pub info: DriverInfo,
    /// Options as shown in status (secrets replaced by `(secret)`).
    pub shown_options: BTreeMap<String, String>,
    /// Why `init` failed, if it did: the backend is then down and refuses calls.
    pub init_error: Option<String>,
    /// 0 for the driver loaded at start, +1 for each swap.
    pub generation: u64,
    /// Extensions the driver provides.
    pub extensions: Vec<String>,
    /// The worker process serving it, for an isolated backend.
    pub supervisor: Option<Arc<Supervisor>>,
    /// `init` has not run yet (in-process drivers: it runs bounded, or in the background at start).
    pub init_pending: bool,
}

impl<I: Interface> Active<I> {
    /// Runs the driver's cleanup (if it initialised) and stops its worker, if it has one.
    fn finish(&self, service: &str, backend: &str) {
        if self.init_error.is_none() {
            if let Err(e) = I::cleanup(self.driver.object()) {
                log::warn!("{service} backend {backend:?}: cleanup failed: {e}");
            }
        }
        if let Some(s) = &self.supervisor {
            s.stop();
        }
    }
}

/// Runs an in-process driver's `init` in a thread of its own, waiting up to `timeout`. A driver whose
/// `init` does not return in time is given up on: the thread keeps it until `init` returns, then drops
/// it (no `cleanup`: it never served).
fn init_bounded<I: Interface>(active: Active<I>, timeout: Duration) -> Result<Active<I>, String> {
    let shared = Arc::new(active);
    let (tx, rx) = std::sync::mpsc::channel();
    let mine = shared.clone();
    let handle = std::thread::Builder::new()
        .name("driver-init".to_owned())
        .spawn(move || {
            let r = I::init(mine.driver.object());
            drop(mine);
            let _ = tx.send(r);
        })
        .map_err(|e| format!("cannot start a thread for init: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = handle.join();
            let mut active = Arc::try_unwrap(shared)
                .unwrap_or_else(|_| unreachable!("the init thread dropped its reference before answering"));
            active.init_error = r.err().map(|e| format!("driver init failed: {}", e.message()));
            active.init_pending = false;
            Ok(active)
        }
        Err(_) => Err(format!("driver init did not finish within {}s", timeout.as_secs_f64())),
    }
}

/// Where a backend's first `init` is (it runs in the background at start).
#[derive(Debug, Clone)]
enum InitState {
    /// Running since then.
    Running(Instant),
    /// Failed or timed out: the backend stays down until a swap.
    Failed(String),
    /// Done (or not needed).
    Done,
}

/// A backend's health, shared with its worker's supervisor (which takes it down when the circuit
/// opens, and up again on `ctl restart`).
#[derive(Debug)]
pub struct HealthCell {
    health: Mutex<Health>,
    /// `health == Up`, read on every call without a lock.
    serving: AtomicBool,
    label: String,
}

impl HealthCell {
    fn new(service: &str, backend: &str) -> HealthCell {
        HealthCell {
            health: Mutex::new(Health::Down("starting".to_owned())),
            serving: AtomicBool::new(false),
            label: format!("{service} backend {backend:?}"),
        }
    }

    fn get(&self) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, h: Health) {
        let mut g = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if *g != h {
            match &h {
                Health::Up => log::info!("{} is up", self.label),
                // Starting is expected, not a fault; a backend stuck there is reported by its
                // reason's growing "init running for Ns" at each health check.
                Health::Down(r) if r.starts_with("starting") => log::info!("{} is {r}", self.label),
                Health::Down(r) => log::warn!("{} is down: {r}", self.label),
            }
        }
        self.serving.store(h == Health::Up, Ordering::Relaxed);
        *g = h;
    }
}

/// One backend: the active driver (swappable while serving) and its bookkeeping.
pub struct Backend<I: Interface> {
    /// Backend name within its service.
    pub name: String,
    service: &'static str,
    active: RcuCell<Active<I>>,
    configured: Mutex<Configured>,
    swap_lock: Mutex<()>,
    health: Arc<HealthCell>,
    calls: CallStats,
    /// The first `init` (at start).
    init: Mutex<InitState>,
    /// A health check still running, since then (a driver's `health` may hang too).
    health_running: Mutex<Option<Instant>>,
}

impl<I: Interface> fmt::Debug for Backend<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend").field("service", &self.service).field("name", &self.name).finish_non_exhaustive()
    }
}

/// Resolves, loads, validates, constructs and initialises a driver, in this process or (isolation
/// `process`) in a worker. Load, option and constructor errors are `Err`; an `init` failure is recorded
/// in `Active::init_error`.
fn prepare<I: Interface>(
    ctx: BuildContext<'_>,
    service: &'static str,
    backend: &str,
    configured: &Configured,
    generation: u64,
    health: &Arc<HealthCell>,
) -> Result<Active<I>, BackendError> {
    let fail = |e| BackendError { service, backend: backend.to_owned(), cause: BackendCause::Load(e) };
    let path = resolve(&configured.driver, ctx.driver_dirs).map_err(|reason| BackendError {
        service,
        backend: backend.to_owned(),
        cause: BackendCause::NotFound(reason),
    })?;
    let pin = configured.settings.digest.as_deref();
    if configured.settings.isolation == Isolation::Process {
        return prepare_isolated(ctx, service, backend, configured, generation, health, &path).map_err(fail);
    }
    let library = ctx.loader.load_pinned(&path, pin).map_err(fail)?;
    library.expect_kind(I::KIND).map_err(fail)?;
    let options = library.prepare_options(&configured.options, ctx.state_dir, backend).map_err(fail)?;
    let shown_options = library.shown_options(&options);
    let constructed = library.construct::<I>(&options).map_err(fail)?;
    let driver = Driver::Loaded(constructed.driver);
    let extensions = constructed.extensions.iter().map(|e| (*e).to_owned()).collect();
    Ok(Active {
        driver,
        info: DriverInfo::of(&library),
        shown_options,
        init_error: None,
        generation,
        extensions,
        supervisor: None,
        init_pending: true,
    })
}

/// [`prepare`] for an isolated backend: every check that needs no loading here, then a worker loads,
/// constructs and initialises the driver. Nothing of the library is mapped into this process.
fn prepare_isolated<I: Interface>(
    ctx: BuildContext<'_>,
    service: &'static str,
    backend: &str,
    configured: &Configured,
    generation: u64,
    health: &Arc<HealthCell>,
    path: &Path,
) -> Result<Active<I>, LoadError> {
    let settings = &configured.settings;
    let exe = ctx.exe.ok_or_else(|| {
        LoadError::new(
            crate::loading::error::LoadErrorKind::RuntimeDir,
            path,
            "no plughost executable to start a worker with",
        )
    })?;
    let copy = ctx.loader.checked_copy(path, settings.digest.as_deref())?;
    let user = match &settings.user {
        Some(u) => Some(
            crate::util::users::user_ids(u, settings.group.as_deref())
                .map_err(|e| LoadError::new(crate::loading::error::LoadErrorKind::RuntimeDir, path, e))?,
        ),
        None => None,
    };
    let config = WorkerConfig {
        exe: exe.to_owned(),
        kind: I::KIND.as_str(),
        setup: crate::worker::Setup {
            service: service.to_owned(),
            backend: backend.to_owned(),
            path: path.to_owned(),
            state_dir: ctx.state_dir.to_owned(),
            options: configured.options.clone(),
            memory_limit: settings.memory_limit,
        },
        user,
        call_timeout: settings.call_timeout,
    };
    let cell = health.clone();
    let on_health = Box::new(move |down: Option<String>| {
        cell.set(match down {
            Some(r) => Health::Down(r),
            None => Health::Up,
        })
    });
    let (supervisor, reply) = Supervisor::start(config, copy.fd, on_health)?;
    match reply {
        SetupReply::Refused { kind, reason, details } => {
            supervisor.stop();
            let kind = crate::loading::error::LoadErrorKind::from_name(&kind)
                .unwrap_or(crate::loading::error::LoadErrorKind::InvalidMetadata);
            Err(LoadError::new(kind, path, reason).with_details(details))
        }
        SetupReply::Ready { name, version, api_version, extensions, shown_options, init_error } => {
            let driver = Driver::Other(I::remote(Box::new(SupervisedTransport::<I>::new(supervisor.clone()))));
            let info = DriverInfo {
                name,
                version,
                api_version,
                path: path.to_owned(),
                digest: copy.digest,
                size: copy.size,
                loaded_at: SystemTime::now(),
            };
            Ok(Active {
                driver,
                info,
                shown_options,
                init_error,
                generation,
                extensions,
                supervisor: Some(supervisor),
                init_pending: false,
            })
        }
    }
}

impl<I: Interface> Backend<I> {
    /// Builds a backend at start. Load, option and constructor errors are returned (the host then
    /// refuses to start); an `init` failure only marks the backend down.
    pub fn build(
        ctx: BuildContext<'_>,
        service: &'static str,
        name: &str,
        configured: Configured,
    ) -> Result<Backend<I>, BackendError> {
        let health = Arc::new(HealthCell::new(service, name));
        let active: Active<I> = prepare(ctx, service, name, &configured, 0, &health)?;
        Ok(Backend::assemble(service, name, configured, active, health))
    }

    fn assemble(
        service: &'static str,
        name: &str,
        configured: Configured,
        active: Active<I>,
        cell: Arc<HealthCell>,
    ) -> Backend<I> {
        // Up only once `init` and a first health check pass (a volume root that is not there, ...);
        // a failed health check is checked again periodically, a failed `init` is not. A pending
        // `init` runs in the background ([`Backend::start_init`]).
        let health = match &active.init_error {
            _ if active.init_pending => Health::Down("starting: init running".to_owned()),
            None => match I::health(active.driver.object()) {
                Ok(()) => Health::Up,
                Err(e) => {
                    let why = format!("driver unhealthy: {}", e.message());
                    log::error!("{service} backend {name:?} ({}): {why}; it reports down", active.info.name);
                    Health::Down(why)
                }
            },
            Some(e) => {
                log::error!("{service} backend {name:?} ({}): {e}; it reports down", active.info.name);
                Health::Down(e.clone())
            }
        };
        cell.set(health);
        Backend {
            name: name.to_owned(),
            service,
            active: RcuCell::new(active),
            configured: Mutex::new(configured),
            swap_lock: Mutex::new(()),
            health: cell,
            calls: CallStats::new(I::METHODS.len()),
            init: Mutex::new(InitState::Done),
            health_running: Mutex::new(None),
        }
    }

    /// The service it serves.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// Runs the driver's first `init` in the background (at start: a slow `init` of one backend holds up
    /// no other). The backend is `starting` until it returns; one that outlasts the call timeout is
    /// given up on (down; a swap or a restart brings a new driver).
    pub fn start_init(self: &Arc<Self>) {
        if !self.active.read(|a| a.init_pending) {
            return;
        }
        *self.init.lock().unwrap_or_else(|p| p.into_inner()) = InitState::Running(Instant::now());
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("driver-init".to_owned()).spawn(move || {
            let r = me.active.read(|a| I::init(a.driver.object()));
            let mut st = me.init.lock().unwrap_or_else(|p| p.into_inner());
            if !matches!(*st, InitState::Running(_)) {
                return; // given up on meanwhile
            }
            match r {
                Ok(()) => {
                    *st = InitState::Done;
                    drop(st);
                    let h = me.active.read(|a| match I::health(a.driver.object()) {
                        Ok(()) => Health::Up,
                        Err(e) => Health::Down(format!("driver unhealthy: {}", e.message())),
                    });
                    me.set_health(h);
                }
                Err(e) => {
                    let why = format!("driver init failed: {}", e.message());
                    log::error!("{} backend {:?}: {why}; it reports down", me.service, me.name);
                    *st = InitState::Failed(why.clone());
                    drop(st);
                    me.set_health(Health::Down(why));
                }
            }
        });
        if let Err(e) = spawned {
            let why = format!("cannot start a thread for init: {e}");
            *self.init.lock().unwrap_or_else(|p| p.into_inner()) = InitState::Failed(why.clone());
            self.set_health(Health::Down(why));
        }
    }

    /// Runs a pending first `init` here and now, unbounded (benchmarks and tests that build a backend
    /// by hand; the host uses [`start_init`](Self::start_init)).
    pub fn init_now(&self) {
        if !self.active.read(|a| a.init_pending) {
            return;
        }
        let h = self.active.read(|a| match I::init(a.driver.object()) {
            Ok(()) => match I::health(a.driver.object()) {
                Ok(()) => Health::Up,
                Err(e) => Health::Down(format!("driver unhealthy: {}", e.message())),
            },
            Err(e) => Health::Down(format!("driver init failed: {}", e.message())),
        });
        *self.init.lock().unwrap_or_else(|p| p.into_inner()) = match &h {
            Health::Down(why) if why.starts_with("driver init failed") => InitState::Failed(why.clone()),
            _ => InitState::Done,
        };
        self.set_health(h);
    }

    /// Whether the first `init` is still running.
    pub fn starting(&self) -> bool {
        matches!(*self.init.lock().unwrap_or_else(|p| p.into_inner()), InitState::Running(_))
    }

    fn call_timeout(&self) -> Duration {
        self.configured.lock().unwrap_or_else(|p| p.into_inner()).settings.call_timeout
    }

    /// A backend serving a driver compiled into this process (for tests and benchmarks): initialised
    /// here, described as `driver_name` in status.
    pub fn in_process(service: &'static str, name: &str, driver: Box<I::Object>, driver_name: &str) -> Backend<I> {
        let driver = Driver::Other(driver);
        let init_error = I::init(driver.object()).err().map(|e| format!("driver init failed: {}", e.message()));
        let info = DriverInfo {
            name: driver_name.to_owned(),
            version: "in-process".to_owned(),
            api_version: plughost_api::API_VERSION.to_owned(),
            path: PathBuf::new(),
            digest: "in-process".to_owned(),
            size: 0,
            loaded_at: SystemTime::now(),
        };
        let active = Active {
            driver,
            info,
            shown_options: BTreeMap::new(),
            init_error,
            generation: 0,
            extensions: Vec::new(),
            supervisor: None,
            init_pending: false,
        };
        let configured =
            Configured { driver: driver_name.to_owned(), options: Vec::new(), settings: Default::default() };
        Backend::assemble(service, name, configured, active, Arc::new(HealthCell::new(service, name)))
    }

    /// Calls the active driver, recording count, errors and sampled latency under `method`. Refuses
    /// with `unavailable` while the backend is down. Never waits for a swap, and a swap never waits for
    /// it: the call keeps the driver it started with (inside an RCU read section) until it returns.
    #[inline(always)]
    pub fn call<T>(
        &self,
        method: I::Method,
        f: impl FnOnce(&I::Object) -> Result<T, DriverError>,
    ) -> Result<T, ApiError> {
        self.active.read(|active| {
            if !self.health.serving.load(Ordering::Relaxed) {
                return Err(self.unavailable());
            }
            let pending = self.calls.begin(I::method_index(method));
            // One call per arm, so that a loaded driver's methods are called directly (devirtualized).
            let r = match &active.driver {
                Driver::Loaded(client) => f(I::as_object(client)),
                Driver::Other(object) => f(object),
            };
            self.calls.end(pending, r.is_err());
            r.map_err(driver_error)
        })
    }

    #[cold]
    fn unavailable(&self) -> ApiError {
        let reason = match self.health() {
            Health::Down(r) => r,
            Health::Up => "starting".to_owned(),
        };
        ApiError::new(ErrorKind::Unavailable, format!("{} backend {:?} is down: {reason}", self.service, self.name))
    }

    /// Runs `f` on the active driver and what it was built from.
    pub fn with_active<R>(&self, f: impl FnOnce(&Active<I>) -> R) -> R {
        self.active.read(f)
    }

    fn set_health(&self, h: Health) {
        self.health.set(h);
    }

    /// The active driver's digest.
    pub fn digest(&self) -> String {
        self.active.read(|a| a.info.digest.clone())
    }
}

/// What the host does with any backend, whatever its kind (swap, reload, status, health, cleanup).
pub trait BackendControl: Send + Sync {
    /// The backend's name.
    fn name(&self) -> &str;
    /// The configured driver and raw options.
    fn configured(&self) -> Configured;
    /// Replaces the active driver without stopping service.
    ///
    /// The new driver is loaded, verified, constructed with the backend's options (the configured ones,
    /// or `options` when given) and initialised first, outside anything a request waits on. Only then is
    /// the active pointer swapped: calls already running finish on the old driver, new calls go to the
    /// new one. The old driver's `cleanup` runs once it is drained (waiting up to `drain_timeout`, then
    /// in the background). On any failure the old driver keeps serving, untouched.
    fn swap(
        &self,
        ctx: BuildContext<'_>,
        driver: Option<&str>,
        options: Option<Vec<(String, String)>>,
        settings: Option<BackendSettings>,
        drain_timeout: Duration,
    ) -> Result<SwapReport, ApiError>;
    /// The status of this backend.
    fn status(&self, default: bool, capacity: Option<Capacity>) -> BackendStatus;
    /// Current health.
    fn health(&self) -> Health;
    /// Runs the driver's health check and records the result (a periodic task), waiting at most the
    /// backend's call timeout.
    fn check_health(self: Arc<Self>);
    /// Runs the active driver's cleanup (host stop).
    fn cleanup(&self);
    /// The digest of the active driver's library.
    fn active_digest(&self) -> String;
    /// Changes the host-level settings (they take effect at once; the driver is not involved).
    fn set_settings(&self, settings: BackendSettings);
    /// Changes whenever another driver object starts serving (a swap, a restarted worker): its state
    /// may differ from what the records say, so services reconcile then.
    fn incarnation(&self) -> u64;
    /// `ctl restart`: a fresh worker for an isolated backend (closing its circuit); for an in-process
    /// one, the configured driver loaded again (a swap).
    fn restart(
        &self,
        ctx: BuildContext<'_>,
        drain_timeout: Duration,
    ) -> Result<crate::control::protocol::RestartReport, ApiError>;
}

impl<I: Interface> BackendControl for Backend<I> {
    fn name(&self) -> &str {
        &self.name
    }

    fn configured(&self) -> Configured {
        self.configured.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn swap(
        &self,
        ctx: BuildContext<'_>,
        driver: Option<&str>,
        options: Option<Vec<(String, String)>>,
        settings: Option<BackendSettings>,
        drain_timeout: Duration,
    ) -> Result<SwapReport, ApiError> {
        let _one_swap_at_a_time = self.swap_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.configured();
        let wanted = Configured {
            driver: driver.map(str::to_owned).unwrap_or_else(|| current.driver.clone()),
            options: options.unwrap_or_else(|| current.options.clone()),
            settings: settings.unwrap_or_else(|| current.settings.clone()),
        };
        let generation = self.active.read(|a| a.generation) + 1;
        let prepared: Active<I> =
            prepare(ctx, self.service, &self.name, &wanted, generation, &self.health).map_err(|e| {
                let kind = match &e.cause {
                    BackendCause::Load(l) if l.kind.is_trust() => ErrorKind::UntrustedDriver,
                    _ => ErrorKind::SwapFailed,
                };
                ApiError::new(kind, format!("{}; the old driver keeps serving", e.one_line()))
            })?;
        let fresh = if prepared.init_pending {
            init_bounded(prepared, wanted.settings.call_timeout).map_err(|why| {
                ApiError::new(
                    ErrorKind::SwapFailed,
                    format!(
                        "{} backend {:?}: new driver: {why}; the old driver keeps serving",
                        self.service, self.name
                    ),
                )
            })?
        } else {
            prepared
        };
        let unhealthy = match &fresh.init_error {
            Some(e) => Some(e.clone()),
            None => I::health(fresh.driver.object()).err().map(|e| format!("driver unhealthy: {}", e.message())),
        };
        if let Some(e) = &unhealthy {
            fresh.finish(self.service, &self.name);
            return Err(ApiError::new(
                ErrorKind::SwapFailed,
                format!(
                    "{} backend {:?}: new driver {:?}: {e}; the old driver keeps serving",
                    self.service, self.name, fresh.info.name
                ),
            ));
        }
        let new = fresh.info.reference(true);
        let started = Instant::now();
        let old = self.active.replace(fresh);
        let swap_us = started.elapsed().as_micros() as u64;
        *self.init.lock().unwrap_or_else(|p| p.into_inner()) = InitState::Done;
        *self.configured.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
        self.set_health(Health::Up);
        log::info!(
            "{} backend {:?}: swapped in {} {} [{}] (generation {generation})",
            self.service,
            self.name,
            new.name,
            new.version,
            new.digest
        );
        let old = retire::<I>(old, drain_timeout, self.service, &self.name);
        Ok(SwapReport { backend: self.name.clone(), generation, old, new, swap_us })
    }

    fn status(&self, default: bool, capacity: Option<Capacity>) -> BackendStatus {
        let (state, reason) = match self.health() {
            Health::Up => (State::Up, None),
            Health::Down(r) => (State::Down, Some(r)),
        };
        let calls = I::METHODS
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let t = self.calls.totals(i);
                (t.count > 0).then(|| {
                    let mean_us = (t.total_ns / 1000).checked_div(t.sampled).unwrap_or(0);
                    let status = CallStatus {
                        count: t.count,
                        errors: t.errors,
                        sampled: t.sampled,
                        mean_us,
                        max_us: t.max_ns / 1000,
                    };
                    ((*name).to_owned(), status)
                })
            })
            .collect();
        let Configured { driver: configured, settings, .. } = self.configured();
        self.active.read(|active| {
            let info = &active.info;
            BackendStatus {
                name: self.name.clone(),
                default,
                state,
                reason,
                driver: DriverStatus {
                    name: info.name.clone(),
                    kind: I::KIND.to_string(),
                    version: info.version.clone(),
                    api_version: info.api_version.clone(),
                    path: info.path.display().to_string(),
                    configured,
                    digest: info.digest.clone(),
                    size: info.size,
                    loaded_at: crate::util::time::unix_secs(info.loaded_at),
                    generation: active.generation,
                    extensions: active.extensions.clone(),
                },
                pinned: settings.digest.clone(),
                isolation: settings.isolation.as_str().to_owned(),
                worker: active.supervisor.as_ref().map(|s| s.status()),
                options: active.shown_options.clone(),
                calls,
                capacity,
            }
        })
    }

    fn health(&self) -> Health {
        self.health.get()
    }

    fn check_health(self: Arc<Self>) {
        let timeout = self.call_timeout();
        let init = self.init.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match init {
            InitState::Running(since) if since.elapsed() > timeout => {
                let why = format!("driver init did not finish within {}s; given up on", timeout.as_secs_f64());
                *self.init.lock().unwrap_or_else(|p| p.into_inner()) = InitState::Failed(why.clone());
                return self.set_health(Health::Down(why));
            }
            InitState::Running(since) => {
                let why = format!("starting: init running for {}s", since.elapsed().as_secs());
                return self.set_health(Health::Down(why));
            }
            InitState::Failed(why) => return self.set_health(Health::Down(why)),
            InitState::Done => {}
        }
        // A health check that is still running is not started again; one that outlasts the timeout
        // takes the backend down.
        {
            let mut running = self.health_running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(since) = *running {
                if since.elapsed() > timeout {
                    drop(running);
                    let why = format!("health check did not answer within {}s", timeout.as_secs_f64());
                    self.set_health(Health::Down(why));
                }
                return;
            }
            *running = Some(Instant::now());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("health".to_owned()).spawn(move || {
            // An answer about a worker that was replaced meanwhile (a restart) says nothing now.
            let incarnation = me.incarnation();
            let h = me.active.read(|active| match &active.init_error {
                Some(e) => Health::Down(e.clone()),
                None => {
                    let pending = me.calls.begin(2); // "health" is method 2 of every kind
                    let r = I::health(active.driver.object());
                    me.calls.end(pending, r.is_err());
                    match r {
                        Ok(()) => Health::Up,
                        Err(e) => Health::Down(format!("driver unhealthy: {}", e.message())),
                    }
                }
            });
            *me.health_running.lock().unwrap_or_else(|p| p.into_inner()) = None;
            if me.incarnation() == incarnation {
                me.set_health(h.clone());
            }
            let _ = tx.send(h);
        });
        match spawned {
            Ok(_) => {
                if rx.recv_timeout(timeout).is_err() {
                    let why = format!("health check did not answer within {}s", timeout.as_secs_f64());
                    self.set_health(Health::Down(why));
                }
            }
            Err(e) => {
                *self.health_running.lock().unwrap_or_else(|p| p.into_inner()) = None;
                log::warn!("{} backend {:?}: cannot start a health check: {e}", self.service, self.name);
            }
        }
    }

    fn cleanup(&self) {
        self.active.read(|active| active.finish(self.service, &self.name));
    }

    fn active_digest(&self) -> String {
        self.digest()
    }

    fn set_settings(&self, settings: BackendSettings) {
        self.configured.lock().unwrap_or_else(|p| p.into_inner()).settings = settings;
    }

    fn incarnation(&self) -> u64 {
        self.active.read(|a| (a.generation << 32) | a.supervisor.as_ref().map(|s| s.epoch()).unwrap_or(0))
    }

    fn restart(
        &self,
        ctx: BuildContext<'_>,
        drain_timeout: Duration,
    ) -> Result<crate::control::protocol::RestartReport, ApiError> {
        let supervisor = self.active.read(|a| a.supervisor.clone());
        let Some(sup) = supervisor else {
            let swap = self.swap(ctx, None, None, None, drain_timeout)?;
            return Ok(crate::control::protocol::RestartReport {
                backend: self.name.clone(),
                isolation: "in-process".to_owned(),
                worker_pid: None,
                generation: swap.generation,
            });
        };
        let pid = sup.restart_now().map_err(|e| {
            ApiError::new(ErrorKind::SwapFailed, format!("{} backend {:?}: restart: {e}", self.service, self.name))
        })?;
        log::info!("{} backend {:?}: worker restarted on request (pid {pid})", self.service, self.name);
        let (generation, health) = self.active.read(|a| {
            let h = match I::health(a.driver.object()) {
                Ok(()) => Health::Up,
                Err(e) => Health::Down(format!("driver unhealthy: {}", e.message())),
            };
            (a.generation, h)
        });
        self.set_health(health);
        Ok(crate::control::protocol::RestartReport {
            backend: self.name.clone(),
            isolation: "process".to_owned(),
            worker_pid: Some(pid),
            generation,
        })
    }
}

/// Waits for every call that may still use `old` to return, then runs its cleanup and frees it; in
/// the background once `timeout` has passed. Returns a description of the old driver.
fn retire<I: Interface>(old: Retired<Active<I>>, timeout: Duration, service: &'static str, backend: &str) -> DriverRef {
    fn finish<I: Interface>(old: Active<I>, service: &str, backend: &str) {
        old.finish(service, backend);
    }
    let info = old.peek(|a| a.info.reference(false));
    match old.wait(timeout) {
        Ok(old) => {
            finish::<I>(*old, service, backend);
            info
        }
        Err(old) => {
            let name = backend.to_owned();
            let spawned = std::thread::Builder::new().name("retire".to_owned()).spawn(move || {
                let mut old = old;
                loop {
                    match old.wait(Duration::from_secs(60)) {
                        Ok(done) => return finish::<I>(*done, service, &name),
                        Err(still) => {
                            log::warn!("{service} backend {name:?}: old driver still has calls in flight");
                            old = still;
                        }
                    }
                }
            });
            if let Err(e) = spawned {
                log::error!(
                    "{service} backend {backend:?}: cannot start a thread to retire the old driver (it is leaked): {e}"
                );
            }
            DriverRef { draining: true, ..info }
        }
    }
}

/// A driver's error as the protocol answers it; out of line, so that the success path of
/// [`Backend::call`] stays small enough to inline.
#[cold]
#[inline(never)]
fn driver_error(e: DriverError) -> ApiError {
    ApiError::from(e)
}
