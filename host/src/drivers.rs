//! Where driver libraries are looked for, and how a `NAME` becomes a path.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::loader::Library;
use crate::{LoadError, Loader};

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

/// Resolves a `--*-driver` value: anything with a `/` or ending in `.so` is a path, used as is; a NAME
/// is looked up as `lib<NAME>.so` (dashes turned into underscores, as cargo names `cdylib`s) in `dirs`.
pub fn resolve(spec: &str, dirs: &[PathBuf]) -> Result<PathBuf, String> {
    if spec.contains('/') || spec.ends_with(".so") {
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

/// The JSON description of a load result, as `inspect --json` and `list --json` print it.
pub fn describe_json(path: &Path, result: &Result<Library, LoadError>) -> Value {
    match result {
        Ok(lib) => json!({
            "path": path.display().to_string(),
            "ok": true,
            "name": lib.name(),
            "kind": lib.kind().as_str(),
            "version": lib.version(),
            "api_version": lib.api_version(),
            "summary": lib.summary(),
            "digest": lib.digest,
            "size": lib.size,
            "options": lib.options().iter().map(|o| json!({
                "name": o.name(),
                "type": o.ty().as_str(),
                "default": if o.is_secret() { None } else { o.default_value() },
                "required": o.is_required(),
                "secret": o.is_secret(),
                "help": o.help(),
            })).collect::<Vec<_>>(),
        }),
        Err(e) => json!({
            "path": path.display().to_string(),
            "ok": false,
            "error": {"kind": e.kind.as_str(), "message": e.to_string(), "details": e.details},
        }),
    }
}

/// The human description `inspect` prints for a valid driver.
pub fn describe_text(lib: &Library) -> String {
    let mut s = format!(
        "{}\n  name:        {}\n  kind:        {}\n  version:     {}\n  plugin-api:  {}\n  summary:     {}\n  digest:      {}\n",
        lib.path.display(),
        lib.name(),
        lib.kind(),
        lib.version(),
        lib.api_version(),
        lib.summary(),
        lib.digest
    );
    let opts = lib.options();
    if opts.is_empty() {
        s.push_str("  options:     none\n");
        return s;
    }
    s.push_str("  options:\n");
    let rows: Vec<[String; 5]> = opts
        .iter()
        .map(|o| {
            let mut flags = Vec::new();
            if o.is_required() {
                flags.push("required");
            }
            if o.is_secret() {
                flags.push("secret");
            }
            let default = match (o.is_secret(), o.default_value()) {
                (true, Some(_)) => "(secret)".to_owned(),
                (_, Some(d)) => d.to_owned(),
                (_, None) => "-".to_owned(),
            };
            [o.name().to_owned(), o.ty().to_string(), default, flags.join(","), o.help().to_owned()]
        })
        .collect();
    let header = ["NAME", "TYPE", "DEFAULT", "FLAGS", "HELP"].map(String::from);
    s.push_str(&table(std::iter::once(&header).chain(rows.iter()), "    "));
    s
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table<'a, const N: usize>(rows: impl Iterator<Item = &'a [String; N]> + Clone, indent: &str) -> String {
    let mut widths = [0usize; N];
    for r in rows.clone() {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        s.push_str(indent);
        for (i, c) in r.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        let trimmed = s.trim_end().len();
        s.truncate(trimmed);
        s.push('\n');
    }
    s
}

/// Loads every path, keeping every result (errors are reported together, never just the first).
pub fn load_all(loader: &Loader, paths: &[PathBuf]) -> Vec<(PathBuf, Result<Library, LoadError>)> {
    paths.iter().map(|p| (p.clone(), loader.load(p))).collect()
}
