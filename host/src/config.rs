//! `plughost run` settings: command line > environment (`PLUGHOST_*`, handled by clap) > config file
//! (TOML) > built-in defaults.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// The config file's shape. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Control socket path.
    pub socket: Option<PathBuf>,
    /// Extra driver directories.
    #[serde(default)]
    pub driver_dirs: Vec<PathBuf>,
    /// How long a graceful stop waits for in-flight requests.
    pub shutdown_timeout_ms: Option<u64>,
    /// Spacing of periodic tasks.
    pub periodic_interval_ms: Option<u64>,
    /// The volume service.
    pub volume: Option<ServiceConfig>,
    /// The compute service.
    pub compute: Option<ServiceConfig>,
}

/// `[volume]` / `[compute]`.
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
}

/// One service to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
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

/// Reads and parses a config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.to_owned(), reason: e.to_string().to_lowercase() })?;
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

/// Merges file and flags into the backends of one service; `None` when the service is disabled.
pub fn service_spec(
    kind: &str,
    builtin_driver: &str,
    file: Option<&ServiceConfig>,
    flags: &ServiceFlags,
) -> Result<Option<ServiceSpec>, ConfigError> {
    let mut backends: Vec<BackendSpec> = Vec::new();
    let default_driver = flags.driver.clone().or_else(|| file.and_then(|f| f.driver.clone()));
    let file_backends = file.map(|f| f.backends.as_slice()).unwrap_or_default();
    let cli_backends: Vec<(String, String)> =
        flags.backends.iter().map(|b| split_kv(&format!("--{kind}-backend"), b)).collect::<Result<_, _>>()?;
    if default_driver.as_deref() == Some("none") {
        return Ok(None);
    }
    // The `default` backend exists when a driver is named for it, or when no backend is named at all.
    if default_driver.is_some() || (file_backends.is_empty() && cli_backends.is_empty()) {
        let mut options = Vec::new();
        if let Some(f) = file {
            for (k, v) in &f.options {
                options.push((k.clone(), value_text(k, v)?));
            }
        }
        backends.push(BackendSpec {
            name: "default".to_owned(),
            driver: default_driver.unwrap_or_else(|| builtin_driver.to_owned()),
            options,
        });
    }
    for b in file_backends {
        let mut options = Vec::new();
        for (k, v) in &b.options {
            options.push((k.clone(), value_text(k, v)?));
        }
        backends.push(BackendSpec { name: b.name.clone(), driver: b.driver.clone(), options });
    }
    for (name, driver) in cli_backends {
        match backends.iter_mut().find(|b| b.name == name) {
            Some(b) => b.driver = driver,
            None => backends.push(BackendSpec { name, driver, options: Vec::new() }),
        }
    }
    for (i, b) in backends.iter().enumerate() {
        let ok = !b.name.is_empty() && b.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(ConfigError::Invalid(format!("{kind} backend name {:?}: use A-Z a-z 0-9 - _", b.name)));
        }
        if backends[..i].iter().any(|o| o.name == b.name) {
            return Err(ConfigError::Invalid(format!("{kind} backend {:?} is defined twice", b.name)));
        }
    }
    for o in &flags.opts {
        let (key, value) = split_kv(&format!("--{kind}-opt"), o)?;
        let (backend, key) = match key.split_once(':') {
            Some((b, k)) => (b.to_owned(), k.to_owned()),
            None => (backends.first().map(|b| b.name.clone()).unwrap_or_default(), key),
        };
        let b = backends
            .iter_mut()
            .find(|b| b.name == backend)
            .ok_or_else(|| ConfigError::Invalid(format!("--{kind}-opt {o:?}: no {kind} backend named {backend:?}")))?;
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
        return Err(ConfigError::Invalid(format!("default {kind} backend {default_backend:?} is not defined")));
    }
    Ok(Some(ServiceSpec { backends, default_backend }))
}

/// Replaces `${state_dir}` and `${backend}` in an option value.
pub fn expand(value: &str, state_dir: &Path, backend: &str) -> String {
    value.replace("${state_dir}", &state_dir.display().to_string()).replace("${backend}", backend)
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

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.driver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_have_line_and_column() {
        let e = parse(Path::new("c.toml"), "state_dir = \"x\"\n[volume]\ndriver = 5\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { line: 3, .. }), "{e}");
        let e = parse(Path::new("c.toml"), "bogus = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("config \"c.toml\": line 1, column 1: unknown field"), "{e}");
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
        let s = service_spec("volume", "file-volume", file.volume.as_ref(), &flags).unwrap().unwrap();
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[0].options, [("root".to_owned(), "/b".to_owned())]);
        assert_eq!(s.backends[1].options, [("capacity".to_owned(), "1GiB".to_owned())]);
        assert_eq!(s.default_backend, "fast");
        let none = ServiceFlags { driver: Some("none".into()), ..Default::default() };
        assert!(service_spec("volume", "file-volume", None, &none).unwrap().is_none());
        let bad = ServiceFlags { opts: vec!["nope:x=1".into()], ..Default::default() };
        assert!(service_spec("volume", "file-volume", None, &bad).is_err());
    }
}
