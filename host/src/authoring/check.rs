//! `plughost check LIB.so`: plughost-api's conformance suite, run on a built library through the real
//! loader and ABI, in a child process (a driver that crashes takes only the child down) with a fresh
//! private state directory that is removed afterwards.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plughost_api::testing::{
    check_compute_with_progress, check_network_with_progress, check_volume_with_progress, harmless_instance,
    CheckResult, Progress, Report,
};
use plughost_api::{
    ComputeDriver, ComputeInterface, DriverError, DriverKind, NetworkDriver, NetworkInterface, VolumeDriver,
    VolumeInterface,
};
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
    let mut seen = Seen::new(path);
    for line in out.lines() {
        match serde_json::from_str::<Event>(line) {
            Ok(Event::Report(report)) => return report,
            Ok(event) => seen.add(event),
            Err(_) => {}
        }
    }
    let why = match status {
        None => format!("the checks did not finish within {}s", TIMEOUT.as_secs()),
        Some(s) if s.signal().is_some() => {
            let sig = s.signal().unwrap_or(0);
            format!("the driver killed the check process (signal {sig}, {})", crate::loading::loader::signal_name(sig))
        }
        Some(_) => format!("the check process ended without a report ({s})", s = status_text(status)),
    };
    seen.cut_short(why)
}

/// What the check child says on its report descriptor, one JSON line each, as it goes: a child the
/// driver takes down has still said which driver it loaded, which checks passed, and which one was
/// running.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Event {
    /// The library loaded: its description.
    Driver(String),
    /// A check is about to run.
    Started(String),
    /// A check ran.
    Finished(CheckOutcome),
    /// The whole report (the last line of a child that finished).
    Report(CheckReport),
}

/// The events of a child that did not finish.
struct Seen {
    report: CheckReport,
    running: Option<String>,
}

impl Seen {
    fn new(path: &Path) -> Seen {
        Seen { report: CheckReport::failed(path, String::new()), running: None }
    }

    fn add(&mut self, event: Event) {
        match event {
            Event::Driver(d) => self.report.driver = Some(d),
            Event::Started(name) => self.running = Some(name),
            Event::Finished(outcome) => {
                self.running = None;
                self.report.checks.push(outcome);
            }
            Event::Report(_) => {}
        }
    }

    /// The report of a child that ended (or was killed) with `why`: what it said, the running check
    /// failed with `why`, and an error naming it.
    fn cut_short(mut self, why: String) -> CheckReport {
        self.report.error = Some(match self.running.take() {
            Some(name) => {
                let error = format!("{why} during check {name:?}");
                self.report.checks.push(CheckOutcome { name, passed: false, detail: why });
                error
            }
            None if self.report.driver.is_some() => format!("{why} outside any check"),
            None => format!("{why} while loading the library"),
        });
        self.report
    }
}

/// Where the check child writes its events: standard output as it was when the child started. The
/// child points its own standard output at standard error, so that what a driver prints cannot be
/// taken for an event.
pub struct EventWriter(std::fs::File);

impl EventWriter {
    /// Takes standard output for events, and sends whatever else is written to it to standard error.
    pub fn take_stdout() -> std::io::Result<EventWriter> {
        use std::os::fd::AsFd;
        let events = rustix::io::fcntl_dupfd_cloexec(std::io::stdout().as_fd(), 3)?;
        rustix::stdio::dup2_stdout(std::io::stderr().as_fd())?;
        Ok(EventWriter(std::fs::File::from(events)))
    }

    fn send(&mut self, event: &Event) {
        use std::io::Write;
        let line = serde_json::to_string(event).expect("a check event always serializes");
        // Written at once, so that a crash right after leaves it whole.
        let _ = self.0.write_all(format!("{line}\n").as_bytes());
    }
}

fn status_text(s: Option<std::process::ExitStatus>) -> String {
    s.map(|s| s.to_string()).unwrap_or_default()
}

/// The child side: loads `path` here and runs the suite, telling `events` as it goes, and last the
/// whole report.
pub fn child(path: &Path, state_dir: &Path, opts: &[String], events: &mut EventWriter) {
    let report = run_suite(path, state_dir, opts, events);
    events.send(&Event::Report(report));
}

fn run_suite(path: &Path, state_dir: &Path, opts: &[String], events: &mut EventWriter) -> CheckReport {
    let lib = match Loader::new().load(path) {
        Ok(l) => l,
        Err(e) => return CheckReport::failed(path, e.to_string()),
    };
    events.send(&Event::Driver(description(&lib)));
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
    let mut progress = |p: Progress<'_>| match p {
        Progress::Started(name) => events.send(&Event::Started(name.to_owned())),
        Progress::Finished(r) => events.send(&Event::Finished(outcome(r))),
    };
    let report: Report = match lib.kind() {
        k if k == DriverKind::VOLUME => check_volume_with_progress(
            &|| {
                let c = lib.construct::<VolumeInterface>(&options).map_err(construct_error)?;
                Ok(Box::new(c.driver) as Box<dyn VolumeDriver>)
            },
            &mut progress,
        ),
        k if k == DriverKind::COMPUTE => check_compute_with_progress(
            &|| {
                let c = lib.construct::<ComputeInterface>(&options).map_err(construct_error)?;
                Ok(Box::new(c.driver) as Box<dyn ComputeDriver>)
            },
            &harmless_instance(),
            &mut progress,
        ),
        k if k == DriverKind::NETWORK => check_network_with_progress(
            &|| {
                let c = lib.construct::<NetworkInterface>(&options).map_err(construct_error)?;
                Ok(Box::new(c.driver) as Box<dyn NetworkDriver>)
            },
            &mut progress,
        ),
        other => return CheckReport::failed(path, format!("no conformance suite for {other} drivers")),
    };
    CheckReport {
        path: path.display().to_string(),
        driver: Some(description(&lib)),
        passed: report.passed(),
        error: None,
        checks: report.results.iter().map(outcome).collect(),
    }
}

fn outcome(r: &CheckResult) -> CheckOutcome {
    CheckOutcome { name: r.name.to_owned(), passed: r.passed, detail: r.detail.clone() }
}

fn description(lib: &Library) -> String {
    format!("{} {} ({} driver, plughost-api {})", lib.name(), lib.version(), lib.kind(), lib.api_version())
}
