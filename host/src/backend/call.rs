//! The backend: its active driver in an RCU cell (swappable while serving), calls through the health
//! gate with per-method statistics, and the first `init` in the background.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use plughost_api::host::Interface;
use plughost_api::DriverError;

use super::health::*;
use super::prepare::*;
use crate::backend::rcu::RcuCell;
use crate::backend::stats::CallStats;
use crate::control::protocol::{ApiError, ErrorKind};

/// One backend: the active driver (swappable while serving) and its bookkeeping.
pub struct Backend<I: Interface> {
    /// Backend name within its service.
    pub name: String,
    pub(super) service: &'static str,
    pub(super) active: RcuCell<Active<I>>,
    pub(super) configured: Mutex<Configured>,
    pub(super) swap_lock: Mutex<()>,
    pub(super) health: Arc<HealthCell>,
    pub(super) calls: CallStats,
    /// The first `init` (at start).
    pub(super) init: Mutex<InitState>,
    /// A health check still running, since then (a driver's `health` may hang too).
    pub(super) health_running: Mutex<Option<Instant>>,
    /// The drivers this backend ran before, newest last: (digest, PATH or NAME as configured), at most
    /// [`HISTORY`]. A swap that names only a digest goes back to one of them (a rollout's rollback).
    pub(super) history: Mutex<Vec<(String, String)>>,
}

/// How many earlier drivers a backend remembers.
pub(super) const HISTORY: usize = 16;

impl<I: Interface> fmt::Debug for Backend<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend").field("service", &self.service).field("name", &self.name).finish_non_exhaustive()
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

    pub(super) fn assemble(
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
            history: Mutex::new(Vec::new()),
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

    pub(super) fn call_timeout(&self) -> Duration {
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
            self.calls.end(pending, r.as_ref().err().map(|e| super::stats::error_kind_index(e.kind().as_str())));
            r.map_err(driver_error)
        })
    }

    #[cold]
    pub(super) fn unavailable(&self) -> ApiError {
        let reason = match self.health.get() {
            Health::Down(r) => r,
            Health::Up => "starting".to_owned(),
        };
        ApiError::new(ErrorKind::Unavailable, format!("{} backend {:?} is down: {reason}", self.service, self.name))
    }

    /// Runs `f` on the active driver and what it was built from.
    pub fn with_active<R>(&self, f: impl FnOnce(&Active<I>) -> R) -> R {
        self.active.read(f)
    }

    pub(super) fn set_health(&self, h: Health) {
        self.health.set(h);
    }

    /// The active driver's digest.
    pub fn digest(&self) -> String {
        self.active.read(|a| a.info.digest.clone())
    }
}

/// A driver's error as the protocol answers it; out of line, so that the success path of
/// [`Backend::call`] stays small enough to inline.
#[cold]
#[inline(never)]
fn driver_error(e: DriverError) -> ApiError {
    ApiError::from(e)
}
