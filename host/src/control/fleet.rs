//! The fleet from an operator's side: `ctl --host` (any `ctl` command to a remote host), `fleet status`
//! (the services table, as nova's service list) and `place` (filter and weigh the hosts, and with
//! `--create` claim by doing). The broker and its client are `plughost-fleet`'s.

use std::path::PathBuf;
use std::time::Duration;

use plughost_fleet::place::{Ask, Placement};
use plughost_fleet::subject::{self, Class};
use plughost_fleet::{Client, ClientError, HostEntry};

use crate::control::outcome::CtlError;
use crate::control::request::{Answer, Request};
use crate::util::fmt::{human_size, table_rows};

/// How to reach a fleet (flags shared by `ctl --host`, `fleet` and `place`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Connect {
    /// NATS server URL of the fleet (repeatable, or comma-separated) [default: $PLUGHOST_FLEET_URL]
    #[arg(long = "fleet-url", value_name = "URL", value_delimiter = ',')]
    pub fleet_urls: Vec<String>,
    /// The fleet's name
    #[arg(long, env = "PLUGHOST_FLEET_NAME", value_name = "NAME", default_value = "default")]
    pub fleet_name: String,
    /// Broker credentials file (user:password, an nkey seed or a .creds file)
    #[arg(long, env = "PLUGHOST_FLEET_CREDENTIALS", value_name = "FILE")]
    pub fleet_credentials: Option<PathBuf>,
    /// How long to wait for the broker, and for each answer
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub timeout: String,
}

impl Connect {
    fn timeout(&self) -> Result<Duration, CtlError> {
        crate::util::time::parse_duration(&self.timeout).map_err(|e| CtlError::Usage(format!("--timeout {e}")))
    }

    /// Connects to the broker.
    pub fn client(&self) -> Result<Client, CtlError> {
        let urls = if self.fleet_urls.is_empty() {
            std::env::var("PLUGHOST_FLEET_URL")
                .ok()
                .map(|v| v.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect())
                .unwrap_or_default()
        } else {
            self.fleet_urls.clone()
        };
        if urls.is_empty() {
            return Err(CtlError::Usage("no fleet: give --fleet-url URL (or set PLUGHOST_FLEET_URL)".to_owned()));
        }
        plughost_fleet::names::check("fleet name", &self.fleet_name).map_err(CtlError::Usage)?;
        let credentials = self
            .fleet_credentials
            .as_deref()
            .map(crate::config::read_credentials)
            .transpose()
            .map_err(|e| CtlError::Failed(e.to_string()))?;
        Client::connect(&urls, &self.fleet_name, credentials.as_ref(), self.timeout()?)
            .map_err(|e| CtlError::Failed(e.to_string()))
    }
}

/// A remote host, for `ctl --host`.
#[derive(Debug, Clone)]
pub struct Remote {
    /// How to reach the fleet.
    pub connect: Connect,
    /// The host.
    pub host: String,
}

/// The subject a request line goes to on `host`: its service, the backend it names and its class. A
/// line that does not parse goes to the host's own read subject (the host answers why it does not).
pub fn subject_for_line(fleet: &str, host: &str, line: &str) -> String {
    let kind = |name: &str| -> Result<crate::control::request::OpParser, crate::control::protocol::ApiError> {
        crate::services::kinds::kind(name).map(|k| k.parse).ok_or_else(|| {
            crate::control::protocol::ApiError::new(crate::control::protocol::ErrorKind::UnknownService, name)
        })
    };
    match crate::control::request::parse_request(line, &kind) {
        Ok(req) => {
            let backend = req.body.backend().ok().flatten();
            subject::rpc(fleet, host, req.body.service(), backend.as_deref(), Class::of(req.body.reads()))
        }
        Err(_) => subject::rpc(fleet, host, None, None, Class::Read),
    }
}

/// Sends one request line to `host` and reads its answer.
fn send(client: &Client, host: &str, req: &Request<'_>, timeout: Duration) -> Result<(String, Answer), CtlError> {
    let body = &req.body;
    let backend = body.backend().map_err(|e| CtlError::Usage(e.message))?;
    let subject = subject::rpc(client.fleet(), host, body.service(), backend.as_deref(), Class::of(body.reads()));
    let line = serde_json::to_string(req).map_err(|e| CtlError::Usage(format!("cannot encode the request: {e}")))?;
    let answer = client
        .request(host, &subject, line.as_bytes(), crate::control::protocol::PROTOCOL_VERSION, timeout)
        .map_err(|e| CtlError::Failed(e.to_string()))?;
    let text = String::from_utf8(answer).map_err(|_| CtlError::Failed(format!("host {host}: answer is not UTF-8")))?;
    let parsed: Answer =
        serde_json::from_str(&text).map_err(|e| CtlError::Failed(format!("host {host}: malformed answer: {e}")))?;
    Ok((text, parsed))
}

impl Remote {
    /// Sends a `ctl` request to the host: refused here, naming the host and its version, when the host
    /// reports a protocol version older than the operation needs.
    pub(crate) fn request(&self, req: &Request<'_>) -> Result<(String, Answer), CtlError> {
        plughost_fleet::names::check("--host", &self.host).map_err(CtlError::Usage)?;
        let client = self.connect.client()?;
        // As nova's can_send_version: the host's last report says which version it speaks (a host that
        // never reported, or a table the user may not read, leaves it to the host to answer).
        let need = crate::control::protocol::op_since(req.body.service(), req.body.op());
        if let Ok(Some(HostEntry { report: Ok(r), .. })) = client.host(&self.host) {
            if r.api < need {
                return Err(CtlError::Failed(format!(
                    "host {} speaks protocol version {} (plughost {}); {} needs version {need}: not sent",
                    self.host,
                    r.api,
                    r.version,
                    req.body.op()
                )));
            }
        }
        send(&client, &self.host, req, self.connect.timeout()?)
    }
}

/// A row's state as `fleet status` shows it: `down` past the host's `service_down_time`.
fn state_of(e: &HostEntry, default_down: Duration) -> String {
    match &e.report {
        Err(_) => "unreadable".to_owned(),
        Ok(r) if r.is_down(e.age, default_down) => "down".to_owned(),
        Ok(r) => r.state.as_str().to_owned(),
    }
}

/// `plughost fleet status`: every host of the services table.
pub fn status(connect: &Connect, json: bool) -> Result<String, CtlError> {
    let client = connect.client()?;
    let mut hosts = client.hosts().map_err(|e| CtlError::Failed(e.to_string()))?;
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    let default_down = Duration::from_secs(60);
    if json {
        let rows: Vec<serde_json::Value> = hosts
            .iter()
            .map(|e| {
                serde_json::json!({
                    "host": e.host,
                    "state": state_of(e, default_down),
                    "age_ms": e.age.as_millis() as u64,
                    "report": e.report.as_ref().ok(),
                    "error": e.report.as_ref().err(),
                })
            })
            .collect();
        return Ok(format!("{}\n", serde_json::Value::Array(rows)));
    }
    let mut rows = vec![["HOST", "STATE", "LAST REPORT", "API", "VERSION", "BACKENDS"].map(String::from).to_vec()];
    for e in &hosts {
        let (api, version, backends) = match &e.report {
            Ok(r) => (
                r.api.to_string(),
                r.version.clone(),
                r.services
                    .iter()
                    .flat_map(|s| {
                        s.backends.iter().map(move |b| {
                            let free = b.free_bytes.map(|f| format!(" {} free", human_size(f))).unwrap_or_default();
                            format!("{}/{} {}{free}", s.name, b.name, if b.up { "up" } else { "down" })
                        })
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            Err(err) => ("-".to_owned(), "-".to_owned(), err.clone()),
        };
        rows.push(vec![
            e.host.clone(),
            state_of(e, default_down),
            format!("{:.1}s ago", e.age.as_secs_f64()),
            api,
            version,
            backends,
        ]);
    }
    if hosts.is_empty() {
        return Ok(format!("no host has reported in fleet {} yet\n", connect.fleet_name));
    }
    Ok(table_rows(&rows, ""))
}

/// `plughost place`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct PlaceArgs {
    /// What to place
    #[arg(value_parser = ["volume", "compute"])]
    pub service: String,
    /// Size of the volume (10GiB)
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Backend on each host (default: the host's default backend for the service)
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,
    /// Only hosts labelled KEY=VALUE (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Only backends whose driver provides EXTENSION (repeatable)
    #[arg(long = "extension", value_name = "EXTENSION")]
    pub extensions: Vec<String>,
    /// A weigher's multiplier: free (default 1), records (0), failures (-1); negative turns it round
    #[arg(long = "weigher", value_name = "NAME=MULT", allow_hyphen_values = true)]
    pub weighers: Vec<String>,
    /// Pick at random among this many of the best hosts
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub host_subset_size: usize,
    /// Only hosts speaking at least this protocol version
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub min_api: u32,
    /// A host is down when its last report is older than this (hosts that report their own
    /// service_down_time use theirs)
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub service_down_time: String,
    /// Print every filter's verdict and every weight for every host
    #[arg(long)]
    pub explain: bool,
    /// Print the placement as JSON
    #[arg(long)]
    pub json: bool,
    /// Create it: send the create (or spawn) to the chosen host, then to up to 3 alternates when a host
    /// answers no_capacity, unavailable, busy or nobody answers; never retried after a timeout
    #[arg(long, value_name = "NAME")]
    pub create: Option<String>,
    /// For compute --create: the command to run (after --)
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// How to reach the fleet.
    #[command(flatten)]
    pub connect: Connect,
}

/// What `place` printed, and whether it succeeded.
#[derive(Debug)]
pub struct PlaceOutput {
    /// For stdout.
    pub stdout: String,
    /// For stderr (notes about alternates tried).
    pub notes: Vec<String>,
}

fn explain(p: &Placement) -> String {
    let mut out = String::new();
    for (i, v) in p.ranked.iter().enumerate() {
        let role = if i == 0 { "chosen" } else { "alternate" };
        out.push_str(&format!("{} {role} weight {:.3}\n", v.host, v.weight));
        for f in &v.filters {
            out.push_str(&format!("  {:<10} pass  {}\n", f.filter, crate::util::fmt::printable(&f.detail)));
        }
        for w in &v.weights {
            out.push_str(&format!(
                "  weigher {:<8} raw {} normalized {:.3} x {}\n",
                w.weigher, w.raw, w.normalized, w.multiplier
            ));
        }
    }
    for v in &p.dropped {
        out.push_str(&format!("{} dropped by {}\n", v.host, v.dropped_by.unwrap_or("?")));
        for f in &v.filters {
            let verdict = if f.passed { "pass" } else { "FAIL" };
            out.push_str(&format!("  {:<10} {verdict}  {}\n", f.filter, crate::util::fmt::printable(&f.detail)));
        }
    }
    out
}

/// The create request `--create` sends.
fn create_line(a: &PlaceArgs, name: &str, size: Option<u64>) -> Result<String, CtlError> {
    let mut args = serde_json::Map::new();
    args.insert("name".to_owned(), name.into());
    if let Some(b) = &a.backend {
        args.insert("backend".to_owned(), b.clone().into());
    }
    let op = match a.service.as_str() {
        "volume" => {
            let size = size.ok_or_else(|| CtlError::Usage("place volume --create needs --size".to_owned()))?;
            args.insert("size".to_owned(), size.into());
            "create"
        }
        _ => {
            let (cmd, rest) = a
                .command
                .split_first()
                .ok_or_else(|| CtlError::Usage("place compute --create NAME needs -- CMD [ARGS...]".to_owned()))?;
            args.insert("command".to_owned(), cmd.clone().into());
            if !rest.is_empty() {
                args.insert("args".to_owned(), rest.to_vec().into());
            }
            "spawn"
        }
    };
    Ok(serde_json::json!({"id": 1, "service": a.service, "op": op, "args": args}).to_string())
}

/// `plughost place`: the chosen host (and with `--create`, where it was created).
pub fn place(a: &PlaceArgs) -> Result<PlaceOutput, CtlError> {
    let usage = CtlError::Usage;
    let size = a
        .size
        .as_deref()
        .map(|s| plughost_api::parse_size(s).map_err(|e| usage(format!("--size {s:?}: {e}"))))
        .transpose()?;
    let pairs = |flag: &str, items: &[String]| -> Result<Vec<(String, String)>, CtlError> {
        items
            .iter()
            .map(|i| match i.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(usage(format!("{flag} {i:?}: expected KEY=VALUE"))),
            })
            .collect()
    };
    let weighers = pairs("--weigher", &a.weighers)?
        .into_iter()
        .map(|(k, v)| {
            v.parse::<f64>()
                .ok()
                .filter(|m| m.is_finite())
                .map(|m| (k.clone(), m))
                .ok_or_else(|| usage(format!("--weigher {k}={v}: the multiplier is not a number")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if a.create.is_none() && !a.command.is_empty() {
        return Err(usage("a command after -- is for --create NAME".to_owned()));
    }
    let ask = Ask {
        service: a.service.clone(),
        backend: a.backend.clone(),
        size,
        labels: pairs("--label", &a.labels)?,
        extensions: a.extensions.clone(),
        min_api: a.min_api,
        weighers,
        host_subset_size: a.host_subset_size,
        service_down_time: crate::util::time::parse_duration(&a.service_down_time)
            .map_err(|e| usage(format!("--service-down-time {e}")))?,
    };
    let client = a.connect.client()?;
    let hosts = client.hosts().map_err(|e| CtlError::Failed(e.to_string()))?;
    let placement = plughost_fleet::place::place(&hosts, &ask).map_err(usage)?;
    let mut out = String::new();
    if a.json {
        out = format!("{}\n", serde_json::to_string(&placement).map_err(|e| CtlError::Failed(e.to_string()))?);
    } else if a.explain {
        out = explain(&placement);
    }
    if placement.ranked.is_empty() {
        let why: Vec<String> =
            placement.dropped.iter().map(|v| format!("{} ({})", v.host, v.dropped_by.unwrap_or("?"))).collect();
        let why = if why.is_empty() { "no host has reported".to_owned() } else { why.join(", ") };
        if a.json || a.explain {
            print!("{out}");
        }
        return Err(CtlError::Failed(format!("no host passes the filters: {why}")));
    }
    let Some(name) = &a.create else {
        if !a.json && !a.explain {
            out = format!("{}\n", placement.ranked[0].host);
        }
        return Ok(PlaceOutput { stdout: out, notes: Vec::new() });
    };
    let line = create_line(a, name, size)?;
    let timeout = a.connect.timeout()?;
    let mut notes = Vec::new();
    for v in placement.ranked.iter().take(4) {
        let host = &v.host;
        let subject = subject::rpc(client.fleet(), host, Some(&a.service), a.backend.as_deref(), Class::Admin);
        match client.request(host, &subject, line.as_bytes(), crate::control::protocol::PROTOCOL_VERSION, timeout) {
            Ok(answer) => {
                let text = String::from_utf8_lossy(&answer).into_owned();
                let parsed: Answer = serde_json::from_str(&text)
                    .map_err(|e| CtlError::Failed(format!("host {host}: malformed answer: {e}")))?;
                if parsed.ok {
                    if a.json {
                        out.push_str(&format!(
                            "{{\"created_on\":{},\"answer\":{text}}}\n",
                            serde_json::Value::from(host.as_str())
                        ));
                    } else {
                        out.push_str(&format!("created {} {name:?} on {host}\n", a.service));
                    }
                    return Ok(PlaceOutput { stdout: out, notes });
                }
                let e = parsed.error.unwrap_or_else(|| crate::control::protocol::ApiError::internal("no details"));
                let kind = e.kind.as_str();
                if kind == "timeout" {
                    return Err(CtlError::Failed(format!(
                        "host {host}: timeout: {}; whether {name:?} was created there is unknown (not retried elsewhere)",
                        e.message
                    )));
                }
                if !matches!(kind, "no_capacity" | "unavailable" | "busy") {
                    return Err(CtlError::Failed(format!("host {host}: {kind}: {}", e.message)));
                }
                notes.push(format!("host {host}: {kind}: {}; trying the next host", e.message));
            }
            Err(ClientError::NoResponders { .. }) => {
                notes.push(format!("host {host}: no responders (down); trying the next host"));
            }
            Err(e @ ClientError::Timeout { .. }) => {
                return Err(CtlError::Failed(format!("{e} ({name:?} was not retried elsewhere)")));
            }
            Err(e) => return Err(CtlError::Failed(e.to_string())),
        }
    }
    Err(CtlError::Failed(format!("{name:?} was not created: every host tried refused it ({})", notes.join("; "))))
}
