//! Requests and answers on the wire. A request line `{"id", "service", "op", "args"}` is read once
//! ([`parse_request`]): the envelope in one pass (`id` and `args` kept as written, never copied), then
//! the arguments straight into their type, a service's operation into its kind's own typed operation
//! (the kind registers its [`OpParser`]). Dispatch never sees an operation's name as a string or its
//! arguments as JSON. [`Request`] is also what `ctl` writes: one envelope type for both ends.

use std::any::Any;
use std::fmt;

use serde::de::{
    DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, IntoDeserializer, MapAccess,
    VariantAccess, Visitor,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::protocol::{ApiError, AuditArgs, ErrorKind, RestartArgs, SwapArgs};

/// A service's operation, typed by its kind; the host hands it back to that kind's service.
pub trait KindOp: Any + Send + fmt::Debug {
    /// Its name on the wire (`create`).
    fn name(&self) -> &'static str;
    /// Whether it only reads (open to `socket_group` readers); every other operation needs an admin.
    fn reads(&self) -> bool;
    /// For the service that parsed it, to take its own type back.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    /// Its arguments as JSON, for a client to send.
    fn args_json(&self) -> Result<Box<RawValue>, String>;
}

/// The `name` argument of a request, if it has one (for log lines; never for dispatch), cut short.
pub(crate) fn arg_name(args: Option<&RawValue>) -> Option<String> {
    #[derive(Deserialize)]
    struct Named<'a> {
        #[serde(borrow, default)]
        name: Option<std::borrow::Cow<'a, str>>,
    }
    let n = serde_json::from_str::<Named<'_>>(args?.get()).ok()?.name?;
    Some(crate::util::fmt::printable(&n.chars().take(128).collect::<String>()).into_owned())
}

/// Parses one operation of a kind from its name and arguments: `(service, op, args)`.
pub type OpParser = fn(&str, &str, Option<&RawValue>) -> Result<Box<dyn KindOp>, ApiError>;

/// The operations every service has besides its kind's own (the host runs them).
pub const SERVICE_LEVEL_OPS: &[&str] = &["swap", "restart"];

/// A request: its `id` (echoed back verbatim) and what it asks.
#[derive(Debug)]
pub struct Request<'a> {
    /// The `id` as it was written.
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
    /// `metrics`: the same and more as OpenMetrics text (open to readers).
    Metrics,
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
    /// An operation of the service's kind, already typed.
    Service {
        /// The service.
        service: String,
        /// The operation.
        op: Box<dyn KindOp>,
        /// Its arguments as written (for the audit log), when given.
        args: Option<&'a RawValue>,
    },
}

impl Body<'_> {
    /// The service it is for, if any.
    pub fn service(&self) -> Option<&str> {
        match self {
            Body::Ping | Body::Status | Body::Metrics | Body::Reload | Body::Audit(_) => None,
            Body::Restart { service, .. } | Body::Swap { service, .. } | Body::Service { service, .. } => Some(service),
        }
    }

    /// The operation's name.
    pub fn op(&self) -> &str {
        match self {
            Body::Ping => "ping",
            Body::Metrics => "metrics",
            Body::Status => "status",
            Body::Reload => "reload",
            Body::Audit(_) => "audit",
            Body::Restart { .. } => "restart",
            Body::Swap { .. } => "swap",
            Body::Service { op, .. } => op.name(),
        }
    }

    /// The backend a request names in its arguments, if any.
    pub fn backend(&self) -> Result<Option<String>, ApiError> {
        Ok(match self {
            Body::Ping | Body::Status | Body::Metrics | Body::Reload | Body::Audit(_) => None,
            Body::Swap { args, .. } => args.backend.clone(),
            Body::Restart { args, .. } => args.backend.clone(),
            Body::Service { args, .. } => {
                #[derive(serde::Deserialize)]
                struct OnBackend {
                    #[serde(default)]
                    backend: Option<String>,
                }
                match args {
                    Some(a) => {
                        serde_json::from_str::<OnBackend>(a.get())
                            .map_err(|e| {
                                ApiError::new(ErrorKind::InvalidRequest, format!("argument \"backend\": {e}"))
                            })?
                            .backend
                    }
                    None => None,
                }
            }
        })
    }

    /// Whether it only reads (open to readers).
    pub fn reads(&self) -> bool {
        match self {
            Body::Ping | Body::Status | Body::Metrics => true,
            Body::Reload | Body::Audit(_) | Body::Restart { .. } | Body::Swap { .. } => false,
            Body::Service { op, .. } => op.reads(),
        }
    }
}

/// A request written by a client: the same envelope, serialized.
impl Serialize for Request<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let args: Option<Box<RawValue>> = match &self.body {
            Body::Ping | Body::Status | Body::Metrics | Body::Reload => None,
            Body::Audit(a) => Some(serde_json::value::to_raw_value(a).map_err(S::Error::custom)?),
            Body::Restart { args, .. } => Some(serde_json::value::to_raw_value(args).map_err(S::Error::custom)?),
            Body::Swap { args, .. } => Some(serde_json::value::to_raw_value(args).map_err(S::Error::custom)?),
            Body::Service { op, .. } => Some(op.args_json().map_err(S::Error::custom)?),
        };
        let mut m = s.serialize_map(None)?;
        if let Some(id) = self.id {
            m.serialize_entry("id", id)?;
        }
        if let Some(service) = self.body.service() {
            m.serialize_entry("service", service)?;
        }
        m.serialize_entry("op", self.body.op())?;
        if let Some(a) = &args {
            m.serialize_entry("args", a)?;
        }
        m.end()
    }
}

/// A request that could not be parsed, with the `id` if one could be read.
#[derive(Debug)]
pub struct BadRequest<'a> {
    /// The id, if the line was an object with one.
    pub id: Option<&'a RawValue>,
    /// Why.
    pub error: ApiError,
    /// The service operation it tried, when the envelope named one (for the audit log: a refused attempt
    /// at a change is recorded like a change).
    pub attempt: Option<Attempt<'a>>,
}

/// A service operation as asked, before its arguments were understood.
#[derive(Debug)]
pub struct Attempt<'a> {
    /// The service.
    pub service: String,
    /// The operation's name as written.
    pub op: String,
    /// Its arguments as written.
    pub args: Option<&'a RawValue>,
}

/// The envelope's fields, each kept as written; problems are kept for after the pass, so that the id
/// is known whatever else is wrong.
#[derive(Default)]
struct Envelope<'a> {
    id: Option<&'a RawValue>,
    service: Option<&'a RawValue>,
    op: Option<&'a RawValue>,
    args: Option<&'a RawValue>,
    problem: Option<String>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Envelope<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Envelope<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
                let mut e = Envelope::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "id" => &mut e.id,
                        "service" => &mut e.service,
                        "op" => &mut e.op,
                        "args" => &mut e.args,
                        other => {
                            if e.problem.is_none() {
                                let other = crate::util::fmt::echo(other);
                                e.problem = Some(format!("unknown field {other} (expected: id, service, op, args)"));
                            }
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.is_some() && e.problem.is_none() {
                        e.problem = Some(format!("duplicate field {:?}", key.as_ref()));
                    }
                    *slot = Some(map.next_value::<&'de RawValue>()?);
                }
                Ok(e)
            }
        }
        d.deserialize_map(V)
    }
}

/// serde_json's message without " at line L column C" (requests are one line).
fn serde_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// A string field of the envelope.
fn string_field(name: &str, raw: &RawValue) -> Result<String, String> {
    serde_json::from_str::<String>(raw.get()).map_err(|_| format!("\"{name}\" must be a string"))
}

/// Parses one request line (without its newline). `kind` gives the operation parser of a service by
/// name, or the error to answer (an unknown service, one that is not enabled).
pub fn parse_request<'a>(
    line: &'a str,
    kind: &dyn Fn(&str) -> Result<OpParser, ApiError>,
) -> Result<Request<'a>, BadRequest<'a>> {
    let invalid = |id, message: String| BadRequest {
        id,
        error: ApiError::new(ErrorKind::InvalidRequest, message),
        attempt: None,
    };
    let mut de = serde_json::Deserializer::from_str(line);
    let env = match Envelope::deserialize(&mut de).and_then(|e| de.end().map(|()| e)) {
        Ok(e) => e,
        Err(e) if e.is_data() => return Err(invalid(None, "request must be a JSON object".to_owned())),
        Err(e) => return Err(invalid(None, format!("malformed JSON: {}", serde_message(&e)))),
    };
    let id = env.id;
    let fail = |error: ApiError| BadRequest { id, error, attempt: None };
    if let Some(p) = env.problem {
        return Err(invalid(id, p));
    }
    let op = env.op.ok_or_else(|| invalid(id, "missing \"op\"".to_owned()))?;
    let op = string_field("op", op).map_err(|m| invalid(id, m))?;
    let service = env.service.map(|s| string_field("service", s)).transpose().map_err(|m| invalid(id, m))?;
    let args = env.args;
    let attempt = |service: &str, error: ApiError| BadRequest {
        id,
        error,
        attempt: Some(Attempt { service: service.to_owned(), op: op.clone(), args }),
    };
    let body = match (service, op.as_str()) {
        (None, "ping") => {
            parse_args::<NoArgs>("ping", args).map_err(fail)?;
            Body::Ping
        }
        (None, "status") => {
            parse_args::<NoArgs>("status", args).map_err(fail)?;
            Body::Status
        }
        (None, "reload") => {
            parse_args::<NoArgs>("reload", args).map_err(fail)?;
            Body::Reload
        }
        (None, "metrics") => {
            parse_args::<NoArgs>("metrics", args).map_err(fail)?;
            Body::Metrics
        }
        (None, "audit") => Body::Audit(parse_args("audit", args).map_err(fail)?),
        (None, other) => {
            return Err(invalid(
                id,
                format!(
                    "unknown operation {} (top-level: ping, status, metrics, reload, audit; others need \"service\")",
                    crate::util::fmt::echo(other)
                ),
            ))
        }
        (Some(service), "swap") => {
            let parsed = parse_args("swap", args).map_err(|e| attempt(&service, e))?;
            kind(&service).map_err(fail)?;
            Body::Swap { service, args: parsed }
        }
        (Some(service), "restart") => {
            let parsed = parse_args("restart", args).map_err(|e| attempt(&service, e))?;
            kind(&service).map_err(fail)?;
            Body::Restart { service, args: parsed }
        }
        (Some(service), name) => {
            let parse = kind(&service).map_err(fail)?;
            let op = parse(&service, name, args).map_err(|e| attempt(&service, e))?;
            Body::Service { service, op, args }
        }
    };
    Ok(Request { id, body })
}

/// The arguments of an operation that takes none: `{}`, or nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

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
        let (field, expected) = match rest.split_once(", there are no fields") {
            Some((field, _)) => (field, "none"),
            None => rest.split_once(", expected ").unwrap_or((rest, "")),
        };
        let expected = expected.trim_start_matches("one of ").replace('`', "").replace(" or ", ", ");
        let field = field.trim_matches('`');
        return ApiError::invalid(format!(
            "{context}: unknown argument {} (expected: {expected})",
            crate::util::fmt::echo(field)
        ));
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

/// Parses an operation of a service: `op` names a variant of `T` (an enum of struct or newtype
/// variants), `args` holds its fields, read straight into the variant. An unknown `op` is
/// `invalid_request` listing every operation of the service (the service-level ones too); bad arguments
/// are `invalid_argument`, naming the argument and the type expected.
pub fn parse_op<T: DeserializeOwned>(service: &str, op: &str, args: Option<&RawValue>) -> Result<T, ApiError> {
    let known = variants::<T>();
    if !known.contains(&op) {
        let all: Vec<&str> = known.iter().chain(SERVICE_LEVEL_OPS).copied().collect();
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("unknown {service} operation {} (known: {})", crate::util::fmt::echo(op), all.join(", ")),
        ));
    }
    let context = format!("{service} {op}");
    let text = args_object(&context, args)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let typed = serde_path_to_error::deserialize(OpDeserializer { op, args: &mut de });
    typed.map_err(|e| {
        let inner = serde_message(e.inner());
        if e.inner().is_syntax() || e.inner().is_eof() {
            return ApiError::new(ErrorKind::InvalidRequest, format!("{context}: malformed arguments: {inner}"));
        }
        // Paths start with the variant name; the caller knows the operation.
        let path = e.path().to_string();
        let trimmed = path.strip_prefix(op).map(|p| p.trim_start_matches('.')).unwrap_or(&path);
        // An unknown argument's path ends in its own name; the message names it already.
        let trimmed = if inner.starts_with("unknown field") { "" } else { trimmed };
        argument_problem(&context, trimmed, &inner)
    })
}

/// An enum value whose variant is `op` and whose content is read from `args`: how an operation is
/// read from the envelope without putting name and arguments back together as text.
struct OpDeserializer<'a, 'de> {
    op: &'a str,
    args: &'a mut serde_json::Deserializer<serde_json::de::StrRead<'de>>,
}

impl<'de> Deserializer<'de> for OpDeserializer<'_, 'de> {
    type Error = serde_json::Error;
    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("an operation is an enum"))
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de> EnumAccess<'de> for OpDeserializer<'_, 'de> {
    type Error = serde_json::Error;
    type Variant = Self;
    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Self::Error> {
        let de: serde::de::value::StrDeserializer<'_, serde_json::Error> = self.op.into_deserializer();
        Ok((seed.deserialize(de)?, self))
    }
}

impl<'de> VariantAccess<'de> for OpDeserializer<'_, 'de> {
    type Error = serde_json::Error;
    fn unit_variant(self) -> Result<(), Self::Error> {
        NoArgs::deserialize(self.args).map(drop)
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Self::Error> {
        seed.deserialize(self.args)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.args.deserialize_seq(visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.args.deserialize_struct("", fields, visitor)
    }
}

/// The variant names of an enum, read from its `Deserialize` implementation.
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

/// The arguments of a typed operation as a client sends them: the content of its (externally tagged)
/// serialization. Client side only.
pub fn op_args<T: Serialize>(op: &T) -> Result<Box<RawValue>, String> {
    let text = serde_json::to_string(op).map_err(|e| e.to_string())?;
    // `{"name":CONTENT}` for a variant with content, `"name"` for a unit variant.
    let content = match text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        Some(inner) => {
            let key: String = serde_json::Deserializer::from_str(inner)
                .into_iter::<String>()
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| format!("cannot encode operation {text}"))?;
            let skip = serde_json::to_string(&key).map_err(|e| e.to_string())?.len() + 1;
            inner.get(skip..).ok_or_else(|| format!("cannot encode operation {text}"))?.to_owned()
        }
        None => "{}".to_owned(),
    };
    RawValue::from_string(content).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{Pong, Size};
    use crate::services::compute::ComputeOp;
    use crate::services::volume::VolumeOp;

    fn kinds(name: &str) -> Result<OpParser, ApiError> {
        crate::services::kinds::kind(name)
            .map(|k| k.parse)
            .ok_or_else(|| ApiError::new(ErrorKind::UnknownService, format!("unknown service {name:?}")))
    }

    fn parse(line: &str) -> Result<Request<'_>, BadRequest<'_>> {
        parse_request(line, &kinds)
    }

    fn bad(line: &str) -> ApiError {
        parse(line).unwrap_err().error
    }

    #[test]
    fn ids_are_echoed_verbatim() {
        let big = r#"{"id": 123456789012345678901234567890, "op": "ping"}"#;
        let r = parse(big).unwrap();
        assert_eq!(
            answer(r.id, to_json(&Pong { pong: true })),
            r#"{"id":123456789012345678901234567890,"ok":true,"result":{"pong":true}}"#
        );
        let r = parse(r#"{"id": {"a": [1, "x"]}, "op": "ping"}"#).unwrap();
        assert_eq!(r.id.unwrap().get(), r#"{"a": [1, "x"]}"#);
        // Whatever else is wrong, the id is known: it was read in the same pass.
        for line in [r#"{"id": 7, "op": 3}"#, r#"{"op": 3, "id": 7}"#, r#"{"bogus": 1, "id": 7, "op": "ping"}"#] {
            assert_eq!(parse(line).unwrap_err().id.unwrap().get(), "7", "{line}");
        }
    }

    #[test]
    fn envelope_errors() {
        assert_eq!(bad("nope").kind, ErrorKind::InvalidRequest);
        assert_eq!(bad("[1]").message, "request must be a JSON object");
        assert_eq!(bad(r#"{"id":1}"#).message, "missing \"op\"");
        assert_eq!(
            bad(r#"{"op":"ping","serivce":"volume"}"#).message,
            "unknown field \"serivce\" (expected: id, service, op, args)"
        );
        assert_eq!(bad(r#"{"op":"ping","op":"status"}"#).message, "duplicate field \"op\"");
        assert!(bad("{\"op\": \"pi").message.starts_with("malformed JSON"));
        assert!(bad(r#"{"op":"ping"} x"#).message.starts_with("malformed JSON"));
        assert!(bad(r#"{"op":"frob"}"#).message.starts_with("unknown operation \"frob\""));
        assert_eq!(bad(r#"{"op":"ping","args":{"a":1}}"#).message, "ping: unknown argument \"a\" (expected: none)");
        assert_eq!(bad(r#"{"op":"status","args":[1]}"#).message, "status: \"args\" must be an object");
        assert_eq!(bad(r#"{"service":"disk","op":"get"}"#).kind, ErrorKind::UnknownService);
        assert!(matches!(parse(r#"{"op":"ping"}"#).unwrap().body, Body::Ping));
        assert!(matches!(parse(r#"{"op":"ping","args":{}}"#).unwrap().body, Body::Ping));
    }

    #[test]
    fn a_service_operation_arrives_typed_and_knows_whether_it_reads() {
        let r = parse(r#"{"service":"volume","op":"create","args":{"name":"v","size":"1KiB"}}"#).unwrap();
        let Body::Service { service, op, args } = r.body else { panic!("not a service operation") };
        assert_eq!((service.as_str(), op.name(), op.reads()), ("volume", "create", false));
        assert_eq!(args.unwrap().get(), r#"{"name":"v","size":"1KiB"}"#, "kept as written, for the audit log");
        let op = op.into_any().downcast::<VolumeOp>().unwrap();
        assert_eq!(*op, VolumeOp::Create { name: "v".into(), size: Size::bytes(1024), backend: None });
        let r = parse(r#"{"service":"volume","op":"list"}"#).unwrap();
        assert!(r.body.reads());
        let r = parse(r#"{"service":"compute","op":"destroy","args":{"name":"x"}}"#).unwrap();
        assert!(!r.body.reads());
        let r = parse(r#"{"service":"volume","op":"swap","args":{"driver":"x"}}"#).unwrap();
        assert!(matches!(r.body, Body::Swap { .. }) && !r.body.reads());
    }

    #[test]
    fn unknown_operations_list_every_operation_of_the_service() {
        let e = bad(r#"{"service":"volume","op":"frobnicate"}"#);
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert_eq!(
            e.message,
            "unknown volume operation \"frobnicate\" (known: create, get, list, extend, snapshot, revert, delete, stats, swap, restart)"
        );
        let e = bad(r#"{"service":"compute","op":"frobnicate"}"#);
        assert!(e.message.ends_with("destroy, swap, restart)"), "{e}");
    }

    #[test]
    fn operation_names_are_the_wire_names() {
        // strum's names (what a parsed operation says it is) are serde's (what the wire carries).
        fn check<O: DeserializeOwned + Serialize + KindOp>(ops: Vec<O>) {
            let wire = variants::<O>();
            assert_eq!(ops.len(), wire.len(), "one example per operation");
            for (op, name) in ops.iter().zip(wire) {
                assert_eq!(op.name(), *name);
                let json = serde_json::to_value(op).unwrap();
                assert!(json.get(name).is_some() || json == serde_json::json!(name), "{json}");
            }
        }
        let named = || crate::services::Named { name: "n".into(), backend: None };
        let on = || crate::services::OnBackend { backend: None };
        let (name, size, backend) = (String::from("n"), Size::bytes(1), None);
        check(vec![
            VolumeOp::Create { name: name.clone(), size: size.clone(), backend: backend.clone() },
            VolumeOp::Get(named()),
            VolumeOp::List(on()),
            VolumeOp::Extend { name: name.clone(), size, backend: backend.clone() },
            VolumeOp::Snapshot { name: name.clone(), snapshot: "s".into(), backend: backend.clone() },
            VolumeOp::Revert { name, snapshot: "s".into(), backend },
            VolumeOp::Delete(named()),
            VolumeOp::Stats(on()),
        ]);
        let spawn: ComputeOp = parse_op("compute", "spawn", Some(&raw(r#"{"name":"n","command":"true"}"#))).unwrap();
        check(vec![
            spawn,
            ComputeOp::Get(named()),
            ComputeOp::List(on()),
            ComputeOp::Start(named()),
            ComputeOp::Stop(named()),
            ComputeOp::Reboot(named()),
            ComputeOp::Destroy(named()),
        ]);
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn arguments() {
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
    fn a_client_writes_the_envelope_the_server_reads() {
        let op: Box<dyn KindOp> =
            Box::new(VolumeOp::Create { name: "v".into(), size: Size::bytes(1024), backend: Some("fast".into()) });
        let id = raw("1");
        let out = Request { id: Some(&id), body: Body::Service { service: "volume".into(), op, args: None } };
        let line = serde_json::to_string(&out).unwrap();
        assert_eq!(
            line,
            r#"{"id":1,"service":"volume","op":"create","args":{"name":"v","size":1024,"backend":"fast"}}"#
        );
        let back = parse(&line).unwrap();
        assert_eq!((back.body.service(), back.body.op()), (Some("volume"), "create"));
        let swap = Request {
            id: None,
            body: Body::Swap {
                service: "volume".into(),
                args: SwapArgs { driver: Some("x".into()), ..SwapArgs::default() },
            },
        };
        assert_eq!(serde_json::to_string(&swap).unwrap(), r#"{"service":"volume","op":"swap","args":{"driver":"x"}}"#);
    }
}
