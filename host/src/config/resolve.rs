//! Resolution: command line > environment > config file > defaults, merged into [`Settings`]; the
//! trust settings in effect and what a reload may not relax; where state and socket go by default.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::error::ConfigError;
use super::file::*;
use super::flags::*;
pub(super) use crate::backend::settings::{BackendSettings, BackendSpec, Isolation};
use crate::services::kinds::{self, KINDS};
use crate::services::ServiceKind;

/// The trust settings in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSettings {
    /// Driver files, and every directory above them, must be owned by root or plughost's user and not
    /// writable by others (default); off, they load with a warning.
    pub strict: bool,
    /// Nothing whose digest is not listed in this file loads.
    pub allowlist: Option<PathBuf>,
    /// Every backend must pin its driver's digest.
    pub require_pins: bool,
    /// `swap` may name a path outside the driver directories.
    pub allow_swap_paths: bool,
}

impl Default for TrustSettings {
    fn default() -> TrustSettings {
        TrustSettings { strict: true, allowlist: None, require_pins: false, allow_swap_paths: false }
    }
}

impl TrustSettings {
    /// What `new` would relax compared with these settings: each as the key and its change. A reload may
    /// tighten the policy or change the allow list's contents, never relax it (that takes a restart, by
    /// whoever may start the host).
    pub fn relaxed_by(&self, new: &TrustSettings) -> Vec<String> {
        let mut relaxed = Vec::new();
        if self.strict && !new.strict {
            relaxed.push("trust.strict true -> false".to_owned());
        }
        if self.require_pins && !new.require_pins {
            relaxed.push("trust.require_pins true -> false".to_owned());
        }
        if !self.allow_swap_paths && new.allow_swap_paths {
            relaxed.push("trust.allow_swap_paths false -> true".to_owned());
        }
        if self.allowlist.is_some() && new.allowlist.is_none() {
            relaxed.push("trust.allowlist removed".to_owned());
        }
        relaxed
    }
}

/// Splits `DRIVER@blake3:HEX` into the driver and its pin.
fn split_pin(flag: &str, spec: &str) -> Result<(String, Option<String>), ConfigError> {
    match spec.rsplit_once("@blake3:") {
        Some((driver, hex)) => {
            let pin = format!("blake3:{hex}");
            check_digest(flag, &pin)?;
            Ok((driver.to_owned(), Some(pin.to_ascii_lowercase())))
        }
        None => Ok((spec.to_owned(), None)),
    }
}

fn check_digest(at: &str, digest: &str) -> Result<(), ConfigError> {
    if crate::loading::loader::is_digest(digest) {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!("{at}: digest {digest:?} is not blake3: and 64 hex digits")))
}

/// One service to start.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Its kind.
    pub kind: &'static ServiceKind,
    /// Backends, in order.
    pub backends: Vec<BackendSpec>,
    /// Name of the default backend.
    pub default_backend: String,
}

/// Everything `plughost run` needs, merged from flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// State directory (absolute).
    pub state_dir: PathBuf,
    /// Control socket path.
    pub socket: PathBuf,
    /// Driver directories for NAME lookups.
    pub driver_dirs: Vec<PathBuf>,
    /// The enabled services, in table order.
    pub services: Vec<ServiceSpec>,
    /// How long a graceful stop waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Spacing of periodic tasks.
    pub periodic_interval: Duration,
    /// Largest request line accepted on the control socket.
    pub max_request_bytes: usize,
    /// Connections served at once for admins (readers: a quarter, at least one).
    pub max_connections: usize,
    /// The `plughost` executable, to load new driver content in a child process first; `None` loads
    /// in-process only.
    pub probe: Option<PathBuf>,
    /// Which driver code may load.
    pub trust: TrustSettings,
    /// The group that may read through the socket.
    pub socket_group: Option<String>,
    /// Largest driver file accepted.
    pub max_driver_bytes: u64,
    /// Start although state.db lost the records it held.
    pub accept_empty_state: bool,
    /// The fleet to join, when a URL is given.
    pub fleet: Option<FleetSpec>,
    /// Where to serve metrics over HTTP, when asked.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// A host's fleet settings and where its credentials came from.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    /// What the fleet agent needs.
    pub settings: plughost_fleet::FleetSettings,
    /// The credentials file, if any.
    pub credentials_path: Option<PathBuf>,
}

/// Reads a broker credentials file: it must pass the driver files' owner and mode checks (whoever can
/// write it can point the host at their own broker account) and must not be readable by others (it
/// holds a secret).
pub fn read_credentials(path: &std::path::Path) -> Result<plughost_fleet::Credentials, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display().to_string();
    crate::loading::trust::check_config_file(path)
        .map_err(|u| ConfigError::Untrusted { path: path.to_owned(), reason: u.relative_to(path) })?;
    let meta = std::fs::metadata(path)
        .map_err(|e| ConfigError::Read { path: path.to_owned(), reason: crate::util::fmt::io_text(&e) })?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(ConfigError::Untrusted {
            path: path.to_owned(),
            reason: format!(
                "readable by others (mode {:04o}): it holds a secret; chmod o-r",
                meta.permissions().mode() & 0o7777
            ),
        });
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.to_owned(), reason: crate::util::fmt::io_text(&e) })?;
    plughost_fleet::Credentials::parse(&shown, &text).map_err(ConfigError::Invalid)
}

/// `[fleet]` with its flags and environment; `None` when no URL is given (nothing of the fleet starts).
fn fleet_spec(flags: &RunFlags, file: &FleetConfig) -> Result<Option<FleetSpec>, ConfigError> {
    let urls: Vec<String> = if flags.fleet_urls.is_empty() {
        file.url.as_ref().map(Urls::list).unwrap_or_default()
    } else {
        flags.fleet_urls.clone()
    };
    let urls: Vec<String> = urls.into_iter().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
    if urls.is_empty() {
        return Ok(None);
    }
    let invalid = ConfigError::Invalid;
    let allow_plaintext = file.allow_plaintext.unwrap_or(false);
    for u in &urls {
        plughost_fleet::check_url(u, allow_plaintext).map_err(invalid)?;
    }
    let name = flags.fleet_name.clone().or_else(|| file.name.clone()).unwrap_or_else(|| "default".to_owned());
    plughost_fleet::names::check("fleet name", &name).map_err(invalid)?;
    let host = match flags.host_name.clone().or_else(|| file.host.clone()) {
        Some(h) => {
            plughost_fleet::names::check("fleet host", &h).map_err(invalid)?;
            h
        }
        None => plughost_fleet::names::default_host().map_err(invalid)?,
    };
    let duration = |key: &str, flag: &Option<String>, value: &Option<toml::Value>, default: u64| {
        let text = match (flag, value) {
            (Some(f), _) => f.clone(),
            (None, Some(v)) => value_text(key, v)?,
            (None, None) => return Ok(Duration::from_secs(default)),
        };
        crate::util::time::parse_duration(&text).map_err(|e| invalid(format!("fleet.{key}: {e}")))
    };
    let report_interval = duration("report_interval", &flags.fleet_report_interval, &file.report_interval, 10)?;
    let down = duration("service_down_time", &flags.fleet_service_down_time, &file.service_down_time, 60)?;
    if report_interval < Duration::from_millis(100) {
        return Err(invalid(format!("fleet.report_interval {report_interval:?}: at least 100ms")));
    }
    if down <= report_interval * 2 {
        return Err(invalid(format!(
            "fleet.service_down_time {down:?} must be more than twice fleet.report_interval {report_interval:?} (one lost report must not mark a host down)"
        )));
    }
    let workers = file.request_workers.unwrap_or(8);
    if !(1..=256).contains(&workers) {
        return Err(invalid(format!("fleet.request_workers {workers}: between 1 and 256")));
    }
    let mut labels = file.labels.clone();
    for l in &flags.fleet_labels {
        let (k, v) = split_kv("--fleet-label", l)?;
        labels.insert(k, v);
    }
    for (k, v) in &labels {
        plughost_fleet::names::check("fleet label", k).map_err(invalid)?;
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(invalid(format!("fleet label {k}: value longer than 256 bytes or with control characters")));
        }
    }
    let credentials_path = flags.fleet_credentials.clone().or_else(|| file.credentials.clone());
    let credentials = credentials_path.as_deref().map(read_credentials).transpose()?;
    Ok(Some(FleetSpec {
        settings: plughost_fleet::FleetSettings {
            urls,
            name,
            host,
            credentials,
            report_interval,
            service_down_time: down,
            request_workers: usize::try_from(workers).unwrap_or(8),
            labels,
            allow_plaintext,
        },
        credentials_path,
    }))
}

/// Where the configuration comes from: the flags given at start (environment included) and the file
/// they name. Reloading reads the file again with the same flags.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The flags.
    pub flags: RunFlags,
}

impl ConfigSource {
    /// Reads the file (if any) and merges everything into settings; every error found.
    pub fn load(&self) -> Result<Settings, Vec<ConfigError>> {
        let file = match self.flags.config.clone().or_else(default_config) {
            Some(p) => read_file(&p).map_err(|e| vec![e])?,
            None => FileConfig::default(),
        };
        resolve(&self.flags, &file)
    }
}

/// Merges flags and file into settings.
pub fn resolve(flags: &RunFlags, file: &FileConfig) -> Result<Settings, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut services = Vec::new();
    for k in KINDS {
        let none = ServiceFlags::default();
        let f = flags.services.0.get(k.name).unwrap_or(&none);
        match service_spec(k, file.services.get(k.name), f) {
            Ok(Some(mut s)) => match apply_setting_flags(&mut s, &flags.stop_instances_on_exit, &flags.isolate) {
                Ok(()) => services.push(s),
                Err(e) => errors.push(e),
            },
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    let targets = flags.stop_instances_on_exit.iter().map(|t| ("--stop-instances-on-exit", t));
    for (flag, target) in targets.chain(flags.isolate.iter().map(|t| ("--isolate", t))) {
        let service = target.split('/').next().unwrap_or_default();
        if kinds::kind(service).is_none() {
            let known: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
            errors.push(ConfigError::Invalid(format!(
                "{flag} {target:?}: unknown service {service:?} ({})",
                known.join(", ")
            )));
        }
    }
    let fleet = match fleet_spec(flags, &file.fleet) {
        Ok(f) => f,
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let metrics_listen = match flags.metrics_listen.as_ref().or(file.metrics_listen.as_ref()) {
        Some(a) => match a.parse::<std::net::SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errors.push(ConfigError::Invalid(format!(
                    "metrics_listen {a:?}: expected an address and port like 127.0.0.1:9464 or [::1]:9464"
                )));
                None
            }
        },
        None => None,
    };
    if errors.is_empty() && services.is_empty() {
        errors.push(ConfigError::Invalid("every service is disabled: nothing to run".to_owned()));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let state_dir = flags.state_dir.clone().or_else(|| file.state_dir.clone()).unwrap_or_else(default_state_dir);
    let state_dir = std::path::absolute(&state_dir).unwrap_or(state_dir);
    let socket = flags.socket.clone().or_else(|| file.socket.clone()).unwrap_or_else(|| {
        // A state dir named by the user keeps its socket; the system defaults put it in /run.
        if flags.state_dir.is_some() || file.state_dir.is_some() {
            systemd_dir("RUNTIME_DIRECTORY").unwrap_or_else(|| state_dir.clone()).join("plughost.sock")
        } else {
            default_socket_for(&state_dir)
        }
    });
    let mut dirs = flags.driver_dirs.clone();
    dirs.extend(file.driver_dirs.iter().cloned());
    let max_request_bytes = flags.max_request_bytes.or(file.max_request_bytes).unwrap_or(1 << 20);
    let t = &file.trust;
    let trust = TrustSettings {
        strict: !flags.allow_untrusted_drivers && t.strict.unwrap_or(true),
        allowlist: t.allowlist.clone(),
        require_pins: t.require_pins.unwrap_or(false),
        allow_swap_paths: flags.allow_swap_paths || t.allow_swap_paths.unwrap_or(false),
    };
    if trust.require_pins {
        let unpinned: Vec<String> = services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter(|b| b.settings.digest.is_none())
                    .map(move |b| format!("{} backend {:?}", s.kind.name, b.name))
            })
            .collect();
        if !unpinned.is_empty() {
            return Err(vec![ConfigError::Invalid(format!(
                "trust.require_pins is set but these backends pin no digest: {}",
                unpinned.join(", ")
            ))]);
        }
    }
    Ok(Settings {
        driver_dirs: crate::loading::drivers::driver_dirs(&dirs),
        state_dir,
        socket,
        services,
        shutdown_timeout: Duration::from_millis(
            flags.shutdown_timeout_ms.or(file.shutdown_timeout_ms).unwrap_or(10_000),
        ),
        periodic_interval: Duration::from_millis(
            flags.periodic_interval_ms.or(file.periodic_interval_ms).unwrap_or(10_000).max(10),
        ),
        max_request_bytes: usize::try_from(max_request_bytes.max(64)).unwrap_or(usize::MAX),
        max_connections: usize::try_from(flags.max_connections.or(file.max_connections).unwrap_or(512).max(1))
            .unwrap_or(usize::MAX),
        probe: std::env::current_exe().ok(),
        trust,
        socket_group: flags.socket_group.clone().or_else(|| file.socket_group.clone()),
        max_driver_bytes: flags
            .max_driver_bytes
            .or(file.max_driver_bytes)
            .unwrap_or(crate::loading::loader::DEFAULT_MAX_DRIVER_BYTES),
        accept_empty_state: flags.accept_empty_state,
        fleet,
        metrics_listen,
    })
}

/// An option value as given, or where it says to find it, so that secrets stay off the command line
/// and out of the config file: `@FILE` (the file's contents without the final newline; the file must
/// pass the config file's owner and mode checks and not be readable by others), `@env:NAME` (an
/// environment variable of the host), `@@…` (a value that starts with `@`).
fn option_value(at: &str, key: &str, raw: &str) -> Result<String, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let Some(rest) = raw.strip_prefix('@') else { return Ok(raw.to_owned()) };
    if rest.starts_with('@') {
        return Ok(rest.to_owned());
    }
    if let Some(var) = rest.strip_prefix("env:") {
        return std::env::var(var).map_err(|_| {
            ConfigError::Invalid(format!("{at}: option {key:?}: environment variable {var:?} is not set"))
        });
    }
    let path = std::path::Path::new(rest);
    crate::loading::trust::check_config_file(path).map_err(|u| ConfigError::Untrusted {
        path: path.to_owned(),
        reason: format!("{at}: option {key:?}: {}", u.relative_to(path)),
    })?;
    let read = |e: std::io::Error| ConfigError::Read {
        path: path.to_owned(),
        reason: format!("{at}: option {key:?}: {}", crate::util::fmt::io_text(&e)),
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(ConfigError::Untrusted {
            path: path.to_owned(),
            reason: format!(
                "{at}: option {key:?}: readable by others (mode {:04o}): an option file holds a secret; chmod o-r",
                meta.permissions().mode() & 0o7777
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned())
}

fn split_kv(flag: &str, text: &str) -> Result<(String, String), ConfigError> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(ConfigError::Invalid(format!("{flag} {text:?}: expected KEY=VALUE"))),
    }
}

/// Merges file and flags into the backends of one service; `None` when the service is disabled.
pub fn service_spec(
    kind: &'static ServiceKind,
    file: Option<&ServiceConfig>,
    flags: &ServiceFlags,
) -> Result<Option<ServiceSpec>, ConfigError> {
    let name = kind.name;
    let mut backends: Vec<BackendSpec> = Vec::new();
    let (flag_driver, flag_pin) = match &flags.driver {
        Some(d) => {
            let (d, pin) = split_pin(&format!("--{name}-driver"), d)?;
            (Some(d), pin)
        }
        None => (None, None),
    };
    let default_driver = flag_driver.or_else(|| file.and_then(|f| f.driver.clone()));
    let default_pin = match flag_pin {
        Some(p) => Some(p),
        None => match file.and_then(|f| f.digest.clone()) {
            Some(d) => {
                check_digest(&format!("[{name}] digest"), &d)?;
                Some(d.to_ascii_lowercase())
            }
            None => None,
        },
    };
    let file_backends = file.map(|f| f.backends.as_slice()).unwrap_or_default();
    let cli_backends: Vec<(String, String)> =
        flags.backends.iter().map(|b| split_kv(&format!("--{name}-backend"), b)).collect::<Result<_, _>>()?;
    if default_driver.as_deref() == Some("none") {
        return Ok(None);
    }
    // A kind added after an installation was set up stays off until it is configured: an upgrade never
    // makes a working configuration fail to start for want of a driver of the new kind.
    if !kind.on_by_default && default_driver.is_none() && file.is_none() && cli_backends.is_empty() {
        return Ok(None);
    }
    let section = format!("[{name}]");
    let service_settings = match file {
        Some(f) => SettingsConfig {
            stop_instances_on_exit: f.stop_instances_on_exit,
            isolation: f.isolation.clone(),
            user: f.user.clone(),
            group: f.group.clone(),
            memory_limit: f.memory_limit.clone(),
            call_timeout: f.call_timeout.clone(),
            max_frame_bytes: f.max_frame_bytes.clone(),
            max_records: f.max_records,
        }
        .apply(kind, &BackendSettings::default(), &section)?,
        None => BackendSettings::default(),
    };
    // The `default` backend exists when a driver is named for it, or when no backend is named at all.
    if default_driver.is_some() || (file_backends.is_empty() && cli_backends.is_empty()) {
        backends.push(BackendSpec {
            name: "default".to_owned(),
            driver: default_driver.unwrap_or_else(|| kind.default_driver.to_owned()),
            options: file.map(|f| options(&f.options)).transpose()?.unwrap_or_default(),
            settings: BackendSettings { digest: default_pin, ..service_settings.clone() },
        });
    }
    for b in file_backends {
        let at = format!("[[{name}.backends]] {:?}", b.name);
        let mut settings = SettingsConfig {
            stop_instances_on_exit: b.stop_instances_on_exit,
            isolation: b.isolation.clone(),
            user: b.user.clone(),
            group: b.group.clone(),
            memory_limit: b.memory_limit.clone(),
            call_timeout: b.call_timeout.clone(),
            max_frame_bytes: b.max_frame_bytes.clone(),
            max_records: b.max_records,
        }
        .apply(kind, &service_settings, &at)?;
        if let Some(d) = &b.digest {
            check_digest(&at, d)?;
            settings.digest = Some(d.to_ascii_lowercase());
        }
        backends.push(BackendSpec {
            name: b.name.clone(),
            driver: b.driver.clone(),
            options: options(&b.options)?,
            settings,
        });
    }
    for (backend, driver) in cli_backends {
        let (driver, pin) = split_pin(&format!("--{name}-backend {backend}"), &driver)?;
        match backends.iter_mut().find(|b| b.name == backend) {
            Some(b) => {
                b.driver = driver;
                if pin.is_some() {
                    b.settings.digest = pin;
                }
            }
            None => backends.push(BackendSpec {
                name: backend,
                driver,
                options: Vec::new(),
                settings: BackendSettings { digest: pin, ..service_settings.clone() },
            }),
        }
    }
    for (i, b) in backends.iter().enumerate() {
        let ok = !b.name.is_empty() && b.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(ConfigError::Invalid(format!("{name} backend name {:?}: use A-Z a-z 0-9 - _", b.name)));
        }
        if backends[..i].iter().any(|o| o.name == b.name) {
            return Err(ConfigError::Invalid(format!("{name} backend {:?} is defined twice", b.name)));
        }
    }
    for o in &flags.opts {
        let (key, value) = split_kv(&format!("--{name}-opt"), o)?;
        let (backend, key) = match key.split_once(':') {
            Some((b, k)) => (b.to_owned(), k.to_owned()),
            None => (backends.first().map(|b| b.name.clone()).unwrap_or_default(), key),
        };
        let b = backends
            .iter_mut()
            .find(|b| b.name == backend)
            .ok_or_else(|| ConfigError::Invalid(format!("--{name}-opt {o:?}: no {name} backend named {backend:?}")))?;
        b.options.retain(|(k, _)| *k != key);
        b.options.push((key, value));
    }
    for b in backends.iter_mut() {
        let at = format!("{name} backend {:?}", b.name);
        for (k, v) in b.options.iter_mut() {
            *v = option_value(&at, k, v)?;
        }
    }
    let default_backend = flags
        .default_backend
        .clone()
        .or_else(|| file.and_then(|f| f.default_backend.clone()))
        .or_else(|| backends.first().map(|b| b.name.clone()))
        .unwrap_or_default();
    if !backends.iter().any(|b| b.name == default_backend) {
        return Err(ConfigError::Invalid(format!("default {name} backend {default_backend:?} is not defined")));
    }
    Ok(Some(ServiceSpec { kind, backends, default_backend }))
}

/// Applies the `--stop-instances-on-exit` and `--isolate SERVICE[/BACKEND]` flags naming this service.
fn apply_setting_flags(spec: &mut ServiceSpec, stop: &[String], isolate: &[String]) -> Result<(), ConfigError> {
    let flags = stop.iter().map(|t| ("--stop-instances-on-exit", t)).chain(isolate.iter().map(|t| ("--isolate", t)));
    for (name, target) in flags {
        let (service, backend) = match target.split_once('/') {
            Some((s, b)) => (s, Some(b)),
            None => (target.as_str(), None),
        };
        if service != spec.kind.name {
            continue;
        }
        let flag = format!("{name} {target:?}");
        if name == "--stop-instances-on-exit" {
            check_setting(spec.kind, "stop_instances_on_exit", &flag)?;
        }
        let mut matched = false;
        for b in spec.backends.iter_mut().filter(|b| backend.is_none_or(|n| n == b.name)) {
            if name == "--isolate" {
                b.settings.isolation = Isolation::Process;
            } else {
                b.settings.stop_instances_on_exit = true;
            }
            matched = true;
        }
        if !matched {
            return Err(ConfigError::Invalid(format!(
                "{flag}: no {service} backend named {:?}",
                backend.unwrap_or("")
            )));
        }
    }
    Ok(())
}

/// The built-in state directory: `$XDG_STATE_HOME/plughost`, else `$HOME/.local/state/plughost`,
/// else `./state`.
/// A systemd directory variable (`STATE_DIRECTORY`, ...): its first path.
fn systemd_dir(var: &str) -> Option<PathBuf> {
    let v = std::env::var(var).ok()?;
    v.split(':').next().filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// Whether plughost runs as a system daemon: as root, or under systemd with its directories set. Then
/// state, socket and config default to `/var/lib/plughost`, `/run/plughost` and `/etc/plughost`.
fn system_daemon() -> bool {
    crate::loading::trust::euid() == 0
        || ["STATE_DIRECTORY", "RUNTIME_DIRECTORY", "CONFIGURATION_DIRECTORY"].iter().any(|v| systemd_dir(v).is_some())
}

/// The config file read when none is named: `$CONFIGURATION_DIRECTORY/plughost.toml` or
/// `/etc/plughost/plughost.toml` for a system daemon, if it exists.
pub(super) fn default_config() -> Option<PathBuf> {
    if !system_daemon() {
        return None;
    }
    let dir = systemd_dir("CONFIGURATION_DIRECTORY").unwrap_or_else(|| PathBuf::from("/etc/plughost"));
    Some(dir.join("plughost.toml")).filter(|p| p.exists())
}

/// The state directory when none is named: `$STATE_DIRECTORY`, or `/var/lib/plughost` for root;
/// otherwise `$XDG_STATE_HOME/plughost` or `~/.local/state/plughost`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = systemd_dir("STATE_DIRECTORY") {
        return d;
    }
    if crate::loading::trust::euid() == 0 {
        return PathBuf::from("/var/lib/plughost");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("plughost");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".local/state/plughost");
    }
    PathBuf::from("state")
}

/// The control socket `ctl` talks to when `--socket` is not given: `$PLUGHOST_SOCKET`, else
/// `$PLUGHOST_STATE_DIR/plughost.sock`, else the default state dir's.
pub fn default_socket() -> PathBuf {
    if let Some(s) = std::env::var_os("PLUGHOST_SOCKET").filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    match std::env::var_os("PLUGHOST_STATE_DIR").filter(|s| !s.is_empty()) {
        Some(state) => PathBuf::from(state).join("plughost.sock"),
        None => default_socket_for(&default_state_dir()),
    }
}

/// The socket when none is named, for a host with state dir `state_dir`: `$RUNTIME_DIRECTORY/plughost.sock`
/// or `/run/plughost/plughost.sock` for a system daemon, else in the state dir.
pub(super) fn default_socket_for(state_dir: &std::path::Path) -> PathBuf {
    if let Some(d) = systemd_dir("RUNTIME_DIRECTORY") {
        return d.join("plughost.sock");
    }
    if system_daemon() {
        return PathBuf::from("/run/plughost/plughost.sock");
    }
    state_dir.join("plughost.sock")
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.driver)
    }
}

/// The service kind named `name` (for messages about a section or flag).
pub fn service_kind(name: &str) -> Option<&'static ServiceKind> {
    kinds::kind(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind added after an installation was set up (off by default), with the volume service's types.
    static LATE: ServiceKind = ServiceKind::of::<crate::services::volume::VolumeService>(
        "late",
        "A kind added later",
        "fake-volume",
        false,
        &[],
    );

    #[test]
    fn a_kind_that_is_not_on_by_default_runs_only_once_configured() {
        let none = ServiceFlags::default();
        assert!(service_spec(&LATE, None, &none).unwrap().is_none(), "off when nothing names it");
        let named = ServiceFlags { driver: Some("fake-volume".into()), ..ServiceFlags::default() };
        let spec = service_spec(&LATE, None, &named).unwrap().expect("on once a driver is named");
        assert_eq!(spec.backends[0].driver, "fake-volume");
        let backend = ServiceFlags { backends: vec!["b=fake-volume".into()], ..ServiceFlags::default() };
        assert!(service_spec(&LATE, None, &backend).unwrap().is_some(), "on once a backend is named");
        // The kinds an installation already runs stay on without being named.
        let volume = crate::services::kinds::kind("volume").unwrap();
        assert!(service_spec(volume, None, &none).unwrap().is_some());
    }
}
