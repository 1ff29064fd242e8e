//! The host in a fleet: remote requests through the same dispatch as the socket's, checked against the
//! subject they came on; the host's report for the services table.

use plughost_fleet::report::{BackendReport, HostState, Report, ServiceReport};
use plughost_fleet::subject::{Addressed, Class};
use plughost_fleet::Incoming;

use super::host::Host;
use crate::control::protocol::{ApiError, ErrorKind, State, PROTOCOL_VERSION};
use crate::control::request::Body;
use crate::control::server::Peer;

/// Refuses a request whose subject says something else than its payload: another service or backend
/// (`invalid_request`), or a change sent on a read subject (`permission_denied`). A remote `swap` may
/// name a driver only by NAME (from the driver directories).
pub(crate) fn agree(addressed: &Addressed, body: &Body<'_>) -> Result<(), ApiError> {
    let op = body.op();
    if let Addressed::Host { service, backend, .. } = addressed {
        if service.as_deref() != body.service() {
            return Err(ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "the subject names service {} but the request is {} {op}",
                    service.as_deref().unwrap_or("host"),
                    body.service().unwrap_or("host")
                ),
            ));
        }
        let named = body.backend()?;
        if backend != &named {
            return Err(ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "the subject names backend {} but the request names {}",
                    backend.as_deref().unwrap_or("_ (none)"),
                    named.as_deref().unwrap_or("none")
                ),
            ));
        }
    }
    if addressed.class() == Class::Read && !body.reads() {
        return Err(ApiError::new(
            ErrorKind::PermissionDenied,
            format!(
                "{}{op} changes something: it came on a read subject (send it on the .admin subject, open to admins only)",
                body.service().map(|s| format!("{s} ")).unwrap_or_default()
            ),
        ));
    }
    if let Body::Swap { args, .. } = body {
        if let Some(d) = &args.driver {
            if crate::loading::drivers::is_path(d) {
                return Err(ApiError::new(
                    ErrorKind::PermissionDenied,
                    format!("swap driver {d:?}: a remote swap names a driver by NAME from the driver directories, never by path"),
                ));
            }
        }
    }
    Ok(())
}

impl plughost_fleet::Responder for Host {
    fn answer(&self, request: &Incoming<'_>) -> String {
        let limit = self.settings.max_request_bytes;
        if request.payload.len() > limit {
            // As on the socket: a request larger than max_request_bytes is not read.
            return crate::control::request::answer(
                None,
                Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "request of {} bytes is longer than {limit} bytes (max_request_bytes)",
                        request.payload.len()
                    ),
                )),
            );
        }
        let peer = Peer::remote(request.user, request.addressed.class() == Class::Admin);
        self.handle_with(request.payload, &peer, |body| agree(request.addressed, body))
    }

    fn report(&self, stopping: bool) -> Report {
        self.report(stopping)
    }
}

impl Host {
    /// This host's report for the services table.
    pub(super) fn report(&self, stopping: bool) -> Report {
        let st = self.status();
        let spec = self.settings.fleet.as_ref();
        let services: Vec<ServiceReport> = st
            .services
            .iter()
            .map(|s| {
                let service = self.services.iter().find(|x| x.kind().name == s.name);
                ServiceReport {
                    name: s.name.clone(),
                    default_backend: s.default_backend.clone(),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendReport {
                            name: b.name.clone(),
                            up: b.state == State::Up,
                            reason: b.reason.clone(),
                            driver: b.driver.name.clone(),
                            driver_version: b.driver.version.clone(),
                            digest: b.driver.digest.clone(),
                            extensions: b.driver.extensions.clone(),
                            total_bytes: b.capacity.map(|c| c.total_bytes),
                            free_bytes: b.capacity.map(|c| c.free_bytes),
                            records: service.map_or(0, |x| x.records_on(&b.name) as u64),
                            failures: b.calls.values().map(|c| c.errors).sum::<u64>()
                                + b.worker.as_ref().map_or(0, |w| w.crashes),
                        })
                        .collect(),
                }
            })
            .collect();
        let degraded = services.iter().any(|s| s.backends.iter().any(|b| !b.up));
        Report {
            host: spec.map(|f| f.settings.host.clone()).unwrap_or_default(),
            fleet: spec.map(|f| f.settings.name.clone()).unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api: PROTOCOL_VERSION,
            plugin_api: plughost_api::API_VERSION.to_owned(),
            started_at: crate::util::time::now().saturating_sub(st.uptime_ms / 1000),
            state: if stopping || self.stopping() {
                HostState::Stopping
            } else if degraded {
                HostState::Degraded
            } else {
                HostState::Up
            },
            service_down_time_ms: spec.map_or(0, |f| f.settings.service_down_time.as_millis() as u64),
            labels: spec.map(|f| f.settings.labels.clone()).unwrap_or_default(),
            services,
        }
    }

    /// When a backend went up or down, changed driver, or first knew its capacity since the last look:
    /// the fleet gets a report at once, and systemd a new status line.
    pub(super) fn report_if_changed(&self) {
        let shape: String = self
            .services
            .iter()
            .flat_map(|s| {
                s.backends().iter().map(move |b| {
                    let capacity = s.capacity(b.name()).is_some();
                    format!("{}/{}:{:?}:{}:{capacity};", s.kind().name, b.name(), b.health(), b.active_digest())
                })
            })
            .collect();
        let mut last = self.shape.lock().unwrap_or_else(|p| p.into_inner());
        if *last == shape {
            return;
        }
        *last = shape;
        drop(last);
        super::notify::status(&self.status_line());
        if let Some(agent) = self.fleet.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            agent.report_now();
        }
    }

    /// One line for systemd's status: how many backends serve, and what is down and why.
    pub(crate) fn status_line(&self) -> String {
        let mut up = 0;
        let mut all = 0;
        let mut down = Vec::new();
        for s in &self.services {
            for b in s.backends().iter() {
                all += 1;
                if b.health() == crate::backend::Health::Up {
                    up += 1;
                } else {
                    down.push(format!("{} backend {:?} down", s.kind().name, b.name()));
                }
            }
        }
        if down.is_empty() {
            format!("serving: {up} of {all} backends up")
        } else {
            format!("degraded: {up} of {all} backends up; {}", down.join(", "))
        }
    }

    /// Joins the fleet, when the settings name one: the agent's thread starts and the host reports.
    pub(super) fn join_fleet(self: &std::sync::Arc<Self>) -> Result<(), String> {
        let Some(spec) = &self.settings.fleet else { return Ok(()) };
        let responder: std::sync::Arc<dyn plughost_fleet::Responder> = self.clone();
        let agent = plughost_fleet::Agent::start(spec.settings.clone(), responder)?;
        *self.fleet.lock().unwrap_or_else(|p| p.into_inner()) = Some(agent);
        Ok(())
    }

    /// Leaves the fleet (the first step of a graceful stop): reports `stopping`, stops listening, and
    /// answers remote requests in flight (up to `drain`).
    pub(super) fn leave_fleet(&self, drain: std::time::Duration) {
        let agent = self.fleet.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(agent) = agent {
            agent.stop(drain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::request::parse_request;

    fn body_of(line: &str) -> Body<'_> {
        let kind = |name: &str| -> Result<crate::control::request::OpParser, ApiError> {
            crate::services::kinds::kind(name)
                .map(|k| k.parse)
                .ok_or_else(|| ApiError::new(ErrorKind::UnknownService, name.to_owned()))
        };
        parse_request(line, &kind).map_err(|b| b.error).unwrap().body
    }

    fn host_sub(service: Option<&str>, backend: Option<&str>, class: Class) -> Addressed {
        Addressed::Host { service: service.map(str::to_owned), backend: backend.map(str::to_owned), class }
    }

    #[test]
    fn subject_and_payload_must_agree() {
        let create = r#"{"service":"volume","op":"create","args":{"name":"v","size":1,"backend":"fast"}}"#;
        let ok = host_sub(Some("volume"), Some("fast"), Class::Admin);
        assert!(agree(&ok, &body_of(create)).is_ok());
        // Another service, another backend, no backend: invalid_request.
        for wrong in [
            host_sub(Some("compute"), Some("fast"), Class::Admin),
            host_sub(Some("volume"), None, Class::Admin),
            host_sub(None, None, Class::Admin),
        ] {
            assert_eq!(agree(&wrong, &body_of(create)).unwrap_err().kind, ErrorKind::InvalidRequest, "{wrong:?}");
        }
        // A change on a read subject: permission_denied; a read on an admin subject is fine.
        let e = agree(&host_sub(Some("volume"), Some("fast"), Class::Read), &body_of(create)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        assert!(e.message.contains("read subject"), "{}", e.message);
        let get = r#"{"service":"volume","op":"get","args":{"name":"v"}}"#;
        assert!(agree(&host_sub(Some("volume"), None, Class::Admin), &body_of(get)).is_ok());
        assert!(agree(&host_sub(None, None, Class::Read), &body_of(r#"{"op":"status"}"#)).is_ok());
        assert_eq!(
            agree(&host_sub(None, None, Class::Read), &body_of(r#"{"op":"reload"}"#)).unwrap_err().kind,
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            agree(&Addressed::All { class: Class::Read }, &body_of(r#"{"op":"audit"}"#)).unwrap_err().kind,
            ErrorKind::PermissionDenied
        );
        // A remote swap names drivers by NAME only.
        let by_path = r#"{"service":"volume","op":"swap","args":{"driver":"/tmp/evil.so"}}"#;
        let e = agree(&host_sub(Some("volume"), None, Class::Admin), &body_of(by_path)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied);
        let by_name = r#"{"service":"volume","op":"swap","args":{"driver":"fake-volume"}}"#;
        assert!(agree(&host_sub(Some("volume"), None, Class::Admin), &body_of(by_name)).is_ok());
    }
}
