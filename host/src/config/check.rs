//! `plughost config check` and `config show`: what `run` would do with these flags, environment and
//! file, without taking the state dir's lock, binding the socket or loading a driver in this process
//! (drivers are described by the sandboxed child, as `inspect` does).

use serde_json::{json, Value};

use super::{ConfigSource, RunFlags, Settings};
use crate::loading::loader::{Allowlist, DriverMeta, Loader};

/// What a check found: one line per thing checked, and the problems (none: the config would start).
#[derive(Debug, Default)]
pub struct Checked {
    /// `ok: …` lines.
    pub lines: Vec<String>,
    /// One line per problem.
    pub problems: Vec<String>,
    /// The settings, when they could be read.
    pub settings: Option<Settings>,
    /// Each backend's driver, when it could be described: (service, backend, metadata, digest).
    pub drivers: Vec<(String, String, DriverMeta, String)>,
}

/// A loader for checks: it describes in a sandboxed child and never loads here.
fn loader(settings: &Settings) -> Result<Loader, String> {
    let loader = Loader::new().with_max_bytes(settings.max_driver_bytes);
    let allowlist = settings.trust.allowlist.as_deref().map(Allowlist::read).transpose()?;
    loader.set_trust(settings.trust.strict, allowlist);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the plughost executable: {e}"))?;
    Ok(loader.with_probe(exe))
}

/// Checks what `plughost run` with these flags would start with.
pub fn check(flags: RunFlags) -> Checked {
    let mut c = Checked::default();
    let source = ConfigSource { flags };
    let config = source.flags.config.clone().or_else(super::resolve::default_config);
    let settings = match source.load() {
        Ok(s) => s,
        Err(errs) => {
            c.problems.extend(errs.iter().map(ToString::to_string));
            return c;
        }
    };
    match &config {
        Some(p) => c.lines.push(format!("config \"{}\": read, owner and mode trusted", p.display())),
        None => c.lines.push("config: none (flags, environment and defaults)".to_owned()),
    }
    // The state dir as `run` would find it (nothing is created or changed here).
    let state = &settings.state_dir;
    if state.exists() {
        match crate::loading::trust::private_dir(state, "state dir", false, false) {
            Ok(()) => c.lines.push(format!("state dir \"{}\": owned by plughost's user, private", state.display())),
            Err(e) => c.problems.push(e),
        }
    } else {
        c.lines.push(format!("state dir \"{}\": will be created (0700)", state.display()));
    }
    if let Some(dir) = settings.socket.parent().filter(|d| d.exists() && *d != state.as_path()) {
        if let Err(e) = crate::loading::trust::private_dir(dir, "socket directory", true, false) {
            c.problems.push(e);
        }
    }
    let loader = match loader(&settings) {
        Ok(l) => l,
        Err(e) => {
            c.problems.push(e);
            c.settings = Some(settings);
            return c;
        }
    };
    for spec in &settings.services {
        for b in &spec.backends {
            let at = format!("{} backend {:?}", spec.kind.name, b.name);
            let path = match crate::loading::drivers::resolve(&b.driver, &settings.driver_dirs) {
                Ok(p) => p,
                Err(e) => {
                    c.problems.push(format!("{at}: {e}"));
                    continue;
                }
            };
            match loader.describe_pinned(&path, b.settings.digest.as_deref()) {
                Ok(d) if d.meta.kind != spec.kind.name => c.problems.push(format!(
                    "{at}: \"{}\" is a {} driver, not a {} driver",
                    path.display(),
                    d.meta.kind,
                    spec.kind.name
                )),
                Ok(d) => {
                    c.lines.push(format!(
                        "{at}: {} {} from \"{}\" [{}]{}",
                        d.meta.name,
                        d.meta.version,
                        path.display(),
                        d.digest,
                        if b.settings.digest.is_some() { ", pinned" } else { "" }
                    ));
                    let unknown: Vec<&str> = b
                        .options
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .filter(|k| !d.meta.options.iter().any(|o| o.name == *k))
                        .collect();
                    if !unknown.is_empty() {
                        c.problems.push(format!(
                            "{at}: unknown option(s) {} for driver {}",
                            unknown.join(", "),
                            d.meta.name
                        ));
                    }
                    let missing: Vec<&str> = d
                        .meta
                        .options
                        .iter()
                        .filter(|o| o.required && !b.options.iter().any(|(k, _)| *k == o.name))
                        .map(|o| o.name.as_str())
                        .collect();
                    if !missing.is_empty() {
                        c.problems.push(format!("{at}: required option(s) {} not given", missing.join(", ")));
                    }
                    c.drivers.push((spec.kind.name.to_owned(), b.name.clone(), d.meta, d.digest));
                }
                Err(e) => c.problems.push(format!("{at}: {}", e.report())),
            }
        }
    }
    if let Some(f) = &settings.fleet {
        c.lines.push(format!(
            "fleet {}: host {} via {}{}",
            f.settings.name,
            f.settings.host,
            f.settings.urls.join(", "),
            f.credentials_path
                .as_ref()
                .map(|p| format!(", credentials \"{}\" trusted", p.display()))
                .unwrap_or_default()
        ));
    }
    c.settings = Some(settings);
    c
}

/// The effective settings as JSON, option values of secret options (by the driver's schema) masked;
/// options of a driver that could not be described are masked too.
pub fn show(c: &Checked) -> Option<Value> {
    let s = c.settings.as_ref()?;
    let services: Vec<Value> = s
        .services
        .iter()
        .map(|spec| {
            let backends: Vec<Value> = spec
                .backends
                .iter()
                .map(|b| {
                    let meta = c.drivers.iter().find(|(svc, be, _, _)| svc == spec.kind.name && *be == b.name);
                    let options: serde_json::Map<String, Value> = b
                        .options
                        .iter()
                        .map(|(k, v)| {
                            let secret = meta.is_none_or(|(_, _, m, _)| {
                                m.options.iter().find(|o| o.name == *k).is_none_or(|o| o.secret)
                            });
                            (k.clone(), if secret { json!("(secret)") } else { json!(v) })
                        })
                        .collect();
                    json!({
                        "name": b.name,
                        "driver": b.driver,
                        "digest": b.settings.digest,
                        "options": options,
                        "isolation": format!("{:?}", b.settings.isolation).to_lowercase(),
                        "call_timeout_ms": b.settings.call_timeout.as_millis() as u64,
                        "resolved": meta.map(|(_, _, m, d)| json!({"name": m.name, "version": m.version, "digest": d})),
                    })
                })
                .collect();
            json!({"service": spec.kind.name, "default_backend": spec.default_backend, "backends": backends})
        })
        .collect();
    Some(json!({
        "state_dir": s.state_dir,
        "socket": s.socket,
        "socket_group": s.socket_group,
        "driver_dirs": s.driver_dirs,
        "shutdown_timeout_ms": s.shutdown_timeout.as_millis() as u64,
        "periodic_interval_ms": s.periodic_interval.as_millis() as u64,
        "max_request_bytes": s.max_request_bytes,
        "max_connections": s.max_connections,
        "max_driver_bytes": s.max_driver_bytes,
        "trust": {
            "strict": s.trust.strict,
            "allowlist": s.trust.allowlist,
            "require_pins": s.trust.require_pins,
            "allow_swap_paths": s.trust.allow_swap_paths,
        },
        "fleet": s.fleet.as_ref().map(|f| json!({
            "urls": f.settings.urls,
            "name": f.settings.name,
            "host": f.settings.host,
            "credentials": f.credentials_path,
            "report_interval_ms": f.settings.report_interval.as_millis() as u64,
            "service_down_time_ms": f.settings.service_down_time.as_millis() as u64,
            "request_workers": f.settings.request_workers,
            "labels": f.settings.labels,
            "allow_plaintext": f.settings.allow_plaintext,
        })),
        "services": services,
    }))
}
