//! The control-socket protocol as types: requests, answers, errors, records and status, shared by the
//! server, `plughost ctl` and the tests. JSON exists only at the edge: [`parse_request`] turns a line
//! into a [`Request`], [`answer`] turns a result into a line; everything between is typed. The wire
//! format is `docs/protocol.md`; `tests/protocol.rs` checks every example there against these types.
//!
//! Per-kind operations and records live with their service (`services/volume.rs`, ...); this module
//! imports nothing from the services (they build on it).
//!
//! Why this file is long: it is the whole wire contract in one place on purpose (every request, answer,
//! error and status type), so that the server, `ctl` and the tests share it and review sees it whole.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeOwned, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
// Requests

/// A parsed request line.
#[derive(Debug)]
pub struct Request<'a> {
    /// The `id` as it was written, echoed back verbatim.
    pub id: Option<&'a RawValue>,
    /// What is asked.
    pub body: Body<'a>,
}

/// What a request asks.
#[derive(Debug)]
pub enum Body<'a> {
    /// `ping`: is the host serving.
    Ping,
    /// `status`: services, backends, drivers, health, statistics.
    Status,
    /// `reload`: re-read the configuration, swap what changed.
    Reload,
    /// `audit`: the audit log's entries (admins only).
    Audit(AuditArgs),
    /// `restart` on a service: a fresh worker for an isolated backend (closing its circuit).
    Restart {
        /// The service.
        service: String,
        /// Which backend.
        args: RestartArgs,
    },
    /// `swap` on a service: replace a backend's driver.
    Swap {
        /// The service.
        service: String,
        /// What to swap to.
        args: SwapArgs,
    },
    /// Any other operation of a service, parsed by the service itself.
    Service {
        /// The service.
        service: String,
        /// The operation.
        op: String,
        /// Its arguments (`{}` when omitted).
        args: Option<&'a RawValue>,
    },
}

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
    /// The peer's uid.
    pub uid: u32,
    /// The peer's pid.
    pub pid: u32,
    /// The service, for service operations and swaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The operation.
    pub op: String,
    /// Its arguments as sent (verbatim: large numbers stay as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Box<RawValue>>,
    /// `ok`, or the error kind.
    pub outcome: String,
    /// The error message, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Arguments of `swap`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapArgs {
    /// The backend (default: the service's default backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// PATH or NAME of the new driver (default: the configured one, loaded again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    #[allow(dead_code)]
    id: Option<&'a RawValue>,
    service: Option<String>,
    op: Option<String>,
    #[serde(borrow)]
    args: Option<&'a RawValue>,
}

/// A request that could not be parsed, with the `id` if one could be read.
#[derive(Debug)]
pub struct BadRequest<'a> {
    /// The id, if the line was an object with one.
    pub id: Option<&'a RawValue>,
    /// Why.
    pub error: ApiError,
}

fn serde_message(e: &serde_json::Error) -> String {
    // serde_json appends " at line L column C"; requests are one line, so that says little.
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &str) -> Result<Request<'_>, BadRequest<'_>> {
    let invalid = |id, message: String| BadRequest { id, error: ApiError::new(ErrorKind::InvalidRequest, message) };
    let raw: &RawValue =
        serde_json::from_str(line).map_err(|e| invalid(None, format!("malformed JSON: {}", serde_message(&e))))?;
    if !raw.get().starts_with('{') {
        return Err(invalid(None, "request must be a JSON object".to_owned()));
    }
    let id = serde_json::from_str::<IdOnly<'_>>(line).ok().and_then(|i| i.id);
    let env: Envelope<'_> = serde_json::from_str(line).map_err(|e| invalid(id, serde_message(&e)))?;
    let op = env.op.ok_or_else(|| invalid(id, "missing \"op\"".to_owned()))?;
    let body = match (env.service, op.as_str()) {
        (None, "ping") => Body::Ping,
        (None, "status") => Body::Status,
        (None, "reload") => Body::Reload,
        (None, "audit") => {
            Body::Audit(parse_args::<AuditArgs>("audit", env.args).map_err(|error| BadRequest { id, error })?)
        }
        (None, other) => {
            return Err(invalid(
                id,
                format!(
                    "unknown operation {other:?} (top-level: ping, status, reload, audit; others need \"service\")"
                ),
            ))
        }
        (Some(service), "swap") => {
            let args = parse_args::<SwapArgs>("swap", env.args).map_err(|error| BadRequest { id, error })?;
            Body::Swap { service, args }
        }
        (Some(service), "restart") => {
            let args = parse_args::<RestartArgs>("restart", env.args).map_err(|error| BadRequest { id, error })?;
            Body::Restart { service, args }
        }
        (Some(service), _) => Body::Service { service, op, args: env.args },
    };
    Ok(Request { id, body })
}

/// Parses the arguments of one operation (a struct with named fields; `None` means `{}`).
pub fn parse_args<T: DeserializeOwned>(op: &str, args: Option<&RawValue>) -> Result<T, ApiError> {
    let text = args_object(op, args)?;
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| argument_error(op, &e))
}

/// The arguments' text, which must be an object (`{}` when omitted).
fn args_object<'a>(context: &str, args: Option<&'a RawValue>) -> Result<&'a str, ApiError> {
    match args.map(RawValue::get) {
        None | Some("null") => Ok("{}"),
        Some(t) if t.starts_with('{') => Ok(t),
        Some(_) => Err(ApiError::new(ErrorKind::InvalidRequest, format!("{context}: \"args\" must be an object"))),
    }
}

/// Says what is wrong with an argument in the terms of the protocol ("argument", not "field").
fn argument_problem(context: &str, path: &str, inner: &str) -> ApiError {
    let unquote = |t: &str| t.replace('`', "\"");
    if let Some(rest) = inner.strip_prefix("unknown field ") {
        let (field, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let expected = expected.trim_start_matches("one of ").replace('`', "").replace(" or ", ", ");
        return ApiError::invalid(format!("{context}: unknown argument {} (expected: {expected})", unquote(field)));
    }
    if let Some(field) = inner.strip_prefix("missing field ") {
        return ApiError::invalid(format!("{context}: missing argument {}", unquote(field)));
    }
    if path.is_empty() || path == "." {
        if inner.starts_with("invalid type") {
            return ApiError::new(ErrorKind::InvalidRequest, format!("{context}: \"args\" must be an object"));
        }
        return ApiError::invalid(format!("{context}: {}", unquote(inner)));
    }
    ApiError::invalid(format!("{context}: argument {path:?}: {}", inner.replace('`', "")))
}

fn argument_error(op: &str, e: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = serde_message(e.inner());
    if e.inner().is_syntax() || e.inner().is_eof() {
        return ApiError::new(ErrorKind::InvalidRequest, format!("{op}: malformed arguments: {inner}"));
    }
    argument_problem(op, &e.path().to_string(), &inner)
}

/// Parses an operation of a service: `op` names a variant of `T` (an externally tagged enum of struct
/// variants), `args` holds its fields. An unknown `op` is `invalid_request`; bad arguments are
/// `invalid_argument`, naming the argument and the type expected.
pub fn parse_op<T: DeserializeOwned>(service: &str, op: &str, args: Option<&RawValue>) -> Result<T, ApiError> {
    let known = variants::<T>();
    if !known.contains(&op) {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("unknown {service} operation {op:?} (known: {}, swap)", known.join(", ")),
        ));
    }
    let args = args_object(&format!("{service} {op}"), args)?;
    let text = format!("{{{}:{args}}}", serde_json::Value::String(op.to_owned()));
    let mut de = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // Paths start with the variant name; the caller knows the operation.
        let path = e.path().to_string();
        let trimmed = path.strip_prefix(op).map(|p| p.trim_start_matches('.')).unwrap_or(&path);
        let inner = serde_message(e.inner());
        if e.inner().is_syntax() || e.inner().is_eof() {
            return ApiError::new(ErrorKind::InvalidRequest, format!("{service} {op}: malformed arguments: {inner}"));
        }
        // An unknown argument's path ends in its own name; the message names it already.
        let trimmed = if inner.starts_with("unknown field") { "" } else { trimmed };
        argument_problem(&format!("{service} {op}"), trimmed, &inner)
    })
}

/// The variant names of an externally tagged enum, read from its `Deserialize` implementation.
pub fn variants<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("probe")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Stop {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for &mut Probe {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(variants);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
        }
    }
    let mut p = Probe(None);
    let _ = T::deserialize(&mut p);
    p.0.unwrap_or(&[])
}

/// The answer line (without newline) for a result already serialized as JSON.
pub fn answer(id: Option<&RawValue>, result: Result<String, ApiError>) -> String {
    let id = id.map(RawValue::get).unwrap_or("null");
    match result {
        Ok(json) => format!("{{\"id\":{id},\"ok\":true,\"result\":{json}}}"),
        Err(e) => {
            let error = serde_json::to_string(&e).expect("an ApiError always serializes");
            format!("{{\"id\":{id},\"ok\":false,\"error\":{error}}}")
        }
    }
}

/// Serializes a result for [`answer`].
pub fn to_json<T: Serialize>(value: &T) -> Result<String, ApiError> {
    serde_json::to_string(value).map_err(|e| ApiError::internal(format!("cannot serialize the answer: {e}")))
}

/// An answer as a client reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct Answer {
    /// The request's id.
    #[serde(default)]
    pub id: Option<Box<RawValue>>,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    /// The error, when not.
    #[serde(default)]
    pub error: Option<ApiError>,
}

impl Answer {
    /// The result as `T`, or the error.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        match (self.ok, self.result, self.error) {
            (true, Some(r), _) => serde_json::from_str(r.get())
                .map_err(|e| ApiError::internal(format!("unexpected answer: {}", serde_message(&e)))),
            (true, None, _) => Err(ApiError::internal("unexpected answer: no result")),
            (false, _, Some(e)) => Err(e),
            (false, _, None) => Err(ApiError::internal("unexpected answer: an error without details")),
        }
    }
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
    /// Calls whose latency was timed.
    pub sampled: u64,
    /// Mean of the timed latencies.
    pub mean_us: u64,
    /// Largest timed latency.
    pub max_us: u64,
}

/// A backend's capacity, as last refreshed by the periodic task.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Capacity {
    /// Total bytes.
    pub total_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Sum of provisioned sizes.
    pub provisioned_bytes: u64,
    /// Number of resources.
    pub volumes: u64,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::volume::VolumeOp;

    fn bad(line: &str) -> ApiError {
        parse_request(line).unwrap_err().error
    }

    #[test]
    fn ids_are_echoed_verbatim() {
        let big = r#"{"id": 123456789012345678901234567890, "op": "ping"}"#;
        let r = parse_request(big).unwrap();
        assert_eq!(
            answer(r.id, to_json(&Pong { pong: true })),
            r#"{"id":123456789012345678901234567890,"ok":true,"result":{"pong":true}}"#
        );
        let r = parse_request(r#"{"id": {"a": [1, "x"]}, "op": "ping"}"#).unwrap();
        assert_eq!(r.id.unwrap().get(), r#"{"a": [1, "x"]}"#);
        let e = parse_request(r#"{"id": 7, "op": 3}"#).unwrap_err();
        assert_eq!(e.id.unwrap().get(), "7");
    }

    #[test]
    fn envelope_errors() {
        assert_eq!(bad("nope").kind, ErrorKind::InvalidRequest);
        assert_eq!(bad("[1]").message, "request must be a JSON object");
        assert_eq!(bad(r#"{"id":1}"#).message, "missing \"op\"");
        assert!(bad(r#"{"op":"ping","serivce":"volume"}"#).message.contains("unknown field"));
        assert!(bad("{\"op\": \"pi").message.starts_with("malformed JSON"));
        assert!(bad(r#"{"op":"frob"}"#).message.starts_with("unknown operation \"frob\""));
        assert!(matches!(parse_request(r#"{"op":"ping"}"#).unwrap().body, Body::Ping));
    }

    #[test]
    fn ops_and_arguments() {
        let v: VolumeOp =
            parse_op("volume", "create", RawValue::from_string(r#"{"name":"v","size":"1KiB"}"#.into()).ok().as_deref())
                .unwrap();
        assert_eq!(v, VolumeOp::Create { name: "v".into(), size: Size::bytes(1024), backend: None });
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        let e = parse_op::<VolumeOp>("volume", "frobnicate", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert!(e.message.contains("known: create"), "{e}");
        let e = parse_op::<VolumeOp>("volume", "create", Some(&raw(r#"{"name":5,"size":1}"#))).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(e.message, "volume create: argument \"name\": invalid type: integer 5, expected a string");
        let e = parse_op::<VolumeOp>("volume", "create", Some(&raw(r#"{"name":"v"}"#))).unwrap_err();
        assert_eq!(e.message, "volume create: missing argument \"size\"");
        let e = parse_op::<VolumeOp>("volume", "create", Some(&raw(r#"{"name":"v","size":18446744073709551616}"#)))
            .unwrap_err();
        assert!(e.message.contains("too large"), "{e}");
        let e = parse_op::<VolumeOp>("volume", "create", Some(&raw(r#"{"name":"v","size":-1}"#))).unwrap_err();
        assert!(e.message.contains("negative"), "{e}");
        let e = parse_op::<VolumeOp>("volume", "get", Some(&raw(r#"{"name":"v","bogus":1}"#))).unwrap_err();
        assert_eq!(e.message, "volume get: unknown argument \"bogus\" (expected: name, backend)");
        let e = parse_op::<VolumeOp>("volume", "get", Some(&raw("[1]"))).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
    }

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
