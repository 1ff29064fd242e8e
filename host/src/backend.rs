//! A backend: one constructed driver serving a service, with its health and per-method call statistics.
//! Managers call drivers only through [`Backend::call`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use plugin_api::DriverError;
use serde_json::{json, Value};

use crate::loader::Library;

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

/// Calls, errors and latency of one driver method.
#[derive(Debug, Default, Clone)]
pub struct CallStats {
    /// Calls made.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Sum of latencies.
    pub total: Duration,
    /// Slowest call.
    pub max: Duration,
}

/// Whether a backend can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Initialised and last health check passed.
    Up,
    /// `init` failed, or the last health check failed; the reason says which.
    Down(String),
}

/// One constructed driver and its bookkeeping.
#[derive(Debug)]
pub struct Backend<D> {
    /// Backend name within its service.
    pub name: String,
    /// The library the driver came from.
    pub library: Library,
    /// Options as shown in status (secrets replaced by `(secret)`).
    pub shown_options: Vec<(String, String)>,
    driver: Arc<D>,
    initialised: bool,
    health: Mutex<(Health, SystemTime)>,
    calls: Mutex<BTreeMap<&'static str, CallStats>>,
    in_flight: AtomicUsize,
}

impl<D> Backend<D> {
    /// A backend for `driver`, whose `init` result is `init`.
    pub fn new(
        name: &str,
        library: Library,
        shown_options: Vec<(String, String)>,
        driver: D,
        init: Result<(), DriverError>,
    ) -> Backend<D> {
        let health = match &init {
            Ok(()) => Health::Up,
            Err(e) => Health::Down(format!("driver init failed: {}", e.message())),
        };
        Backend {
            name: name.to_owned(),
            library,
            shown_options,
            driver: Arc::new(driver),
            initialised: init.is_ok(),
            health: Mutex::new((health, SystemTime::now())),
            calls: Mutex::new(BTreeMap::new()),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Calls the driver, recording count, errors and latency under `op`. Refuses with `unavailable`
    /// when the driver never initialised.
    pub fn call<T>(&self, op: &'static str, f: impl FnOnce(&D) -> Result<T, DriverError>) -> Result<T, ApiError> {
        if !self.initialised {
            let reason = match self.health() {
                Health::Down(r) => r,
                Health::Up => "driver not initialised".to_owned(),
            };
            return Err(ApiError::new("unavailable", format!("backend {:?} is down: {reason}", self.name)));
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        let r = f(&self.driver);
        let took = start.elapsed();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Ok(mut calls) = self.calls.lock() {
            let s = calls.entry(op).or_default();
            s.count += 1;
            s.errors += u64::from(r.is_err());
            s.total += took;
            s.max = s.max.max(took);
        }
        r.map_err(ApiError::from)
    }

    /// The driver itself, for lifecycle calls (`health`, `cleanup`).
    pub fn driver(&self) -> &D {
        &self.driver
    }

    /// Whether `init` succeeded.
    pub fn initialised(&self) -> bool {
        self.initialised
    }

    /// Requests currently inside the driver.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.health.lock().map(|h| h.0.clone()).unwrap_or(Health::Down("health lock poisoned".to_owned()))
    }

    /// Records the result of a health check (ignored while the driver is not initialised).
    pub fn set_health(&self, result: Result<(), DriverError>) {
        if !self.initialised {
            return;
        }
        let h = match result {
            Ok(()) => Health::Up,
            Err(e) => Health::Down(format!("driver unhealthy: {}", e.message())),
        };
        if let Ok(mut g) = self.health.lock() {
            if g.0 != h {
                match &h {
                    Health::Up => log::info!("backend {:?} is up again", self.name),
                    Health::Down(r) => log::warn!("backend {:?}: {r}", self.name),
                }
            }
            *g = (h, SystemTime::now());
        }
    }

    /// The status object for this backend.
    pub fn status(&self, default: bool) -> Value {
        let (state, reason) = match self.health() {
            Health::Up => ("up", None),
            Health::Down(r) => ("down", Some(r)),
        };
        let calls: serde_json::Map<String, Value> = self
            .calls
            .lock()
            .map(|c| {
                c.iter()
                    .map(|(op, s)| {
                        let mean_us = (s.total.as_micros() as u64).checked_div(s.count).unwrap_or(0);
                        (
                            (*op).to_owned(),
                            json!({"count": s.count, "errors": s.errors, "mean_us": mean_us, "max_us": s.max.as_micros() as u64}),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let options: serde_json::Map<String, Value> =
            self.shown_options.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        json!({
            "name": self.name,
            "default": default,
            "state": state,
            "reason": reason,
            "driver": {
                "name": self.library.name(),
                "kind": self.library.kind().as_str(),
                "version": self.library.version(),
                "api_version": self.library.api_version(),
                "path": self.library.path.display().to_string(),
                "digest": self.library.digest,
                "loaded_at": unix_secs(self.library.loaded_at),
            },
            "options": options,
            "in_flight": self.in_flight(),
            "calls": calls,
        })
    }
}

/// Seconds since the epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
