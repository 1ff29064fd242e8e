//! The supervisor of one isolated backend's worker: restarts with backoff, the circuit breaker, and the
//! `Transport` the kind's remote client calls.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use plughost_api::host::{Interface, Transport};
use plughost_api::{DriverError, ErrorKind};

use super::process::*;
use super::wire::*;
use crate::control::protocol::{Crash, WorkerState, WorkerStatus};
use crate::loading::error::{LoadError, LoadErrorKind};

/// The first restart waits this long; each further one twice as long.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between restarts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that served this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// This many crashes within [`CIRCUIT_WINDOW`] open the circuit.
const CIRCUIT_CRASHES: usize = 5;
/// See [`CIRCUIT_CRASHES`].
const CIRCUIT_WINDOW: Duration = Duration::from_secs(60);
/// A call that finds the worker restarting waits for the new one this long at most (and never past its
/// `call_timeout`), if the restart is due by then; otherwise it fails at once.
const RESTART_WAIT: Duration = Duration::from_secs(5);
/// [`Supervisor::spawn_worker`]'s phases of a worker, as its death callback sees them.
const SETTING_UP: u8 = 0;
const SERVING: u8 = 1;
const DIED_SETTING_UP: u8 = 2;

// ---------------------------------------------------------------------------------------------------
// The supervisor

struct SupervisorState {
    worker: Option<Arc<Worker>>,
    state: WorkerState,
    crashes: VecDeque<Instant>,
    total_crashes: u64,
    restarts: u64,
    last_crash: Option<Crash>,
    backoff: Duration,
    /// Bumped for each new worker, so that a death report of an old one is ignored.
    epoch: u64,
    /// Why the circuit is open, while it is.
    open_reason: Option<String>,
    /// When the next worker is due to start, while restarting after a crash (`None`: not scheduled).
    restart_at: Option<Instant>,
}

/// Keeps one isolated backend's worker running: restarts it after a crash (with backoff), opens the
/// circuit after too many, and answers calls while it is away.
pub struct Supervisor {
    config: WorkerConfig,
    library: OwnedFd,
    state: Mutex<SupervisorState>,
    changed: Condvar,
    /// Calls currently waiting on the worker, for `status`.
    in_flight: AtomicU64,
    /// Set once retired: no more restarts.
    stopped: AtomicBool,
    /// Bumped when a worker dies and when a new one takes over: an answer that spans a change says
    /// nothing about the current worker.
    incarnation: AtomicU64,
    /// Called with `Some(reason)` when the backend cannot serve (circuit open), `None` when it can again.
    on_health: Box<dyn Fn(Option<String>) + Send + Sync>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("backend", &self.config.setup.backend).finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Starts the first worker. A worker that dies or refuses during setup is an error (nothing is
    /// restarted for a driver that never served).
    pub fn start(
        config: WorkerConfig,
        library: OwnedFd,
        on_health: Box<dyn Fn(Option<String>) + Send + Sync>,
    ) -> Result<(Arc<Supervisor>, SetupReply), LoadError> {
        let sup = Arc::new(Supervisor {
            config,
            library,
            state: Mutex::new(SupervisorState {
                worker: None,
                state: WorkerState::Stopped,
                crashes: VecDeque::new(),
                total_crashes: 0,
                restarts: 0,
                last_crash: None,
                backoff: BACKOFF_START,
                epoch: 0,
                open_reason: None,
                restart_at: None,
            }),
            changed: Condvar::new(),
            in_flight: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            incarnation: AtomicU64::new(0),
            on_health,
        });
        let reply = sup.spawn_worker()?;
        Ok((sup, reply))
    }

    fn label(&self) -> String {
        format!("{} backend {:?}", self.config.setup.service, self.config.setup.backend)
    }

    /// Starts a worker and makes it current; reports its death to [`Self::died`].
    fn spawn_worker(self: &Arc<Supervisor>) -> Result<SetupReply, LoadError> {
        let epoch = {
            let mut st = lock(&self.state);
            st.epoch += 1;
            st.epoch
        };
        let weak = Arc::downgrade(self);
        // A death during setup is this call's error, reported to its caller only (a failed first
        // start or swap must not leave restarts behind); a death after it is a crash, reported once,
        // by whichever side sees it second.
        let phase = Arc::new(AtomicU8::new(SETTING_UP));
        let seen = phase.clone();
        let (worker, reply) = start_worker(&self.config, &self.library, move |why, retired| {
            let during_setup = seen.compare_exchange(SETTING_UP, DIED_SETTING_UP, Ordering::SeqCst, Ordering::SeqCst);
            if let (Some(sup), false, Err(_)) = (weak.upgrade(), retired, during_setup) {
                sup.died(epoch, why);
            }
        })?;
        if let SetupReply::Refused { .. } = &reply {
            worker.retired.store(true, Ordering::SeqCst);
            worker.kill();
            return Ok(reply);
        }
        let died_meanwhile = phase.compare_exchange(SETTING_UP, SERVING, Ordering::SeqCst, Ordering::SeqCst).is_err();
        {
            let mut st = lock(&self.state);
            if st.epoch == epoch {
                st.worker = Some(worker.clone());
                st.state = WorkerState::Running;
                st.restart_at = None;
                self.incarnation.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.changed.notify_all();
        if died_meanwhile {
            // It answered its setup and died before it was ours: a crash like any later one.
            self.died(epoch, worker.dead().unwrap_or_else(|| "the worker went away".to_owned()));
        }
        Ok(reply)
    }

    /// A worker died: counts the crash, then restarts it after the backoff or opens the circuit.
    fn died(self: &Arc<Supervisor>, epoch: u64, why: String) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let (wait, open) = {
            let mut st = lock(&self.state);
            // Every unexpected death is a crash, even of a worker already replaced (by `ctl restart`
            // right after the call that saw it die).
            let now = Instant::now();
            st.crashes.push_back(now);
            while st.crashes.front().is_some_and(|t| now.duration_since(*t) > CIRCUIT_WINDOW) {
                st.crashes.pop_front();
            }
            st.total_crashes += 1;
            let at = crate::util::time::unix_secs(SystemTime::now());
            st.last_crash = Some(Crash { reason: why.clone(), at });
            if st.epoch != epoch {
                return;
            }
            let served = st.worker.as_ref().map(|w| w.started.elapsed()).unwrap_or_default();
            st.worker = None;
            self.incarnation.fetch_add(1, Ordering::SeqCst);
            if served >= HEALTHY_AFTER {
                st.backoff = BACKOFF_START;
            }
            let open = st.crashes.len() >= CIRCUIT_CRASHES;
            // An opening circuit is `restarting` until the backend is down: status never shows an open
            // circuit on a backend that still says it is up.
            st.state = WorkerState::Restarting;
            let wait = st.backoff;
            st.backoff = (st.backoff * 2).min(BACKOFF_MAX);
            st.restart_at = (!open).then(|| now + wait);
            (wait, open)
        };
        self.changed.notify_all();
        if open {
            let reason = format!(
                "circuit open: {CIRCUIT_CRASHES} worker crashes within {}s, the last: {why}; not restarted until a swap, a reload or plughost ctl restart",
                CIRCUIT_WINDOW.as_secs()
            );
            log::error!("{}: {reason}", self.label());
            (self.on_health)(Some(reason.clone()));
            let mut st = lock(&self.state);
            // Unless something started a worker meanwhile (`ctl restart`, a swap).
            if st.epoch == epoch && st.state == WorkerState::Restarting {
                st.state = WorkerState::CircuitOpen;
                st.open_reason = Some(reason);
            }
            drop(st);
            self.changed.notify_all();
            return;
        }
        log::warn!("{}: {why}; restarting in {wait:?}", self.label());
        let sup = self.clone();
        let spawned = std::thread::Builder::new().name("worker-restart".to_owned()).spawn(move || {
            std::thread::sleep(wait);
            sup.restart(epoch + 1);
        });
        if let Err(e) = spawned {
            log::error!("{}: cannot start a thread to restart the worker: {e}", self.label());
        }
    }

    /// Starts a new worker unless something else did meanwhile.
    fn restart(self: &Arc<Supervisor>, expected_epoch: u64) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        {
            let st = lock(&self.state);
            if st.epoch + 1 != expected_epoch || st.state != WorkerState::Restarting {
                return;
            }
        }
        match self.spawn_worker() {
            Ok(SetupReply::Ready { init_error: None, .. }) => {
                let pid = lock(&self.state).worker.as_ref().map(|w| w.pid);
                lock(&self.state).restarts += 1;
                log::info!("{}: worker restarted (pid {})", self.label(), pid.unwrap_or(0));
                (self.on_health)(None);
            }
            Ok(SetupReply::Ready { init_error: Some(e), .. }) => {
                // It serves, but its driver is unhealthy: periodic health checks will say so.
                lock(&self.state).restarts += 1;
                log::warn!("{}: worker restarted, but {e}", self.label());
            }
            Ok(SetupReply::Refused { reason, .. }) => {
                let epoch = lock(&self.state).epoch;
                self.died(epoch, format!("refused the driver on restart: {reason}"));
            }
            Err(e) => {
                let epoch = lock(&self.state).epoch;
                self.died(epoch, e.reason);
            }
        }
    }

    /// `ctl restart`: closes the circuit and starts a fresh worker now (killing the current one).
    pub fn restart_now(self: &Arc<Supervisor>) -> Result<u32, LoadError> {
        let old = {
            let mut st = lock(&self.state);
            st.crashes.clear();
            st.backoff = BACKOFF_START;
            st.state = WorkerState::Restarting;
            st.open_reason = None;
            st.restart_at = Some(Instant::now());
            st.epoch += 1; // the old worker's death is not a crash
            st.worker.take()
        };
        // Replacing a live worker is not a crash; one that already died (its death not yet counted)
        // was one, and is counted as such.
        if let Some(w) = old.filter(|w| w.dead().is_none()) {
            w.retired.store(true, Ordering::SeqCst);
            w.kill();
        }
        let failed = match self.spawn_worker() {
            Ok(SetupReply::Ready { .. }) => {
                (self.on_health)(None);
                lock(&self.state).restarts += 1;
                return Ok(lock(&self.state).worker.as_ref().map(|w| w.pid).unwrap_or(0));
            }
            Ok(SetupReply::Refused { kind, reason, details }) => {
                let kind = LoadErrorKind::from_name(&kind).unwrap_or(LoadErrorKind::InvalidMetadata);
                LoadError::new(kind, &self.config.setup.path, reason).with_details(details)
            }
            Err(e) => e,
        };
        // No worker: a crash like any other, so that the backoff (or the circuit) takes over rather
        // than leaving the backend without a worker and nothing to start one.
        let epoch = lock(&self.state).epoch;
        self.died(epoch, format!("restart failed: {}", failed.reason));
        Err(failed)
    }

    /// Stops for good: no restarts; the worker is told to go (its socket closes) and killed if it does
    /// not within a second.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let worker = {
            let mut st = lock(&self.state);
            st.state = WorkerState::Stopped;
            st.worker.take()
        };
        self.changed.notify_all();
        if let Some(w) = worker {
            w.retired.store(true, Ordering::SeqCst);
            // The worker reads the end of the stream and exits.
            let _ = lock(&w.writer).shutdown(std::net::Shutdown::Both);
            let deadline = Instant::now() + Duration::from_secs(1);
            while w.dead().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if w.dead().is_none() {
                w.kill();
            }
        }
    }

    /// What status shows.
    pub fn status(&self) -> WorkerStatus {
        let st = lock(&self.state);
        WorkerStatus {
            pid: st.worker.as_ref().map(|w| w.pid),
            restarts: st.restarts,
            crashes: st.total_crashes,
            last_crash: st.last_crash.clone(),
            state: st.state,
        }
    }

    /// The current worker's pid.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.state).worker.as_ref().map(|w| w.pid)
    }

    /// Changes whenever a worker dies or a new one takes over.
    pub fn epoch(&self) -> u64 {
        self.incarnation.load(Ordering::SeqCst)
    }

    /// Sends one encoded call to the current worker.
    fn call(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>, DriverError> {
        let worker = {
            let mut st = lock(&self.state);
            let until = Instant::now() + self.config.call_timeout.min(RESTART_WAIT);
            loop {
                // A worker that died but is not replaced yet, or one restarting soon enough: wait for
                // the next one rather than fail a call that it would serve.
                let dead = matches!((&st.worker, st.state), (Some(w), WorkerState::Running) if w.dead().is_some());
                let soon = st.state == WorkerState::Restarting && st.restart_at.is_some_and(|t| t <= until);
                let now = Instant::now();
                if (dead || soon) && now < until && !self.stopped.load(Ordering::SeqCst) {
                    // Woken when the worker dies, a new one takes over, or the circuit opens; the
                    // short timeout covers a death noticed without a wake-up.
                    let step = (until - now).min(Duration::from_millis(50));
                    st = self.changed.wait_timeout(st, step).unwrap_or_else(|p| p.into_inner()).0;
                    continue;
                }
                break;
            }
            match (&st.worker, st.state) {
                (Some(w), WorkerState::Running) => w.clone(),
                (_, WorkerState::CircuitOpen) if st.open_reason.is_some() => {
                    let reason = st.open_reason.clone().unwrap_or_default();
                    return Err(DriverError::new(ErrorKind::DRIVER_CRASHED, format!("{}: {reason}", self.label())));
                }
                (_, state) => {
                    let last = st.last_crash.as_ref().map(|c| c.reason.as_str()).unwrap_or("no worker");
                    let what = match state {
                        WorkerState::CircuitOpen => "circuit open",
                        WorkerState::Stopped => "stopped",
                        _ => "restarting",
                    };
                    return Err(DriverError::new(
                        ErrorKind::DRIVER_CRASHED,
                        format!("{}: worker {what}; the last one: {last}", self.label()),
                    ));
                }
            }
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let r = worker.call(payload, self.config.call_timeout);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        r.map_err(|e| match e {
            CallError::Died(why) => {
                DriverError::new(ErrorKind::DRIVER_CRASHED, format!("{}: {method}: the {why}", self.label()))
            }
            CallError::Timeout => {
                let late = format!(
                    "{method} did not answer within {}s (call_timeout)",
                    self.config.call_timeout.as_secs_f64()
                );
                log::error!("{}: {late}; killing worker {}", self.label(), worker.pid);
                worker.kill_for(late.clone());
                DriverError::new(
                    ErrorKind::TIMEOUT,
                    format!("{}: {late}; the worker was killed and is restarted", self.label()),
                )
            }
        })
    }
}

/// The transport of an isolated backend's remote driver: typed calls encoded for the supervisor.
pub struct SupervisedTransport<I: Interface> {
    supervisor: Arc<Supervisor>,
    _kind: std::marker::PhantomData<fn() -> I>,
}

impl<I: Interface> SupervisedTransport<I> {
    /// A transport to `supervisor`'s worker.
    pub fn new(supervisor: Arc<Supervisor>) -> SupervisedTransport<I> {
        SupervisedTransport { supervisor, _kind: std::marker::PhantomData }
    }
}

impl<I: Interface> Transport<I> for SupervisedTransport<I> {
    fn call(&self, call: I::Call) -> Result<I::Reply, DriverError> {
        let method = I::METHODS.get(I::method_index(I::method(&call))).copied().unwrap_or("call");
        let payload = postcard::to_stdvec(&call)
            .map_err(|e| DriverError::internal(format!("cannot encode a call of {method}: {e}")))?;
        let answer = self.supervisor.call(method, &payload)?;
        postcard::from_bytes(&answer)
            .map_err(|e| DriverError::internal(format!("cannot decode the answer to {method}: {e}")))
    }
}
