//! The compute service (nova's compute manager): each instance has a record (its id, spec, status and
//! what its driver last reported), conflicting operations on one instance run one after the other, and
//! the backend's driver runs the instances.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use plughost_api::{ComputeDriver, Instance, InstanceSpec, InstanceState};
use plughost_api::{ComputeInterface, ComputeMethod};
use serde::{Deserialize, Serialize};

use super::meta::{columns, record};
use super::network::NetworkService;
use super::records::{
    creation_undone, finish_removal, outcome_unknown, removal_done, Counter, Lookup, Meta, ReconcileCounts, Verdict,
    MISSING,
};
use super::{check_name, Core, Links, Listed, Named, OnBackend, Reply, Service, ServiceKind};
use crate::backend::{Backend, BackendControl};
use crate::control::protocol::{ApiError, ErrorKind, Removed};
use crate::state::{value, Column, RowReader};
use crate::util::netns;
use rusqlite::types::Value;

/// The compute service in the table.
pub(crate) static KIND: ServiceKind = ServiceKind::of::<ComputeService>(
    "compute",
    "Compute operations",
    "process-compute",
    true,
    &["stop_instances_on_exit"],
);

// ---------------------------------------------------------------------------------------------------
// Protocol

/// A compute operation and its arguments: what the socket carries and what `plughost ctl compute`
/// takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[strum(serialize_all = "snake_case")]
pub enum ComputeOp {
    /// Start a new instance running CMD ARGS... (after --)
    Spawn {
        /// Instance name
        name: String,
        /// The program to run
        #[arg(value_name = "CMD")]
        command: String,
        /// Its arguments
        #[arg(value_name = "ARGS", trailing_var_arg = true, allow_hyphen_values = true)]
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        args: Vec<String>,
        /// Environment variable K=V (repeatable)
        #[arg(long = "env", value_name = "K=V")]
        #[serde(default, skip_serializing_if = "Vec::is_empty", with = "env_object")]
        env: Vec<EnvVar>,
        /// Working directory
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workdir: Option<String>,
        /// Backend (default: the service's default backend)
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
        /// Run it in a network namespace of its own with a port on this network (repeatable: eth0,
        /// eth1, ... in order; needs the network service)
        #[arg(long = "network", value_name = "NETWORK")]
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        networks: Vec<String>,
    },
    /// Show one instance, refreshed from its driver
    Get(Named),
    /// List instances, refreshed from the drivers
    List(OnBackend),
    /// Start a stopped instance
    Start(Named),
    /// Stop an instance
    Stop(Named),
    /// Stop and start an instance
    Reboot(Named),
    /// Stop and remove an instance, with everything it started
    Destroy(Named),
}

impl super::Operation for ComputeOp {
    fn reads(&self) -> bool {
        matches!(self, ComputeOp::Get(_) | ComputeOp::List(_))
    }
    fn name(&self) -> &'static str {
        self.into()
    }
}

/// One extra environment variable: `K=V` on the command line; the list is an object on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar(pub String, pub String);

impl std::str::FromStr for EnvVar {
    type Err = String;
    fn from_str(kv: &str) -> Result<EnvVar, String> {
        match kv.split_once('=') {
            Some((k, v)) => {
                let var = EnvVar(k.to_owned(), v.to_owned());
                var.check()?;
                Ok(var)
            }
            _ => Err(format!("{kv:?}: expected K=V")),
        }
    }
}

impl EnvVar {
    /// A name a process environment can carry (not empty, no `=`, no NUL) and a value without NUL;
    /// neither with control characters, which would end up in logs and `ps` output.
    fn check(&self) -> Result<(), String> {
        let EnvVar(k, v) = self;
        if k.is_empty() || k.contains('=') || k.chars().any(char::is_control) {
            return Err(format!(
                "environment variable {k:?}: a name is not empty and has no '=' or control characters"
            ));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k:?}: its value has a NUL byte"));
        }
        Ok(())
    }
}

/// `Vec<EnvVar>` as a JSON object.
mod env_object {
    use super::EnvVar;
    use std::collections::BTreeMap;

    pub(super) fn serialize<S: serde::Serializer>(vars: &[EnvVar], s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(vars.iter().map(|v| (&v.0, &v.1)))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<EnvVar>, D::Error> {
        let map: BTreeMap<String, String> = serde::Deserialize::deserialize(d)?;
        Ok(map.into_iter().map(|(k, v)| EnvVar(k, v)).collect())
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::EnumString)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub(crate) enum InstanceStatus {
    /// Being created.
    Spawning,
    /// Running.
    Running,
    /// Not running: stopped, or exited (see `exit_code`, `exit_signal`, `exit_unknown`).
    Stopped,
    /// Suspended.
    Paused,
    /// The driver cannot tell.
    Unknown,
    /// Being started.
    Starting,
    /// Being stopped.
    Stopping,
    /// Being rebooted.
    Rebooting,
    /// Being destroyed.
    Deleting,
    /// Something is wrong; `reason` says what.
    Error,
}

impl From<InstanceState> for InstanceStatus {
    fn from(s: InstanceState) -> InstanceStatus {
        match s {
            InstanceState::Running => InstanceStatus::Running,
            InstanceState::Stopped => InstanceStatus::Stopped,
            InstanceState::Paused => InstanceStatus::Paused,
            InstanceState::Unknown => InstanceStatus::Unknown,
        }
    }
}

/// What the service knows about one instance: the shared `Meta` and its own fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InstanceRecord {
    /// Id, name, backend, status, times, reason, adoption, driver digest.
    #[serde(flatten)]
    pub meta: Meta<InstanceStatus>,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Exit code of the last run.
    pub exit_code: Option<i32>,
    /// Signal that ended the last run.
    pub exit_signal: Option<i32>,
    /// The last run ended in a way that cannot be known (for instance, it was adopted after a restart).
    #[serde(default)]
    pub exit_unknown: bool,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
    /// CPU time in milliseconds.
    pub cpu_time_ms: u64,
    /// Uptime in milliseconds.
    pub uptime_ms: u64,
    /// Command line.
    pub command: String,
    /// When the current (or last) run started, milliseconds since the epoch.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// Driver-specific facts (`pgid`, `cgroup`, ...).
    #[serde(default)]
    pub details: BTreeMap<String, String>,
    /// What was asked for.
    #[serde(default)]
    pub spec: Option<SpecRecord>,
    /// Its ports, one per network it was spawned on (none without networks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<InstancePort>,
    /// Its network namespace (a bound file under the runtime dir), when it has networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// That namespace's inode, as made: what re-adoption checks the namespace and the process against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u64>,
}

/// One of an instance's ports (its record is the network service's, by `id`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InstancePort {
    /// The network.
    pub network: String,
    /// The port's id in the network service.
    pub id: String,
    /// Its address with the prefix length (empty until attached).
    pub address: String,
    /// Its MAC address (empty until attached).
    pub mac: String,
    /// Its interface in the instance's namespace.
    pub ifname: String,
}

/// The `instances` table: one column per field.
const COLUMNS: &[Column] = columns![
    "pid": Int,
    "exit_code": Int,
    "exit_signal": Int,
    "exit_unknown": Bool,
    "rss_bytes": Int,
    "cpu_time_ms": Int,
    "uptime_ms": Int,
    "command": Text,
    "started_at_ms": Int,
    "details": Json,
    "spec": Json,
    "ports": Json,
    "netns": Text,
    "netns_inode": Int,
];

/// An instance's spec as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SpecRecord {
    /// The program.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: Option<String>,
}

impl InstanceRecord {
    fn new(spec: &InstanceSpec, backend: &str, status: InstanceStatus) -> InstanceRecord {
        InstanceRecord {
            meta: Meta::new(&spec.name, backend, status),
            pid: None,
            exit_code: None,
            exit_signal: None,
            exit_unknown: false,
            rss_bytes: 0,
            cpu_time_ms: 0,
            uptime_ms: 0,
            command: std::iter::once(spec.command.as_str())
                .chain(spec.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            started_at_ms: None,
            details: BTreeMap::new(),
            ports: Vec::new(),
            netns: None,
            netns_inode: None,
            spec: Some(SpecRecord {
                command: spec.command.clone(),
                args: spec.args.clone(),
                env: spec.env.iter().cloned().collect(),
                workdir: spec.workdir.clone(),
            }),
        }
    }

    /// Takes what the driver reports; whether the status or identity of the run changed (what is worth
    /// writing down; usage counters change all the time and are refreshed in memory).
    ///
    /// An instance with a network namespace is checked against it: the bound namespace must be the
    /// one made for it (its inode), and a running process must be in it; otherwise it is `error`.
    fn apply(&mut self, i: &Instance) -> bool {
        let before = (self.meta.status, self.meta.reason.clone());
        let changed = self.pid != i.pid
            || self.exit_code != i.exit_code
            || self.exit_signal != i.exit_signal
            || self.exit_unknown != i.exit_unknown
            || self.started_at_ms != i.started_at_ms;
        self.meta.status = InstanceStatus::from(i.state);
        self.meta.reason = None;
        self.pid = i.pid;
        self.exit_code = i.exit_code;
        self.exit_signal = i.exit_signal;
        self.exit_unknown = i.exit_unknown;
        self.rss_bytes = i.rss_bytes;
        self.cpu_time_ms = i.cpu_time_ms;
        self.uptime_ms = i.uptime_ms;
        self.command.clone_from(&i.command);
        self.started_at_ms = i.started_at_ms;
        self.details = i.details.iter().cloned().collect();
        if let Some(why) = self.namespace_mismatch() {
            self.meta.status = InstanceStatus::Error;
            self.meta.reason = Some(why);
        }
        let changed = changed || before != (self.meta.status, self.meta.reason.clone());
        self.meta.touch(changed)
    }

    /// Why the instance is not in the network namespace made for it, if it is not.
    fn namespace_mismatch(&self) -> Option<String> {
        let (path, want) = (self.netns.as_deref()?, self.netns_inode?);
        match netns::inode(Path::new(path)) {
            Some(found) if found == want => {}
            Some(found) => {
                return Some(format!("network namespace {path} was replaced (inode {found}, made as {want})"));
            }
            None => return Some(format!("network namespace {path} is gone (made as inode {want})")),
        }
        let pid = self.pid?;
        match netns::of_pid(pid) {
            Some(found) if found != want => Some(format!(
                "process {pid} is not in network namespace {path} (its namespace is inode {found}, not {want})"
            )),
            _ => None,
        }
    }
}

/// The instances table, version by version (append; never change one that shipped).
const MIGRATIONS: &[&str] = &[
    // 1 (made by the host's first migration in databases from before kinds had their own).
    "CREATE TABLE instances (
        name TEXT PRIMARY KEY NOT NULL,
        id TEXT NOT NULL UNIQUE,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        pid INTEGER,
        exit_code INTEGER,
        exit_signal INTEGER,
        exit_unknown INTEGER NOT NULL DEFAULT 0,
        rss_bytes INTEGER NOT NULL DEFAULT 0,
        cpu_time_ms INTEGER NOT NULL DEFAULT 0,
        uptime_ms INTEGER NOT NULL DEFAULT 0,
        command TEXT NOT NULL,
        started_at_ms INTEGER,
        details TEXT NOT NULL DEFAULT '{}',
        spec TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        reason TEXT,
        adopted INTEGER NOT NULL DEFAULT 0,
        driver_digest TEXT
    ) WITHOUT ROWID;
    CREATE INDEX instances_backend ON instances (backend);",
    // 2: instances with networks (plughost 1.2).
    "ALTER TABLE instances ADD COLUMN ports TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE instances ADD COLUMN netns TEXT;
    ALTER TABLE instances ADD COLUMN netns_inode INTEGER;",
];

record!(InstanceRecord, InstanceStatus, error: InstanceStatus::Error, "instance", "instances", COLUMNS, MIGRATIONS, {
    fn column(&self, name: &str) -> Result<Value, String> {
        match name {
            "pid" => value::opt_int(self.pid),
            "exit_code" => value::opt_int(self.exit_code),
            "exit_signal" => value::opt_int(self.exit_signal),
            "exit_unknown" => Ok(value::boolean(self.exit_unknown)),
            "rss_bytes" => value::int(self.rss_bytes),
            "cpu_time_ms" => value::int(self.cpu_time_ms),
            "uptime_ms" => value::int(self.uptime_ms),
            "command" => Ok(value::text(&self.command)),
            "started_at_ms" => value::opt_int(self.started_at_ms),
            "details" => value::json(&self.details),
            "spec" => value::json(&self.spec),
            "ports" => value::json(&self.ports),
            "netns" => Ok(value::opt_text(self.netns.as_deref())),
            "netns_inode" => value::opt_int(self.netns_inode),
            other => Err(format!("no field {other:?} in an instance record")),
        }
    }
    fn from_row(meta: Meta<InstanceStatus>, row: &mut RowReader) -> Result<InstanceRecord, String> {
        Ok(InstanceRecord {
            meta,
            pid: row.opt_int("pid")?,
            exit_code: row.opt_int("exit_code")?,
            exit_signal: row.opt_int("exit_signal")?,
            exit_unknown: row.boolean("exit_unknown")?,
            rss_bytes: row.int("rss_bytes")?,
            cpu_time_ms: row.int("cpu_time_ms")?,
            uptime_ms: row.int("uptime_ms")?,
            command: row.text("command")?,
            started_at_ms: row.opt_int("started_at_ms")?,
            details: row.json("details")?,
            spec: row.json("spec")?,
            ports: row.json("ports")?,
            netns: row.opt_text("netns")?,
            netns_inode: row.opt_int("netns_inode")?,
        })
    }
});

impl Listed for InstanceRecord {
    const HEADINGS: &'static [&'static str] = &["PID", "RSS", "CPU", "ADDRESSES", "COMMAND"];
    fn cells(&self) -> Vec<String> {
        let pid = self.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".to_owned());
        // One address per port, in the order of its interfaces (eth0 first), without the prefix length.
        let addresses: Vec<&str> = self
            .ports
            .iter()
            .filter(|p| !p.address.is_empty())
            .map(|p| p.address.split_once('/').map_or(p.address.as_str(), |(a, _)| a))
            .collect();
        let addresses = if addresses.is_empty() { "-".to_owned() } else { addresses.join(",") };
        vec![
            pid,
            crate::util::fmt::human_size(self.rss_bytes),
            format!("{}ms", self.cpu_time_ms),
            addresses,
            self.command.clone(),
        ]
    }
}

/// What compute operations answer.
pub(crate) type ComputeReply = Reply<InstanceRecord>;

// ---------------------------------------------------------------------------------------------------
// The service

/// The compute service.
pub(crate) struct ComputeService {
    core: Core<ComputeInterface, InstanceRecord>,
    /// The network service, when the host runs one (set by `link`).
    network: OnceLock<Arc<dyn super::DynService>>,
    /// Where instances' network namespaces are bound: `<runtime dir>/netns` (set by `link`).
    netns_dir: OnceLock<PathBuf>,
}

/// What plumbing an instance's spawn made: its ports as attached, its namespace's inode.
type Plumbed = Option<(Vec<InstancePort>, u64)>;

impl ComputeService {
    /// The network service, if the host runs one.
    fn network(&self) -> Option<&NetworkService> {
        self.network.get().and_then(|s| s.as_any().downcast_ref::<NetworkService>())
    }

    /// The network service, or why an instance cannot have networks here.
    fn network_for(&self, instance: &str) -> Result<&NetworkService, ApiError> {
        self.network().ok_or_else(|| {
            ApiError::new(
                ErrorKind::UnknownService,
                format!(
                    "instance {instance:?}: networks need the network service, which is not enabled (name a network driver: --network-driver bridge-network)"
                ),
            )
        })
    }

    /// The directory of instances' namespaces, made private (0700) if missing.
    fn netns_dir(&self) -> Result<&Path, ApiError> {
        let dir = self.netns_dir.get().ok_or_else(|| ApiError::internal("the compute service was not linked"))?;
        if !dir.is_dir() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .or_else(|e| if dir.is_dir() { Ok(()) } else { Err(e) })
                .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        Ok(dir)
    }

    /// Runs an instance's spawn: without networks, the driver's `spawn`; with them, a namespace of its
    /// own, a port per network in it, then the driver's `spawn_in`. A failure undoes the plumbing; a
    /// failure whose outcome is unknown (the worker died) leaves it, with the intent, for reconcile
    /// and the sweep.
    fn spawn_call(
        &self,
        b: &Backend<ComputeInterface>,
        spec: &InstanceSpec,
        plan: &InstanceRecord,
    ) -> Result<(Instance, Plumbed), ApiError> {
        let Some(path) = plan.netns.as_deref() else {
            return b.call(ComputeMethod::spawn, |d| d.spawn(spec)).map(|i| (i, None));
        };
        let net = self.network_for(&spec.name)?;
        self.netns_dir()?;
        let inode =
            netns::create(Path::new(path)).map_err(|e| ApiError::internal(format!("instance {:?}: {e}", spec.name)))?;
        let mut ports = Vec::new();
        let done = (|| {
            for p in &plan.ports {
                let made = net.attach_port(&p.network, &p.id, path, &p.ifname)?;
                ports.push(InstancePort { address: made.address, mac: made.mac, ..p.clone() });
            }
            b.call(ComputeMethod::spawn_in, |d| d.spawn_in(spec, path))
        })();
        match done {
            Ok(i) => Ok((i, Some((ports, inode)))),
            Err(e) if outcome_unknown(&e) => Err(e),
            Err(e) => {
                if let Err(u) = self.unplumb(plan) {
                    log::warn!("{} (left to the sweep)", u.message);
                }
                Err(e)
            }
        }
    }

    /// Detaches an instance's ports (releasing their addresses) and removes its namespace. A port that
    /// cannot be detached now is logged and left to the sweep; the namespace's removal is the answer.
    fn unplumb(&self, r: &InstanceRecord) -> Result<(), ApiError> {
        if let Some(net) = self.network() {
            for p in &r.ports {
                if let Err(e) = net.detach_port(&p.id) {
                    log::warn!("instance {:?}: port {:?} stays attached for now: {}", r.meta.name, p.id, e.message);
                }
            }
        } else if !r.ports.is_empty() {
            log::warn!("instance {:?}: its ports stay recorded: the network service is not enabled", r.meta.name);
        }
        match &r.netns {
            Some(path) => netns::remove(Path::new(path))
                .map_err(|e| ApiError::internal(format!("instance {:?}: {e}", r.meta.name))),
            None => Ok(()),
        }
    }

    /// At start: binds again each instance's namespace whose file no longer is it. A host in a mount
    /// namespace of its own (systemd's `ProtectSystem`, `PrivateTmp`) loses its bind mounts when it
    /// stops, but not the namespaces: an instance's running process is still in its own, and the old
    /// mount namespace, where every instance's is bound, lives on in every running instance
    /// (`/proc/PID/root`). A namespace found there with the recorded inode is bound again; one found
    /// nowhere is gone (the record then says so). Whether anything was bound again.
    fn rebind_namespaces(&self) -> bool {
        let records = self.core.records.list(None);
        let live: Vec<u32> = records.iter().filter(|r| r.netns.is_some()).filter_map(|r| r.pid).collect();
        let mut rebound = false;
        for r in &records {
            let (Some(path), Some(want)) = (r.netns.as_deref(), r.netns_inode) else { continue };
            let path = Path::new(path);
            if netns::inode(path) == Some(want) {
                continue;
            }
            let own = r.pid.map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")));
            let through = live.iter().map(|pid| {
                let mut p = PathBuf::from(format!("/proc/{pid}/root"));
                p.push(path.strip_prefix("/").unwrap_or(path));
                p
            });
            let Some(source) = own.into_iter().chain(through).find(|s| netns::inode(s) == Some(want)) else {
                // Without a process, `restore_plumbing` makes it again; with one, the record says so.
                log::info!("instance {:?}: network namespace {} (inode {want}) is gone", r.meta.name, path.display());
                continue;
            };
            match netns::bind(&source, path) {
                Ok(_) => {
                    log::info!(
                        "instance {:?}: network namespace {} bound again from {}",
                        r.meta.name,
                        path.display(),
                        source.display()
                    );
                    rebound = true;
                }
                Err(e) => log::warn!("instance {:?}: {e}", r.meta.name),
            }
        }
        rebound
    }

    /// At start, after [`rebind_namespaces`](Self::rebind_namespaces): makes again the plumbing a
    /// reboot took (or a host in a mount namespace of its own, stopped with no instance running) from
    /// the instances' records, so that they start as before. An instance with no process whose
    /// namespace is gone gets a new one at the same path (its record's inode cleared first, then set: a
    /// crash between them leaves a namespace the next start takes as the instance's); then each of its
    /// ports the network service has lost (`error`, missing from backend) is attached again in it with
    /// its address and MAC. A namespace replaced by something else, or an instance whose process runs
    /// elsewhere, is left as it is: its record says so. Whether anything was made again.
    fn restore_plumbing(&self) -> bool {
        let Some(net) = self.network() else { return false };
        let mut restored = false;
        for r in self.core.records.list(None) {
            let Some(path) = r.netns.clone() else { continue };
            if matches!(r.meta.status, InstanceStatus::Spawning | InstanceStatus::Deleting)
                || r.meta.reason.as_deref() == Some(MISSING)
            {
                continue;
            }
            let name = r.meta.name.clone();
            let _held = self.core.records.hold(&name);
            let found = netns::inode(Path::new(&path));
            let inode = match (found, r.netns_inode) {
                (Some(found), Some(want)) if found == want => want,
                (Some(_), Some(_)) => continue,           // replaced: the record says so
                (Some(found), None) => found,             // made by a restore a crash interrupted
                (None, _) if r.pid.is_some() => continue, // its process is elsewhere: the record says so
                (None, _) => match self.new_namespace(&name, &path) {
                    Ok(inode) => {
                        log::warn!("instance {name:?}: network namespace {path} was gone; made again (inode {inode})");
                        restored = true;
                        inode
                    }
                    Err(e) => {
                        log::warn!("instance {name:?}: cannot make its network namespace again: {}", e.message);
                        continue;
                    }
                },
            };
            if r.netns_inode != Some(inode) {
                let _ = self.core.records.update(&name, |r| {
                    r.netns_inode = Some(inode);
                    true
                });
            }
            for p in &r.ports {
                match net.reattach_port(&p.id) {
                    Ok(Some(made)) => {
                        log::warn!(
                            "instance {name:?}: port {:?} was missing; attached again ({} on network {:?})",
                            p.id,
                            made.address,
                            p.network
                        );
                        restored = true;
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!("instance {name:?}: port {:?} cannot be attached again: {}", p.id, e.message),
                }
            }
        }
        restored
    }

    /// A new network namespace at `path` for instance `name`, replacing what is there (the empty file
    /// a bind mount left): the record's inode is cleared before it is made.
    fn new_namespace(&self, name: &str, path: &str) -> Result<u64, ApiError> {
        self.netns_dir()?;
        self.core.records.update(name, |r| {
            r.netns_inode = None;
            true
        })?;
        let path = Path::new(path);
        netns::remove(path)
            .and_then(|()| netns::create(path))
            .map_err(|e| ApiError::internal(format!("instance {name:?}: {e}")))
    }

    /// Brings instances' plumbing in line with their records: a port of the network service bound in
    /// our namespace dir that no instance claims is detached, a namespace no instance claims is
    /// removed (an interrupted spawn or destroy left them), and an instance whose spawn was completed
    /// by reconcile gets its ports' addresses and its namespace's inode. Lists ports and files before
    /// records: a spawn records its intent before it makes either, so nothing in progress is taken.
    fn sweep(&self) {
        let Some(dir) = self.netns_dir.get() else { return };
        let net = self.network();
        if net.is_none() && !dir.exists() {
            return; // no instance has had a network here
        }
        let ports: Vec<_> = net
            .map(NetworkService::all_ports)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| Path::new(&p.netns).parent() == Some(dir.as_path()))
            .collect();
        let files: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        let records = self.core.records.list(None);
        let claimed_ports: BTreeSet<&str> =
            records.iter().flat_map(|r| r.ports.iter().map(|p| p.id.as_str())).collect();
        let claimed_ns: BTreeSet<&str> = records.iter().filter_map(|r| r.netns.as_deref()).collect();
        if let Some(net) = net {
            for p in ports.iter().filter(|p| !claimed_ports.contains(p.meta.name.as_str())) {
                log::info!("port {:?} (network {:?}) belongs to no instance; detaching it", p.meta.name, p.network);
                if let Err(e) = net.detach_port(&p.meta.name) {
                    log::warn!("port {:?}: cannot detach it: {}", p.meta.name, e.message);
                }
            }
        }
        for f in files.iter().filter(|f| !f.to_str().is_some_and(|f| claimed_ns.contains(f))) {
            log::info!("network namespace {} belongs to no instance; removing it", f.display());
            if let Err(e) = netns::remove(f) {
                log::warn!("{e}");
            }
        }
        let Some(net) = net else { return };
        for r in records.iter().filter(|r| r.meta.status != InstanceStatus::Spawning) {
            let unfilled =
                r.ports.iter().any(|p| p.address.is_empty()) || (r.netns.is_some() && r.netns_inode.is_none());
            if !unfilled {
                continue;
            }
            let Some(_held) = self.core.records.try_hold(&r.meta.name) else { continue };
            let _ = self.core.records.update(&r.meta.name, |r| {
                let before = (r.ports.clone(), r.netns_inode);
                for p in &mut r.ports {
                    if let Some(made) = net.port(&p.id) {
                        p.address = made.address;
                        p.mac = made.mac;
                    }
                }
                if r.netns_inode.is_none() {
                    r.netns_inode = r.netns.as_deref().and_then(|p| netns::inode(Path::new(p)));
                }
                before != (r.ports.clone(), r.netns_inode)
            });
        }
    }

    /// Brings the records of one backend in line with what its driver reports. At start (and when a
    /// backend that was down is up again) this finishes or undoes operations a crash interrupted;
    /// periodically (and before `list`) it refreshes what drivers report, skipping instances an
    /// operation is working on. An instance the driver no longer has becomes `error` ("missing from
    /// backend"); one it has without a record is adopted.
    fn reconcile(&self, b: &Backend<ComputeInterface>, concurrent: bool) -> ReconcileCounts {
        use InstanceStatus as S;
        self.core.reconcile(
            b,
            concurrent,
            // Instances are listed whole: a host runs thousands at most.
            |_, _| Err(ApiError::new(crate::control::protocol::ErrorKind::Unsupported, "instances are listed whole")),
            || b.call(ComputeMethod::list, |d| d.list()),
            Lookup {
                name_of: |i: &Instance| &i.name,
                recheck: &|name| b.call(ComputeMethod::get, |d| d.get(name)).ok(),
                check: |_| Ok(()),
            },
            |i| {
                let spec = InstanceSpec { name: i.name.clone(), command: i.command.clone(), ..InstanceSpec::default() };
                let mut r = InstanceRecord::new(&spec, &b.name, S::Unknown);
                r.spec = None;
                r.apply(i);
                r
            },
            |mut r, found| match (r.meta.status, found) {
                (S::Spawning, None) => creation_undone(&r, "spawn"),
                (S::Deleting, None) => removal_done(&r, "destroy"),
                (S::Deleting, Some(_)) => {
                    let name = r.meta.name.clone();
                    finish_removal(r, "destroy", || b.call(ComputeMethod::destroy, |d| d.destroy(&name)))
                }
                (S::Stopping, Some(i)) => match b.call(ComputeMethod::stop, |d| d.stop(&r.meta.name)) {
                    Ok(i) => {
                        log::info!("instance {:?}: interrupted stop finished", r.meta.name);
                        r.apply(&i);
                        Verdict::Put(r, Counter::Completed)
                    }
                    Err(e) => {
                        log::warn!("instance {:?}: cannot finish an interrupted stop: {e}", r.meta.name);
                        r.apply(i);
                        Verdict::Put(r, Counter::Failed)
                    }
                },
                (S::Spawning | S::Starting | S::Rebooting, Some(i)) => {
                    log::info!(
                        "instance {:?}: interrupted {} completed on the backend; {}",
                        r.meta.name,
                        r.meta.status,
                        i.state
                    );
                    r.apply(i);
                    Verdict::Put(r, Counter::Completed)
                }
                (_, Some(i)) => match r.apply(i) {
                    true => Verdict::Put(r, Counter::Refreshed),
                    false => Verdict::Refresh(r),
                },
                (_, None) => Verdict::Missing,
            },
        )
    }

    /// Reconciles every backend (one that is up again after being down, or all of them) and keeps the
    /// counts for `status`.
    fn reconcile_all(&self, only: Option<&str>) {
        self.core.reconcile_all(only, |b| self.reconcile(b, only.is_some()));
    }

    /// Refreshes records from the drivers (periodic work, and before `list`).
    fn sync(&self, only: Option<&str>) {
        for b in self.core.backends.iter().filter(|b| only.is_none_or(|o| o == b.name)) {
            self.reconcile(b, true);
        }
    }

    fn spawn(
        &self,
        spec: InstanceSpec,
        backend: Option<&str>,
        networks: &[String],
    ) -> Result<InstanceRecord, ApiError> {
        check_name("instance", &spec.name)?;
        for (i, n) in networks.iter().enumerate() {
            check_name("network", n)?;
            if networks[..i].contains(n) {
                return Err(ApiError::invalid(format!("instance {:?}: network {n:?} named twice", spec.name)));
            }
        }
        if !networks.is_empty() {
            let net = self.network_for(&spec.name)?;
            for n in networks {
                net.usable(n)?;
            }
        }
        if spec.command.is_empty() {
            return Err(ApiError::invalid(format!("instance {:?}: empty command", spec.name)));
        }
        for (k, v) in &spec.env {
            EnvVar(k.clone(), v.clone())
                .check()
                .map_err(|e| ApiError::invalid(format!("instance {:?}: {e}", spec.name)))?;
        }
        let b = self.core.backends.pick(backend)?;
        let _held = self.core.records.hold(&spec.name);
        self.settle_interrupted(&spec.name)?;
        let mut record = InstanceRecord::new(&spec, &b.name, InstanceStatus::Spawning);
        record.meta.driver_digest = Some(b.digest());
        if !networks.is_empty() {
            record.netns = Some(self.netns_dir()?.join(&record.meta.id).display().to_string());
            record.ports = networks
                .iter()
                .enumerate()
                .map(|(i, n)| InstancePort {
                    network: n.clone(),
                    id: super::network::new_port_id(),
                    address: String::new(),
                    mac: String::new(),
                    ifname: format!("eth{i}"),
                })
                .collect();
        }
        let plan = record.clone();
        self.core.records.create(
            record,
            || self.spawn_call(b, &spec, &plan),
            |r, (i, plumbed)| {
                if let Some((ports, inode)) = plumbed {
                    r.ports = ports;
                    r.netns_inode = Some(inode);
                }
                r.apply(&i);
            },
        )
    }

    fn transition(
        &self,
        name: &str,
        backend: Option<&str>,
        during: InstanceStatus,
        method: ComputeMethod,
        f: impl FnOnce(&dyn ComputeDriver) -> Result<Instance, plughost_api::DriverError>,
    ) -> Result<InstanceRecord, ApiError> {
        let _held = self.core.records.hold(name);
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        self.core.records.transition(
            r,
            during,
            || b.call(method, f),
            |r, i| {
                r.apply(&i);
            },
        )
    }

    fn destroy(&self, name: &str, backend: Option<&str>) -> Result<Removed, ApiError> {
        let _held = self.core.records.hold(name);
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        let plumbing = r.clone();
        self.core.records.removal(r, InstanceStatus::Deleting, || {
            match b.call(ComputeMethod::destroy, |d| d.destroy(name)) {
                Err(e) if e.kind != ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            self.unplumb(&plumbing)
        })?;
        Ok(Removed { name: name.to_owned(), deleted: None, destroyed: Some(true) })
    }

    /// Refreshes one instance from its driver; unlike the transitions, it changes no status by itself.
    /// A driver error is the answer; a driver that no longer has the instance turns the record to
    /// `error`.
    /// An instance left `spawning` by a spawn whose worker died is settled when its name is asked for
    /// again (`Records::settle`), as volumes are.
    fn settle_interrupted(&self, name: &str) -> Result<(), ApiError> {
        self.core.records.settle(
            name,
            InstanceStatus::Spawning,
            |r| {
                let b = self.core.backends.holding("instance", name, &r.meta.backend)?;
                b.call(ComputeMethod::get, |d| d.get(name))
            },
            |r, i| {
                r.apply(i);
            },
        )
    }

    fn get(&self, name: &str, backend: Option<&str>) -> Result<InstanceRecord, ApiError> {
        let _held = self.core.records.hold(name);
        self.settle_interrupted(name)?;
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        self.core.records.refresh(r, b.call(ComputeMethod::get, |d| d.get(name)), InstanceRecord::apply)
    }
}

impl Service for ComputeService {
    type Op = ComputeOp;
    fn handle(&self, op: ComputeOp) -> Result<ComputeReply, ApiError> {
        use ComputeMethod as M;
        use InstanceStatus as S;
        Ok(match op {
            ComputeOp::Spawn { name, command, args, env, workdir, backend, networks } => {
                let env = env.into_iter().map(|EnvVar(k, v)| (k, v)).collect();
                let spec = InstanceSpec { name, command, args, env, workdir };
                ComputeReply::One(self.spawn(spec, backend.as_deref(), &networks)?)
            }
            ComputeOp::Get(Named { name, backend }) => ComputeReply::One(self.get(&name, backend.as_deref())?),
            ComputeOp::List(OnBackend { backend }) => {
                if let Some(b) = &backend {
                    self.core.backends.pick(Some(b))?;
                }
                self.sync(backend.as_deref());
                ComputeReply::Many(self.core.records.list(backend.as_deref()))
            }
            ComputeOp::Start(Named { name, backend }) => {
                let r = self.transition(&name, backend.as_deref(), S::Starting, M::start, |d| d.start(&name))?;
                ComputeReply::One(r)
            }
            ComputeOp::Stop(Named { name, backend }) => {
                let r = self.transition(&name, backend.as_deref(), S::Stopping, M::stop, |d| d.stop(&name))?;
                ComputeReply::One(r)
            }
            ComputeOp::Reboot(Named { name, backend }) => {
                let r = self.transition(&name, backend.as_deref(), S::Rebooting, M::reboot, |d| d.reboot(&name))?;
                ComputeReply::One(r)
            }
            ComputeOp::Destroy(Named { name, backend }) => {
                ComputeReply::Removed(self.destroy(&name, backend.as_deref())?)
            }
        })
    }

    type Other = super::Never;
    type Interface = ComputeInterface;
    type Record = InstanceRecord;

    fn new(core: Core<ComputeInterface, InstanceRecord>) -> Result<ComputeService, String> {
        let s = ComputeService { core, network: OnceLock::new(), netns_dir: OnceLock::new() };
        s.reconcile_all(None);
        Ok(s)
    }

    fn link(&self, links: &Links<'_>) {
        if let Some(n) = links.service(super::network::KIND.name) {
            let _ = self.network.set(n.clone());
        }
        let _ = self.netns_dir.set(links.instance_netns_dir());
        let rebound = self.rebind_namespaces();
        if self.restore_plumbing() || rebound {
            self.sync(None); // their records, checked against them again
        }
        self.sweep();
    }

    const KIND: &'static ServiceKind = &KIND;

    fn core(&self) -> &Core<ComputeInterface, InstanceRecord> {
        &self.core
    }

    fn periodic(&self) {
        self.core.health_round(|b, changed| {
            if changed {
                self.reconcile_all(Some(&b.name));
            }
        });
        self.sync(None);
        self.sweep();
    }

    /// Instances outlive the host: only backends set to `stop_instances_on_exit` have theirs stopped
    /// (all at once, each through the stop flow, so that the records say `stopped`) before the drivers'
    /// cleanup.
    fn cleanup(&self) {
        std::thread::scope(|scope| {
            for b in self.core.backends.iter().filter(|b| b.configured().settings.stop_instances_on_exit) {
                // Every instance, not only running ones: one whose first process exited may have left
                // processes behind, and stop ends them too.
                for r in self.core.records.list(Some(&b.name)) {
                    scope.spawn(move || {
                        log::info!(
                            "instance {:?}: stopping (backend {:?} stops instances on exit)",
                            r.meta.name,
                            b.name
                        );
                        let stop =
                            self.transition(&r.meta.name, None, InstanceStatus::Stopping, ComputeMethod::stop, |d| {
                                d.stop(&r.meta.name)
                            });
                        if let Err(e) = stop {
                            log::warn!("instance {:?}: stop at exit failed: {}", r.meta.name, e.message);
                        }
                    });
                }
            }
        });
        for b in &self.table().controls {
            b.cleanup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::control::protocol::ErrorKind;
    use crate::services::records::Records;
    use plughost_api::{ComputeClient, DriverError};
    use std::sync::Arc;
    use std::sync::Mutex;

    /// Instances in memory; `stop` of one named "slow" blocks until released.
    #[derive(Default)]
    struct Mem {
        instances: Mutex<BTreeMap<String, Instance>>,
        release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl ComputeDriver for Mem {
        fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, DriverError> {
            let i = Instance {
                name: spec.name.clone(),
                state: InstanceState::Running,
                pid: Some(42),
                ..Instance::default()
            };
            self.instances.lock().unwrap().insert(spec.name.clone(), i.clone());
            Ok(i)
        }
        fn destroy(&self, name: &str) -> Result<(), DriverError> {
            self.instances.lock().unwrap().remove(name).map(drop).ok_or_else(|| DriverError::not_found("no"))
        }
        fn start(&self, name: &str) -> Result<Instance, DriverError> {
            self.get(name)
        }
        fn stop(&self, name: &str) -> Result<Instance, DriverError> {
            if name == "slow" {
                if let Some(rx) = self.release.lock().unwrap().take() {
                    let _ = rx.recv();
                }
            }
            let mut m = self.instances.lock().unwrap();
            let i = m.get_mut(name).ok_or_else(|| DriverError::not_found("no"))?;
            i.state = InstanceState::Stopped;
            i.pid = None;
            Ok(i.clone())
        }
        fn reboot(&self, name: &str) -> Result<Instance, DriverError> {
            self.get(name)
        }
        fn list(&self) -> Result<Vec<Instance>, DriverError> {
            Ok(self.instances.lock().unwrap().values().cloned().collect())
        }
        fn get(&self, name: &str) -> Result<Instance, DriverError> {
            self.instances.lock().unwrap().get(name).cloned().ok_or_else(|| DriverError::not_found("no"))
        }
    }

    fn service(driver: Mem) -> ComputeService {
        let client: Box<dyn ComputeDriver> = Box::new(ComputeClient::in_process(driver));
        let backend = Backend::<ComputeInterface>::in_process("compute", "default", client, "mem");
        ComputeService::new(Core::new(
            crate::services::Backends::from_list("compute", vec![backend]),
            Records::in_memory(),
        ))
        .unwrap()
    }

    fn spec(name: &str, command: &str) -> InstanceSpec {
        InstanceSpec { name: name.into(), command: command.into(), ..InstanceSpec::default() }
    }

    #[test]
    fn spawn_validates_and_records_what_the_driver_reports() {
        let s = service(Mem::default());
        assert_eq!(s.spawn(spec("../x", "true"), None, &[]).unwrap_err().kind, ErrorKind::InvalidArgument);
        let e = s.spawn(spec("a", ""), None, &[]).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (ErrorKind::InvalidArgument, "instance \"a\": empty command"));
        let r = s.spawn(spec("a", "sleep"), None, &[]).unwrap();
        assert_eq!((r.meta.status, r.pid), (InstanceStatus::Running, Some(42)));
        assert_eq!(r.spec.as_ref().unwrap().command, "sleep");
        assert_eq!(s.spawn(spec("a", "sleep"), None, &[]).unwrap_err().kind, ErrorKind::AlreadyExists);
        let stopped = s.transition("a", None, InstanceStatus::Stopping, ComputeMethod::stop, |d| d.stop("a")).unwrap();
        assert_eq!((stopped.meta.status, stopped.pid), (InstanceStatus::Stopped, None));
        s.destroy("a", None).unwrap();
        assert_eq!(s.get("a", None).unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn an_interrupted_spawn_is_settled_when_its_name_is_asked_for_again() {
        let s = service(Mem::default());
        // One the driver made (its record left spawning, as when the worker died before answering), one
        // it never got.
        s.spawn(spec("done", "sleep"), None, &[]).unwrap();
        s.core
            .records
            .update("done", |r| {
                r.meta.status = InstanceStatus::Spawning;
                true
            })
            .unwrap();
        s.core.records.put(InstanceRecord::new(&spec("never", "sleep"), "default", InstanceStatus::Spawning)).unwrap();
        assert_eq!(s.get("done", None).unwrap().meta.status, InstanceStatus::Running);
        assert_eq!(s.spawn(spec("done", "sleep"), None, &[]).unwrap_err().kind, ErrorKind::AlreadyExists);
        assert_eq!(s.spawn(spec("never", "sleep"), None, &[]).unwrap().meta.status, InstanceStatus::Running);
    }

    #[test]
    fn a_slow_stop_holds_only_its_own_instance() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mem = Mem::default();
        *mem.release.lock().unwrap() = Some(rx);
        let s = Arc::new(service(mem));
        s.spawn(spec("slow", "x"), None, &[]).unwrap();
        s.spawn(spec("quick", "x"), None, &[]).unwrap();
        let s2 = s.clone();
        let stopping = std::thread::spawn(move || {
            s2.transition("slow", None, InstanceStatus::Stopping, ComputeMethod::stop, |d| d.stop("slow"))
        });
        while s.core.records.get("slow").unwrap().meta.status != InstanceStatus::Stopping {
            std::thread::yield_now();
        }
        assert_eq!(s.get("quick", None).unwrap().meta.status, InstanceStatus::Running, "answers while the other stops");
        let listed = s.handle(ComputeOp::List(OnBackend { backend: None })).unwrap();
        let ComputeReply::Many(list) = listed else { panic!("list answers records") };
        assert_eq!(
            list.iter().find(|r| r.meta.name == "slow").unwrap().meta.status,
            InstanceStatus::Stopping,
            "sync skips it"
        );
        tx.send(()).unwrap();
        assert_eq!(stopping.join().unwrap().unwrap().meta.status, InstanceStatus::Stopped);
    }

    #[test]
    fn lost_instances_become_errors_and_strays_are_adopted() {
        let mem = Mem::default();
        mem.instances.lock().unwrap().insert(
            "stray".into(),
            Instance { name: "stray".into(), state: InstanceState::Running, pid: Some(7), ..Instance::default() },
        );
        let s = service(mem);
        let stray = s.core.records.get("stray").unwrap();
        assert_eq!((stray.meta.status, stray.pid), (InstanceStatus::Running, Some(7)));
        s.spawn(spec("a", "x"), None, &[]).unwrap();
        s.core.backends.iter().next().unwrap().call(ComputeMethod::destroy, |d| d.destroy("a")).unwrap();
        s.sync(None);
        let a = s.core.records.get("a").unwrap();
        assert_eq!((a.meta.status, a.meta.reason.as_deref()), (InstanceStatus::Error, Some(MISSING)));
    }
}
