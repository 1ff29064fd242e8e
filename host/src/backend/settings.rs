//! What a backend is configured with, apart from its driver's options: a leaf that the configuration
//! (which reads it) and the backend (which obeys it) share.

use std::time::Duration;

/// What the host does around a backend's driver (not driver options: the driver never sees them).
/// Which kind-specific settings a kind of service accepts is in `ServiceKind::settings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSettings {
    /// At a graceful stop, stop this backend's instances first. Off by default: instances outlive the
    /// host, and a restarted host re-adopts them.
    pub stop_instances_on_exit: bool,
    /// The only driver content this backend loads (`blake3:…`), at start, swap and reload.
    pub digest: Option<String>,
    /// Where the driver runs: in the host, or in a worker process.
    pub isolation: Isolation,
    /// An isolated backend's worker runs as this user (name or uid).
    pub user: Option<String>,
    /// ...and this group (name or gid; default: the user's primary group).
    pub group: Option<String>,
    /// An isolated backend's worker's address-space limit, bytes.
    pub memory_limit: Option<u64>,
    /// How long one call to an isolated backend may take before it is answered `timeout` and the
    /// worker killed.
    pub call_timeout: Duration,
    /// The largest answer an isolated backend's worker may send (one frame, a listing included); a
    /// larger one kills the worker as misbehaving.
    pub max_frame_bytes: u64,
    /// The most records this backend may hold by adoption: a reconcile adopts resources its driver
    /// lists without a record only up to it (the rest are refused and counted), so that no driver can
    /// make the host hold unbounded records. Records made by requests are not limited by it.
    pub max_records: u64,
}

impl Default for BackendSettings {
    fn default() -> BackendSettings {
        BackendSettings {
            stop_instances_on_exit: false,
            digest: None,
            isolation: Isolation::InProcess,
            user: None,
            group: None,
            memory_limit: None,
            call_timeout: Duration::from_secs(60),
            max_frame_bytes: 16 << 20,
            max_records: 1_000_000,
        }
    }
}

/// Where a backend's driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// In the host process: fastest, and the driver is trusted with everything the host has.
    #[default]
    InProcess,
    /// In a worker process: no fault of the driver can take the host down.
    Process,
}

impl Isolation {
    /// `in-process` or `process`.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::InProcess => "in-process",
            Isolation::Process => "process",
        }
    }
}

/// One backend to start: a name, a driver spec (PATH or NAME) and raw options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Backend name, unique within its service.
    pub name: String,
    /// PATH or NAME as given.
    pub driver: String,
    /// Raw `(key, value)` options, validated later against the driver's schema.
    pub options: Vec<(String, String)>,
    /// Host-level settings.
    pub settings: BackendSettings,
}
