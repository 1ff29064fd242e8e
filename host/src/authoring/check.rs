//! `plughost check LIB.so`: plughost-api's conformance suite, run on a built library through the real
//! loader and ABI, in a child process (a driver that crashes takes only the child down) with a fresh
//! private state directory that is removed afterwards.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plughost_api::testing::{check_compute, check_volume, harmless_instance, Report};
use plughost_api::{ComputeDriver, ComputeInterface, DriverError, DriverKind, VolumeDriver, VolumeInterface};
use serde::{Deserialize, Serialize};

use crate::loading::loader::{Library, Loader};

/// How long the whole suite may take before the child is killed.
const TIMEOUT: Duration = Duration::from_secs(600);

/// One check's outcome, as printed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckOutcome {
    /// The check's name.
    pub name: String,
    /// Whether the driver met it.
    pub passed: bool,
    /// Why it failed, or a note.
    pub detail: String,
}

/// What `plughost check` found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckReport {
    /// The library checked.
    pub path: String,
    /// Driver name, version and kind, when it loaded.
    pub driver: Option<String>,
    /// Whether every check passed (false when the library did not load or the child died).
    pub passed: bool,
    /// Why nothing could be checked (load error, crash).
    pub error: Option<String>,
    /// One entry per check.
    pub checks: Vec<CheckOutcome>,
}

impl CheckReport {
    fn failed(path: &Path, error: String) -> CheckReport {
        CheckReport {
            path: path.display().to_string(),
            driver: None,
            passed: false,
            error: Some(error),
            checks: Vec::new(),
        }
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = format!("{}: {}\n", self.path, self.driver.as_deref().unwrap_or("not loaded"));
        if let Some(e) = &self.error {
            out.push_str(&format!("error: {e}\n"));
        }
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            let mark = if c.passed { "pass" } else { "FAIL" };
            let detail = if c.detail.is_empty() { String::new() } else { format!("  {}", c.detail) };
            out.push_str(format!("{mark}  {:width$}{detail}", c.name).trim_end());
            out.push('\n');
        }
        let failed = self.checks.iter().filter(|c| !c.passed).count();
        out.push_str(&format!(
            "{} checks, {} passed, {failed} failed\n",
            self.checks.len(),
            self.checks.len() - failed
        ));
        out
    }
}

/// Runs the suite on `path` in a child process (`exe __check`) with options `KEY=VALUE`.
pub fn check(exe: &Path, path: &Path, opts: &[String]) -> CheckReport {
    let dir = match private_dir() {
        Ok(d) => d,
        Err(e) => return CheckReport::failed(path, format!("cannot make a private state directory: {e}")),
    };
    let report = run_child(exe, path, opts, &dir);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        log::warn!("cannot remove the check's state directory \"{}\": {e}", dir.display());
    }
    report
}

fn private_dir() -> std::io::Result<PathBuf> {
    crate::util::fs::fresh_private_dir(&std::env::temp_dir(), "plughost-check")
}

fn run_child(exe: &Path, path: &Path, opts: &[String], dir: &Path) -> CheckReport {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = Command::new(exe);
    cmd.arg("__check").arg("--state-dir").arg(dir).arg(path);
    for o in opts {
        cmd.arg("--opt").arg(o);
    }
    let mut child = match cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn() {
        Ok(c) => c,
        Err(e) => return CheckReport::failed(path, format!("cannot start {}: {e}", exe.display())),
    };
    let mut out = String::new();
    let reader = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        })
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(_) => break None,
        }
    };
    if let Some(r) = reader {
        out = r.join().unwrap_or_default();
    }
    match status {
        None => CheckReport::failed(path, format!("the checks did not finish within {}s", TIMEOUT.as_secs())),
        Some(s) if s.signal().is_some() => {
            let sig = s.signal().unwrap_or(0);
            CheckReport::failed(
                path,
                format!(
                    "the driver killed the check process (signal {sig}, {})",
                    crate::loading::loader::signal_name(sig)
                ),
            )
        }
        Some(_) => serde_json::from_str(&out).unwrap_or_else(|_| {
            CheckReport::failed(
                path,
                format!("the check process ended without a report ({s})", s = status_text(status)),
            )
        }),
    }
}

fn status_text(s: Option<std::process::ExitStatus>) -> String {
    s.map(|s| s.to_string()).unwrap_or_default()
}

/// The child side: loads `path` here and runs the suite; prints the report as JSON.
pub fn child(path: &Path, state_dir: &Path, opts: &[String]) -> CheckReport {
    let lib = match Loader::new().load(path) {
        Ok(l) => l,
        Err(e) => return CheckReport::failed(path, e.to_string()),
    };
    let mut given = Vec::new();
    for o in opts {
        match o.split_once('=') {
            Some((k, v)) if !k.is_empty() => given.push((k.to_owned(), v.to_owned())),
            _ => return CheckReport::failed(path, format!("--opt {o:?}: expected KEY=VALUE")),
        }
    }
    // As a host's first backend, and as `testing::TestHost` in the driver's own tests.
    let options = match plughost_api::host::prepare_options(lib.options(), &given, state_dir, "default") {
        Ok(o) => o,
        Err(errors) => {
            // The same messages as `TestHost::options` in the driver's own tests, with the fix here.
            let text: Vec<String> = errors
                .iter()
                .map(|e| match e.reason.as_str() {
                    "required option missing" => format!("{e} (give it with --opt {}=VALUE)", e.option),
                    _ => e.to_string(),
                })
                .collect();
            return CheckReport::failed(path, format!("driver {:?}: {}", lib.name(), text.join("; ")));
        }
    };
    let construct_error = |e: crate::loading::error::LoadError| DriverError::internal(e.to_string());
    let report: Report = match lib.kind() {
        k if k == DriverKind::VOLUME => check_volume(&|| {
            let c = lib.construct::<VolumeInterface>(&options).map_err(construct_error)?;
            Ok(Box::new(c.driver) as Box<dyn VolumeDriver>)
        }),
        k if k == DriverKind::COMPUTE => check_compute(
            &|| {
                let c = lib.construct::<ComputeInterface>(&options).map_err(construct_error)?;
                Ok(Box::new(c.driver) as Box<dyn ComputeDriver>)
            },
            &harmless_instance(),
        ),
        other => return CheckReport::failed(path, format!("no conformance suite for {other} drivers")),
    };
    described(&lib, path, report)
}

fn described(lib: &Library, path: &Path, report: Report) -> CheckReport {
    CheckReport {
        path: path.display().to_string(),
        driver: Some(format!(
            "{} {} ({} driver, plughost-api {})",
            lib.name(),
            lib.version(),
            lib.kind(),
            lib.api_version()
        )),
        passed: report.passed(),
        error: None,
        checks: report
            .results
            .into_iter()
            .map(|r| CheckOutcome { name: r.name.to_owned(), passed: r.passed, detail: r.detail })
            .collect(),
    }
}
