//! `plughost run` settings: command line > environment (`PLUGHOST_*`, read by clap) > config file
//! (TOML) > built-in defaults. The per-service parts (`[volume]`, `--volume-driver`, ...) come from the
//! service table ([`crate::services::kinds::KINDS`]). A [`ConfigSource`] is what the host re-reads on reload.
//!
//! Why this file is long: it holds the whole configuration contract (file format, flags and their
//! environment variables, precedence, reload source) so that the rules can be read in one place.

pub mod sample;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

pub use crate::backend::settings::{BackendSettings, BackendSpec, Isolation};
use crate::services::kinds::{self, KINDS};
use crate::services::ServiceKind;

/// A configuration error, naming the file or the flag concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config \"{path}\": {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file (or a directory above it) could have been written by another user: whoever can write
    /// the config decides what code the host runs.
    #[error("config \"{path}\": untrusted: {reason}", path = .path.display())]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// The offending path and why, with its owner and mode.
        reason: String,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config \"{path}\": line {line}, column {column}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Why.
        reason: String,
    },
    /// A value given on the command line, in the environment or in the file is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// The config file's shape: a few global keys and one section per service. Unknown keys are errors.
#[derive(Debug, Default)]
pub struct FileConfig {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Control socket path.
    pub socket: Option<PathBuf>,
    /// Extra driver directories.
    pub driver_dirs: Vec<PathBuf>,
    /// How long a graceful stop waits for in-flight requests.
    pub shutdown_timeout_ms: Option<u64>,
    /// Spacing of periodic tasks.
    pub periodic_interval_ms: Option<u64>,
    /// Largest request line accepted on the control socket.
    pub max_request_bytes: Option<u64>,
    /// The group whose members may read (status, get, list, stats) through the socket.
    pub socket_group: Option<String>,
    /// Largest driver file accepted.
    pub max_driver_bytes: Option<u64>,
    /// `[trust]`.
    pub trust: TrustConfig,
    /// `[volume]`, `[compute]`, ... by service name.
    pub services: BTreeMap<&'static str, ServiceConfig>,
}

/// `[trust]`: which driver code may load, and what the socket may ask for.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Refuse driver files that others could have written (default true).
    pub strict: Option<bool>,
    /// A file of allowed digests.
    pub allowlist: Option<PathBuf>,
    /// Refuse backends without a `digest` pin.
    pub require_pins: Option<bool>,
    /// Let `swap` name a driver file outside the driver directories.
    pub allow_swap_paths: Option<bool>,
}

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

const GLOBAL_KEYS: &[&str] = &[
    "state_dir",
    "socket",
    "driver_dirs",
    "shutdown_timeout_ms",
    "periodic_interval_ms",
    "max_request_bytes",
    "socket_group",
    "max_driver_bytes",
    "trust",
];

/// Every top-level key, for error messages.
fn top_level_keys() -> &'static [&'static str] {
    static KEYS: OnceLock<Vec<&'static str>> = OnceLock::new();
    KEYS.get_or_init(|| GLOBAL_KEYS.iter().copied().chain(KINDS.iter().map(|k| k.name)).collect())
}

/// A top-level key, refused while it is read if unknown (so that the error carries its position).
struct TopKey;

impl<'de> DeserializeSeed<'de> for TopKey {
    type Value = &'static str;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'static str, D::Error> {
        let key = String::deserialize(d)?;
        top_level_keys()
            .iter()
            .copied()
            .find(|k| *k == key)
            .ok_or_else(|| serde::de::Error::unknown_field(&key, top_level_keys()))
    }
}

impl<'de> Deserialize<'de> for FileConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FileConfig, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FileConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a plughost configuration table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FileConfig, A::Error> {
                let mut c = FileConfig::default();
                while let Some(key) = map.next_key_seed(TopKey)? {
                    match key {
                        "state_dir" => c.state_dir = Some(map.next_value()?),
                        "socket" => c.socket = Some(map.next_value()?),
                        "driver_dirs" => c.driver_dirs = map.next_value()?,
                        "shutdown_timeout_ms" => c.shutdown_timeout_ms = Some(map.next_value()?),
                        "periodic_interval_ms" => c.periodic_interval_ms = Some(map.next_value()?),
                        "max_request_bytes" => c.max_request_bytes = Some(map.next_value()?),
                        "socket_group" => c.socket_group = Some(map.next_value()?),
                        "max_driver_bytes" => c.max_driver_bytes = Some(map.next_value()?),
                        "trust" => c.trust = map.next_value()?,
                        service => {
                            c.services.insert(service, map.next_value()?);
                        }
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_map(V)
    }
}

/// `[volume]`, `[compute]`, ...
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Driver of the backend named `default` (PATH or NAME; `none` disables the service).
    pub driver: Option<String>,
    /// Options of the backend named `default`.
    #[serde(default)]
    pub options: BTreeMap<String, toml::Value>,
    /// More backends (`[[volume.backends]]`).
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Which backend serves requests that name none.
    pub default_backend: Option<String>,
    /// Host-level setting for every backend of the service (each backend may override it): see
    /// [`BackendSettings::stop_instances_on_exit`]. (Settings are plain keys, not a flattened struct:
    /// serde's `flatten` would lose the line and column of errors.)
    pub stop_instances_on_exit: Option<bool>,
    /// The `default` backend's pinned driver digest (`blake3:…`).
    pub digest: Option<String>,
    /// Host-level setting: where the driver runs (`in-process` or `process`).
    pub isolation: Option<String>,
    /// Host-level setting: an isolated backend's worker's user.
    pub user: Option<String>,
    /// Host-level setting: an isolated backend's worker's group.
    pub group: Option<String>,
    /// Host-level setting: an isolated backend's worker's address-space limit (`512MiB`).
    pub memory_limit: Option<toml::Value>,
    /// Host-level setting: how long one call to an isolated backend may take (ms, or `60s`).
    pub call_timeout: Option<toml::Value>,
}

/// `[[volume.backends]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Backend name.
    pub name: String,
    /// Driver PATH or NAME.
    pub driver: String,
    /// Options.
    #[serde(default)]
    pub options: BTreeMap<String, toml::Value>,
    /// Host-level setting of this backend: see [`BackendSettings::stop_instances_on_exit`].
    pub stop_instances_on_exit: Option<bool>,
    /// This backend's pinned driver digest (`blake3:…`).
    pub digest: Option<String>,
    /// Host-level setting: where the driver runs (`in-process` or `process`).
    pub isolation: Option<String>,
    /// Host-level setting: an isolated backend's worker's user.
    pub user: Option<String>,
    /// Host-level setting: an isolated backend's worker's group.
    pub group: Option<String>,
    /// Host-level setting: an isolated backend's worker's address-space limit (`512MiB`).
    pub memory_limit: Option<toml::Value>,
    /// Host-level setting: how long one call to an isolated backend may take (ms, or `60s`).
    pub call_timeout: Option<toml::Value>,
}

/// Host-level backend settings as a config section gives them (unset: inherited or the default).
#[derive(Debug, Default, Clone)]
struct SettingsConfig {
    stop_instances_on_exit: Option<bool>,
    isolation: Option<String>,
    user: Option<String>,
    group: Option<String>,
    memory_limit: Option<toml::Value>,
    call_timeout: Option<toml::Value>,
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

impl SettingsConfig {
    /// These settings over `base`; an error names the setting and where it was given.
    fn apply(&self, kind: &ServiceKind, base: &BackendSettings, at: &str) -> Result<BackendSettings, ConfigError> {
        let mut s = base.clone();
        let bad = |key: &str, why: String| ConfigError::Invalid(format!("{at}: {key}: {why}"));
        if let Some(v) = self.stop_instances_on_exit {
            check_setting(kind, "stop_instances_on_exit", at)?;
            s.stop_instances_on_exit = v;
        }
        if let Some(i) = &self.isolation {
            s.isolation = match i.as_str() {
                "in-process" => Isolation::InProcess,
                "process" => Isolation::Process,
                other => {
                    return Err(bad("isolation", format!("expected \"in-process\" or \"process\", got {other:?}")))
                }
            };
        }
        if let Some(u) = &self.user {
            s.user = Some(u.clone());
        }
        if let Some(g) = &self.group {
            s.group = Some(g.clone());
        }
        if let Some(m) = &self.memory_limit {
            let text = value_text("memory_limit", m)?;
            s.memory_limit = Some(plughost_api::parse_size(&text).map_err(|e| bad("memory_limit", e))?);
        }
        if let Some(t) = &self.call_timeout {
            let text = value_text("call_timeout", t)?;
            s.call_timeout = crate::util::time::parse_duration(&text).map_err(|e| bad("call_timeout", e))?;
        }
        Ok(s)
    }
}

/// Refuses a setting the service does not take.
fn check_setting(kind: &ServiceKind, setting: &str, at: &str) -> Result<(), ConfigError> {
    if kind.settings.contains(&setting) {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!("{at}: {} backends have no setting {setting:?}", kind.name)))
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

/// What the command line (and environment) said about one service.
#[derive(Debug, Default, Clone)]
pub struct ServiceFlags {
    /// `--volume-driver`.
    pub driver: Option<String>,
    /// `--volume-backend NAME=DRIVER`, repeatable.
    pub backends: Vec<String>,
    /// `--volume-opt [BACKEND:]KEY=VALUE`, repeatable.
    pub opts: Vec<String>,
    /// `--default-volume-backend`.
    pub default_backend: Option<String>,
}

/// The per-service flags of `plughost run`, one group per entry of the service table.
#[derive(Debug, Default, Clone)]
pub struct ServiceFlagSet(pub BTreeMap<&'static str, ServiceFlags>);

fn flag_ids(service: &str) -> [String; 4] {
    [
        format!("{service}_driver"),
        format!("{service}_backends"),
        format!("{service}_opts"),
        format!("default_{service}_backend"),
    ]
}

impl clap::FromArgMatches for ServiceFlagSet {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut set = ServiceFlagSet::default();
        set.update_from_arg_matches(m)?;
        Ok(set)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for k in KINDS {
            let [driver, backends, opts, default] = flag_ids(k.name);
            let many = |id: &str| m.get_many::<String>(id).map(|v| v.cloned().collect()).unwrap_or_default();
            self.0.insert(
                k.name,
                ServiceFlags {
                    driver: m.get_one::<String>(&driver).cloned(),
                    backends: many(&backends),
                    opts: many(&opts),
                    default_backend: m.get_one::<String>(&default).cloned(),
                },
            );
        }
        Ok(())
    }
}

impl clap::Args for ServiceFlagSet {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction};
        for k in KINDS {
            let [driver, backends, opts, default] = flag_ids(k.name);
            let n = k.name;
            cmd = cmd
                .arg(
                    Arg::new(driver)
                        .long(format!("{n}-driver"))
                        .env(format!("PLUGHOST_{}_DRIVER", n.to_uppercase()))
                        .value_name("PATH|NAME")
                        .help(format!(
                            "Driver of the default {n} backend (PATH or NAME, or `none`; DRIVER@blake3:HEX pins its digest) [default: {}]",
                            k.default_driver
                        )),
                )
                .arg(
                    Arg::new(backends)
                        .long(format!("{n}-backend"))
                        .value_name("NAME=DRIVER")
                        .action(ArgAction::Append)
                        .help(format!(
                            "Another {n} backend, NAME=PATH|DRIVER, optionally pinned: NAME=DRIVER@blake3:HEX (repeatable)"
                        )),
                )
                .arg(
                    Arg::new(opts)
                        .long(format!("{n}-opt"))
                        .value_name("KEY=VALUE")
                        .action(ArgAction::Append)
                        .help(format!("{n} driver option KEY=VALUE (first backend) or BACKEND:KEY=VALUE (repeatable)")),
                )
                .arg(
                    Arg::new(default)
                        .long(format!("default-{n}-backend"))
                        .value_name("NAME")
                        .help(format!("{n} backend used when a request names none")),
                );
        }
        cmd
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// The flags of `plughost run` (and the environment variables clap reads for them).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunFlags {
    /// TOML config file
    #[arg(long, env = "PLUGHOST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory to search for driver NAMEs (repeatable)
    #[arg(long = "driver-dir", value_name = "DIR")]
    pub driver_dirs: Vec<PathBuf>,
    /// State directory [default: $XDG_STATE_HOME/plughost or ~/.local/state/plughost]
    #[arg(long, env = "PLUGHOST_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket [default: STATE_DIR/plughost.sock]
    #[arg(long, env = "PLUGHOST_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// How long a graceful stop waits for in-flight requests, in milliseconds [default: 10000]
    #[arg(long, value_name = "MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Spacing of periodic tasks (stats refresh, instance sync, health), in milliseconds [default: 10000]
    #[arg(long, value_name = "MS")]
    pub periodic_interval_ms: Option<u64>,
    /// Largest request line accepted on the control socket, in bytes [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub max_request_bytes: Option<u64>,
    /// Load driver files even if others could have written them (trust.strict = false); logged as a
    /// warning and shown in status
    #[arg(long)]
    pub allow_untrusted_drivers: bool,
    /// Largest driver file accepted, in bytes; larger ones are refused before they are read [default:
    /// 268435456]
    #[arg(long, value_name = "BYTES")]
    pub max_driver_bytes: Option<u64>,
    /// Let `swap` name a driver file outside the driver directories (trust.allow_swap_paths = true)
    #[arg(long)]
    pub allow_swap_paths: bool,
    /// Members of GROUP may read through the control socket (status, get, list, stats); mutations,
    /// swap and reload stay with root and plughost's user
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Run the drivers of SERVICE (every backend) or SERVICE/BACKEND in worker processes (isolation =
    /// "process"): no fault of theirs can take plughost down (repeatable)
    #[arg(long, value_name = "SERVICE[/BACKEND]")]
    pub isolate: Vec<String>,
    /// Stop the instances of SERVICE (every backend) or SERVICE/BACKEND when plughost stops; by default
    /// they keep running and a restarted plughost re-adopts them (repeatable)
    #[arg(long, value_name = "SERVICE[/BACKEND]")]
    pub stop_instances_on_exit: Vec<String>,
    /// Per-service flags.
    #[command(flatten)]
    pub services: ServiceFlagSet,
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
    /// The `plughost` executable, to load new driver content in a child process first; `None` loads
    /// in-process only.
    pub probe: Option<PathBuf>,
    /// Which driver code may load.
    pub trust: TrustSettings,
    /// The group that may read through the socket.
    pub socket_group: Option<String>,
    /// Largest driver file accepted.
    pub max_driver_bytes: u64,
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
        let file = match &self.flags.config {
            Some(p) => read_file(p).map_err(|e| vec![e])?,
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
    if errors.is_empty() && services.is_empty() {
        errors.push(ConfigError::Invalid("every service is disabled: nothing to run".to_owned()));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let state_dir = flags.state_dir.clone().or_else(|| file.state_dir.clone()).unwrap_or_else(default_state_dir);
    let state_dir = std::path::absolute(&state_dir).unwrap_or(state_dir);
    let socket =
        flags.socket.clone().or_else(|| file.socket.clone()).unwrap_or_else(|| state_dir.join("plughost.sock"));
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
        probe: std::env::current_exe().ok(),
        trust,
        socket_group: flags.socket_group.clone().or_else(|| file.socket_group.clone()),
        max_driver_bytes: flags
            .max_driver_bytes
            .or(file.max_driver_bytes)
            .unwrap_or(crate::loading::loader::DEFAULT_MAX_DRIVER_BYTES),
    })
}

/// Reads and parses a config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    if let Err(u) = crate::loading::trust::check_config_file(path) {
        if !u.missing {
            return Err(ConfigError::Untrusted { path: path.to_owned(), reason: u.relative_to(path) });
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.to_owned(), reason: crate::util::fmt::io_text(&e) })?;
    parse(path, &text)
}

/// Parses config text; errors carry line and column.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        ConfigError::Parse { path: path.to_owned(), line, column, reason: e.message().replace('\n', " ") }
    })
}

fn value_text(key: &str, v: &toml::Value) -> Result<String, ConfigError> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Float(f) => f.to_string(),
        other => {
            return Err(ConfigError::Invalid(format!(
                "option {key:?}: expected a string, number or boolean, got {}",
                other.type_str()
            )))
        }
    })
}

fn split_kv(flag: &str, text: &str) -> Result<(String, String), ConfigError> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(ConfigError::Invalid(format!("{flag} {text:?}: expected KEY=VALUE"))),
    }
}

fn options(map: &BTreeMap<String, toml::Value>) -> Result<Vec<(String, String)>, ConfigError> {
    map.iter().map(|(k, v)| Ok((k.clone(), value_text(k, v)?))).collect()
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
    let section = format!("[{name}]");
    let service_settings = match file {
        Some(f) => SettingsConfig {
            stop_instances_on_exit: f.stop_instances_on_exit,
            isolation: f.isolation.clone(),
            user: f.user.clone(),
            group: f.group.clone(),
            memory_limit: f.memory_limit.clone(),
            call_timeout: f.call_timeout.clone(),
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
pub fn default_state_dir() -> PathBuf {
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
    let state = std::env::var_os("PLUGHOST_STATE_DIR")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(default_state_dir);
    state.join("plughost.sock")
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

    fn volume() -> &'static ServiceKind {
        kinds::kind("volume").expect("volume is registered")
    }

    #[test]
    fn parse_errors_have_line_and_column() {
        let e = parse(Path::new("c.toml"), "state_dir = \"x\"\n[volume]\ndriver = 5\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { line: 3, .. }), "{e}");
        let e = parse(Path::new("c.toml"), "bogus = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("config \"c.toml\": line 1, column 1: unknown field"), "{e}");
        let e = parse(Path::new("c.toml"), "[volume]\ndriver = \"x\"\n\n[storage]\ndriver = \"y\"\n").unwrap_err();
        assert!(e.to_string().starts_with("config \"c.toml\": line 4, column 2: unknown field `storage`"), "{e}");
    }

    #[test]
    fn flags_override_file_and_backends_merge() {
        let file = parse(
            Path::new("c.toml"),
            "[volume]\ndriver = \"file-volume\"\noptions = { root = \"/a\" }\n[[volume.backends]]\nname = \"fast\"\ndriver = \"fake-volume\"\n",
        )
        .unwrap();
        let flags = ServiceFlags {
            opts: vec!["root=/b".into(), "fast:capacity=1GiB".into()],
            default_backend: Some("fast".into()),
            ..Default::default()
        };
        let s = service_spec(volume(), file.services.get("volume"), &flags).unwrap().unwrap();
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[0].options, [("root".to_owned(), "/b".to_owned())]);
        assert_eq!(s.backends[1].options, [("capacity".to_owned(), "1GiB".to_owned())]);
        assert_eq!(s.default_backend, "fast");
        let none = ServiceFlags { driver: Some("none".into()), ..Default::default() };
        assert!(service_spec(volume(), None, &none).unwrap().is_none());
        let bad = ServiceFlags { opts: vec!["nope:x=1".into()], ..Default::default() };
        assert!(service_spec(volume(), None, &bad).is_err());
    }

    #[test]
    fn every_registered_service_has_its_flags_and_section() {
        use clap::{Args, FromArgMatches};
        let cmd = RunFlags::augment_args(clap::Command::new("run"));
        let m = cmd
            .try_get_matches_from([
                "run",
                "--volume-driver",
                "x",
                "--compute-opt",
                "a=1",
                "--default-compute-backend",
                "b",
            ])
            .unwrap();
        let flags = RunFlags::from_arg_matches(&m).unwrap();
        assert_eq!(flags.services.0["volume"].driver.as_deref(), Some("x"));
        assert_eq!(flags.services.0["compute"].opts, ["a=1"]);
        assert_eq!(flags.services.0["compute"].default_backend.as_deref(), Some("b"));
        for k in KINDS {
            let text = format!("[{}]\ndriver = \"none\"\n", k.name);
            assert!(parse(Path::new("c.toml"), &text).unwrap().services.contains_key(k.name));
        }
    }
}
