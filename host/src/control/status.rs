//! What `status` answers: one tree of types (host, services, backends, drivers, calls, capacity,
//! workers, libraries, trust, reconcile counts).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------------
// Status

/// Whether something can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Serving.
    Up,
    /// Some backends serve, some do not.
    Degraded,
    /// Not serving; the reason says why.
    Down,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Up => "up",
            State::Degraded => "degraded",
            State::Down => "down",
        })
    }
}

/// The answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    /// The host's pid.
    pub pid: u32,
    /// Time since start.
    pub uptime_ms: u64,
    /// The control socket.
    pub socket: String,
    /// Requests being handled.
    pub in_flight: u64,
    /// Each enabled service.
    pub services: Vec<ServiceStatus>,
    /// Driver libraries mapped into the host.
    pub libraries: LibrariesStatus,
    /// Which driver code may load.
    #[serde(default)]
    pub trust: TrustStatus,
    /// The host's fleet connection, when it is in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<plughost_fleet::AgentStatus>,
}

impl HostStatus {
    /// What a health check reports: whether some service has no backend up, and one line per backend
    /// that is down and for a fleet the host is not connected to (`ctl health`, `/healthz`).
    pub fn problems(&self) -> (bool, Vec<String>) {
        let mut problems = Vec::new();
        let mut down = false;
        for s in &self.services {
            down |= !s.backends.iter().any(|b| b.state == State::Up);
            for b in s.backends.iter().filter(|b| b.state != State::Up) {
                let why = b.reason.as_deref().unwrap_or("no reason given");
                problems.push(format!("{} backend {:?} {}: {why}", s.name, b.name, b.state));
            }
        }
        if let Some(f) = self.fleet.as_ref().filter(|f| f.state != "connected") {
            problems.push(format!("fleet {}: {} since {}", f.fleet, f.state, crate::util::time::utc(f.since)));
        }
        (down, problems)
    }
}

/// The trust settings in effect, in [`HostStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrustStatus {
    /// Driver files others could write are refused.
    pub strict: bool,
    /// The allow list file, if any.
    pub allowlist: Option<String>,
    /// Every backend must pin a digest.
    pub require_pins: bool,
    /// `swap` may name a path outside the driver directories.
    pub allow_swap_paths: bool,
    /// The group that may read through the socket.
    pub socket_group: Option<String>,
    /// What is weaker than the default, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// One service in [`HostStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// `volume`, `compute`, ...
    pub name: String,
    /// Up when every backend is, down when none is.
    pub state: State,
    /// The down backends and why.
    pub reason: Option<String>,
    /// Time since the service's periodic task last ran.
    pub heartbeat_age_ms: Option<u64>,
    /// The backend used when a request names none.
    pub default_backend: String,
    /// Each backend.
    pub backends: Vec<BackendStatus>,
    /// How many records there are.
    #[serde(default)]
    pub records: u64,
    /// What the last reconcile of the records with the drivers decided (at start, and when a backend
    /// that was down came back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile: Option<ReconcileCounts>,
}

/// One backend in [`ServiceStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Backend name.
    pub name: String,
    /// Whether it is the service's default.
    pub default: bool,
    /// Up or down.
    pub state: State,
    /// Why it is down.
    pub reason: Option<String>,
    /// The active driver.
    pub driver: DriverStatus,
    /// The digest this backend is pinned to, if any.
    #[serde(default)]
    pub pinned: Option<String>,
    /// Where its driver runs: `in-process` or `process`.
    #[serde(default)]
    pub isolation: String,
    /// Its worker, for an isolated backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerStatus>,
    /// Options as validated (secrets shown as `(secret)`).
    pub options: BTreeMap<String, String>,
    /// Per-method call statistics.
    pub calls: BTreeMap<String, CallStatus>,
    /// Capacity, for kinds that have one.
    pub capacity: Option<Capacity>,
}

/// The active driver of a backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriverStatus {
    /// Driver name.
    pub name: String,
    /// Driver kind.
    pub kind: String,
    /// Driver version.
    pub version: String,
    /// Plugin API version it was built against.
    pub api_version: String,
    /// The file it was loaded from.
    pub path: String,
    /// The PATH or NAME configured.
    pub configured: String,
    /// Content digest.
    pub digest: String,
    /// File size.
    pub size: u64,
    /// Load time, seconds since the epoch.
    pub loaded_at: u64,
    /// Swaps so far.
    pub generation: u64,
    /// Extensions the driver provides (methods added by later plugin API versions).
    #[serde(default)]
    pub extensions: Vec<String>,
}

/// Statistics of one driver method.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CallStatus {
    /// Calls.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Of those, the driver's own faults (`internal`, `panicked`, `driver_crashed`, `timeout`, and kinds
    /// this host does not know) rather than answers about the request (`not_found`, `busy`, ...): what a
    /// rollout's error rate counts.
    #[serde(default)]
    pub faults: u64,
    /// Calls whose latency was timed.
    pub sampled: u64,
    /// Mean of the timed latencies.
    pub mean_us: u64,
    /// Largest timed latency.
    pub max_us: u64,
}

/// A backend's capacity (the one type for what a driver reports, what `stats` answers and what status
/// shows, as last refreshed by the periodic task).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Total bytes.
    pub total_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Sum of provisioned sizes.
    pub provisioned_bytes: u64,
    /// Sum of allocated bytes.
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Number of resources.
    pub volumes: u64,
}

impl From<plughost_api::CapacityStats> for Capacity {
    fn from(s: plughost_api::CapacityStats) -> Capacity {
        let plughost_api::CapacityStats { total_bytes, free_bytes, provisioned_bytes, allocated_bytes, volumes } = s;
        Capacity { total_bytes, free_bytes, provisioned_bytes, allocated_bytes, volumes }
    }
}

/// Driver libraries mapped into the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LibrariesStatus {
    /// Distinct contents mapped.
    pub mapped: u64,
    /// Their total size.
    pub mapped_bytes: u64,
    /// Mapped but not used by any backend (swapped out, or loaded and refused).
    pub retired: u64,
    /// Their total size.
    pub retired_bytes: u64,
    /// Why they stay.
    pub note: String,
}

/// Where a backend's worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Serving.
    Running,
    /// Crashed; a new worker starts after the backoff.
    Restarting,
    /// Too many crashes: not restarted until a swap, a reload or `ctl restart`.
    CircuitOpen,
    /// Stopped (retired, or the host is stopping).
    Stopped,
}

/// The last crash of a backend's worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crash {
    /// How it died.
    pub reason: String,
    /// When, seconds since the epoch.
    pub at: u64,
}

/// What status shows of an isolated backend's worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The current worker's pid.
    pub pid: Option<u32>,
    /// Restarts after crashes so far.
    pub restarts: u64,
    /// Crashes so far.
    pub crashes: u64,
    /// The last crash.
    pub last_crash: Option<Crash>,
    /// Where it is in its life.
    pub state: WorkerState,
}

/// The counts of one reconcile of one service (all its backends), as `status` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileCounts {
    /// When it ran, seconds since the epoch.
    pub at: u64,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// Records examined.
    pub records: u64,
    /// Records refreshed from their driver.
    pub refreshed: u64,
    /// Interrupted operations finished.
    pub completed: u64,
    /// Interrupted operations undone.
    pub undone: u64,
    /// Records the driver no longer has (kept as `error`).
    pub missing: u64,
    /// Resources found without a record and adopted.
    pub adopted: u64,
    /// Interrupted operations that could not be finished (records in `error`).
    pub failed: u64,
    /// Backends that could not be asked (down, or their list failed): their records are kept as they are.
    pub skipped_backends: u64,
    /// Entries of a driver's listing refused as no user input would be accepted (a name that is not a
    /// name, a size the records cannot hold): logged once each, never recorded.
    #[serde(default)]
    pub refused: u64,
}
