//! The network service (nova-network's manager): it owns the records of networks and of their ports and
//! does the address management (`ipam`: each network's subnet and gateway, each port's address, MAC and
//! interface name); the backend's driver does the plumbing. Off unless configured.
//!
//! Ports are records of their own (table `ports`), held by their id; a port's address stays taken until
//! its record is gone, so a port being detached (or whose detach was interrupted) keeps it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use plughost_api::{Network, NetworkInterface, NetworkMethod, NetworkSpec, Port, PortSpec};
use serde::{Deserialize, Serialize};

use super::ipam::{self, Subnet};
use super::meta::{columns, record};
use super::records::{lifecycle_verdict, Lookup, Meta, ReconcileCounts, Record, Records, Scope, MISSING};
use super::{check_name, Core, Listed, Named, OnBackend, Reply, Service, ServiceKind};
use crate::backend::{Backend, BackendControl};
use crate::control::protocol::{ApiError, ErrorKind, Removed};
use crate::state::{value, Column, RowReader};
use rusqlite::types::Value;

/// The network service in the table: off unless a driver is named for it.
pub(crate) static KIND: ServiceKind =
    ServiceKind::of::<NetworkService>("network", "Network operations", "bridge-network", false, &[]);

// ---------------------------------------------------------------------------------------------------
// Protocol

/// A network operation and its arguments: what the socket carries and what `plughost ctl network` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[strum(serialize_all = "snake_case")]
pub enum NetworkOp {
    /// Create a network
    Create {
        /// Network name
        name: String,
        /// Its IPv4 subnet: 10.1.0.0/24 (prefix 8 to 30, no overlap with another network)
        #[arg(long)]
        cidr: String,
        /// Its gateway (default: the subnet's first host address)
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway: Option<String>,
        /// Backend (default: the service's default backend)
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
    /// Show one network
    Get(Named),
    /// List networks (from the records)
    List(OnBackend),
    /// Delete a network that has no ports
    Delete(Named),
    /// List ports (of one network)
    Ports {
        /// Only this network's
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        network: Option<String>,
    },
    /// Attach a port to a network: the next free address, a MAC from its id
    Attach {
        /// The network
        network: String,
        /// The port's id (default: a new one)
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The network namespace it goes in (a path; default: none)
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
        /// The interface's name in the namespace
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ifname: Option<String>,
    },
    /// Detach a port and release its address
    Detach {
        /// The port's id
        id: String,
    },
}

impl super::Operation for NetworkOp {
    fn reads(&self) -> bool {
        matches!(self, NetworkOp::Get(_) | NetworkOp::List(_) | NetworkOp::Ports { .. })
    }
    fn name(&self) -> &'static str {
        self.into()
    }
}

/// Where a network is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::EnumString)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub(crate) enum NetworkStatus {
    /// Being created.
    Creating,
    /// Ready.
    Available,
    /// Being deleted.
    Deleting,
    /// Something is wrong; `reason` says what.
    Error,
}

/// What the service knows about one network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct NetworkRecord {
    /// Id, name, backend, status, times, reason, adoption, driver digest.
    #[serde(flatten)]
    pub meta: Meta<NetworkStatus>,
    /// Its subnet.
    pub cidr: String,
    /// Its gateway.
    pub gateway: String,
    /// What carries it, as the driver reports it.
    pub interface: String,
}

const COLUMNS: &[Column] = columns!["cidr": Text, "gateway": Text, "interface": Text];

/// The networks table, version by version (append; never change one that shipped).
const MIGRATIONS: &[&str] = &["CREATE TABLE networks (
        name TEXT PRIMARY KEY NOT NULL,
        id TEXT NOT NULL UNIQUE,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        cidr TEXT NOT NULL,
        gateway TEXT NOT NULL,
        interface TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        reason TEXT,
        adopted INTEGER NOT NULL DEFAULT 0,
        driver_digest TEXT
    ) WITHOUT ROWID;
    CREATE INDEX networks_backend ON networks (backend);"];

record!(NetworkRecord, NetworkStatus, error: NetworkStatus::Error, "network", "networks", COLUMNS, MIGRATIONS, {
    fn column(&self, name: &str) -> Result<Value, String> {
        match name {
            "cidr" => Ok(value::text(&self.cidr)),
            "gateway" => Ok(value::text(&self.gateway)),
            "interface" => Ok(value::text(&self.interface)),
            other => Err(format!("no field {other:?} in a network record")),
        }
    }
    fn from_row(meta: Meta<NetworkStatus>, row: &mut RowReader) -> Result<NetworkRecord, String> {
        Ok(NetworkRecord { meta, cidr: row.text("cidr")?, gateway: row.text("gateway")?, interface: row.text("interface")? })
    }
});

impl NetworkRecord {
    fn subnet(&self) -> Result<Subnet, ApiError> {
        Subnet::parse(&self.cidr)
    }

    /// Takes what the driver reports; whether anything changed.
    fn apply(&mut self, n: &Network) -> bool {
        let changed = self.interface != n.interface;
        self.interface.clone_from(&n.interface);
        self.meta.touch(changed)
    }
}

impl Listed for NetworkRecord {
    const HEADINGS: &'static [&'static str] = &["CIDR", "GATEWAY", "INTERFACE"];
    fn cells(&self) -> Vec<String> {
        vec![self.cidr.clone(), self.gateway.clone(), self.interface.clone()]
    }
}

/// Where a port is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::EnumString)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub(crate) enum PortStatus {
    /// Being attached.
    Attaching,
    /// Attached.
    Attached,
    /// Being detached (its address is still taken).
    Detaching,
    /// Something is wrong; `reason` says what.
    Error,
}

/// What the service knows about one port (named by its id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PortRecord {
    /// Id (the port's), name (its id too), backend (its network's), status, times, reason, adoption.
    #[serde(flatten)]
    pub meta: Meta<PortStatus>,
    /// Its network.
    pub network: String,
    /// Its address with the prefix length.
    pub address: String,
    /// Its MAC address.
    pub mac: String,
    /// Its interface's name in the namespace.
    pub ifname: String,
    /// Its namespace, or empty.
    pub netns: String,
    /// Its other end on the machine, as the driver reports it.
    pub host_interface: String,
}

const PORT_COLUMNS: &[Column] = columns![
    "network": Text,
    "address": Text,
    "mac": Text,
    "ifname": Text,
    "netns": Text,
    "host_interface": Text,
];

/// The ports table, version by version.
const PORT_MIGRATIONS: &[&str] = &["CREATE TABLE ports (
        name TEXT PRIMARY KEY NOT NULL,
        id TEXT NOT NULL UNIQUE,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        network TEXT NOT NULL,
        address TEXT NOT NULL,
        mac TEXT NOT NULL,
        ifname TEXT NOT NULL,
        netns TEXT NOT NULL,
        host_interface TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        reason TEXT,
        adopted INTEGER NOT NULL DEFAULT 0,
        driver_digest TEXT
    ) WITHOUT ROWID;
    CREATE INDEX ports_network ON ports (network);"];

record!(PortRecord, PortStatus, error: PortStatus::Error, "port", "ports", PORT_COLUMNS, PORT_MIGRATIONS, {
    fn column(&self, name: &str) -> Result<Value, String> {
        match name {
            "network" => Ok(value::text(&self.network)),
            "address" => Ok(value::text(&self.address)),
            "mac" => Ok(value::text(&self.mac)),
            "ifname" => Ok(value::text(&self.ifname)),
            "netns" => Ok(value::text(&self.netns)),
            "host_interface" => Ok(value::text(&self.host_interface)),
            other => Err(format!("no field {other:?} in a port record")),
        }
    }
    fn from_row(meta: Meta<PortStatus>, row: &mut RowReader) -> Result<PortRecord, String> {
        Ok(PortRecord {
            meta,
            network: row.text("network")?,
            address: row.text("address")?,
            mac: row.text("mac")?,
            ifname: row.text("ifname")?,
            netns: row.text("netns")?,
            host_interface: row.text("host_interface")?,
        })
    }
});

impl PortRecord {
    fn spec(&self) -> PortSpec {
        PortSpec {
            id: self.meta.name.clone(),
            network: self.network.clone(),
            address: self.address.clone(),
            mac: self.mac.clone(),
            ifname: self.ifname.clone(),
            netns: self.netns.clone(),
        }
    }

    /// Its address without the prefix length.
    fn ip(&self) -> Option<Ipv4Addr> {
        self.address.split('/').next().and_then(|a| a.parse().ok())
    }

    fn apply(&mut self, p: &Port) -> bool {
        let changed = self.host_interface != p.host_interface;
        self.host_interface.clone_from(&p.host_interface);
        self.meta.touch(changed)
    }
}

/// The kind's own answers: a port, ports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum NetworkOther {
    /// `attach`: the port made.
    Port {
        /// The port.
        port: Box<PortRecord>,
    },
    /// `ports`: every port (of a network).
    Ports {
        /// The ports.
        ports: Vec<PortRecord>,
    },
}

type NetworkReply = Reply<NetworkRecord, NetworkOther>;

// ---------------------------------------------------------------------------------------------------
// Service

/// The network service.
pub(crate) struct NetworkService {
    core: Core<NetworkInterface, NetworkRecord>,
    ports: Records<PortRecord>,
    /// Held while a network is created: the overlap check and the intent are one step, so two
    /// overlapping networks of different names cannot both pass it.
    creating: std::sync::Mutex<()>,
    /// Where compute instances' namespaces are (set by `link`): their ports are detached with them.
    instance_netns: std::sync::OnceLock<std::path::PathBuf>,
}

/// How many characters of a port id name its interfaces (a Linux interface name holds 15).
const PORT_ID_LEN: usize = 11;

pub(crate) fn new_port_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let seed = format!("{nanos}-{}-{:p}", std::process::id(), &nanos);
    blake3::hash(seed.as_bytes()).to_hex()[..PORT_ID_LEN].to_owned()
}

impl NetworkService {
    /// Makes again, with their recorded subnet and gateway, the networks of backend `b` that the
    /// reconcile just found missing from its driver: a reboot takes every bridge, and the records are
    /// what was asked for. Runs where the reconcile does (at start, and when a backend is up again),
    /// after its networks and before its ports. One that cannot be made again stays missing, logged.
    fn restore_networks(&self, b: &Backend<NetworkInterface>) {
        use NetworkStatus as S;
        let lost = |r: &NetworkRecord| r.meta.status == S::Error && r.meta.reason.as_deref() == Some(MISSING);
        let mine = self.core.records.filter_map(|r| (r.meta.backend == b.name && lost(r)).then(|| r.meta.name.clone()));
        for name in mine {
            let _held = self.core.records.hold(&name);
            let Some(r) = self.core.records.get(&name).filter(|r| lost(r)) else { continue };
            let spec = NetworkSpec { name: name.clone(), cidr: r.cidr.clone(), gateway: Some(r.gateway.clone()) };
            match b.call(NetworkMethod::create_network, |d| d.create_network(&spec)) {
                Ok(n) => {
                    log::warn!("network {name:?}: missing from backend {:?} (after a reboot?); made again", b.name);
                    let _ = self.core.records.update(&name, |r| {
                        r.apply(&n);
                        r.set_status(S::Available);
                        true
                    });
                }
                Err(e) => log::warn!("network {name:?}: missing from backend {:?}; cannot make it again: {e}", b.name),
            }
        }
    }

    /// Attaches again an instance's port that its driver lost (a reboot took its veth with the
    /// instance's namespace, which compute has made again at `netns`): the same id, address, MAC and
    /// interface name. The record stays as it is until the driver has made it (an attach is idempotent,
    /// so one interrupted here is made again or found by the next reconcile). A port that is not
    /// missing is left alone.
    pub(crate) fn reattach_port(&self, id: &str) -> Result<Option<PortRecord>, ApiError> {
        let _port = self.ports.hold(id);
        let r = self.ports.get(id).ok_or_else(|| ApiError::not_found(format!("port {id:?} not found")))?;
        if !(r.meta.status == PortStatus::Error && r.meta.reason.as_deref() == Some(MISSING)) {
            return Ok(None);
        }
        self.usable(&r.network)?;
        let b = self.core.backends.holding("network", id, &r.meta.backend)?;
        let p = b.call(NetworkMethod::attach, |d| d.attach(&r.spec()))?;
        self.ports.update(id, |r| {
            r.apply(&p);
            r.set_status(PortStatus::Attached);
            true
        })
    }

    fn reconcile(&self, b: &Backend<NetworkInterface>, concurrent: bool) -> ReconcileCounts {
        use NetworkStatus as S;
        let mut counts = self.core.reconcile(
            b,
            concurrent,
            |_, _| Err(ApiError::new(ErrorKind::Unsupported, "networks are listed whole")),
            || b.call(NetworkMethod::list_networks, |d| d.list_networks()),
            Lookup {
                name_of: |n: &Network| &n.name,
                recheck: &|name| {
                    b.call(NetworkMethod::list_networks, |d| d.list_networks())
                        .ok()
                        .and_then(|all| all.into_iter().find(|n| n.name == name))
                },
                check: |n: &Network| Subnet::parse(&n.cidr).map(drop).map_err(|e| e.message),
            },
            |n| {
                let mut r = NetworkRecord {
                    meta: Meta::new(&n.name, &b.name, S::Available),
                    cidr: n.cidr.clone(),
                    gateway: n.gateway.clone().unwrap_or_default(),
                    interface: String::new(),
                };
                r.apply(n);
                r
            },
            |r, found| {
                lifecycle_verdict(
                    r,
                    found,
                    (S::Creating, "create"),
                    (S::Deleting, "delete"),
                    S::Available,
                    NetworkRecord::apply,
                    |name| b.call(NetworkMethod::delete_network, |d| d.delete_network(name)),
                )
            },
        );
        self.restore_networks(b);
        counts.add(&self.reconcile_ports(b, concurrent));
        counts
    }

    /// Ports against the driver's attachments: an interrupted attach completed or undone (its address
    /// freed only then), an interrupted detach finished, a port the driver has without a record adopted
    /// (its address stays taken).
    fn reconcile_ports(&self, b: &Backend<NetworkInterface>, concurrent: bool) -> ReconcileCounts {
        use PortStatus as S;
        let found = match b.call(NetworkMethod::list_attachments, |d| d.list_attachments()) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("network backend {:?}: cannot list ports, records kept: {e}", b.name);
                return ReconcileCounts { skipped_backends: 1, ..ReconcileCounts::default() };
            }
        };
        let watch = concurrent.then(|| self.ports.watch());
        let recheck = |id: &str| {
            b.call(NetworkMethod::list_attachments, |d| d.list_attachments())
                .ok()
                .and_then(|all| all.into_iter().find(|p| p.id == id))
        };
        let found: Vec<Port> = found.into_iter().filter(|p| check_name("port", &p.id).is_ok()).collect();
        self.ports.reconcile(
            &b.name,
            found,
            Scope::all(b.configured().settings.max_records.saturating_sub(self.ports.count_on(&b.name))),
            Lookup { name_of: |p: &Port| &p.id, recheck: &recheck, check: |_| Ok(()) },
            watch.as_ref(),
            |p| PortRecord {
                meta: Meta::new(&p.id, &b.name, S::Attached),
                network: p.network.clone(),
                address: p.address.clone(),
                mac: p.mac.clone(),
                ifname: p.ifname.clone(),
                netns: p.netns.clone(),
                host_interface: p.host_interface.clone(),
            },
            |r, found| {
                lifecycle_verdict(
                    r,
                    found,
                    (S::Attaching, "attach"),
                    (S::Detaching, "detach"),
                    S::Attached,
                    PortRecord::apply,
                    |id| b.call(NetworkMethod::detach, |d| d.detach(id)),
                )
            },
        )
    }

    fn create(
        &self,
        name: &str,
        cidr: &str,
        gateway: Option<&str>,
        backend: Option<&str>,
    ) -> Result<NetworkRecord, ApiError> {
        check_name("network", name)?;
        let subnet = Subnet::parse(cidr)?;
        let gateway = ipam::gateway(subnet, gateway)?;
        let b = self.core.backends.pick(backend)?;
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let _held = self.core.records.hold(name);
        // Every network's subnet, whatever its backend: addresses are one space on this host.
        let others: Vec<(String, Subnet)> = self
            .core
            .records
            .list(None)
            .into_iter()
            .filter(|r| r.meta.name != name)
            .filter_map(|r| r.subnet().ok().map(|s| (r.meta.name, s)))
            .collect();
        ipam::check_overlap(name, subnet, others.iter().map(|(n, s)| (n.as_str(), *s)))?;
        let mut record = NetworkRecord {
            meta: Meta::new(name, &b.name, NetworkStatus::Creating),
            cidr: subnet.to_string(),
            gateway: gateway.to_string(),
            interface: String::new(),
        };
        record.meta.driver_digest = Some(b.digest());
        let spec = NetworkSpec { name: name.to_owned(), cidr: subnet.to_string(), gateway: Some(gateway.to_string()) };
        self.core.records.create(
            record,
            || b.call(NetworkMethod::create_network, |d| d.create_network(&spec)),
            |r, n| {
                r.apply(&n);
                r.set_status(NetworkStatus::Available);
            },
        )
    }

    fn delete(&self, name: &str, backend: Option<&str>) -> Result<Removed, ApiError> {
        let _held = self.core.records.hold(name);
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        let ports = self.ports.filter_map(|p| (p.network == name).then_some(())).len();
        if ports > 0 {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("network {name:?} has {ports} port(s): detach them first (plughost ctl network ports --network {name})"),
            ));
        }
        self.core.records.removal(r, NetworkStatus::Deleting, || {
            b.call(NetworkMethod::delete_network, |d| d.delete_network(name))
        })?;
        Ok(Removed { name: name.to_owned(), deleted: Some(true), destroyed: None })
    }

    fn ports_of(&self, network: &str) -> Vec<PortRecord> {
        self.ports.list(None).into_iter().filter(|p| p.network == network).collect()
    }

    fn attach(
        &self,
        network: &str,
        id: Option<&str>,
        netns: Option<&str>,
        ifname: Option<&str>,
    ) -> Result<PortRecord, ApiError> {
        let id = match id {
            Some(id) => {
                check_name("port", id)?;
                if id.len() > PORT_ID_LEN {
                    return Err(ApiError::invalid(format!(
                        "port {}: an id has at most {PORT_ID_LEN} characters (interface names derive from it)",
                        crate::util::fmt::echo(id)
                    )));
                }
                id.to_owned()
            }
            None => new_port_id(),
        };
        let ifname = ifname.unwrap_or("eth0");
        if ifname.is_empty()
            || ifname.len() > 15
            || !ifname.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(ApiError::invalid(format!(
                "ifname {}: 1 to 15 letters, digits, '-' or '_'",
                crate::util::fmt::echo(ifname)
            )));
        }
        let netns = netns.unwrap_or("");
        if !netns.is_empty() && !netns.starts_with('/') {
            return Err(ApiError::invalid(format!("netns {}: an absolute path", crate::util::fmt::echo(netns))));
        }
        // The network's name is held while its address is chosen and recorded: two attaches never take
        // the same address, and the network cannot be deleted meanwhile.
        let _network = self.core.records.hold(network);
        let (net, b) = self.core.backends.locate(&self.core.records, network, None)?;
        if net.meta.status != NetworkStatus::Available {
            return Err(ApiError::new(ErrorKind::Unavailable, format!("network {network:?} is {}", net.meta.status)));
        }
        let subnet = net.subnet()?;
        let gateway: Ipv4Addr = net.gateway.parse().unwrap_or_else(|_| subnet.first_host());
        let _port = self.ports.hold(&id);
        let in_use: BTreeSet<Ipv4Addr> =
            self.ports.filter_map(|p| (p.network == network).then(|| p.ip()).flatten()).into_iter().collect();
        let address = ipam::allocate(network, subnet, gateway, &in_use)?;
        let mut record = PortRecord {
            meta: Meta::new(&id, &b.name, PortStatus::Attaching),
            network: network.to_owned(),
            address: subnet.with_prefix(address),
            mac: ipam::mac_of(&id),
            ifname: ifname.to_owned(),
            netns: netns.to_owned(),
            host_interface: String::new(),
        };
        record.meta.driver_digest = Some(b.digest());
        let spec = record.spec();
        self.ports.create(
            record,
            || b.call(NetworkMethod::attach, |d| d.attach(&spec)),
            |r, p| {
                r.apply(&p);
                r.set_status(PortStatus::Attached);
            },
        )
    }

    /// Attaches port `id` for another service (compute's instances): as `attach`, with every argument.
    pub(crate) fn attach_port(
        &self,
        network: &str,
        id: &str,
        netns: &str,
        ifname: &str,
    ) -> Result<PortRecord, ApiError> {
        self.attach(network, Some(id), Some(netns), Some(ifname))
    }

    /// Whether network `name` exists and takes ports (checked again when a port is attached).
    pub(crate) fn usable(&self, name: &str) -> Result<(), ApiError> {
        let (net, _) = self.core.backends.locate(&self.core.records, name, None)?;
        match net.meta.status {
            NetworkStatus::Available => Ok(()),
            other => Err(ApiError::new(ErrorKind::Unavailable, format!("network {name:?} is {other}"))),
        }
    }

    /// Detaches port `id` for another service; a port that is gone already is fine.
    pub(crate) fn detach_port(&self, id: &str) -> Result<(), ApiError> {
        match self.detach(id) {
            Err(e) if e.kind != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every port's record.
    pub(crate) fn all_ports(&self) -> Vec<PortRecord> {
        self.ports.list(None)
    }

    /// One port's record.
    pub(crate) fn port(&self, id: &str) -> Option<PortRecord> {
        self.ports.get(id)
    }

    fn detach(&self, id: &str) -> Result<Removed, ApiError> {
        let _held = self.ports.hold(id);
        let r = self.ports.get(id).ok_or_else(|| ApiError::not_found(format!("port {id:?} not found")))?;
        let b = self.core.backends.holding("network", id, &r.meta.backend)?;
        self.ports.removal(r, PortStatus::Detaching, || b.call(NetworkMethod::detach, |d| d.detach(id)))?;
        Ok(Removed { name: id.to_owned(), deleted: Some(true), destroyed: None })
    }
}

impl Service for NetworkService {
    type Op = NetworkOp;
    type Other = NetworkOther;
    type Interface = NetworkInterface;
    type Record = NetworkRecord;

    fn new(core: Core<NetworkInterface, NetworkRecord>) -> Result<NetworkService, String> {
        let ports = core.records.sibling::<PortRecord>().map_err(|e| e.to_string())?;
        let s = NetworkService {
            core,
            ports,
            creating: std::sync::Mutex::new(()),
            instance_netns: std::sync::OnceLock::new(),
        };
        s.core.reconcile_all(None, |b| s.reconcile(b, false));
        Ok(s)
    }

    const KIND: &'static ServiceKind = &KIND;

    fn core(&self) -> &Core<NetworkInterface, NetworkRecord> {
        &self.core
    }

    fn handle(&self, op: NetworkOp) -> Result<NetworkReply, ApiError> {
        Ok(match op {
            NetworkOp::Create { name, cidr, gateway, backend } => {
                Reply::One(self.create(&name, &cidr, gateway.as_deref(), backend.as_deref())?)
            }
            NetworkOp::Get(Named { name, backend }) => {
                Reply::One(self.core.backends.locate(&self.core.records, &name, backend.as_deref())?.0)
            }
            NetworkOp::List(OnBackend { backend }) => {
                if let Some(b) = &backend {
                    self.core.backends.pick(Some(b))?;
                }
                Reply::Many(self.core.records.list(backend.as_deref()))
            }
            NetworkOp::Delete(Named { name, backend }) => Reply::Removed(self.delete(&name, backend.as_deref())?),
            NetworkOp::Ports { network } => {
                let ports = match network {
                    Some(n) => {
                        self.core.backends.locate(&self.core.records, &n, None)?;
                        self.ports_of(&n)
                    }
                    None => self.ports.list(None),
                };
                Reply::Other(NetworkOther::Ports { ports })
            }
            NetworkOp::Attach { network, id, netns, ifname } => Reply::Other(NetworkOther::Port {
                port: Box::new(self.attach(&network, id.as_deref(), netns.as_deref(), ifname.as_deref())?),
            }),
            NetworkOp::Detach { id } => {
                // A compute instance's port goes with its instance (whose record lists it).
                let owned = self
                    .instance_netns
                    .get()
                    .zip(self.ports.get(&id))
                    .filter(|(dir, p)| std::path::Path::new(&p.netns).parent() == Some(dir.as_path()));
                if let Some((_, p)) = owned {
                    return Err(ApiError::new(
                        ErrorKind::Busy,
                        format!(
                            "port {id:?} belongs to a compute instance (namespace {}): destroy the instance to detach it",
                            p.netns
                        ),
                    ));
                }
                Reply::Removed(self.detach(&id)?)
            }
        })
    }

    fn periodic(&self) {
        self.core.health_round(|b, changed| {
            if changed {
                self.core.last_reconcile.set(self.reconcile(b, true));
            }
        });
    }

    /// Learns where compute instances' namespaces are; then attaches again the other ports a reboot
    /// took (compute does its instances'): those in the host's namespace, and those whose namespace is
    /// there again (made by whoever attached them).
    fn link(&self, links: &super::Links<'_>) {
        let dir = links.instance_netns_dir();
        let lost = self.ports.filter_map(|p| {
            // Missing first: a namespace is looked at only for the ports a reboot took, not every port.
            let missing = p.meta.status == PortStatus::Error && p.meta.reason.as_deref() == Some(MISSING);
            let ns = std::path::Path::new(&p.netns);
            let back = || {
                p.netns.is_empty() || (ns.parent() != Some(dir.as_path()) && crate::util::netns::inode(ns).is_some())
            };
            (missing && back()).then(|| p.meta.name.clone())
        });
        let _ = self.instance_netns.set(dir);
        for id in lost {
            match self.reattach_port(&id) {
                Ok(Some(p)) => {
                    log::warn!("port {id:?} was missing; attached again ({} on network {:?})", p.address, p.network)
                }
                Ok(None) => {}
                Err(e) => log::warn!("port {id:?}: cannot attach it again: {}", e.message),
            }
        }
    }

    fn format_other(other: &NetworkOther) -> Option<String> {
        match other {
            NetworkOther::Port { port } => {
                let text = serde_json::to_string(port).ok()?;
                crate::util::fmt::key_values(&text).ok()
            }
            NetworkOther::Ports { ports } => {
                let mut rows =
                    vec![["ID", "NETWORK", "STATUS", "ADDRESS", "MAC", "IFNAME", "NETNS"].map(str::to_owned).to_vec()];
                rows.extend(ports.iter().map(|p| {
                    let mut row = vec![
                        p.meta.name.clone(),
                        p.network.clone(),
                        p.meta.status.to_string(),
                        p.address.clone(),
                        p.mac.clone(),
                        p.ifname.clone(),
                        if p.netns.is_empty() { "-".to_owned() } else { p.netns.clone() },
                    ];
                    if let (Some(reason), Some(last)) = (p.meta.reason.as_deref(), row.last_mut()) {
                        *last = reason.to_owned();
                    }
                    row
                }));
                Some(crate::util::fmt::table_rows(&rows, ""))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::records::Records;
    use plughost_api::{DriverError, NetworkClient, NetworkDriver, NetworkStats};
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    /// A driver that holds what it is told, and remembers what it was asked to detach.
    #[derive(Default)]
    struct Mem {
        networks: Mutex<BTreeMap<String, NetworkSpec>>,
        ports: Mutex<BTreeMap<String, PortSpec>>,
        detached: Mutex<Vec<String>>,
    }

    struct Shared(Arc<Mem>);

    impl NetworkDriver for Shared {
        fn create_network(&self, spec: &NetworkSpec) -> Result<Network, DriverError> {
            self.0.networks.lock().unwrap().insert(spec.name.clone(), spec.clone());
            Ok(Network {
                name: spec.name.clone(),
                cidr: spec.cidr.clone(),
                interface: "br".into(),
                ..Network::default()
            })
        }
        fn delete_network(&self, name: &str) -> Result<(), DriverError> {
            self.0.networks.lock().unwrap().remove(name);
            Ok(())
        }
        fn attach(&self, spec: &PortSpec) -> Result<Port, DriverError> {
            self.0.ports.lock().unwrap().insert(spec.id.clone(), spec.clone());
            Ok(Port {
                id: spec.id.clone(),
                network: spec.network.clone(),
                address: spec.address.clone(),
                ..Port::default()
            })
        }
        fn detach(&self, id: &str) -> Result<(), DriverError> {
            self.0.detached.lock().unwrap().push(id.to_owned());
            self.0.ports.lock().unwrap().remove(id);
            Ok(())
        }
        fn list_networks(&self) -> Result<Vec<Network>, DriverError> {
            let n = self.0.networks.lock().unwrap();
            Ok(n.values()
                .map(|s| Network { name: s.name.clone(), cidr: s.cidr.clone(), ..Network::default() })
                .collect())
        }
        fn list_attachments(&self) -> Result<Vec<Port>, DriverError> {
            let p = self.0.ports.lock().unwrap();
            Ok(p.values().map(|s| Port { id: s.id.clone(), network: s.network.clone(), ..Port::default() }).collect())
        }
        fn stats(&self) -> Result<NetworkStats, DriverError> {
            Ok(NetworkStats::default())
        }
    }

    fn service(mem: &Arc<Mem>) -> NetworkService {
        let client: Box<dyn NetworkDriver> = Box::new(NetworkClient::in_process(Shared(mem.clone())));
        let backend = Backend::<NetworkInterface>::in_process("network", "default", client, "mem");
        NetworkService::new(Core::new(
            crate::services::Backends::from_list("network", vec![backend]),
            Records::in_memory(),
        ))
        .unwrap()
    }

    fn port(id: &str, status: PortStatus, address: &str) -> PortRecord {
        PortRecord {
            meta: Meta::new(id, "default", status),
            network: "lan".into(),
            address: address.into(),
            mac: ipam::mac_of(id),
            ifname: "eth0".into(),
            netns: String::new(),
            host_interface: String::new(),
        }
    }

    #[test]
    fn interrupted_attaches_and_detaches_are_settled_and_only_then_free_their_address() {
        let mem = Arc::new(Mem::default());
        let s = service(&mem);
        s.create("lan", "10.20.0.0/29", None, None).unwrap();
        // As a kill -9 leaves them: an attach recorded that never reached the driver, one that did, and
        // a detach recorded whose driver call never came.
        s.ports.put(port("lost", PortStatus::Attaching, "10.20.0.2/29")).unwrap();
        s.ports.put(port("made", PortStatus::Attaching, "10.20.0.3/29")).unwrap();
        s.ports.put(port("going", PortStatus::Detaching, "10.20.0.4/29")).unwrap();
        for id in ["made", "going"] {
            mem.ports.lock().unwrap().insert(id.into(), port(id, PortStatus::Attached, "").spec());
        }
        // Until settled, their addresses are taken: the next port gets .5.
        assert_eq!(s.attach("lan", Some("next"), None, None).unwrap().address, "10.20.0.5/29");
        let b = s.core.backends.pick(None).unwrap();
        let counts = s.reconcile(b, false);
        assert_eq!((counts.completed, counts.undone), (2, 1), "{counts:?}");
        assert!(s.ports.get("lost").is_none(), "an attach that never happened is forgotten");
        assert_eq!(s.ports.get("made").unwrap().meta.status, PortStatus::Attached);
        assert!(s.ports.get("going").is_none() && mem.detached.lock().unwrap().contains(&"going".to_owned()));
        // Now .2 and .4 are free again, lowest first.
        assert_eq!(s.attach("lan", Some("again"), None, None).unwrap().address, "10.20.0.2/29");
        assert_eq!(s.attach("lan", Some("more"), None, None).unwrap().address, "10.20.0.4/29");
        // A network with ports cannot go; a detach releases; then it can.
        assert_eq!(s.delete("lan", None).unwrap_err().kind, ErrorKind::Busy);
        for id in ["made", "next", "again", "more"] {
            s.detach(id).unwrap();
        }
        s.delete("lan", None).unwrap();
        assert!(mem.networks.lock().unwrap().is_empty());
    }

    #[test]
    fn after_a_reboot_networks_are_made_again_and_lost_ports_attached_again_as_recorded() {
        let mem = Arc::new(Mem::default());
        let s = service(&mem);
        s.create("lan", "10.21.0.0/24", Some("10.21.0.254"), None).unwrap();
        let kept = s.attach("lan", Some("p1"), Some("/run/ns/a"), Some("eth1")).unwrap();
        s.attach("lan", Some("p2"), None, None).unwrap();
        // The reboot: the driver has nothing.
        mem.networks.lock().unwrap().clear();
        mem.ports.lock().unwrap().clear();
        let b = s.core.backends.pick(None).unwrap();
        s.reconcile(b, false);
        // The network is made again as recorded (gateway included) and is available; ports the driver
        // lost are missing until someone attaches them again.
        let made = mem.networks.lock().unwrap().get("lan").cloned().unwrap();
        assert_eq!((made.cidr.as_str(), made.gateway.as_deref()), ("10.21.0.0/24", Some("10.21.0.254")));
        assert_eq!(s.core.records.get("lan").unwrap().meta.status, NetworkStatus::Available);
        let lost = s.ports.get("p1").unwrap();
        assert_eq!((lost.meta.status, lost.meta.reason.as_deref()), (PortStatus::Error, Some(MISSING)));
        let again = s.reattach_port("p1").unwrap().unwrap();
        assert_eq!(again.meta.status, PortStatus::Attached);
        let spec = mem.ports.lock().unwrap().get("p1").cloned().unwrap();
        assert_eq!(spec, kept.spec(), "the same address, MAC, interface name and namespace");
        // Attached ports are left alone; unknown ones are not found.
        assert!(s.reattach_port("p1").unwrap().is_none());
        assert_eq!(s.reattach_port("nope").unwrap_err().kind, ErrorKind::NotFound);
        // A port the driver has again without the host's help is attached again by the reconcile.
        mem.ports.lock().unwrap().insert("p2".into(), s.ports.get("p2").unwrap().spec());
        s.reconcile(b, false);
        assert_eq!(s.ports.get("p2").unwrap().meta.status, PortStatus::Attached);
        // A network that was deleted through the host is not made again.
        for id in ["p1", "p2"] {
            s.detach(id).unwrap();
        }
        s.delete("lan", None).unwrap();
        s.reconcile(b, false);
        assert!(mem.networks.lock().unwrap().is_empty());
    }
}
