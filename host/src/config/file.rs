//! The config file: its shape (a few global keys, `[trust]`, one section per service; unknown keys are
//! errors with their line and column), who may have written it (a trust root), reading and parsing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::error::ConfigError;
pub(super) use crate::backend::settings::{BackendSettings, Isolation};
use crate::services::kinds::KINDS;
use crate::services::ServiceKind;

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
    /// Connections served at once (admins; readers get a quarter).
    pub max_connections: Option<u64>,
    /// The group whose members may read (status, get, list, stats) through the socket.
    pub socket_group: Option<String>,
    /// Largest driver file accepted.
    pub max_driver_bytes: Option<u64>,
    /// `[trust]`.
    pub trust: TrustConfig,
    /// `[fleet]`.
    pub fleet: FleetConfig,
    /// Where to serve metrics over HTTP (`127.0.0.1:9464`).
    pub metrics_listen: Option<String>,
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

/// `[fleet]`: joining a fleet over a NATS broker (off unless a URL is given).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The broker's URL, or a list of a cluster's URLs.
    pub url: Option<Urls>,
    /// The fleet's name (default `default`).
    pub name: Option<String>,
    /// This host's name (default: the hostname with dots turned into `-`).
    pub host: Option<String>,
    /// A credentials file: `user:password`, an nkey seed or a `.creds` file.
    pub credentials: Option<PathBuf>,
    /// How often the host reports (ms, or `10s`).
    pub report_interval: Option<toml::Value>,
    /// A host whose last report is older is down (ms, or `60s`; more than twice report_interval).
    pub service_down_time: Option<toml::Value>,
    /// Threads running remote requests (default 8).
    pub request_workers: Option<u64>,
    /// Labels placement can filter on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Allow a `nats://` URL off this machine without TLS.
    pub allow_plaintext: Option<bool>,
}

/// One URL or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Urls {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Urls {
    /// As a list.
    pub fn list(&self) -> Vec<String> {
        match self {
            Urls::One(u) => vec![u.clone()],
            Urls::Many(v) => v.clone(),
        }
    }
}

const GLOBAL_KEYS: &[&str] = &[
    "state_dir",
    "socket",
    "driver_dirs",
    "shutdown_timeout_ms",
    "periodic_interval_ms",
    "max_request_bytes",
    "max_connections",
    "socket_group",
    "max_driver_bytes",
    "trust",
    "fleet",
    "metrics_listen",
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
                        "max_connections" => c.max_connections = Some(map.next_value()?),
                        "socket_group" => c.socket_group = Some(map.next_value()?),
                        "max_driver_bytes" => c.max_driver_bytes = Some(map.next_value()?),
                        "trust" => c.trust = map.next_value()?,
                        "fleet" => c.fleet = map.next_value()?,
                        "metrics_listen" => c.metrics_listen = Some(map.next_value()?),
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
    /// Host-level setting: the largest answer an isolated backend's worker may send (`16MiB`).
    pub max_frame_bytes: Option<toml::Value>,
    /// Host-level setting: the most records a reconcile lets the backend hold by adoption.
    pub max_records: Option<u64>,
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
    /// Host-level setting: the largest answer an isolated backend's worker may send (`16MiB`).
    pub max_frame_bytes: Option<toml::Value>,
    /// Host-level setting: the most records a reconcile lets the backend hold by adoption.
    pub max_records: Option<u64>,
}

/// Host-level backend settings as a config section gives them (unset: inherited or the default).
#[derive(Debug, Default, Clone)]
pub(super) struct SettingsConfig {
    pub(super) stop_instances_on_exit: Option<bool>,
    pub(super) isolation: Option<String>,
    pub(super) user: Option<String>,
    pub(super) group: Option<String>,
    pub(super) memory_limit: Option<toml::Value>,
    pub(super) call_timeout: Option<toml::Value>,
    pub(super) max_frame_bytes: Option<toml::Value>,
    pub(super) max_records: Option<u64>,
}

impl SettingsConfig {
    /// These settings over `base`; an error names the setting and where it was given.
    pub(super) fn apply(
        &self,
        kind: &ServiceKind,
        base: &BackendSettings,
        at: &str,
    ) -> Result<BackendSettings, ConfigError> {
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
        if let Some(m) = &self.max_frame_bytes {
            let text = value_text("max_frame_bytes", m)?;
            let n = plughost_api::parse_size(&text).map_err(|e| bad("max_frame_bytes", e))?;
            if !(64 << 10..=1 << 30).contains(&n) {
                return Err(bad("max_frame_bytes", format!("{n} bytes: between 64KiB and 1GiB")));
            }
            s.max_frame_bytes = n;
        }
        if let Some(n) = self.max_records {
            if n == 0 {
                return Err(bad("max_records", "0: at least 1".to_owned()));
            }
            s.max_records = n;
        }
        Ok(s)
    }
}

/// Refuses a setting the service does not take.
pub(super) fn check_setting(kind: &ServiceKind, setting: &str, at: &str) -> Result<(), ConfigError> {
    if kind.settings.contains(&setting) {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!("{at}: {} backends have no setting {setting:?}", kind.name)))
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

pub(super) fn value_text(key: &str, v: &toml::Value) -> Result<String, ConfigError> {
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

pub(super) fn options(map: &BTreeMap<String, toml::Value>) -> Result<Vec<(String, String)>, ConfigError> {
    map.iter().map(|(k, v)| Ok((k.clone(), value_text(k, v)?))).collect()
}
