//! The control-socket protocol's types: errors, the arguments and answers every service shares, sizes,
//! and status, shared by the server, `plughost ctl` and the tests. Reading and writing request lines is
//! `request.rs`. The wire format is `docs/protocol.md`; `tests/tests/integration/protocol.rs` checks every example there
//! against these types.
//!
//! Per-kind operations and records live with their service (`services/volume.rs`, ...); this module
//! imports nothing from the services (they build on it).
//!
//! The answer of `status` is `status.rs`'s (re-exported here).

use std::fmt;

use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use super::status::{
    BackendStatus, CallStatus, Capacity, Crash, DriverStatus, HostStatus, LibrariesStatus, ReconcileCounts,
    ServiceStatus, State, TrustStatus, WorkerState, WorkerStatus,
};

/// What kind of error an answer carries. Serialized as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The named resource does not exist (driver or host).
    NotFound,
    /// An argument is not acceptable: wrong type, out of range, bad name.
    InvalidArgument,
    /// A resource with that name exists already.
    AlreadyExists,
    /// The driver does not implement this operation.
    Unsupported,
    /// The resource is busy; retrying later may work.
    Busy,
    /// Any other failure inside the driver or the host.
    Internal,
    /// Driver code panicked (contained).
    Panicked,
    /// Not enough capacity.
    NoCapacity,
    /// The worker process serving an isolated backend died during the call (it is restarted).
    DriverCrashed,
    /// A call to an isolated backend took longer than its `call_timeout`; the worker was killed.
    Timeout,
    /// The request is malformed: not JSON, not an object, unknown operation, line too long.
    InvalidRequest,
    /// No such service, or the service is not enabled.
    UnknownService,
    /// The backend cannot serve: its driver failed to initialise or its health check fails.
    Unavailable,
    /// The host is stopping and takes no new requests.
    ShuttingDown,
    /// A swap was refused; the old driver keeps serving.
    SwapFailed,
    /// A reload found the configuration invalid; nothing changed.
    InvalidConfig,
    /// A driver file refused by the trust policy, a pinned digest or the allow list; nothing changed.
    UntrustedDriver,
    /// The peer may not do this (it is a reader, not an admin; or a swap path outside the driver dirs).
    PermissionDenied,
    /// A kind this version does not know (from a newer host or driver).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Busy => "busy",
            ErrorKind::Internal => "internal",
            ErrorKind::Panicked => "panicked",
            ErrorKind::NoCapacity => "no_capacity",
            ErrorKind::DriverCrashed => "driver_crashed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::UnknownService => "unknown_service",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::SwapFailed => "swap_failed",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::UntrustedDriver => "untrusted_driver",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answered on the control socket: a kind and one line naming the resource concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What kind of error.
    pub kind: ErrorKind,
    /// One line, lowercase, naming the resource.
    pub message: String,
}

impl ApiError {
    /// An error of any kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into() }
    }
    /// `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InvalidArgument, message)
    }
    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::NotFound, message)
    }
    /// `internal`.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Internal, message)
    }
}

impl From<plughost_api::DriverError> for ApiError {
    fn from(e: plughost_api::DriverError) -> ApiError {
        use plughost_api::ErrorKind as K;
        let kind = match e.kind() {
            K::NOT_FOUND => ErrorKind::NotFound,
            K::INVALID_ARGUMENT => ErrorKind::InvalidArgument,
            K::ALREADY_EXISTS => ErrorKind::AlreadyExists,
            K::UNSUPPORTED => ErrorKind::Unsupported,
            K::BUSY => ErrorKind::Busy,
            K::INTERNAL => ErrorKind::Internal,
            K::PANICKED => ErrorKind::Panicked,
            K::NO_CAPACITY => ErrorKind::NoCapacity,
            K::DRIVER_CRASHED => ErrorKind::DriverCrashed,
            K::TIMEOUT => ErrorKind::Timeout,
            _ => ErrorKind::Unknown,
        };
        ApiError { kind, message: e.message().to_owned() }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

// ---------------------------------------------------------------------------------------------------
// Arguments and records shared by every service

/// Arguments of `audit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditArgs {
    /// Only entries at or after this time, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// One entry of the audit log (`STATE_DIR/audit.log`, one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
    /// When, seconds since the epoch.
    pub at: u64,
    /// The peer's uid (socket requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The peer's pid (socket requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How the request came: `socket` or `fleet`.
    #[serde(default = "via_socket")]
    pub via: String,
    /// The broker user of a request through the fleet, as its reply subject names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The service, for service operations and swaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The operation.
    pub op: String,
    /// Its arguments as sent (verbatim: large numbers stay as written), unless they were larger than an
    /// entry keeps (then `args_bytes` says how large).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Box<RawValue>>,
    /// The size of arguments too large to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_bytes: Option<u64>,
    /// `ok`, or the error kind.
    pub outcome: String,
    /// The error message, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn via_socket() -> String {
    "socket".to_owned()
}

/// The answer to `metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsText {
    /// `openmetrics-text`.
    pub format: String,
    /// The metrics, ending with `# EOF`.
    pub text: String,
}

/// Arguments of `swap`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapArgs {
    /// The backend (default: the service's default backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// PATH or NAME of the new driver (default: the configured one, loaded again; or, with `digest`,
    /// the driver with that content this backend ran before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The new driver's content must have this digest (`blake3:` and 64 hex digits): checked before
    /// anything of it is loaded; another content is refused as `untrusted_driver`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The fleet rollout this swap is part of (recorded in the audit log and the host's log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// Only check: resolve the driver and run every check a swap runs before loading (the trust
    /// policy, the pin, `digest`), and answer a [`SwapCheck`]; nothing is loaded or changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// The answer to `swap` with `dry_run`: what a swap would load, and what serves now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapCheck {
    /// The backend.
    pub backend: String,
    /// Always `true`.
    pub dry_run: bool,
    /// The driver serving now.
    pub current: DriverRef,
    /// The PATH or NAME a swap would load.
    pub driver: String,
    /// The file it resolves to.
    pub path: String,
    /// That file's content digest.
    pub digest: String,
}

/// A size in bytes: a non-negative integer, or a string with a unit (`"10MiB"`). It serializes the way
/// it was written.
#[derive(Debug, Clone)]
pub struct Size {
    bytes: u64,
    written: Option<String>,
}

impl Size {
    /// A size given in bytes.
    pub fn bytes(bytes: u64) -> Size {
        Size { bytes, written: None }
    }
    /// A size written with a unit, as a user would (`"10MiB"`).
    pub fn parse(text: &str) -> Result<Size, String> {
        plughost_api::parse_size(text).map(|bytes| Size { bytes, written: Some(text.to_owned()) })
    }
    /// The number of bytes.
    pub fn get(&self) -> u64 {
        self.bytes
    }
}

impl PartialEq for Size {
    fn eq(&self, other: &Size) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for Size {}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.written {
            Some(t) => s.serialize_str(t),
            None => s.serialize_u64(self.bytes),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        const EXPECTED: &str = "a size in bytes: a non-negative integer or a string such as \"10MiB\"";
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size::bytes(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size::bytes).map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Size, E> {
                if v < 0.0 {
                    Err(E::custom(format!("size {v} is negative")))
                } else if v >= 18_446_744_073_709_551_616.0 {
                    Err(E::custom(format!("size {v} is too large (at most {} bytes)", u64::MAX)))
                } else {
                    Err(E::custom(format!("size {v} is not a whole number of bytes")))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                Size::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Size, String> {
        Size::parse(text)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes)
    }
}

// ---------------------------------------------------------------------------------------------------
// Answers shared by every service

/// `{"name": N, "deleted": true}` / `{"name": N, "destroyed": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The resource.
    pub name: String,
    /// `deleted` for volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<bool>,
    /// `destroyed` for instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<bool>,
}

/// The answer to `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// Always `true`.
    pub pong: bool,
}

/// A driver as a swap reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverRef {
    /// Driver name.
    pub name: String,
    /// Driver version.
    pub version: String,
    /// Content digest.
    pub digest: String,
    /// Where it was loaded from (the new driver only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The old driver still had calls in flight when the swap answered; it is cleaned up once they end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// The answer to `swap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapReport {
    /// The backend.
    pub backend: String,
    /// Its new generation (swaps so far).
    pub generation: u64,
    /// The driver replaced.
    pub old: DriverRef,
    /// The driver now serving.
    pub new: DriverRef,
    /// How long the replacement itself took.
    pub swap_us: u64,
}

/// Arguments of `restart`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartArgs {
    /// The backend (default: the service's default backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// The answer to `restart`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartReport {
    /// The backend.
    pub backend: String,
    /// `process`: a fresh worker serves; `in-process`: the configured driver was loaded again.
    pub isolation: String,
    /// The new worker's pid, for an isolated backend.
    pub worker_pid: Option<u32>,
    /// The backend's driver generation.
    pub generation: u64,
}

/// What a reload did with one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The driver or its options changed and the new one serves.
    Swapped,
    /// Only host-level settings changed: they apply now, the driver keeps serving.
    Updated,
    /// Nothing changed.
    Unchanged,
    /// The change was refused; the old driver serves.
    Failed,
    /// The change needs a restart (adding or removing a backend or a service).
    Ignored,
}

/// One entry of the answer to `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadEntry {
    /// The service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// What happened.
    pub outcome: Outcome,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why it was ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The swap, when swapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapReport>,
}

/// The control protocol version this host speaks (in its reports, and in `Plughost-Api` when it calls).
/// Raise it when an operation is added; [`op_since`] says which version brought each.
pub const PROTOCOL_VERSION: u32 = 2;

/// The protocol version that brought an operation (`ctl --host` refuses to send one to a host that
/// reports an older version, as nova's `can_send_version`).
pub fn op_since(_service: Option<&str>, _op: &str) -> u32 {
    // Every operation of today is in version 1; a later one is listed here with its version.
    1
}

/// The protocol version that brought `swap`'s `digest`, `rollout` and `dry_run` (version 1 hosts refuse
/// them as unknown fields): what `fleet swap` needs of every host.
pub const SWAP_DIGEST_SINCE: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_error_kinds_pass_through() {
        for (k, name) in
            [(plughost_api::ErrorKind::NOT_FOUND, "not_found"), (plughost_api::ErrorKind::PANICKED, "panicked")]
        {
            let e = ApiError::from(plughost_api::DriverError::new(k, "m"));
            assert_eq!(e.kind.as_str(), name);
        }
    }
}
