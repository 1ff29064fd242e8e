//! `plughost ctl`: the client side of the control socket. Requests are built from the protocol's types
//! (per-service parts from the service table), answers are printed for people or as JSON.

use crate::util::fmt::{human_size, key_values, table};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub use crate::control::outcome::{CtlError, CtlOutput};
use crate::control::protocol::{AuditArgs, HostStatus, ReloadEntry, RestartArgs, SwapArgs, SwapCheck, SwapReport};
use crate::control::request::{Answer, Body, Request};
use crate::services::kinds::{self, KINDS};
use crate::services::ServiceKind;

/// What `plughost ctl` was asked.
#[derive(Debug, Clone)]
pub enum CtlCommand {
    /// `ping`.
    Ping,
    /// `health`: exit 0 up, 1 degraded, 2 down or unreachable.
    Health,
    /// `status`.
    Status,
    /// `metrics`: OpenMetrics text.
    Metrics,
    /// `reload`.
    Reload,
    /// `audit [--since WHEN]`.
    Audit {
        /// `--since` as given.
        since: Option<String>,
    },
    /// `restart SERVICE[/BACKEND]`.
    Restart {
        /// `SERVICE[/BACKEND]`.
        target: String,
    },
    /// `swap SERVICE[/BACKEND] [PATH|NAME]`.
    Swap {
        /// `SERVICE[/BACKEND]`.
        target: String,
        /// The new driver.
        driver: Option<String>,
        /// The content it must have.
        digest: Option<String>,
        /// Only check.
        dry_run: bool,
    },
    /// `SERVICE OP ...`: a service's own subcommand.
    Service {
        /// The service.
        kind: &'static ServiceKind,
        /// Its parsed subcommand.
        matches: clap::ArgMatches,
    },
}

const SWAP_HELP: &str = "Examples:\n  plughost ctl swap volume target/release/libfile_volume.so\n  plughost ctl swap volume/fast          # reload the configured file (a rebuilt library really loads)\n\nThe new driver is loaded, verified, constructed with the backend's options and initialised before it\nreplaces the old one; calls in flight finish on the old driver. On any error the old one keeps serving.";

impl clap::FromArgMatches for CtlCommand {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        match m.subcommand() {
            Some(("ping", _)) => Ok(CtlCommand::Ping),
            Some(("health", _)) => Ok(CtlCommand::Health),
            Some(("status", _)) => Ok(CtlCommand::Status),
            Some(("metrics", _)) => Ok(CtlCommand::Metrics),
            Some(("reload", _)) => Ok(CtlCommand::Reload),
            Some(("audit", s)) => Ok(CtlCommand::Audit { since: s.get_one::<String>("since").cloned() }),
            Some(("restart", s)) => {
                Ok(CtlCommand::Restart { target: s.get_one::<String>("target").cloned().unwrap_or_default() })
            }
            Some(("swap", s)) => Ok(CtlCommand::Swap {
                target: s.get_one::<String>("target").cloned().unwrap_or_default(),
                driver: s.get_one::<String>("driver").cloned(),
                digest: s.get_one::<String>("digest").cloned(),
                dry_run: s.get_flag("dry-run"),
            }),
            Some((name, s)) => match kinds::kind(name) {
                Some(kind) => Ok(CtlCommand::Service { kind, matches: s.clone() }),
                None => Err(clap::Error::raw(
                    clap::error::ErrorKind::InvalidSubcommand,
                    format!("unknown command {name:?}"),
                )),
            },
            None => Err(clap::Error::raw(clap::error::ErrorKind::MissingSubcommand, "a command is required")),
        }
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = CtlCommand::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Subcommand for CtlCommand {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, Command};
        let cmd =
            cmd.subcommand(Command::new("ping").about("Is the host serving (exit 0 when it answers)"))
                .subcommand(Command::new("health").about(
                    "Exit 0 when every backend is up, 1 degraded, 2 down or unreachable; one line per problem (for monitoring)",
                ))
                .subcommand(Command::new("status").about("Services, backends, drivers, health, call statistics"))
                .subcommand(Command::new("metrics").about(
                    "The host's metrics as OpenMetrics text (backends up, driver calls and errors, latency, records, workers, fleet)",
                ))
                .subcommand(Command::new("reload").about(
                    "Re-read the configuration and swap every backend whose driver or options changed (as SIGHUP)",
                ))
                .subcommand(
                    Command::new("restart")
                        .about("A fresh worker for an isolated backend, closing its circuit (in-process: the configured driver loaded again)")
                        .arg(Arg::new("target").required(true).value_name("SERVICE[/BACKEND]")),
                )
                .subcommand(
                    Command::new("audit")
                        .about("Who changed what: the audit log of mutations, swaps and reloads (admins only)")
                        .arg(Arg::new("since").long("since").value_name("WHEN").help(
                            "Only entries since WHEN: seconds since the epoch, YYYY-MM-DD[THH:MM:SSZ], or an age (15m, 2h, 7d)",
                        )),
                )
                .subcommand(
                    Command::new("swap")
                        .about("Replace a backend's driver while serving: SERVICE[/BACKEND] [PATH|NAME]")
                        .after_help(SWAP_HELP)
                        .arg(Arg::new("target").required(true).value_name("SERVICE[/BACKEND]").help(format!(
                            "{} (optionally /BACKEND)",
                            KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                        )))
                        .arg(
                            Arg::new("driver")
                                .value_name("PATH|NAME")
                                .help("New driver; default: the configured PATH or NAME, loaded again (with --digest alone: the driver of that content this backend ran before)"),
                        )
                        .arg(Arg::new("digest").long("digest").value_name("blake3:HEX").help(
                            "Load only this content: any other is refused before it is loaded (the backend's pin is not changed)",
                        ))
                        .arg(
                            Arg::new("dry-run")
                                .long("dry-run")
                                .action(clap::ArgAction::SetTrue)
                                .help("Only check: what would load, its digest and the trust checks; nothing changes"),
                        ),
                );
        KINDS.iter().fold(cmd, |cmd, k| {
            cmd.subcommand((k.ctl)(clap::Command::new(k.name).about(k.about).subcommand_required(true)))
        })
    }
    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_subcommands(cmd)
    }
    fn has_subcommand(name: &str) -> bool {
        matches!(name, "ping" | "health" | "status" | "metrics" | "reload" | "audit" | "restart" | "swap")
            || kinds::kind(name).is_some()
    }
}

/// Sends one request and reads the answer: the answer line and the answer parsed.
pub fn request(socket: &Path, request: &Request<'_>) -> Result<(String, Answer), String> {
    let line = serde_json::to_string(request).map_err(|e| format!("cannot encode the request: {e}"))?;
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to \"{}\": {} (is plughost run serving there?)",
            socket.display(),
            crate::util::fmt::io_text(&e)
        )
    })?;
    let closed =
        || format!("socket \"{}\": the connection closed before an answer (did the host stop?)", socket.display());
    s.write_all(line.as_bytes()).and_then(|()| s.write_all(b"\n")).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => closed(),
        _ => format!("socket \"{}\": write failed: {e}", socket.display()),
    })?;
    let mut answer = String::new();
    let n = BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| format!("socket \"{}\": read failed: {e}", socket.display()))?;
    if n == 0 || !answer.ends_with('\n') {
        return Err(closed());
    }
    let parsed: Answer =
        serde_json::from_str(&answer).map_err(|e| format!("socket \"{}\": malformed answer: {e}", socket.display()))?;
    Ok((answer.trim_end().to_owned(), parsed))
}

/// Where `ctl` sends its request.
#[derive(Debug)]
pub enum Target {
    /// A local control socket (default: [`default_socket`](crate::config::default_socket)).
    Socket(Option<PathBuf>),
    /// A host of a fleet, through the broker.
    Fleet(crate::control::fleet::Remote),
}

/// Runs one `ctl` command against `socket` (default: [`default_socket`](crate::config::default_socket)).
/// With `json`, the answer line is printed whatever it says; otherwise an error answer is a
/// [`CtlError::Failed`] with `KIND: MESSAGE`.
pub fn run(socket: Option<PathBuf>, json: bool, command: &CtlCommand) -> Result<CtlOutput, CtlError> {
    run_on(&Target::Socket(socket), json, command)
}

/// Runs one `ctl` command against a local socket or a remote host: the same request, the same output,
/// the same exit codes.
pub fn run_on(target: &Target, json: bool, command: &CtlCommand) -> Result<CtlOutput, CtlError> {
    let body = match command {
        CtlCommand::Ping => Body::Ping,
        CtlCommand::Status | CtlCommand::Health => Body::Status,
        CtlCommand::Metrics => Body::Metrics,
        CtlCommand::Reload => Body::Reload,
        CtlCommand::Audit { since } => {
            let since = since
                .as_deref()
                .map(|t| crate::util::time::parse_since(t, crate::util::time::now()))
                .transpose()
                .map_err(CtlError::Usage)?;
            Body::Audit(AuditArgs { since })
        }
        CtlCommand::Swap { target, driver, digest, dry_run } => {
            let (svc, backend) = split_target("swap", target)?;
            Body::Swap {
                service: svc.to_owned(),
                args: SwapArgs {
                    backend,
                    driver: driver.clone(),
                    digest: digest.clone(),
                    rollout: None,
                    dry_run: *dry_run,
                },
            }
        }
        CtlCommand::Restart { target } => {
            let (svc, backend) = split_target("restart", target)?;
            Body::Restart { service: svc.to_owned(), args: RestartArgs { backend } }
        }
        CtlCommand::Service { kind, matches } => {
            let op = (kind.ctl_op)(matches).map_err(CtlError::Usage)?;
            Body::Service { service: kind.name.to_owned(), op, args: None }
        }
    };
    let id = serde_json::value::RawValue::from_string("1".to_owned()).map_err(|e| CtlError::Usage(e.to_string()))?;
    let req = Request { id: Some(&id), body };
    let sent = match target {
        Target::Socket(socket) => {
            let socket = socket.clone().unwrap_or_else(crate::config::default_socket);
            request(&socket, &req).map_err(CtlError::Failed)
        }
        Target::Fleet(remote) => remote.request(&req),
    };
    let (line, answer) = match (sent, command) {
        (Ok(sent), _) => sent,
        // A host that cannot be reached is down, as far as a health check goes.
        (Err(CtlError::Failed(e)), CtlCommand::Health) => {
            let stdout = if json {
                format!("{}\n", serde_json::json!({"state": "down", "problems": [e]}))
            } else {
                format!("DOWN - {}\n", crate::util::fmt::printable(&e))
            };
            return Ok(CtlOutput { stdout, code: 2 });
        }
        (Err(e), _) => return Err(e),
    };
    if json {
        if let CtlCommand::Health = command {
            let (code, report) = health_of(&answer);
            let v = serde_json::json!({"state": report.0, "problems": report.1});
            return Ok(CtlOutput { stdout: format!("{v}\n"), code });
        }
        return Ok(CtlOutput { stdout: format!("{line}\n"), code: u8::from(!answer.ok) });
    }
    if !answer.ok {
        let e =
            answer.error.unwrap_or_else(|| crate::control::protocol::ApiError::internal("an error without details"));
        return Err(CtlError::Failed(format!("{}: {}", e.kind, crate::util::fmt::printable(&e.message))));
    }
    let result = answer.result.map(|r| r.get().to_owned()).unwrap_or_else(|| "null".to_owned());
    if let CtlCommand::Health = command {
        let (code, (state, problems)) = health_of(&answer_again(&result));
        let mut stdout = format!("{} - {}\n", state.to_uppercase(), summary(&result, &problems));
        for p in &problems {
            stdout.push_str(&format!("{}\n", crate::util::fmt::printable(p)));
        }
        return Ok(CtlOutput { stdout, code });
    }
    let stdout = match &req.body {
        Body::Status => parse::<HostStatus>(&result).map(|s| format_status(&s)),
        Body::Metrics => parse::<crate::control::protocol::MetricsText>(&result).map(|m| m.text),
        Body::Reload => parse::<Vec<ReloadEntry>>(&result).map(|r| format_reload(&r)),
        Body::Audit(_) => parse::<Vec<crate::control::protocol::AuditEntry>>(&result).map(|e| format_audit(&e)),
        Body::Swap { args, .. } if args.dry_run => parse::<SwapCheck>(&result).map(|c| {
            format!(
                "backend {}: would load {} ({}) [{}]; serving now: {} {} [{}]\n",
                c.backend, c.driver, c.path, c.digest, c.current.name, c.current.version, c.current.digest
            )
        }),
        Body::Swap { .. } => parse::<SwapReport>(&result).map(|r| format_swap(&r)),
        Body::Service { service, .. } => match kinds::kind(service) {
            Some(k) => (k.format)(&result).map_err(CtlError::Failed),
            None => key_values(&result).map_err(CtlError::Failed),
        },
        Body::Ping | Body::Restart { .. } => key_values(&result).map_err(CtlError::Failed),
    }?;
    Ok(CtlOutput::ok(stdout))
}

/// An `ok` answer around a status result (for [`health_of`]).
fn answer_again(result: &str) -> Answer {
    Answer { id: None, ok: true, result: serde_json::value::RawValue::from_string(result.to_owned()).ok(), error: None }
}

/// One line after the state: how many backends are up.
fn summary(result: &str, problems: &[String]) -> String {
    match serde_json::from_str::<HostStatus>(result) {
        Ok(st) => {
            let backends: Vec<_> = st.services.iter().flat_map(|s| s.backends.iter()).collect();
            let up = backends.iter().filter(|b| b.state == crate::control::protocol::State::Up).count();
            format!(
                "{up} of {} backend(s) up in {} service(s){}",
                backends.len(),
                st.services.len(),
                if problems.is_empty() { String::new() } else { format!("; {} problem(s)", problems.len()) }
            )
        }
        Err(e) => format!("unreadable status: {e}"),
    }
}

/// The health a status answer shows: exit code, state and one line per problem. Down (2): the answer is
/// an error, or some service has no backend up. Degraded (1): some backend is down, or the host is in a
/// fleet it is not connected to. Up (0) otherwise.
fn health_of(answer: &Answer) -> (u8, (&'static str, Vec<String>)) {
    if !answer.ok {
        let e = answer.error.as_ref().map(|e| format!("{}: {}", e.kind, e.message)).unwrap_or_default();
        return (2, ("down", vec![e]));
    }
    let Some(st) = answer.result.as_ref().and_then(|r| serde_json::from_str::<HostStatus>(r.get()).ok()) else {
        return (2, ("down", vec!["unreadable status answer".to_owned()]));
    };
    let (down, problems) = st.problems();
    match (down, problems.is_empty()) {
        (true, _) => (2, ("down", problems)),
        (false, false) => (1, ("degraded", problems)),
        (false, true) => (0, ("ok", problems)),
    }
}

/// `SERVICE[/BACKEND]`.
fn split_target(what: &str, target: &str) -> Result<(&'static str, Option<String>), CtlError> {
    let (svc, backend) = match target.split_once('/') {
        Some((s, b)) => (s, Some(b.to_owned())),
        None => (target, None),
    };
    let svc = kinds::kind(svc).map(|k| k.name).ok_or_else(|| {
        let known: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        CtlError::Usage(format!(
            "{what} target {svc:?}: expected SERVICE[/BACKEND] with SERVICE one of {}",
            known.join(", ")
        ))
    })?;
    Ok((svc, backend))
}

fn parse<T: serde::de::DeserializeOwned>(result: &str) -> Result<T, CtlError> {
    serde_json::from_str(result).map_err(|e| CtlError::Failed(format!("unexpected answer: {e}")))
}

/// `ctl status` for people.
pub fn format_status(st: &HostStatus) -> String {
    let mut out = format!("plughost pid {} on {}\n", st.pid, st.socket);
    for svc in &st.services {
        out.push_str(&format!(
            "service {}: {}{} (heartbeat {} ms ago)\n",
            svc.name,
            svc.state,
            svc.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default(),
            svc.heartbeat_age_ms.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
        ));
        let header = ["  BACKEND", "STATE", "ISOLATION", "DRIVER", "DIGEST", "GEN", "CALLS", "PATH"].map(String::from);
        let rows: Vec<[String; 8]> = svc
            .backends
            .iter()
            .map(|b| {
                [
                    format!("  {}{}", b.name, if b.default { "*" } else { "" }),
                    b.state.to_string(),
                    b.isolation.clone(),
                    format!("{} {}", b.driver.name, b.driver.version),
                    b.driver.digest.chars().take(19).collect(),
                    b.driver.generation.to_string(),
                    b.calls.values().map(|c| c.count).sum::<u64>().to_string(),
                    b.driver.path.clone(),
                ]
            })
            .collect();
        out.push_str(&table(std::iter::once(&header).chain(rows.iter()), ""));
        for b in &svc.backends {
            if let Some(w) = &b.worker {
                let state = serde_json::to_value(w.state).ok().and_then(|v| v.as_str().map(str::to_owned));
                let mut line = format!(
                    "  worker of {}: {}, pid {}, {} restart(s), {} crash(es)",
                    b.name,
                    state.unwrap_or_default(),
                    w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".to_owned()),
                    w.restarts,
                    w.crashes
                );
                if let Some(c) = &w.last_crash {
                    line.push_str(&format!("; last: {} at {}", c.reason, crate::util::time::utc(c.at)));
                }
                out.push_str(&line);
                out.push('\n');
            }
        }
        let mut line = format!("  records: {}", svc.records);
        if let Some(r) = &svc.last_reconcile {
            line.push_str(&format!(
                "; last reconcile ({} ms): {} refreshed, {} completed, {} undone, {} missing, {} adopted, {} failed",
                r.duration_ms, r.refreshed, r.completed, r.undone, r.missing, r.adopted, r.failed
            ));
            if r.skipped_backends > 0 {
                line.push_str(&format!(", {} backend(s) not asked (down)", r.skipped_backends));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(f) = &st.fleet {
        out.push_str(&format!(
            "fleet {}: host {} {} ({}) since {}; last report {}; {} failed report(s); remote requests: {} served, {} refused busy, {} expired\n",
            f.fleet,
            f.host,
            f.state,
            f.server.as_deref().unwrap_or("no server yet"),
            crate::util::time::utc(f.since),
            f.last_report.map(crate::util::time::utc).unwrap_or_else(|| "never".to_owned()),
            f.failed_reports,
            f.requests,
            f.refused_busy,
            f.expired
        ));
        if let Some(w) = &f.warning {
            out.push_str(&format!("warning: {w}\n"));
        }
    }
    if let Some(w) = &st.trust.warning {
        out.push_str(&format!("warning: {w}\n"));
    }
    if let Some(g) = &st.trust.socket_group {
        out.push_str(&format!("socket readers: group {g} (status, get, list, stats)\n"));
    }
    let libs = &st.libraries;
    out.push_str(&format!(
        "libraries mapped: {} ({}), of which not in use (swapped out or refused) but still mapped: {} ({})\n",
        libs.mapped,
        human_size(libs.mapped_bytes),
        libs.retired,
        human_size(libs.retired_bytes),
    ));
    out
}

/// `ctl audit` for people: one line per entry.
pub fn format_audit(entries: &[crate::control::protocol::AuditEntry]) -> String {
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            let what = match &e.service {
                Some(s) => format!("{s} {}", e.op),
                None => e.op.clone(),
            };
            let args = e.args.as_ref().map(|a| a.to_string()).unwrap_or_default();
            let outcome = match &e.message {
                Some(m) => format!("{}: {m}", e.outcome),
                None => e.outcome.clone(),
            };
            let who = match (e.via.as_str(), &e.user, e.uid, e.pid) {
                ("fleet", Some(u), _, _) => format!("fleet {u}"),
                ("fleet", None, _, _) => "fleet (anonymous)".to_owned(),
                (_, _, Some(uid), Some(pid)) if pid > 0 => format!("uid {uid} pid {pid}"),
                (_, _, Some(uid), _) => format!("uid {uid}"),
                _ => "-".to_owned(),
            };
            [e.time.clone(), who, what, args, outcome]
        })
        .collect();
    let header = ["TIME", "PEER", "REQUEST", "ARGS", "OUTCOME"].map(String::from);
    table(std::iter::once(&header).chain(rows.iter()), "")
}

/// `ctl swap` for people.
pub fn format_swap(r: &SwapReport) -> String {
    format!(
        "{}: {} {} [{}] -> {} {} [{}], generation {}\n",
        r.backend, r.old.name, r.old.version, r.old.digest, r.new.name, r.new.version, r.new.digest, r.generation
    )
}

/// `ctl reload` for people.
pub fn format_reload(entries: &[ReloadEntry]) -> String {
    entries
        .iter()
        .map(|r| {
            let detail = r.error.as_ref().or(r.reason.as_ref()).map(|d| format!(": {d}")).unwrap_or_default();
            let outcome =
                serde_json::to_value(r.outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            format!(
                "{}/{}: {outcome}{detail}\n",
                r.service.as_deref().unwrap_or("-"),
                r.backend.as_deref().unwrap_or("-")
            )
        })
        .collect()
}
