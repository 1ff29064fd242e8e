//! A host's report in the services table (the bucket `ph_<fleet>_hosts`, under its host name). The host
//! writes it; `fleet status`, `ctl --host` (versions) and `place` read it. Liveness is not in it: the
//! reader computes it from the entry's server-side timestamp, so the hosts' clocks do not matter.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A host, as it reports itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Its name in the fleet.
    pub host: String,
    /// The fleet.
    pub fleet: String,
    /// plughost's version.
    pub version: String,
    /// The control protocol version it speaks (ops newer than it are refused by callers).
    pub api: u32,
    /// The driver API version it loads (`plughost-api`).
    pub plugin_api: String,
    /// When it started, seconds since the epoch (its own clock; informational).
    pub started_at: u64,
    /// `up`, `degraded` or `stopping`.
    pub state: HostState,
    /// The host's `service_down_time`, in milliseconds: readers call it down when its last report is
    /// older (0: the reader's default).
    #[serde(default)]
    pub service_down_time_ms: u64,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its services.
    pub services: Vec<ServiceReport>,
}

/// A host's state as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Every backend is up.
    Up,
    /// Some backend is down.
    Degraded,
    /// A graceful stop has begun.
    Stopping,
}

impl HostState {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Degraded => "degraded",
            HostState::Stopping => "stopping",
        }
    }
}

/// One service of a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceReport {
    /// `volume`, `compute`.
    pub name: String,
    /// The default backend.
    pub default_backend: String,
    /// Its backends.
    pub backends: Vec<BackendReport>,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendReport {
    /// Its name.
    pub name: String,
    /// Whether it serves.
    pub up: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Driver name.
    pub driver: String,
    /// Driver version.
    pub driver_version: String,
    /// Driver file digest.
    pub digest: String,
    /// Extensions the driver provides.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Total bytes (kinds with a capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Free bytes (kinds with a capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// Records held.
    pub records: u64,
    /// Driver calls that failed lately (since the host started, or since the last report for isolated
    /// workers' crashes): the `failures` weigher.
    #[serde(default)]
    pub failures: u64,
}

impl Report {
    /// Whether a report `age` old means the host is down (by the host's own `service_down_time`, else
    /// `default`).
    pub fn is_down(&self, age: std::time::Duration, default: std::time::Duration) -> bool {
        let limit = if self.service_down_time_ms > 0 {
            std::time::Duration::from_millis(self.service_down_time_ms)
        } else {
            default
        };
        age > limit
    }

    /// A backend of a service: the one named, or the service's default.
    pub fn backend(&self, service: &str, backend: Option<&str>) -> Option<&BackendReport> {
        let s = self.services.iter().find(|s| s.name == service)?;
        let name = backend.unwrap_or(&s.default_backend);
        s.backends.iter().find(|b| b.name == name)
    }
}
