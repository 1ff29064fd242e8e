//! Rolling driver upgrades across the fleet: `plughost fleet swap` and `plughost fleet rollout
//! status|resume|abort`.
//!
//! A rollout swaps one backend's driver host by host: a canary batch, then batches, each followed by a
//! health window in which every host swapped so far is watched (its backend up, still on the new
//! content, and its driver's fault rate under the threshold). A failure anywhere stops the rollout and
//! swaps every host already swapped back to the content it ran before (by digest: the host finds that
//! driver in its own history). The new content is pinned by the operator (`--digest`): each host checks
//! its file against it before loading anything, so no host ever loads content the operator did not name.
//!
//! The rollout is a record in the bucket `ph_<fleet>_rollouts` (key `rollout.<id>`), written after every
//! step with a compare-and-set, so that any machine can show it, an interrupted one can be resumed or
//! undone, and two runners never drive one rollout (the one whose write loses stops). A second key,
//! `lock.<service>.<backend>`, created with a compare-and-set and removed when the rollout ends, keeps
//! two rollouts of one backend from running at once.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use plughost_fleet::subject::{self, Class};
use plughost_fleet::{Client, ClientError, HostEntry};
use serde::{Deserialize, Serialize};

use crate::control::fleet::Connect;
use crate::control::outcome::{CtlError, CtlOutput};
use crate::control::protocol::{ApiError, HostStatus, State, SwapCheck, SwapReport, SWAP_DIGEST_SINCE};
use crate::control::request::Answer;
use crate::util::fmt::table_rows;

/// `plughost fleet swap`.
#[derive(clap::Args, Debug, Clone)]
pub struct SwapArgs {
    /// The backend: SERVICE (each host's default backend, which must be the same everywhere) or
    /// SERVICE/BACKEND
    #[arg(value_name = "SERVICE[/BACKEND]")]
    pub target: String,
    /// The new driver's NAME, which each host resolves in its own driver directories
    #[arg(value_name = "DRIVER")]
    pub driver: String,
    /// The new driver's content: a host whose file has another digest (or none) is left out, and no
    /// host loads anything else
    #[arg(long, value_name = "blake3:HEX")]
    pub digest: String,
    /// Only these hosts (comma-separated or repeated) [default: every host with the service]
    #[arg(long, value_name = "H1,H2,...", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Only hosts with this label (repeatable; all must match)
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Hosts in the first batch, watched alone before any other is touched
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub canary: usize,
    /// Hosts per later batch: a number, or a percentage of the hosts in the rollout
    #[arg(long, value_name = "N|P%", default_value = "25%")]
    pub batch: String,
    /// How long every host swapped so far is watched after each batch
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub health_window: String,
    /// The highest share of a swapped backend's driver calls that may fail by the driver's fault
    /// (internal, panicked, crashed, timed out) during a window
    #[arg(long, value_name = "R", default_value_t = 0.05)]
    pub max_error_rate: f64,
    /// Refuse the whole rollout when any host asked for would be left out
    #[arg(long)]
    pub all_or_nothing: bool,
    /// Only plan: check every host (down, protocol, the file's digest) and print the batches
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document (the rollout's record) instead of progress and a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
}

/// `plughost fleet rollout ...`.
#[derive(clap::Args, Debug, Clone)]
pub struct RolloutArgs {
    /// The rollout (`status` without one lists them all)
    #[arg(value_name = "ID")]
    pub id: Option<String>,
    /// How long every host swapped so far is watched after each batch (`resume`) [default: as planned]
    #[arg(long, value_name = "DURATION")]
    pub health_window: Option<String>,
    /// Print one JSON document
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub connect: Connect,
}

/// A rollout's record, as kept in the bucket and printed with `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// Its id (`YYYYMMDD-HHMMSS-XXXX`).
    pub id: String,
    /// The service.
    pub service: String,
    /// The backend.
    pub backend: String,
    /// The new driver's NAME.
    pub driver: String,
    /// The new content.
    pub digest: String,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it stopped, or who aborted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Hosts in the canary batch.
    pub canary: usize,
    /// Hosts per later batch, as given.
    pub batch: String,
    /// The health window.
    pub health_window_ms: u64,
    /// The highest fault rate allowed.
    pub max_error_rate: f64,
    /// The batches, in order (the first is the canary when `canary` > 0).
    pub batches: Vec<Vec<String>>,
    /// Each host in the rollout, in plan order.
    pub hosts: Vec<HostStep>,
    /// Hosts asked for (or serving the service) that are not in it, and why.
    #[serde(default)]
    pub excluded: Vec<Excluded>,
    /// When it was planned, seconds since the epoch.
    pub created_at: u64,
    /// When its record last changed.
    pub updated_at: u64,
    /// Who drives it now (`pid N on MACHINE`).
    pub by: String,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Batches are being swapped and watched (or were, when its runner was interrupted).
    Running,
    /// Every host serves the new content and passed its window.
    Done,
    /// Stopped or aborted: hosts are being swapped back.
    RollingBack,
    /// Every host that was swapped is back on its old content.
    RolledBack,
    /// Some host could not be swapped back: see its message; `abort` tries again.
    Failed,
}

impl RolloutState {
    fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Done => "done",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Failed => "failed",
        }
    }
}

/// One host of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStep {
    /// The host.
    pub host: String,
    /// Its batch (0 is the first).
    pub batch: usize,
    /// What happened there.
    pub state: StepState,
    /// What served before.
    pub from: Served,
    /// What went wrong, or what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A driver serving a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    /// Driver name.
    pub name: String,
    /// Driver version.
    pub version: String,
    /// Content digest.
    pub digest: String,
}

/// What happened on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not touched yet.
    Pending,
    /// Its swap was sent; whether it ran is not known yet.
    Swapping,
    /// It serves the new content; its window is running.
    Swapped,
    /// It serves the new content and passed its window.
    Passed,
    /// Its swap failed (it still serves the old content), or it failed its window.
    Failed,
    /// Being swapped back.
    Reverting,
    /// Back on the old content.
    Reverted,
    /// Could not be swapped back: see the message.
    RevertFailed,
    /// Never touched: the rollout stopped before its batch.
    Skipped,
}

impl StepState {
    fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Swapping => "swapping",
            StepState::Swapped => "swapped",
            StepState::Passed => "passed",
            StepState::Failed => "failed",
            StepState::Reverting => "reverting",
            StepState::Reverted => "reverted",
            StepState::RevertFailed => "revert_failed",
            StepState::Skipped => "skipped",
        }
    }
}

/// A host left out of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Excluded {
    /// The host.
    pub host: String,
    /// Why.
    pub reason: String,
    /// It already serves the new content (not a problem for `--all-or-nothing`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub current: bool,
}

fn record_key(id: &str) -> String {
    format!("rollout.{id}")
}

fn lock_key(service: &str, backend: &str) -> String {
    format!("lock.{service}.{backend}")
}

fn broker(e: ClientError) -> CtlError {
    CtlError::Failed(e.to_string())
}

fn who() -> String {
    let machine = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    format!("uid {uid}, pid {} on {}", std::process::id(), if machine.is_empty() { "?" } else { &machine })
}

fn new_id() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let stamp = crate::util::time::utc(now.as_secs()).replace(['-', ':'], "").replace('T', "-").replace('Z', "");
    let salt = (now.subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffff;
    format!("{stamp}-{salt:04x}")
}

/// Sends one request line to `host` on `subject` and reads the answer.
fn call(client: &Client, host: &str, subject: &str, line: &str, timeout: Duration) -> Result<Answer, String> {
    let answer = client
        .request(host, subject, line.as_bytes(), crate::control::protocol::PROTOCOL_VERSION, timeout)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&answer).map_err(|e| format!("host {host}: malformed answer: {e}"))
}

fn result<T: serde::de::DeserializeOwned>(answer: Result<Answer, String>) -> Result<T, String> {
    answer?.into_result::<T>().map_err(|e: ApiError| format!("{}: {}", e.kind, e.message))
}

/// The parts of a host's status a rollout watches.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Health {
    up: bool,
    on_target: bool,
    calls: u64,
    faults: u64,
}

/// The broker and the record of one rollout, and how to show progress.
struct Runner<'a> {
    client: &'a Client,
    timeout: Duration,
    bucket: String,
    revision: u64,
    window: Duration,
    show: Show,
}

/// How progress is shown: bars on a terminal, plain lines otherwise, nothing with `--json`.
enum Show {
    Bars(Option<indicatif::ProgressBar>),
    Lines,
    Quiet,
}

impl Show {
    fn pick(json: bool) -> Show {
        if json {
            Show::Quiet
        } else if std::io::stdout().is_terminal() {
            Show::Bars(None)
        } else {
            Show::Lines
        }
    }

    fn line(&self, text: &str) {
        match self {
            Show::Lines => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
            Show::Bars(Some(bar)) => bar.println(text),
            Show::Bars(None) => println!("{text}"),
            Show::Quiet => {}
        }
    }

    fn batch_started(&mut self, label: &str, hosts: usize) {
        if let Show::Bars(bar) = self {
            let b = indicatif::ProgressBar::new(hosts as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{prefix:>18} [{bar:24}] {pos}/{len} {wide_msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix(label.to_owned());
            b.enable_steady_tick(Duration::from_millis(200));
            *bar = Some(b);
        } else {
            self.line(&format!("{label}: {hosts} host(s)"));
        }
    }

    fn status(&self, text: &str) {
        if let Show::Bars(Some(bar)) = self {
            bar.set_message(text.to_owned());
        }
    }

    fn advance(&self) {
        if let Show::Bars(Some(bar)) = self {
            bar.inc(1);
        }
    }

    fn batch_done(&mut self, label: &str, text: &str) {
        if let Show::Bars(bar) = self {
            if let Some(b) = bar.take() {
                b.finish_with_message(text.to_owned());
            }
        } else {
            self.line(&format!("{label}: {text}"));
        }
    }
}

impl Runner<'_> {
    /// Writes the record if it is still at the revision this runner last wrote: another runner that
    /// took the rollout over makes this one stop.
    fn save(&mut self, r: &mut Rollout) -> Result<(), CtlError> {
        r.updated_at = crate::util::time::now();
        let body = serde_json::to_vec(r).map_err(|e| CtlError::Failed(format!("rollout {}: {e}", r.id)))?;
        self.revision = self.client.update_record(&self.bucket, &record_key(&r.id), &body, self.revision).map_err(
            |e| match e {
                ClientError::Conflict { .. } => CtlError::Failed(format!(
                    "rollout {}: its record was changed by another runner (`fleet rollout resume` or `abort`); this one stops",
                    r.id
                )),
                e => broker(e),
            },
        )?;
        Ok(())
    }

    /// Ends the lock of a rollout that is over.
    fn unlock(&self, r: &Rollout) {
        let key = lock_key(&r.service, &r.backend);
        if let Ok(Some(lock)) = self.client.record(&self.bucket, &key) {
            if lock.value == r.id.as_bytes() {
                if let Err(e) = self.client.delete_record(&self.bucket, &key, lock.revision) {
                    self.show.line(&format!("warning: rollout {}: cannot remove its lock {key}: {e}", r.id));
                }
            }
        }
    }

    fn swap_line(r: &Rollout, driver: Option<&str>, digest: &str) -> String {
        let mut args = serde_json::json!({"backend": r.backend, "digest": digest, "rollout": r.id});
        if let Some(d) = driver {
            args["driver"] = serde_json::Value::String(d.to_owned());
        }
        serde_json::json!({"service": r.service, "op": "swap", "args": args}).to_string()
    }

    /// Swaps `host` to the new driver (`driver` = Some) or back to `digest`'s.
    fn swap(&self, r: &Rollout, host: &str, driver: Option<&str>, digest: &str) -> Result<SwapReport, String> {
        let subject = subject::rpc(self.client.fleet(), host, Some(&r.service), Some(&r.backend), Class::Admin);
        // A swap waits for the old driver's calls to drain: give it longer than a status.
        let timeout = self.timeout.max(Duration::from_secs(60));
        result(call(self.client, host, &subject, &Self::swap_line(r, driver, digest), timeout))
    }

    /// What `host`'s backend looks like now.
    fn health(&self, r: &Rollout, host: &str) -> Result<Health, String> {
        let subject = subject::rpc(self.client.fleet(), host, None, None, Class::Read);
        let status: HostStatus = result(call(self.client, host, &subject, r#"{"op":"status"}"#, self.timeout))?;
        let backend = status
            .services
            .iter()
            .find(|s| s.name == r.service)
            .and_then(|s| s.backends.iter().find(|b| b.name == r.backend))
            .ok_or_else(|| format!("no {} backend {:?}", r.service, r.backend))?;
        let (calls, faults) = backend.calls.values().fold((0, 0), |(c, f), s| (c + s.count, f + s.faults));
        Ok(Health {
            up: backend.state == State::Up,
            on_target: backend.driver.digest.eq_ignore_ascii_case(&r.digest),
            calls,
            faults,
        })
    }

    /// Drives a rollout in state `running` to `done`, or into a rollback at the first failure.
    fn run(&mut self, r: &mut Rollout) -> Result<(), CtlError> {
        // An interrupted runner may have sent a swap without hearing its answer: ask the host.
        for i in 0..r.hosts.len() {
            if r.hosts[i].state == StepState::Swapping {
                let host = r.hosts[i].host.clone();
                r.hosts[i].state = match self.health(r, &host) {
                    Ok(h) if h.on_target => StepState::Swapped,
                    Ok(_) => StepState::Pending,
                    Err(e) => {
                        return self.stop(r, format!("host {host}: cannot tell whether its swap ran: {e}"));
                    }
                };
                self.save(r)?;
            }
        }
        let batches = r.batches.len();
        for b in 0..batches {
            let members: Vec<usize> = (0..r.hosts.len()).filter(|&i| r.hosts[i].batch == b).collect();
            if members.iter().all(|&i| r.hosts[i].state == StepState::Passed) {
                continue;
            }
            let label = if b == 0 && r.canary > 0 {
                format!("batch {}/{batches} (canary)", b + 1)
            } else {
                format!("batch {}/{batches}", b + 1)
            };
            self.show.batch_started(&label, members.len());
            for &i in &members {
                let host = r.hosts[i].host.clone();
                match r.hosts[i].state {
                    StepState::Pending => {}
                    StepState::Swapped | StepState::Passed => {
                        self.show.advance();
                        continue;
                    }
                    other => {
                        let why = format!("host {host} is {} in a running rollout", other.as_str());
                        return self.stop(r, why);
                    }
                }
                self.show.status(&format!("swapping {host}"));
                r.hosts[i].state = StepState::Swapping;
                self.save(r)?;
                let driver = r.driver.clone();
                let digest = r.digest.clone();
                match self.swap(r, &host, Some(&driver), &digest) {
                    Ok(s) => {
                        r.hosts[i].state = StepState::Swapped;
                        r.hosts[i].message = Some(format!(
                            "swapped to {} {} (generation {}, {} µs)",
                            s.new.name, s.new.version, s.generation, s.swap_us
                        ));
                        self.save(r)?;
                        self.show
                            .line(&format!("{host}: swapped to {} {} [{}]", s.new.name, s.new.version, s.new.digest));
                        self.show.advance();
                    }
                    Err(e) => {
                        // Did it run after all (an answer lost)? Then it is swapped, and undone below.
                        let ran = self.health(r, &host).map(|h| h.on_target).unwrap_or(false);
                        r.hosts[i].state = if ran { StepState::Swapped } else { StepState::Failed };
                        r.hosts[i].message = Some(e.clone());
                        self.save(r)?;
                        self.show.batch_done(&label, &format!("{host}: swap failed"));
                        return self.stop(r, format!("host {host}: swap failed: {e}"));
                    }
                }
            }
            let watched: Vec<usize> = (0..r.hosts.len())
                .filter(|&i| matches!(r.hosts[i].state, StepState::Swapped | StepState::Passed))
                .collect();
            if let Err((i, why)) = self.watch(r, &watched) {
                let host = r.hosts[i].host.clone();
                r.hosts[i].state = StepState::Failed;
                r.hosts[i].message = Some(why.clone());
                self.save(r)?;
                self.show.batch_done(&label, &format!("{host}: {why}"));
                return self.stop(r, format!("host {host}: {why}"));
            }
            for &i in &members {
                r.hosts[i].state = StepState::Passed;
            }
            self.save(r)?;
            self.show.batch_done(&label, "healthy");
        }
        r.state = RolloutState::Done;
        r.reason = None;
        self.save(r)?;
        self.unlock(r);
        Ok(())
    }

    /// Watches `hosts` (indexes) for the health window: each must stay up on the new content, answer,
    /// and keep its driver's fault rate under the threshold. The first that does not, and why.
    fn watch(&self, r: &Rollout, hosts: &[usize]) -> Result<(), (usize, String)> {
        let start = Instant::now();
        let tick = (self.window / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut base: Vec<Option<Health>> = vec![None; hosts.len()];
        let mut silent = vec![0u32; hosts.len()];
        loop {
            for (k, &i) in hosts.iter().enumerate() {
                let host = &r.hosts[i].host;
                match self.health(r, host) {
                    Ok(h) => {
                        silent[k] = 0;
                        if !h.on_target {
                            return Err((i, "no longer serves the new content (swapped by someone else?)".into()));
                        }
                        if !h.up {
                            return Err((i, "its backend is down on the new driver".into()));
                        }
                        let b = *base[k].get_or_insert(h);
                        let (calls, faults) = (h.calls.saturating_sub(b.calls), h.faults.saturating_sub(b.faults));
                        if faults > 0 && faults as f64 > r.max_error_rate * calls as f64 {
                            return Err((
                                i,
                                format!(
                                    "{faults} of {calls} driver calls failed by the driver's fault ({:.1}% > {:.1}%)",
                                    100.0 * faults as f64 / calls.max(1) as f64,
                                    100.0 * r.max_error_rate
                                ),
                            ));
                        }
                    }
                    Err(e) => {
                        silent[k] += 1;
                        if silent[k] >= 3 {
                            return Err((i, format!("no status in 3 tries: {e}")));
                        }
                    }
                }
            }
            let elapsed = start.elapsed();
            if elapsed >= self.window {
                return Ok(());
            }
            let left = self.window - elapsed;
            self.show.status(&format!("watching {} host(s), {}s left", hosts.len(), left.as_secs() + 1));
            std::thread::sleep(tick.min(left));
        }
    }

    /// Stops a rollout for `why` and swaps back every host it swapped.
    fn stop(&mut self, r: &mut Rollout, why: String) -> Result<(), CtlError> {
        self.show.line(&format!("rollout {}: stopped: {why}; swapping back", r.id));
        r.state = RolloutState::RollingBack;
        r.reason = Some(why);
        self.save(r)?;
        self.roll_back(r)
    }

    /// Swaps every host the rollout may have swapped back to the content it ran before, newest first.
    fn roll_back(&mut self, r: &mut Rollout) -> Result<(), CtlError> {
        for i in (0..r.hosts.len()).rev() {
            let host = r.hosts[i].host.clone();
            let state = r.hosts[i].state;
            if state == StepState::Pending {
                r.hosts[i].state = StepState::Skipped;
                continue;
            }
            if matches!(state, StepState::Reverted | StepState::Skipped) {
                continue;
            }
            // Whatever the record says, the host's own answer decides: only a host on the new content
            // is swapped back.
            match self.health(r, &host) {
                Ok(h) if !h.on_target => {
                    if matches!(state, StepState::Swapped | StepState::Passed | StepState::Reverting) {
                        r.hosts[i].state = StepState::Reverted;
                        r.hosts[i].message = Some("back on its old content".to_owned());
                    } else if state == StepState::Swapping {
                        r.hosts[i].state = StepState::Skipped;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    r.hosts[i].state = StepState::RevertFailed;
                    r.hosts[i].message = Some(format!("cannot tell what it serves: {e}"));
                    self.save(r)?;
                    continue;
                }
            }
            r.hosts[i].state = StepState::Reverting;
            self.save(r)?;
            let old = r.hosts[i].from.digest.clone();
            match self.swap(r, &host, None, &old) {
                Ok(s) => {
                    r.hosts[i].state = StepState::Reverted;
                    r.hosts[i].message = Some(format!("swapped back to {} {}", s.new.name, s.new.version));
                    self.show
                        .line(&format!("{host}: swapped back to {} {} [{}]", s.new.name, s.new.version, s.new.digest));
                }
                Err(e) => {
                    r.hosts[i].state = StepState::RevertFailed;
                    r.hosts[i].message = Some(format!("cannot swap back to {old}: {e}"));
                    self.show.line(&format!("{host}: cannot swap back: {e}"));
                }
            }
            self.save(r)?;
        }
        let failed = r.hosts.iter().any(|h| h.state == StepState::RevertFailed);
        r.state = if failed { RolloutState::Failed } else { RolloutState::RolledBack };
        self.save(r)?;
        if !failed {
            self.unlock(r);
        }
        Ok(())
    }
}

/// Splits `SERVICE[/BACKEND]`.
fn target(text: &str) -> Result<(String, Option<String>), CtlError> {
    let (service, backend) = match text.split_once('/') {
        Some((s, b)) => (s, Some(b.to_owned())),
        None => (text, None),
    };
    if crate::services::kinds::kind(service).is_none() {
        let known: Vec<&str> = crate::services::kinds::KINDS.iter().map(|k| k.name).collect();
        return Err(CtlError::Usage(format!("{text:?}: no service {service:?} (services: {})", known.join(", "))));
    }
    if backend.as_deref() == Some("") {
        return Err(CtlError::Usage(format!("{text:?}: empty backend name")));
    }
    Ok((service.to_owned(), backend))
}

/// The hosts of each batch: `canary` first, then batches of `batch` (N or P% of all).
fn batches(hosts: &[String], canary: usize, batch: &str) -> Result<Vec<Vec<String>>, CtlError> {
    let size = match batch.strip_suffix('%') {
        Some(p) => {
            let p: f64 =
                p.trim().parse().ok().filter(|p: &f64| *p > 0.0 && *p <= 100.0).ok_or_else(|| {
                    CtlError::Usage(format!("--batch {batch:?}: a percentage above 0 and at most 100"))
                })?;
            ((hosts.len() as f64 * p / 100.0).ceil() as usize).max(1)
        }
        None => batch.trim().parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            CtlError::Usage(format!("--batch {batch:?}: a number of hosts (1 or more) or a percentage"))
        })?,
    };
    let mut out = Vec::new();
    let canary = canary.min(hosts.len());
    if canary > 0 {
        out.push(hosts[..canary].to_vec());
    }
    out.extend(hosts[canary..].chunks(size).map(<[String]>::to_vec));
    Ok(out)
}

fn labels(items: &[String]) -> Result<Vec<(String, String)>, CtlError> {
    items
        .iter()
        .map(|i| match i.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CtlError::Usage(format!("--label {i:?}: expected KEY=VALUE"))),
        })
        .collect()
}

/// Plans a rollout: which hosts, in which batches, each checked by a dry-run swap on the host itself.
fn plan(client: &Client, a: &SwapArgs, window: Duration, timeout: Duration) -> Result<Rollout, CtlError> {
    if !crate::loading::loader::is_digest(&a.digest) {
        return Err(CtlError::Usage(format!(
            "--digest {:?}: not a digest (blake3: and 64 hex digits, as `plughost inspect` prints)",
            a.digest
        )));
    }
    if crate::loading::drivers::is_path(&a.driver) {
        return Err(CtlError::Usage(format!(
            "{:?}: a rollout names a driver by NAME, which each host finds in its own driver directories",
            a.driver
        )));
    }
    if !(0.0..=1.0).contains(&a.max_error_rate) {
        return Err(CtlError::Usage(format!("--max-error-rate {}: a share from 0 to 1", a.max_error_rate)));
    }
    for h in &a.hosts {
        plughost_fleet::names::check("--hosts", h).map_err(CtlError::Usage)?;
    }
    let (service, backend) = target(&a.target)?;
    let wanted = labels(&a.labels)?;
    let table = client.hosts().map_err(broker)?;
    let mut excluded = Vec::new();
    let mut left_out =
        |host: &str, reason: String| excluded.push(Excluded { host: host.to_owned(), reason, current: false });
    let mut candidates: Vec<&HostEntry> = Vec::new();
    let asked: Vec<String> = if a.hosts.is_empty() {
        let mut all: Vec<String> = table.iter().map(|e| e.host.clone()).collect();
        all.sort();
        all
    } else {
        a.hosts.clone()
    };
    for name in &asked {
        let Some(e) = table.iter().find(|e| &e.host == name) else {
            left_out(name, "not in the services table".to_owned());
            continue;
        };
        let explicit = !a.hosts.is_empty();
        let report = match &e.report {
            Ok(r) => r,
            Err(why) => {
                left_out(name, why.clone());
                continue;
            }
        };
        if !wanted.iter().all(|(k, v)| report.labels.get(k) == Some(v)) {
            if explicit {
                left_out(name, "its labels do not match".to_owned());
            }
            continue;
        }
        if !report.services.iter().any(|s| s.name == service) {
            if explicit {
                left_out(name, format!("no {service} service"));
            }
            continue;
        }
        if report.is_down(e.age, Duration::from_secs(60)) || report.state == plughost_fleet::report::HostState::Stopping
        {
            left_out(name, format!("down (last report {}s ago, {})", e.age.as_secs(), report.state.as_str()));
            continue;
        }
        if report.api < SWAP_DIGEST_SINCE {
            left_out(
                name,
                format!(
                    "speaks protocol version {} (plughost {}); a rollout needs version {SWAP_DIGEST_SINCE}",
                    report.api, report.version
                ),
            );
            continue;
        }
        candidates.push(e);
    }
    // One backend everywhere: named, or every candidate's default.
    let backend = match backend {
        Some(b) => b,
        None => {
            let mut defaults: Vec<(String, String)> = candidates
                .iter()
                .filter_map(|e| e.report.as_ref().ok())
                .filter_map(|r| {
                    r.services.iter().find(|s| s.name == service).map(|s| (r.host.clone(), s.default_backend.clone()))
                })
                .collect();
            defaults.sort_by(|x, y| x.1.cmp(&y.1));
            match defaults.first() {
                None => "default".to_owned(),
                Some((_, first)) if defaults.iter().all(|(_, d)| d == first) => first.clone(),
                Some(_) => {
                    let list: Vec<String> = defaults.iter().map(|(h, d)| format!("{h}: {d}")).collect();
                    return Err(CtlError::Usage(format!(
                        "the hosts' default {service} backends differ ({}): name one, {service}/BACKEND",
                        list.join(", ")
                    )));
                }
            }
        }
    };
    let mut hosts = Vec::new();
    let check_line = serde_json::json!({"service": service, "op": "swap",
        "args": {"backend": backend, "driver": a.driver, "digest": a.digest, "dry_run": true}})
    .to_string();
    for e in candidates {
        let subject = subject::rpc(client.fleet(), &e.host, Some(&service), Some(&backend), Class::Admin);
        match result::<SwapCheck>(call(client, &e.host, &subject, &check_line, timeout)) {
            Ok(c) if c.current.digest.eq_ignore_ascii_case(&a.digest) => excluded.push(Excluded {
                host: e.host.clone(),
                reason: format!("already serves {} {} [{}]", c.current.name, c.current.version, c.current.digest),
                current: true,
            }),
            Ok(c) => hosts.push(HostStep {
                host: e.host.clone(),
                batch: 0,
                state: StepState::Pending,
                from: Served { name: c.current.name, version: c.current.version, digest: c.current.digest },
                message: None,
            }),
            Err(why) => excluded.push(Excluded { host: e.host.clone(), reason: why, current: false }),
        }
    }
    let names: Vec<String> = hosts.iter().map(|h| h.host.clone()).collect();
    let batches = batches(&names, a.canary, &a.batch)?;
    for (b, members) in batches.iter().enumerate() {
        for h in hosts.iter_mut().filter(|h| members.contains(&h.host)) {
            h.batch = b;
        }
    }
    let now = crate::util::time::now();
    Ok(Rollout {
        id: new_id(),
        service,
        backend,
        driver: a.driver.clone(),
        digest: a.digest.to_ascii_lowercase(),
        state: RolloutState::Running,
        reason: None,
        canary: a.canary,
        batch: a.batch.clone(),
        health_window_ms: window.as_millis() as u64,
        max_error_rate: a.max_error_rate,
        batches,
        hosts,
        excluded,
        created_at: now,
        updated_at: now,
        by: who(),
    })
}

fn duration(flag: &str, text: &str) -> Result<Duration, CtlError> {
    crate::util::time::parse_duration(text).map_err(|e| CtlError::Usage(format!("{flag} {e}")))
}

fn connect_timeout(c: &Connect) -> Result<Duration, CtlError> {
    duration("--timeout", &c.timeout)
}

/// What a rollout ended with: its table (or JSON) and exit code: 0 when it ended as `wanted`, 1
/// otherwise.
fn outcome(r: &Rollout, json: bool, wanted: RolloutState) -> Result<CtlOutput, CtlError> {
    let code = if r.state == wanted { 0 } else { 1 };
    let stdout = if json {
        serde_json::to_string_pretty(r).map_err(|e| CtlError::Failed(e.to_string()))? + "\n"
    } else {
        describe(r)
    };
    Ok(CtlOutput { stdout, code })
}

/// A rollout for people: a header, each host, the hosts left out.
pub fn describe(r: &Rollout) -> String {
    let mut out = format!(
        "rollout {}: {}/{} to {} [{}]: {}{}\n",
        r.id,
        r.service,
        r.backend,
        r.driver,
        r.digest,
        r.state.as_str(),
        r.reason.as_deref().map(|w| format!(" ({w})")).unwrap_or_default()
    );
    if !r.hosts.is_empty() {
        let mut rows = vec![vec!["HOST".into(), "BATCH".into(), "STATE".into(), "FROM".into(), "MESSAGE".into()]];
        for h in &r.hosts {
            rows.push(vec![
                h.host.clone(),
                (h.batch + 1).to_string(),
                h.state.as_str().to_owned(),
                format!("{} {} [{}]", h.from.name, h.from.version, h.from.digest.chars().take(19).collect::<String>()),
                h.message.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&table_rows(&rows, ""));
    }
    for e in &r.excluded {
        out.push_str(&format!("left out: {}: {}\n", e.host, e.reason));
    }
    out
}

/// `plughost fleet swap`.
pub fn swap(a: &SwapArgs) -> Result<CtlOutput, CtlError> {
    let window = duration("--health-window", &a.health_window)?;
    let timeout = connect_timeout(&a.connect)?;
    let client = a.connect.client()?;
    let mut r = plan(&client, a, window, timeout)?;
    let problems: Vec<&Excluded> = r.excluded.iter().filter(|e| !e.current).collect();
    if a.all_or_nothing && !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|e| format!("{}: {}", e.host, e.reason)).collect();
        return Err(CtlError::Failed(format!(
            "{}/{}: refused (--all-or-nothing): {}",
            r.service,
            r.backend,
            list.join("; ")
        )));
    }
    if a.dry_run || r.hosts.is_empty() {
        if r.hosts.is_empty() && !a.dry_run {
            if problems.is_empty() {
                r.state = RolloutState::Done;
                r.reason = Some("every host already serves this content".to_owned());
            } else {
                let list: Vec<String> = problems.iter().map(|e| format!("{}: {}", e.host, e.reason)).collect();
                return Err(CtlError::Failed(format!(
                    "{}/{}: no host can take {} [{}]: {}",
                    r.service,
                    r.backend,
                    a.driver,
                    r.digest,
                    list.join("; ")
                )));
            }
        }
        let mut out = if a.json {
            serde_json::to_string_pretty(&r).map_err(|e| CtlError::Failed(e.to_string()))? + "\n"
        } else {
            let mut text = describe(&r);
            if a.dry_run {
                for (b, members) in r.batches.iter().enumerate() {
                    text.push_str(&format!("batch {}: {}\n", b + 1, members.join(", ")));
                }
            }
            text
        };
        if a.dry_run && !a.json {
            out.push_str("dry run: nothing was swapped\n");
        }
        return Ok(CtlOutput::ok(out));
    }
    // Claim the backend, then write the record.
    let bucket = subject::rollouts_bucket(client.fleet());
    let lock = lock_key(&r.service, &r.backend);
    if let Err(e) = client.create_record(&bucket, &lock, r.id.as_bytes()) {
        return Err(match e {
            ClientError::Conflict { .. } => {
                let holder = client
                    .record(&bucket, &lock)
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v.value).into_owned())
                    .unwrap_or_else(|| "?".to_owned());
                let detail = client
                    .record(&bucket, &record_key(&holder))
                    .ok()
                    .flatten()
                    .and_then(|v| serde_json::from_slice::<Rollout>(&v.value).ok())
                    .map(|o| {
                        format!(
                            " ({}, by {}, updated {})",
                            o.state.as_str(),
                            o.by,
                            crate::util::time::utc(o.updated_at)
                        )
                    })
                    .unwrap_or_default();
                CtlError::Failed(format!(
                    "{}/{}: rollout {holder}{detail} holds it: finish it with `plughost fleet rollout resume {holder}` or undo it with `plughost fleet rollout abort {holder}`",
                    r.service, r.backend
                ))
            }
            e => broker(e),
        });
    }
    let body = serde_json::to_vec(&r).map_err(|e| CtlError::Failed(e.to_string()))?;
    let revision = match client.create_record(&bucket, &record_key(&r.id), &body) {
        Ok(rev) => rev,
        Err(e) => {
            if let Ok(Some(l)) = client.record(&bucket, &lock) {
                let _ = client.delete_record(&bucket, &lock, l.revision);
            }
            return Err(broker(e));
        }
    };
    let mut runner = Runner { client: &client, timeout, bucket, revision, window, show: Show::pick(a.json) };
    runner.show.line(&format!(
        "rollout {}: {}/{} to {} [{}] on {} host(s) in {} batch(es), health window {}, max error rate {}",
        r.id,
        r.service,
        r.backend,
        r.driver,
        r.digest,
        r.hosts.len(),
        r.batches.len(),
        a.health_window,
        r.max_error_rate
    ));
    for e in &r.excluded {
        runner.show.line(&format!("left out: {}: {}", e.host, e.reason));
    }
    runner.run(&mut r)?;
    outcome(&r, a.json, RolloutState::Done)
}

/// Reads a rollout's record and its revision.
fn load(client: &Client, id: &str) -> Result<(Rollout, u64), CtlError> {
    let bucket = subject::rollouts_bucket(client.fleet());
    let v = client
        .record(&bucket, &record_key(id))
        .map_err(broker)?
        .ok_or_else(|| CtlError::Failed(format!("rollout {id}: no such rollout in fleet {}", client.fleet())))?;
    let r: Rollout = serde_json::from_slice(&v.value)
        .map_err(|e| CtlError::Failed(format!("rollout {id}: unreadable record: {e}")))?;
    Ok((r, v.revision))
}

/// `plughost fleet rollout status [ID]`.
pub fn status(a: &RolloutArgs) -> Result<CtlOutput, CtlError> {
    let client = a.connect.client()?;
    if let Some(id) = &a.id {
        let (r, _) = load(&client, id)?;
        let stdout = if a.json {
            serde_json::to_string_pretty(&r).map_err(|e| CtlError::Failed(e.to_string()))? + "\n"
        } else {
            describe(&r)
        };
        return Ok(CtlOutput::ok(stdout));
    }
    let bucket = subject::rollouts_bucket(client.fleet());
    let mut all: Vec<Rollout> = client
        .all_records(&bucket)
        .map_err(broker)?
        .into_iter()
        .filter(|v| v.key.starts_with("rollout."))
        .filter_map(|v| serde_json::from_slice(&v.value).ok())
        .collect();
    all.sort_by(|x, y| x.created_at.cmp(&y.created_at).then(x.id.cmp(&y.id)));
    if a.json {
        return Ok(CtlOutput::ok(
            serde_json::to_string_pretty(&all).map_err(|e| CtlError::Failed(e.to_string()))? + "\n",
        ));
    }
    let mut rows = vec![vec![
        "ID".to_owned(),
        "TARGET".to_owned(),
        "DRIVER".to_owned(),
        "STATE".to_owned(),
        "PASSED".to_owned(),
        "UPDATED".to_owned(),
    ]];
    for r in &all {
        let passed = r.hosts.iter().filter(|h| h.state == StepState::Passed).count();
        rows.push(vec![
            r.id.clone(),
            format!("{}/{}", r.service, r.backend),
            r.driver.clone(),
            r.state.as_str().to_owned(),
            format!("{passed}/{}", r.hosts.len()),
            crate::util::time::utc(r.updated_at),
        ]);
    }
    Ok(CtlOutput::ok(table_rows(&rows, "")))
}

/// Takes a rollout over: its record is rewritten under this runner, so a runner still driving it stops
/// at its next write.
fn take_over<'a>(client: &'a Client, a: &RolloutArgs, verb: &str) -> Result<(Runner<'a>, Rollout), CtlError> {
    let id =
        a.id.as_deref().ok_or_else(|| CtlError::Usage(format!("fleet rollout {verb}: which rollout? give its ID")))?;
    let (mut r, revision) = load(client, id)?;
    let window = match &a.health_window {
        Some(w) => duration("--health-window", w)?,
        None => Duration::from_millis(r.health_window_ms),
    };
    let mut runner = Runner {
        client,
        timeout: connect_timeout(&a.connect)?,
        bucket: subject::rollouts_bucket(client.fleet()),
        revision,
        window,
        show: Show::pick(a.json),
    };
    r.by = who();
    runner.save(&mut r)?;
    Ok((runner, r))
}

/// `plughost fleet rollout resume ID`: finishes an interrupted rollout (or its rollback).
pub fn resume(a: &RolloutArgs) -> Result<CtlOutput, CtlError> {
    let client = a.connect.client()?;
    let (mut runner, mut r) = take_over(&client, a, "resume")?;
    match r.state {
        RolloutState::Running => {
            runner.show.line(&format!("rollout {}: resuming", r.id));
            runner.run(&mut r)?;
        }
        RolloutState::RollingBack => {
            runner.show.line(&format!("rollout {}: resuming its rollback", r.id));
            runner.roll_back(&mut r)?;
        }
        RolloutState::Done | RolloutState::RolledBack | RolloutState::Failed => {
            runner.show.line(&format!("rollout {}: already {}: nothing to resume", r.id, r.state.as_str()));
        }
    }
    // A resumed rollback that brought every host back did what it was asked.
    let wanted = if r.reason.is_some() && r.state == RolloutState::RolledBack {
        RolloutState::RolledBack
    } else {
        RolloutState::Done
    };
    outcome(&r, a.json, wanted)
}

/// `plughost fleet rollout abort ID`: swaps back every host the rollout swapped.
pub fn abort(a: &RolloutArgs) -> Result<CtlOutput, CtlError> {
    let client = a.connect.client()?;
    let (mut runner, mut r) = take_over(&client, a, "abort")?;
    if r.state == RolloutState::RolledBack {
        runner.show.line(&format!("rollout {}: already rolled back: nothing to abort", r.id));
        return outcome(&r, a.json, RolloutState::RolledBack);
    }
    let why = format!("aborted by {}", r.by);
    runner.show.line(&format!("rollout {}: {why}; swapping back", r.id));
    r.state = RolloutState::RollingBack;
    r.reason = Some(why);
    runner.save(&mut r)?;
    runner.roll_back(&mut r)?;
    outcome(&r, a.json, RolloutState::RolledBack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("h{i}")).collect()
    }

    #[test]
    fn batches_put_the_canary_first_then_fixed_or_percentage_sizes() {
        let b = batches(&names(5), 1, "2").unwrap();
        assert_eq!(b, vec![vec!["h1"], vec!["h2", "h3"], vec!["h4", "h5"]]);
        let b = batches(&names(8), 2, "25%").unwrap();
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2, 2, 2]);
        let b = batches(&names(3), 0, "100%").unwrap();
        assert_eq!(b, vec![vec!["h1", "h2", "h3"]]);
        let b = batches(&names(2), 5, "1").unwrap();
        assert_eq!(b, vec![vec!["h1", "h2"]]);
        for bad in ["0", "0%", "150%", "x", "-1"] {
            assert!(matches!(batches(&names(3), 1, bad), Err(CtlError::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn ids_are_valid_keys_and_rollout_ids() {
        let id = new_id();
        assert_eq!(id.len(), "20261206-093012-a1b2".len(), "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{id}");
    }

    #[test]
    fn targets_name_a_known_service() {
        assert_eq!(target("volume").unwrap(), ("volume".to_owned(), None));
        assert_eq!(target("volume/fast").unwrap(), ("volume".to_owned(), Some("fast".to_owned())));
        assert!(matches!(target("nope/x"), Err(CtlError::Usage(_))));
        assert!(matches!(target("volume/"), Err(CtlError::Usage(_))));
    }
}
