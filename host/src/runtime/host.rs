//! The host: builds the services of the service table from the settings, reads each request once and
//! dispatches it typed (with the permission check and the audit log), assembles status, and runs
//! periodic work.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::{BuildContext, Health};
use crate::config::{ConfigSource, Settings};
use crate::control::protocol::{
    ApiError, ErrorKind, HostStatus, LibrariesStatus, Pong, ServiceStatus, State, TrustStatus,
};
use crate::control::request::{answer, parse_request, to_json, Body, OpParser};
use crate::control::server::{Handler, Peer};
use crate::loading::loader::Loader;
use crate::services::{DynService, ServiceContext};
use crate::state::{DirLock, StateDb};

/// Shared state of a running host.
pub struct Host {
    pub(super) services: Vec<Arc<dyn DynService>>,
    pub(super) loader: Loader,
    pub(super) source: ConfigSource,
    pub(super) settings: Settings,
    pub(super) heartbeats: Mutex<BTreeMap<&'static str, Instant>>,
    pub(super) stopping: AtomicBool,
    pub(super) in_flight: AtomicU64,
    pub(super) started: Instant,
    /// Keeps other hosts off the state dir while this one runs.
    pub(super) lock: Mutex<DirLock>,
    /// The trust settings in effect (changed by reload).
    pub(super) trust: Mutex<crate::config::TrustSettings>,
    /// Who changed what (none for hosts built without a state dir of their own, in tests).
    pub(super) audit: Option<crate::control::audit::AuditLog>,
    /// The fleet connection, while the host is in a fleet and serving.
    pub(super) fleet: Mutex<Option<plughost_fleet::Agent>>,
    /// What the last report said of each backend (state, driver): a change reports at once.
    pub(super) shape: Mutex<String>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("socket", &self.settings.socket).field("stopping", &self.stopping).finish()
    }
}

impl Host {
    /// Reads the configuration and builds every service; every error found (nothing is served then).
    pub fn start(source: ConfigSource) -> Result<Arc<Host>, Vec<String>> {
        let settings = source.load().map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        Host::start_with(source, settings)
    }

    /// Builds every service from settings already loaded from `source`.
    pub fn start_with(source: ConfigSource, settings: Settings) -> Result<Arc<Host>, Vec<String>> {
        crate::loading::trust::private_dir(&settings.state_dir, "state dir", false, true).map_err(|e| vec![e])?;
        if let Some(dir) = settings.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::loading::trust::private_dir(dir, "socket directory", true, false).map_err(|e| vec![e])?;
        }
        let lock = DirLock::take(&settings.state_dir).map_err(|e| vec![e.to_string()])?;
        let db = Arc::new(StateDb::open(&settings.state_dir).map_err(|e| vec![e.to_string()])?);
        let tables: Vec<&str> = crate::services::kinds::KINDS.iter().map(|k| k.table).collect();
        db.check_not_emptied(&settings.state_dir, &tables, settings.accept_empty_state)
            .map_err(|e| vec![e.to_string()])?;
        let audit = crate::control::audit::AuditLog::open(&settings.state_dir).map_err(|e| vec![e])?;
        let allowlist = match &settings.trust.allowlist {
            Some(p) => Some(crate::loading::loader::Allowlist::read(p).map_err(|e| vec![e])?),
            None => None,
        };
        if !settings.trust.strict {
            log::warn!("trust.strict is off: driver files that others could have written are loaded");
        }
        let mut loader = Loader::new().with_max_bytes(settings.max_driver_bytes);
        loader.set_trust(settings.trust.strict, allowlist);
        if let Some(exe) = &settings.probe {
            loader = loader.with_probe(exe.clone());
        }
        let build = BuildContext {
            loader: &loader,
            state_dir: &settings.state_dir,
            driver_dirs: &settings.driver_dirs,
            exe: settings.probe.as_deref(),
        };
        let mut errors = Vec::new();
        let mut services = Vec::new();
        // Services build side by side: a slow backend of one holds up no other.
        let built: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = settings
                .services
                .iter()
                .map(|spec| {
                    let db = &db;
                    let state_dir = &settings.state_dir;
                    scope.spawn(move || {
                        let ctx = ServiceContext {
                            build,
                            service: spec.kind.name,
                            backends: &spec.backends,
                            default_backend: &spec.default_backend,
                            state_dir,
                            db,
                        };
                        (spec.kind.build)(&ctx)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        for b in built {
            match b {
                Ok(Ok(s)) => services.push(s),
                Ok(Err(e)) => errors.extend(e),
                Err(_) => errors.push("building a service panicked".to_owned()),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        db.mark_held(&tables);
        // Absolute: instances' namespace paths are handed to drivers, which refuse relative ones, and
        // `--socket s/sock` (relative) is a valid flag.
        let runtime_dir = match settings.socket.parent() {
            Some(d) if !d.as_os_str().is_empty() => std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf()),
            _ => std::path::absolute(&settings.state_dir).unwrap_or_else(|_| settings.state_dir.clone()),
        };
        let links = crate::services::Links { services: &services, runtime_dir: &runtime_dir };
        for s in &services {
            s.link(&links);
        }
        let now = Instant::now();
        let heartbeats = services.iter().map(|s| (s.kind().name, now)).collect();
        let trust = settings.trust.clone();
        Ok(Arc::new(Host {
            services,
            loader,
            source,
            settings,
            heartbeats: Mutex::new(heartbeats),
            stopping: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            started: Instant::now(),
            lock: Mutex::new(lock),
            trust: Mutex::new(trust),
            audit: Some(audit),
            fleet: Mutex::new(None),
            shape: Mutex::new(String::new()),
        }))
    }

    /// The settings the host started with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(super) fn service(&self, name: &str) -> Result<&Arc<dyn DynService>, ApiError> {
        self.services.iter().find(|s| s.kind().name == name).ok_or_else(|| {
            let what = if crate::services::kinds::kind(name).is_some() {
                format!("the {name} service is not enabled")
            } else {
                let known: Vec<&str> = crate::services::kinds::KINDS.iter().map(|k| k.name).collect();
                format!("unknown service {} ({})", crate::util::fmt::echo(name), known.join(", "))
            };
            ApiError::new(ErrorKind::UnknownService, what)
        })
    }

    /// Refuses a peer that is not an admin.
    pub(super) fn admin(peer: &Peer, what: &str) -> Result<(), ApiError> {
        if peer.is_admin() {
            return Ok(());
        }
        let needs = if peer.remote.is_some() {
            "changes go to an admin subject, which the broker opens to admins only"
        } else {
            "changes need root or plughost's user"
        };
        Err(ApiError::new(
            ErrorKind::PermissionDenied,
            format!("{what}: {} may only read (status, get, list, stats); {needs}", peer.who()),
        ))
    }

    /// Runs one request for `peer`. Reads are open to every peer that can connect; mutations, swaps,
    /// reloads and the audit log need an admin. Every mutation, swap and reload (and every refusal) is
    /// audited.
    pub(super) fn dispatch(&self, body: Body<'_>, peer: &Peer) -> Result<String, ApiError> {
        let audited = |service: Option<&str>,
                       op: &str,
                       args: Option<Box<serde_json::value::RawValue>>,
                       r: &Result<String, ApiError>| {
            if let Some(a) = &self.audit {
                a.record(peer, service, op, args, r.as_ref().map(drop));
            }
        };
        match body {
            Body::Ping => to_json(&Pong { pong: true }),
            Body::Status => to_json(&self.status()),
            Body::Metrics => to_json(&crate::control::protocol::MetricsText {
                format: "openmetrics-text".to_owned(),
                text: self.metrics(),
            }),
            Body::Audit(args) => {
                Self::admin(peer, "audit")?;
                let log = self.audit.as_ref().ok_or_else(|| ApiError::internal("this host keeps no audit log"))?;
                to_json(&log.read(args.since)?)
            }
            Body::Reload => {
                let r = Self::admin(peer, "reload").and_then(|()| to_json(&self.reload()?));
                audited(None, "reload", None, &r);
                self.report_if_changed();
                r
            }
            Body::Swap { service, args } => {
                let r = Self::admin(peer, "swap").and_then(|()| {
                    if args.dry_run {
                        to_json(&self.swap_check(&service, &args)?)
                    } else {
                        to_json(&self.swap(&service, &args)?)
                    }
                });
                // A dry run changes nothing: the audit log is who changed what.
                if !args.dry_run {
                    audited(Some(&service), "swap", serde_json::value::to_raw_value(&args).ok(), &r);
                }
                self.report_if_changed();
                r
            }
            Body::Restart { service, args } => {
                let r = Self::admin(peer, "restart").and_then(|()| to_json(&self.restart(&service, &args)?));
                audited(Some(&service), "restart", serde_json::value::to_raw_value(&args).ok(), &r);
                self.report_if_changed();
                r
            }
            Body::Service { service, op, args } => {
                let s = self.service(&service)?;
                if op.reads() {
                    return s.handle(op);
                }
                let name = op.name();
                let r = Self::admin(peer, &format!("{service} {name}")).and_then(|()| s.handle(op));
                audited(Some(&service), name, args.map(ToOwned::to_owned), &r);
                r
            }
        }
    }

    /// The `status` answer.
    pub fn status(&self) -> HostStatus {
        let heartbeats = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let services = self
            .services
            .iter()
            .map(|s| {
                let default = s.default_backend();
                let backends: Vec<_> =
                    s.backends().iter().map(|b| b.status(b.name() == default, s.capacity(b.name()))).collect();
                let up = backends.iter().filter(|b| b.state == State::Up).count();
                let state = match up {
                    n if n == backends.len() => State::Up,
                    0 => State::Down,
                    _ => State::Degraded,
                };
                let reasons: Vec<String> =
                    backends.iter().filter_map(|b| b.reason.as_ref().map(|r| format!("{}: {r}", b.name))).collect();
                ServiceStatus {
                    name: s.kind().name.to_owned(),
                    state,
                    reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
                    heartbeat_age_ms: heartbeats.get(s.kind().name).map(|t| t.elapsed().as_millis() as u64),
                    default_backend: default.to_owned(),
                    backends,
                    records: s.records() as u64,
                    last_reconcile: s.last_reconcile(),
                }
            })
            .collect();
        let mapped = self.loader.mapped();
        let active: Vec<String> =
            self.services.iter().flat_map(|s| s.backends().iter().map(|b| b.active_digest())).collect();
        let retired: Vec<_> = mapped.iter().filter(|m| !active.contains(&m.digest)).collect();
        let fleet = self.fleet.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|a| a.status());
        HostStatus {
            fleet,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            socket: self.settings.socket.display().to_string(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            services,
            libraries: LibrariesStatus {
                mapped: mapped.len() as u64,
                mapped_bytes: mapped.iter().map(|m| m.size).sum(),
                retired: retired.len() as u64,
                retired_bytes: retired.iter().map(|m| m.size).sum(),
                note: "driver libraries are never unloaded; each distinct file content stays mapped until exit"
                    .to_owned(),
            },
            trust: {
                let t = self.trust.lock().unwrap_or_else(|p| p.into_inner()).clone();
                TrustStatus {
                    strict: t.strict,
                    allowlist: t.allowlist.as_ref().map(|p| p.display().to_string()),
                    require_pins: t.require_pins,
                    allow_swap_paths: t.allow_swap_paths,
                    socket_group: self.settings.socket_group.clone(),
                    warning: (!t.strict).then(|| {
                        "trust.strict is off: driver files that others could have written are loaded".to_owned()
                    }),
                }
            },
        }
    }

    pub(super) fn build_context(&self) -> BuildContext<'_> {
        BuildContext {
            loader: &self.loader,
            state_dir: &self.settings.state_dir,
            driver_dirs: &self.settings.driver_dirs,
            exe: self.settings.probe.as_deref(),
        }
    }

    /// One round of periodic work for service `i`, and its heartbeat.
    pub(super) fn periodic(&self, i: usize) {
        // Before each round: the state dir is still this host's (see `DirLock::verify`).
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).verify();
        let s = &self.services[i];
        s.periodic();
        self.heartbeats.lock().unwrap_or_else(|p| p.into_inner()).insert(s.kind().name, Instant::now());
        self.report_if_changed();
    }

    /// Whether a stop has begun.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Startup lines: one per backend, with its driver and state.
    pub fn describe(&self) -> Vec<String> {
        self.status()
            .services
            .iter()
            .flat_map(|s| {
                s.backends.iter().map(move |b| {
                    format!("{} backend {:?}: {} {} ({})", s.name, b.name, b.driver.name, b.driver.version, b.state)
                })
            })
            .collect()
    }

    /// Whether any backend of any service is down.
    pub fn any_down(&self) -> bool {
        self.services.iter().any(|s| s.backends().iter().any(|b| b.health() != Health::Up))
    }
}

impl Host {
    /// Reads one request line and runs it for `peer`, after `admit` (which may refuse it: the refusal is
    /// audited like any other).
    pub(super) fn handle_with(
        &self,
        line: &[u8],
        peer: &Peer,
        admit: impl FnOnce(&Body<'_>) -> Result<(), ApiError>,
    ) -> String {
        let Ok(line) = std::str::from_utf8(line) else {
            return answer(None, Err(ApiError::new(ErrorKind::InvalidRequest, "request is not valid UTF-8")));
        };
        let kind = |name: &str| -> Result<OpParser, ApiError> { Ok(self.service(name)?.kind().parse) };
        let req = match parse_request(line, &kind) {
            Ok(r) => r,
            Err(bad) => {
                // An attempt at a service operation that was not understood is audited as a change would
                // be: who tried what, and why it was refused.
                if let (Some(a), Some(log)) = (&bad.attempt, &self.audit) {
                    log.record(peer, Some(&a.service), &a.op, a.args.map(ToOwned::to_owned), Err(&bad.error));
                }
                return answer(bad.id, Err(bad.error));
            }
        };
        if let Err(e) = admit(&req.body) {
            if let Some(log) = &self.audit {
                let args = match &req.body {
                    Body::Service { args, .. } => args.map(ToOwned::to_owned),
                    Body::Swap { args, .. } => serde_json::value::to_raw_value(args).ok(),
                    Body::Restart { args, .. } => serde_json::value::to_raw_value(args).ok(),
                    _ => None,
                };
                log.record(peer, req.body.service(), req.body.op(), args, Err(&e));
            }
            return answer(req.id, Err(e));
        }
        if self.stopping.load(Ordering::SeqCst) {
            return answer(req.id, Err(ApiError::new(ErrorKind::ShuttingDown, "plughost is stopping")));
        }
        let fields = log::log_enabled!(target: "plughost::request", log::Level::Debug).then(|| {
            let args = match &req.body {
                Body::Service { args, .. } => *args,
                _ => None,
            };
            (
                req.body.service().unwrap_or("-").to_owned(),
                req.body.op().to_owned(),
                req.body.backend().ok().flatten().unwrap_or_else(|| "-".to_owned()),
                crate::control::request::arg_name(args).unwrap_or_else(|| "-".to_owned()),
            )
        });
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = self.dispatch(req.body, peer);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some((service, op, backend, name)) = fields {
            let outcome = result.as_ref().map_or_else(|e| e.kind.as_str(), |_| "ok");
            log::debug!(
                target: "plughost::request",
                service = service.as_str(),
                backend = backend.as_str(),
                op = op.as_str(),
                name = name.as_str(),
                peer = peer.tag().as_str(),
                outcome = outcome;
                "request"
            );
        }
        answer(req.id, result)
    }
}

impl Handler for Host {
    fn handle(&self, line: &[u8], peer: &Peer) -> String {
        self.handle_with(line, peer, |_| Ok(()))
    }

    fn too_long(&self, limit: usize) -> String {
        answer(
            None,
            Err(ApiError::new(
                ErrorKind::InvalidRequest,
                format!("request line longer than {limit} bytes (max_request_bytes); closing the connection"),
            )),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, RunFlags};
    use serde_json::Value;

    /// A host over an in-memory volume service, with a state dir (lock, audit log) of its own.
    fn host(tag: &str) -> (Host, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("plughost-dispatch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (volume, _driver) = crate::services::volume::tests::service();
        let flags = RunFlags { state_dir: Some(dir.clone()), ..RunFlags::default() };
        let settings = crate::config::resolve(&flags, &FileConfig::default()).unwrap();
        let host = Host {
            services: vec![Arc::new(volume)],
            loader: Loader::new(),
            source: ConfigSource { flags },
            trust: Mutex::new(settings.trust.clone()),
            settings,
            heartbeats: Mutex::new(BTreeMap::new()),
            stopping: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            started: Instant::now(),
            lock: Mutex::new(DirLock::take(&dir).unwrap()),
            audit: Some(crate::control::audit::AuditLog::open(&dir).unwrap()),
            fleet: Mutex::new(None),
            shape: Mutex::new(String::new()),
        };
        (host, dir)
    }

    fn ask(host: &Host, peer: &Peer, line: &str) -> Value {
        serde_json::from_str(&host.handle(line.as_bytes(), peer)).unwrap()
    }

    #[test]
    fn requests_reach_their_service_typed_and_readers_only_read() {
        let (host, dir) = host("typed");
        let admin = Peer::this_process();
        let reader = Peer { uid: 65534, gid: 65534, pid: 1, remote: None };
        let create = r#"{"id":1,"service":"volume","op":"create","args":{"name":"v","size":"1KiB"}}"#;
        let v = ask(&host, &admin, create);
        assert_eq!((v["ok"].clone(), v["result"]["size"].clone()), (Value::Bool(true), Value::from(1024)), "{v}");
        // Readers read...
        let v = ask(&host, &reader, r#"{"id":2,"service":"volume","op":"get","args":{"name":"v"}}"#);
        assert_eq!(v["result"]["status"], "available", "{v}");
        assert_eq!(ask(&host, &reader, r#"{"id":3,"op":"status"}"#)["ok"], true);
        // ...and change nothing: a mutation, a swap, a reload, the audit log.
        for line in [
            r#"{"id":4,"service":"volume","op":"delete","args":{"name":"v"}}"#,
            r#"{"id":5,"service":"volume","op":"swap","args":{}}"#,
            r#"{"id":6,"op":"reload"}"#,
            r#"{"id":7,"op":"audit"}"#,
        ] {
            let v = ask(&host, &reader, line);
            assert_eq!(v["error"]["kind"], "permission_denied", "{line}: {v}");
        }
        assert_eq!(ask(&host, &admin, r#"{"service":"volume","op":"get","args":{"name":"v"}}"#)["ok"], true);
        // Unknown services and operations are refused at the edge, each naming what there is.
        let v = ask(&host, &admin, r#"{"id":8,"service":"disk","op":"get"}"#);
        assert_eq!((v["id"].clone(), v["error"]["kind"].clone()), (Value::from(8), Value::from("unknown_service")));
        assert!(
            v["error"]["message"].as_str().unwrap().contains("unknown service \"disk\" (volume, compute, network)"),
            "{v}"
        );
        let v = ask(&host, &admin, r#"{"service":"compute","op":"list"}"#);
        assert_eq!(v["error"]["message"], "the compute service is not enabled", "{v}");
        let v = ask(&host, &admin, r#"{"service":"volume","op":"frob"}"#);
        assert!(v["error"]["message"].as_str().unwrap().ends_with("stats, swap, restart)"), "{v}");
        // Every change and every refused attempt at one is audited, with who asked.
        let log = host.audit.as_ref().unwrap().read(None).unwrap();
        let seen: Vec<(u32, Option<&str>, &str, &str)> = log
            .iter()
            .map(|e| (e.uid.unwrap_or(u32::MAX), e.service.as_deref(), e.op.as_str(), e.outcome.as_str()))
            .collect();
        let me = admin.uid;
        assert_eq!(
            seen,
            [
                (me, Some("volume"), "create", "ok"),
                (65534, Some("volume"), "delete", "permission_denied"),
                (65534, Some("volume"), "swap", "permission_denied"),
                (65534, None, "reload", "permission_denied"),
                (me, Some("volume"), "frob", "invalid_request"),
            ]
        );
        drop(host);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
