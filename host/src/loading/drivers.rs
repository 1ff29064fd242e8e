//! Where driver libraries are looked for, and how a `NAME` becomes a path.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::loading::error::LoadError;
use crate::loading::loader::Loader;
use crate::loading::loader::{Described, OptionDescription};
use crate::util::fmt::table;

/// The environment variable holding extra driver directories (`:`-separated).
pub const DRIVER_DIR_ENV: &str = "PLUGHOST_DRIVER_DIR";

/// The driver directories, in search order: `--driver-dir` flags, then `PLUGHOST_DRIVER_DIR`, then the
/// directory holding the `plughost` executable (where `cargo build` puts the reference drivers), then
/// `/usr/local/lib/plughost/drivers` and `/usr/lib/plughost/drivers`.
pub fn driver_dirs(flags: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = flags.to_vec();
    if let Some(env) = std::env::var_os(DRIVER_DIR_ENV) {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir);
    }
    dirs.push(PathBuf::from("/usr/local/lib/plughost/drivers"));
    dirs.push(PathBuf::from("/usr/lib/plughost/drivers"));
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
    dirs
}

/// Whether a driver spec is a PATH (anything with a `/` or ending in `.so`) rather than a NAME.
pub fn is_path(spec: &str) -> bool {
    spec.contains('/') || spec.ends_with(".so")
}

/// Resolves a `--*-driver` value: anything with a `/` or ending in `.so` is a path, used as is; a NAME
/// is looked up as `lib<NAME>.so` (dashes turned into underscores, as cargo names `cdylib`s) in `dirs`.
pub fn resolve(spec: &str, dirs: &[PathBuf]) -> Result<PathBuf, String> {
    if is_path(spec) {
        return Ok(PathBuf::from(spec));
    }
    let file = format!("lib{}.so", spec.replace('-', "_"));
    for d in dirs {
        let p = d.join(&file);
        if p.exists() {
            return Ok(p);
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(format!("driver {spec:?} not found: no {file} in {}", searched.join(", ")))
}

/// Every `*.so` in `dirs` (not recursive), sorted per directory.
pub fn scan(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else {
            continue;
        };
        let mut files: Vec<PathBuf> =
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "so")).collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// One library as `inspect --json` and `list --json` describe it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Description {
    /// The path given.
    pub path: String,
    /// Whether it is a valid driver.
    pub ok: bool,
    /// Driver name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Driver kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Driver version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Plugin API version it was built against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// One line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Content digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// File size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The option schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<OptionDescription>>,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RejectionDescription>,
}

/// Why a library was rejected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectionDescription {
    /// The rejection kind.
    pub kind: String,
    /// The one-line message.
    pub message: String,
    /// Extra lines.
    pub details: Vec<String>,
}

/// The description of a result of [`Loader::describe`], as `inspect --json` and `list --json` print it.
pub fn describe(path: &Path, result: &Result<Described, LoadError>) -> Description {
    let mut d = Description {
        path: path.display().to_string(),
        ok: result.is_ok(),
        name: None,
        kind: None,
        version: None,
        api_version: None,
        summary: None,
        digest: None,
        size: None,
        options: None,
        error: None,
    };
    match result {
        Ok(found) => {
            let m = &found.meta;
            d.name = Some(m.name.clone());
            d.kind = Some(m.kind.clone());
            d.version = Some(m.version.clone());
            d.api_version = Some(m.api_version.clone());
            d.summary = Some(m.summary.clone());
            d.digest = Some(found.digest.clone());
            d.size = Some(found.size);
            d.options = Some(m.options.clone());
        }
        Err(e) => {
            d.error = Some(RejectionDescription {
                kind: e.kind.as_str().to_owned(),
                message: e.to_string(),
                details: e.details.clone(),
            })
        }
    }
    d
}

/// The human description `inspect` prints for a valid driver, with the line to add to an allow list.
pub fn describe_text(path: &Path, found: &Described) -> String {
    let m = &found.meta;
    let mut s = format!(
        "{}\n  name:        {}\n  kind:        {}\n  version:     {}\n  plugin-api:  {}\n  summary:     {}\n  digest:      {}\n  allowlist:   {} # {} {} {}\n",
        path.display(),
        m.name,
        m.kind,
        m.version,
        m.api_version,
        m.summary,
        found.digest,
        found.digest,
        m.name,
        m.version,
        path.display()
    );
    if m.options.is_empty() {
        s.push_str("  options:     none\n");
        return s;
    }
    s.push_str("  options:\n");
    let rows: Vec<[String; 5]> = m
        .options
        .iter()
        .map(|o| {
            let mut flags = Vec::new();
            if o.required {
                flags.push("required");
            }
            if o.secret {
                flags.push("secret");
            }
            let default = match (o.secret, &o.default) {
                (true, _) => "(secret)".to_owned(),
                (_, Some(d)) => d.clone(),
                (_, None) => "-".to_owned(),
            };
            [o.name.clone(), o.ty.clone(), default, flags.join(","), o.help.clone()]
        })
        .collect();
    let header = ["NAME", "TYPE", "DEFAULT", "FLAGS", "HELP"].map(String::from);
    s.push_str(&table(std::iter::once(&header).chain(rows.iter()), "    "));
    s
}

/// Describes every path, keeping every result (errors are reported together, never just the first).
/// Nothing is loaded in this process.
pub fn describe_all(loader: &Loader, paths: &[PathBuf]) -> Vec<(PathBuf, Result<Described, LoadError>)> {
    paths.iter().map(|p| (p.clone(), loader.describe(p))).collect()
}

/// What `inspect` or `list` prints, and whether every library was accepted.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// For stdout.
    pub stdout: String,
    /// One line each, for stderr (without the `plughost: ` prefix).
    pub stderr: Vec<String>,
    /// Whether every library was accepted.
    pub ok: bool,
}

/// `plughost inspect [--json] PATH...`.
pub fn inspect(loader: &Loader, paths: &[PathBuf], json: bool) -> Report {
    let results = describe_all(loader, paths);
    let ok = results.iter().all(|(_, r)| r.is_ok());
    if json {
        let all: Vec<Description> = results.iter().map(|(p, r)| describe(p, r)).collect();
        let stdout = serde_json::to_string(&all).expect("descriptions always serialize") + "\n";
        return Report { stdout, stderr: Vec::new(), ok };
    }
    let mut report = Report { ok, ..Report::default() };
    for (p, r) in &results {
        match r {
            Ok(found) => {
                if !report.stdout.is_empty() {
                    report.stdout.push('\n');
                }
                report.stdout.push_str(&describe_text(p, found));
            }
            Err(e) => report.stderr.push(e.report()),
        }
    }
    report
}

/// `plughost list [--driver-dir DIR]... [--json]`.
pub fn list(loader: &Loader, extra_dirs: &[PathBuf], json: bool) -> Report {
    let dirs = driver_dirs(extra_dirs);
    let results = describe_all(loader, &scan(&dirs));
    if json {
        let all: Vec<Description> = results.iter().map(|(p, r)| describe(p, r)).collect();
        let stdout = serde_json::to_string(&all).expect("descriptions always serialize") + "\n";
        return Report { stdout, stderr: Vec::new(), ok: true };
    }
    let rows: Vec<[String; 4]> = results
        .iter()
        .map(|(p, r)| match r {
            Ok(l) => [l.meta.name.clone(), l.meta.kind.clone(), l.meta.version.clone(), p.display().to_string()],
            Err(e) => ["-".to_owned(), "rejected".to_owned(), "-".to_owned(), format!("{}: {}", p.display(), e.reason)],
        })
        .collect();
    if rows.is_empty() {
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Report {
            stderr: vec![format!("no driver libraries (*.so) in {}", searched.join(", "))],
            ok: true,
            ..Report::default()
        };
    }
    let header = ["NAME", "KIND", "VERSION", "PATH"].map(String::from);
    Report { stdout: table(std::iter::once(&header).chain(rows.iter()), ""), stderr: Vec::new(), ok: true }
}
