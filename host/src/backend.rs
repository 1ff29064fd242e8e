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
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use plughost_api::host::Interface;
use plughost_api::{DriverError, Options};

use crate::config::expand;
use crate::drivers::resolve;
use crate::error::LoadError;
use crate::loader::{Library, Loader};
use crate::protocol::{
    ApiError, BackendStatus, CallStatus, Capacity, DriverRef, DriverStatus, ErrorKind, State, SwapReport,
};
use crate::rcu::{RcuCell, Retired};
use crate::stats::CallStats;

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
}

/// The configured driver (PATH or NAME, as given) and raw options: what a reload rebuilds from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// PATH or NAME.
    pub driver: String,
    /// Raw options, before `${...}` expansion and validation.
    pub options: Vec<(String, String)>,
    /// Host-level settings (not the driver's business).
    pub settings: crate::config::BackendSettings,
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
}

/// One backend: the active driver (swappable while serving) and its bookkeeping.
pub struct Backend<I: Interface> {
    /// Backend name within its service.
    pub name: String,
    service: &'static str,
    active: RcuCell<Active<I>>,
    configured: Mutex<Configured>,
    swap_lock: Mutex<()>,
    health: Mutex<Health>,
    /// `health == Up`, read on every call without a lock.
    serving: AtomicBool,
    calls: CallStats,
}

impl<I: Interface> fmt::Debug for Backend<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend").field("service", &self.service).field("name", &self.name).finish_non_exhaustive()
    }
}

fn shown_options(lib: &Library, given: &Options) -> BTreeMap<String, String> {
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
fn prepare<I: Interface>(
    ctx: BuildContext<'_>,
    service: &'static str,
    backend: &str,
    configured: &Configured,
    generation: u64,
) -> Result<Active<I>, BackendError> {
    let fail = |e| BackendError { service, backend: backend.to_owned(), cause: BackendCause::Load(e) };
    let path = resolve(&configured.driver, ctx.driver_dirs).map_err(|reason| BackendError {
        service,
        backend: backend.to_owned(),
        cause: BackendCause::NotFound(reason),
    })?;
    let library = ctx.loader.load_pinned(&path, configured.settings.digest.as_deref()).map_err(fail)?;
    library.expect_kind(I::KIND).map_err(fail)?;
    let mut given: Vec<(String, String)> =
        configured.options.iter().map(|(k, v)| (k.clone(), expand(v, ctx.state_dir, backend))).collect();
    for o in library.options() {
        if let Some(d) = o.default_value() {
            if d.contains("${") && !given.iter().any(|(k, _)| k == o.name()) {
                given.push((o.name().to_owned(), expand(d, ctx.state_dir, backend)));
            }
        }
    }
    let options = library.validate_options(&given).map_err(fail)?;
    let constructed = library.construct::<I>(&options).map_err(fail)?;
    let driver = Driver::Loaded(constructed.driver);
    let init_error = I::init(driver.object()).err().map(|e| format!("driver init failed: {}", e.message()));
    let shown_options = shown_options(&library, &options);
    let extensions = constructed.extensions.iter().map(|e| (*e).to_owned()).collect();
    Ok(Active { driver, info: DriverInfo::of(&library), shown_options, init_error, generation, extensions })
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
        let active: Active<I> = prepare(ctx, service, name, &configured, 0)?;
        Ok(Backend::assemble(service, name, configured, active))
    }

    fn assemble(service: &'static str, name: &str, configured: Configured, active: Active<I>) -> Backend<I> {
        // Up only once `init` and a first health check pass (a volume root that is not there, ...);
        // a failed health check is checked again periodically, a failed `init` is not.
        let health = match &active.init_error {
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
        Backend {
            name: name.to_owned(),
            service,
            serving: AtomicBool::new(health == Health::Up),
            active: RcuCell::new(active),
            configured: Mutex::new(configured),
            swap_lock: Mutex::new(()),
            health: Mutex::new(health),
            calls: CallStats::new(I::METHODS.len()),
        }
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
        let active =
            Active { driver, info, shown_options: BTreeMap::new(), init_error, generation: 0, extensions: Vec::new() };
        let configured =
            Configured { driver: driver_name.to_owned(), options: Vec::new(), settings: Default::default() };
        Backend::assemble(service, name, configured, active)
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
            if !self.serving.load(Ordering::Relaxed) {
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
        let mut g = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if *g != h {
            match &h {
                Health::Up => log::info!("{} backend {:?} is up", self.service, self.name),
                Health::Down(r) => log::warn!("{} backend {:?} is down: {r}", self.service, self.name),
            }
        }
        self.serving.store(h == Health::Up, Ordering::Relaxed);
        *g = h;
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
        settings: Option<crate::config::BackendSettings>,
        drain_timeout: Duration,
    ) -> Result<SwapReport, ApiError>;
    /// The status of this backend.
    fn status(&self, default: bool, capacity: Option<Capacity>) -> BackendStatus;
    /// Current health.
    fn health(&self) -> Health;
    /// Runs the driver's health check and records the result (a periodic task).
    fn check_health(&self);
    /// Runs the active driver's cleanup (host stop).
    fn cleanup(&self);
    /// The digest of the active driver's library.
    fn active_digest(&self) -> String;
    /// Changes the host-level settings (they take effect at once; the driver is not involved).
    fn set_settings(&self, settings: crate::config::BackendSettings);
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
        settings: Option<crate::config::BackendSettings>,
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
        let fresh: Active<I> = prepare(ctx, self.service, &self.name, &wanted, generation).map_err(|e| {
            let kind = match &e.cause {
                BackendCause::Load(l) if l.kind.is_trust() => ErrorKind::UntrustedDriver,
                _ => ErrorKind::SwapFailed,
            };
            ApiError::new(kind, format!("{}; the old driver keeps serving", e.one_line()))
        })?;
        let unhealthy = match &fresh.init_error {
            Some(e) => Some(e.clone()),
            None => I::health(fresh.driver.object()).err().map(|e| format!("driver unhealthy: {}", e.message())),
        };
        if let Some(e) = &unhealthy {
            let _ = I::cleanup(fresh.driver.object());
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
                    loaded_at: unix_secs(info.loaded_at),
                    generation: active.generation,
                    extensions: active.extensions.clone(),
                },
                pinned: settings.digest.clone(),
                options: active.shown_options.clone(),
                calls,
                capacity,
            }
        })
    }

    fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn check_health(&self) {
        let h = self.active.read(|active| match &active.init_error {
            Some(e) => Health::Down(e.clone()),
            None => {
                let pending = self.calls.begin(2); // "health" is method 2 of every kind
                let r = I::health(active.driver.object());
                self.calls.end(pending, r.is_err());
                match r {
                    Ok(()) => Health::Up,
                    Err(e) => Health::Down(format!("driver unhealthy: {}", e.message())),
                }
            }
        });
        self.set_health(h);
    }

    fn cleanup(&self) {
        self.active.read(|active| {
            if active.init_error.is_none() {
                if let Err(e) = I::cleanup(active.driver.object()) {
                    log::warn!("{} backend {:?}: cleanup failed: {e}", self.service, self.name);
                }
            }
        });
    }

    fn active_digest(&self) -> String {
        self.digest()
    }

    fn set_settings(&self, settings: crate::config::BackendSettings) {
        self.configured.lock().unwrap_or_else(|p| p.into_inner()).settings = settings;
    }
}

/// Waits for every call that may still use `old` to return, then runs its cleanup and frees it; in
/// the background once `timeout` has passed. Returns a description of the old driver.
fn retire<I: Interface>(old: Retired<Active<I>>, timeout: Duration, service: &'static str, backend: &str) -> DriverRef {
    fn finish<I: Interface>(old: Active<I>, service: &str, backend: &str) {
        if old.init_error.is_none() {
            if let Err(e) = I::cleanup(old.driver.object()) {
                log::warn!("{service} backend {backend:?}: retired driver's cleanup failed: {e}");
            }
        }
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

/// Seconds since the epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
