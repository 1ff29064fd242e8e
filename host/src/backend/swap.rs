//! What the host does with any backend, whatever its kind: swap (load, verify, construct and
//! initialise the replacement before one pointer store), restart, status, health checks, settings; and
//! the retirement of an old driver once no call uses it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plughost_api::host::Interface;

use super::call::*;
use super::health::*;
use super::prepare::*;
use super::settings::BackendSettings;
use crate::backend::rcu::Retired;
use crate::control::protocol::{
    ApiError, BackendStatus, CallStatus, Capacity, DriverRef, DriverStatus, ErrorKind, State, SwapReport,
};

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
    ///
    /// `expect`: the new driver's content must have this digest (checked before anything of it is
    /// loaded, as a pin is, without changing the backend's pin).
    fn swap(
        &self,
        ctx: BuildContext<'_>,
        driver: Option<&str>,
        options: Option<Vec<(String, String)>>,
        settings: Option<BackendSettings>,
        expect: Option<&str>,
        drain_timeout: Duration,
    ) -> Result<SwapReport, ApiError>;
    /// The PATH or NAME of the driver with content `digest` this backend ran last, before its current
    /// one (the backend remembers its last few).
    fn previous(&self, digest: &str) -> Option<String>;
    /// The status of this backend.
    fn status(&self, default: bool, capacity: Option<Capacity>) -> BackendStatus;
    /// Every method's call statistics, with latency buckets and errors by kind (for metrics).
    fn call_totals(&self) -> Vec<(&'static str, super::stats::Totals)>;
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

    fn call_totals(&self) -> Vec<(&'static str, super::stats::Totals)> {
        I::METHODS.iter().enumerate().map(|(i, name)| (*name, self.calls.totals(i))).collect()
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
        expect: Option<&str>,
        drain_timeout: Duration,
    ) -> Result<SwapReport, ApiError> {
        let _one_swap_at_a_time = self.swap_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.configured();
        let wanted = Configured {
            driver: driver.map(str::to_owned).unwrap_or_else(|| current.driver.clone()),
            options: options.unwrap_or_else(|| current.options.clone()),
            settings: settings.unwrap_or_else(|| current.settings.clone()),
        };
        let pinned;
        let checked = match expect {
            Some(digest) => {
                if let Some(pin) = wanted.settings.digest.as_deref().filter(|p| !p.eq_ignore_ascii_case(digest)) {
                    return Err(ApiError::new(
                        ErrorKind::UntrustedDriver,
                        format!(
                            "{} backend {:?}: pinned to {pin} by its configuration; a swap to {digest} is refused (change the pin and reload); the old driver keeps serving",
                            self.service, self.name
                        ),
                    ));
                }
                pinned = Configured {
                    settings: BackendSettings { digest: Some(digest.to_owned()), ..wanted.settings.clone() },
                    ..wanted.clone()
                };
                &pinned
            }
            None => &wanted,
        };
        let generation = self.active.read(|a| a.generation) + 1;
        let prepared: Active<I> =
            prepare(ctx, self.service, &self.name, checked, generation, &self.health).map_err(|e| {
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
        let report = install(self, fresh, wanted, drain_timeout);
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.retain(|(digest, _)| *digest != report.old.digest);
        history.push((report.old.digest.clone(), current.driver));
        if history.len() > super::call::HISTORY {
            history.remove(0);
        }
        Ok(report)
    }

    fn previous(&self, digest: &str) -> Option<String> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.iter().rev().find(|(d, _)| d.eq_ignore_ascii_case(digest)).map(|(_, driver)| driver.clone())
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
                        faults: super::stats::faults(&t),
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
                    me.calls.end(pending, r.as_ref().err().map(|e| super::stats::error_kind_index(e.kind().as_str())));
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
            let swap = self.swap(ctx, None, None, None, None, drain_timeout)?;
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
/// The swap itself, once the replacement is loaded, constructed, initialised and healthy: one pointer
/// store (requests never wait; a call in flight keeps the driver it started with), the backend up
/// under its new configuration, the old driver retired once its calls are done.
fn install<I: Interface>(b: &Backend<I>, fresh: Active<I>, wanted: Configured, drain_timeout: Duration) -> SwapReport {
    let generation = fresh.generation;
    let new = fresh.info.reference(true);
    let started = Instant::now();
    let old = b.active.replace(fresh);
    let swap_us = started.elapsed().as_micros() as u64;
    *b.init.lock().unwrap_or_else(|p| p.into_inner()) = InitState::Done;
    *b.configured.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
    b.set_health(Health::Up);
    log::info!(
        "{} backend {:?}: swapped in {} {} [{}] (generation {generation})",
        b.service,
        b.name,
        new.name,
        new.version,
        new.digest
    );
    let old = retire::<I>(old, drain_timeout, b.service, &b.name);
    SwapReport { backend: b.name.clone(), generation, old, new, swap_us }
}

pub(super) fn retire<I: Interface>(
    old: Retired<Active<I>>,
    timeout: Duration,
    service: &'static str,
    backend: &str,
) -> DriverRef {
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

#[cfg(test)]
mod tests {
    use super::*;
    use plughost_api::{CapacityStats, DriverError, Volume, VolumeClient, VolumeDriver, VolumeInterface, VolumeMethod};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Mutex};

    /// A driver that says which one it is, counts its cleanups, and can hold a `get` until told.
    struct Marked {
        id: u64,
        cleanups: Arc<AtomicUsize>,
        hold: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
    }

    impl VolumeDriver for Marked {
        fn create(&self, _: &str, _: u64) -> Result<Volume, DriverError> {
            Err(DriverError::unsupported("test driver"))
        }
        fn delete(&self, _: &str) -> Result<(), DriverError> {
            Err(DriverError::unsupported("test driver"))
        }
        fn extend(&self, _: &str, _: u64) -> Result<Volume, DriverError> {
            Err(DriverError::unsupported("test driver"))
        }
        fn snapshot(&self, _: &str, _: &str) -> Result<Volume, DriverError> {
            Err(DriverError::unsupported("test driver"))
        }
        fn list(&self) -> Result<Vec<Volume>, DriverError> {
            Ok(Vec::new())
        }
        fn get(&self, name: &str) -> Result<Volume, DriverError> {
            let held = self.hold.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((entered, release)) = held {
                entered.send(()).expect("the test waits for the call to enter");
                release.recv().expect("the test releases the call");
            }
            Ok(Volume { name: name.to_owned(), size: self.id, ..Volume::default() })
        }
        fn stats(&self) -> Result<CapacityStats, DriverError> {
            Ok(CapacityStats::default())
        }
        fn cleanup(&self) -> Result<(), DriverError> {
            self.cleanups.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn marked(id: u64, cleanups: &Arc<AtomicUsize>) -> Marked {
        Marked { id, cleanups: cleanups.clone(), hold: Mutex::new(None) }
    }

    fn object(d: Marked) -> Box<dyn VolumeDriver> {
        Box::new(VolumeClient::in_process(d))
    }

    /// The replacement as a swap would have prepared it, generation `generation`.
    fn fresh(d: Marked, generation: u64) -> Active<VolumeInterface> {
        let info = DriverInfo {
            name: "next".to_owned(),
            version: generation.to_string(),
            api_version: plughost_api::API_VERSION.to_owned(),
            path: std::path::PathBuf::new(),
            digest: format!("test:{generation}"),
            size: 0,
            loaded_at: std::time::SystemTime::now(),
        };
        Active {
            driver: Driver::Other(object(d)),
            info,
            shown_options: BTreeMap::new(),
            init_error: None,
            generation,
            extensions: Vec::new(),
            supervisor: None,
            init_pending: false,
        }
    }

    fn size_of_get(b: &Backend<VolumeInterface>) -> u64 {
        b.call(VolumeMethod::get, |d| d.get("v")).expect("the backend serves").size
    }

    #[test]
    fn a_swap_serves_the_new_driver_at_once_and_retires_the_old_one_after_its_calls() {
        let old_cleanups = Arc::new(AtomicUsize::new(0));
        let new_cleanups = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let old = marked(1, &old_cleanups);
        *old.hold.lock().unwrap() = Some((entered_tx, release_rx));
        let b = Arc::new(Backend::<VolumeInterface>::in_process("volume", "x", object(old), "old"));
        b.set_health(Health::Up);
        // A call in flight on the old driver...
        let caller = {
            let b = b.clone();
            std::thread::spawn(move || size_of_get(&b))
        };
        entered_rx.recv().unwrap();
        // ...does not hold up the swap, which reports the old driver still draining.
        let wanted = Configured { driver: "next".into(), options: Vec::new(), settings: BackendSettings::default() };
        let report = install(&b, fresh(marked(2, &new_cleanups), 1), wanted.clone(), Duration::from_millis(50));
        assert_eq!((report.generation, report.old.draining), (1, true));
        assert_eq!(size_of_get(&b), 2, "new calls reach the new driver at once");
        assert_eq!(b.configured(), wanted);
        assert_eq!(old_cleanups.load(Ordering::SeqCst), 0, "not cleaned up while a call uses it");
        // The call finishes on the driver it started with; then the old driver is cleaned up, once.
        release_tx.send(()).unwrap();
        assert_eq!(caller.join().unwrap(), 1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while old_cleanups.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the old driver was never cleaned up");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(old_cleanups.load(Ordering::SeqCst), 1);
        assert_eq!(new_cleanups.load(Ordering::SeqCst), 0, "the new driver serves on");
        // With no call in flight, retirement is done by the time the swap answers.
        let report = install(&b, fresh(marked(3, &new_cleanups), 2), wanted, Duration::from_secs(10));
        assert_eq!((report.generation, report.old.draining), (2, false));
        assert_eq!(new_cleanups.load(Ordering::SeqCst), 1);
        assert_eq!(size_of_get(&b), 3);
    }

    #[test]
    fn a_backend_that_is_down_refuses_calls_until_a_swap_brings_it_up() {
        let cleanups = Arc::new(AtomicUsize::new(0));
        let b = Backend::<VolumeInterface>::in_process("volume", "x", object(marked(1, &cleanups)), "old");
        b.set_health(Health::Down("disk on fire".into()));
        let e = b.call(VolumeMethod::get, |d| d.get("v")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.message.contains("disk on fire"), "{e}");
        let wanted = Configured { driver: "next".into(), options: Vec::new(), settings: BackendSettings::default() };
        install(&b, fresh(marked(2, &cleanups), 1), wanted, Duration::from_secs(10));
        assert_eq!(size_of_get(&b), 2);
    }
}
