//! `bridge-network`: a Linux bridge per network and a veth pair per port, made over rtnetlink directly
//! (netlink-packet-route and netlink-sys, synchronous, as netavark does), never by running `ip`.
//!
//! Names derive from ids within Linux's 15 characters: a network's bridge is `phb` and 12 hex digits of
//! its name's hash; a port's host end is `phv<id>`, its other end `php<id>` until it moves into the
//! port's namespace as `ifname`. Every link made carries the alias `plughost:<id>` (then the facts the
//! driver needs back: subnet and gateway, or network, address, MAC, name and namespace), and a link
//! without one is never touched: listings show only ours, and a name taken by someone else's link is
//! refused. Needs CAP_NET_ADMIN (and CAP_SYS_ADMIN to enter a port's namespace).

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeader, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use plughost_api::{
    DriverError, Network, NetworkDriver, NetworkSpec, NetworkStats, OptionSpec, Options, Port, PortSpec,
};

/// The options this driver takes.
pub const OPTIONS: &[OptionSpec] = &[OptionSpec::integer(
    "vlan",
    "an 802.1Q VLAN id for every network's uplink (0: none); kernels without 802.1Q answer unsupported",
)
.default("0")];

/// What every alias of ours starts with.
const ALIAS: &str = "plughost:";

/// The link group every link of ours is made in (`pl`). The kernel sets a group at creation but an
/// alias only after (`RTM_SETLINK`): a link in this group with no alias was made by a host that died
/// before it could name it, and `init` removes it.
const GROUP: u32 = 0x706c;

/// The driver.
pub struct BridgeNetwork {
    _vlan: u16,
}

impl BridgeNetwork {
    /// Builds the driver from validated options.
    pub fn new(options: &Options) -> Result<BridgeNetwork, DriverError> {
        let vlan = options.integer("vlan")?;
        if vlan != 0 {
            if !std::path::Path::new("/proc/net/vlan").exists() {
                return Err(DriverError::unsupported(format!(
                    "option \"vlan\" = {vlan}: this kernel has no 802.1Q support (no /proc/net/vlan)"
                )));
            }
            return Err(DriverError::unsupported(format!(
                "option \"vlan\" = {vlan}: VLAN uplinks are not implemented yet"
            )));
        }
        Ok(BridgeNetwork { _vlan: 0 })
    }
}

// ---------------------------------------------------------------------------------------------------
// rtnetlink, synchronously

/// One rtnetlink socket in the calling thread's network namespace.
struct Rtnl {
    socket: Socket,
    seq: u32,
}

fn io_err(what: &str, e: io::Error) -> DriverError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            DriverError::internal(format!("{what}: permission denied (bridge-network needs CAP_NET_ADMIN)"))
        }
        _ => DriverError::internal(format!("{what}: {e}")),
    }
}

impl Rtnl {
    fn open() -> Result<Rtnl, DriverError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| io_err("netlink socket", e))?;
        socket.bind_auto().map_err(|e| io_err("netlink bind", e))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(|e| io_err("netlink connect", e))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends one request; the messages answered (a dump's), or the kernel's error as an errno.
    fn request(
        &mut self,
        what: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, (i32, String)> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|e| (e.raw_os_error().unwrap_or(0), format!("{what}: send: {e}")))?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(|e| (e.raw_os_error().unwrap_or(0), format!("{what}: recv: {e}")))?;
            let mut offset = 0;
            while offset < data.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| (0, format!("{what}: unreadable answer: {e}")))?;
                let len = (m.header.length as usize).max(16);
                offset += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => {
                            let errno = -code.get();
                            return Err((errno, format!("{what}: {}", io::Error::from_raw_os_error(errno))));
                        }
                    },
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn ack(&mut self, what: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), DriverError> {
        self.request(what, msg, flags | NLM_F_ACK).map(drop).map_err(|(errno, text)| match errno {
            libc::EPERM | libc::EACCES => DriverError::internal(format!("{text} (bridge-network needs CAP_NET_ADMIN)")),
            libc::EEXIST => DriverError::already_exists(text),
            libc::ENODEV | libc::ENOENT => DriverError::not_found(text),
            libc::EBUSY => DriverError::busy(text),
            libc::EOPNOTSUPP => DriverError::unsupported(text),
            // A Linux bridge numbers its ports in 10 bits.
            libc::EXFULL => DriverError::no_capacity(format!("{text}: a Linux bridge holds at most 1023 ports")),
            _ => DriverError::internal(text),
        })
    }

    /// Every link of this namespace.
    fn links(&mut self) -> Result<Vec<Link>, DriverError> {
        let answers = self
            .request("listing links", RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)
            .map_err(|(_, t)| DriverError::internal(t))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::of(l)),
                _ => None,
            })
            .collect())
    }

    /// One link by name: a single lookup by the kernel, not a dump (an attach does a few of these, and
    /// must not slow down as the bridge fills).
    fn link(&mut self, name: &str) -> Result<Option<Link>, DriverError> {
        let mut m = LinkMessage::default();
        m.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        match self.request(&format!("finding link {name}"), RouteNetlinkMessage::GetLink(m), 0) {
            Ok(answers) => Ok(answers.into_iter().find_map(|a| match a {
                RouteNetlinkMessage::NewLink(l) => Some(Link::of(l)),
                _ => None,
            })),
            Err((libc::ENODEV, _)) => Ok(None),
            Err((_, text)) => Err(DriverError::internal(text)),
        }
    }

    fn set(&mut self, what: &str, index: u32, attributes: Vec<LinkAttribute>, up: bool) -> Result<(), DriverError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        m.attributes = attributes;
        self.ack(what, RouteNetlinkMessage::SetLink(m), 0)
    }

    fn delete(&mut self, what: &str, index: u32) -> Result<(), DriverError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.ack(what, RouteNetlinkMessage::DelLink(m), 0) {
            Err(e) if e.kind() == plughost_api::ErrorKind::NOT_FOUND => Ok(()),
            other => other,
        }
    }

    fn add_address(&mut self, what: &str, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), DriverError> {
        let mut m = AddressMessage::default();
        m.header = AddressHeader {
            family: AddressFamily::Inet,
            prefix_len: prefix,
            index,
            scope: AddressScope::Universe,
            ..m.header
        };
        m.attributes = vec![AddressAttribute::Local(IpAddr::V4(ip)), AddressAttribute::Address(IpAddr::V4(ip))];
        match self.ack(what, RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_EXCL) {
            Err(e) if e.kind() == plughost_api::ErrorKind::ALREADY_EXISTS => Ok(()),
            other => other,
        }
    }
}

/// What a link dump says of one link.
struct Link {
    index: u32,
    name: String,
    alias: Option<String>,
    kind: Option<InfoKind>,
    controller: Option<u32>,
    group: Option<u32>,
    up: bool,
}

impl Link {
    fn of(m: LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            alias: None,
            kind: None,
            controller: None,
            group: None,
            up: m.header.flags.contains(LinkFlags::Up),
        };
        for a in m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::IfAlias(a) => l.alias = Some(a),
                LinkAttribute::Controller(c) => l.controller = Some(c),
                LinkAttribute::Group(g) => l.group = Some(g),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            l.kind = Some(k);
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    /// Made by us and left unnamed by a host that died mid-way: our group, our name prefix, no alias.
    fn half_made(&self) -> bool {
        self.group == Some(GROUP)
            && self.alias.as_deref().is_none_or(str::is_empty)
            && (self.name.starts_with("phv") || self.name.starts_with("phb"))
    }

    /// The id and fields of our alias (`plughost:<id> key=value ...`), if the link is ours.
    fn ours(&self) -> Option<(String, Vec<(String, String)>)> {
        let alias = self.alias.as_deref()?.strip_prefix(ALIAS)?;
        let mut words = alias.split(' ');
        let id = words.next()?.to_owned();
        let fields = words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        Some((id, fields))
    }
}

/// No IPv6 link-local address (`addr_gen_mode` none): a network is IPv4, and without one, no duplicate
/// address detection or multicast listener report from each new port is flooded to every port of the
/// bridge (measured: with 1,000 ports, an attach took 1.7 times as long as with 10 before, 1.4 after).
/// The kernel refuses it in a link's creation (`EAFNOSUPPORT`), so it goes with the "up".
fn no_ipv6_link_local() -> LinkAttribute {
    LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)])])
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("")
}

/// The bridge of network `name`: `phb` and 12 hex digits of its FNV-1a hash.
fn bridge_name(network: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in network.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("phb{:012x}", h & 0xffff_ffff_ffff)
}

fn net_alias(spec: &NetworkSpec) -> String {
    format!("{ALIAS}{} cidr={} gw={}", spec.name, spec.cidr, spec.gateway.as_deref().unwrap_or(""))
}

fn port_alias(spec: &PortSpec) -> String {
    format!(
        "{ALIAS}{} net={} addr={} mac={} if={} ns={}",
        spec.id, spec.network, spec.address, spec.mac, spec.ifname, spec.netns
    )
}

fn network_of(l: &Link) -> Option<Network> {
    let (name, f) = l.ours()?;
    let gw = field(&f, "gw");
    Some(Network {
        name,
        cidr: field(&f, "cidr").to_owned(),
        gateway: (!gw.is_empty()).then(|| gw.to_owned()),
        interface: l.name.clone(),
        details: Vec::new(),
    })
}

fn port_of(l: &Link) -> Option<Port> {
    let (id, f) = l.ours()?;
    Some(Port {
        id,
        network: field(&f, "net").to_owned(),
        address: field(&f, "addr").to_owned(),
        mac: field(&f, "mac").to_owned(),
        ifname: field(&f, "if").to_owned(),
        netns: field(&f, "ns").to_owned(),
        host_interface: l.name.clone(),
    })
}

fn spec_of(p: &Port) -> PortSpec {
    PortSpec {
        id: p.id.clone(),
        network: p.network.clone(),
        address: p.address.clone(),
        mac: p.mac.clone(),
        ifname: p.ifname.clone(),
        netns: p.netns.clone(),
    }
}

fn parse_address(spec: &PortSpec) -> Result<(Ipv4Addr, u8), DriverError> {
    let bad =
        || DriverError::invalid_argument(format!("port {:?}: address {:?} is not A.B.C.D/N", spec.id, spec.address));
    let (ip, prefix) = spec.address.split_once('/').ok_or_else(bad)?;
    Ok((ip.parse().map_err(|_| bad())?, prefix.parse().map_err(|_| bad())?))
}

fn parse_mac(spec: &PortSpec) -> Result<Vec<u8>, DriverError> {
    let bytes: Result<Vec<u8>, _> = spec.mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
    match bytes {
        Ok(b) if b.len() == 6 => Ok(b),
        _ => Err(DriverError::invalid_argument(format!("port {:?}: mac {:?} is not six hex bytes", spec.id, spec.mac))),
    }
}

/// Opens the network namespace file named by a port's spec, checking that it is one; without waiting:
/// a FIFO put at that path by someone else opens at once, and is refused, instead of holding the call.
fn open_namespace(path: &str) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    /// `NS_GET_NSTYPE` (linux/nsfs.h): the type of the namespace a namespace file refers to.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    // SAFETY: an ioctl without an argument on a descriptor we hold; any other file fails (ENOTTY).
    if unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) } != libc::CLONE_NEWNET {
        return Err(io::Error::other("not a network namespace"));
    }
    Ok(file)
}

/// Runs `f` with an rtnetlink socket inside the namespace at `path`, on a thread of its own (entering
/// a network namespace changes only the calling thread's).
fn in_namespace<T: Send + 'static>(
    path: &str,
    f: impl FnOnce(&mut Rtnl) -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    let file =
        open_namespace(path).map_err(|e| DriverError::invalid_argument(format!("network namespace {path:?}: {e}")))?;
    let path = path.to_owned();
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file we hold open, for this thread only (CLONE_NEWNET), which
        // ends when `f` returns.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io_err(&format!("entering network namespace {path:?}"), io::Error::last_os_error()));
        }
        let mut rtnl = Rtnl::open()?;
        f(&mut rtnl)
    })
    .join()
    .map_err(|_| DriverError::internal("bridge-network: the namespace thread panicked"))?
}

impl NetworkDriver for BridgeNetwork {
    /// Removes the links a host killed mid-way left unnamed (our link group, no alias); without the privilege to
    /// list and change links, the backend reports down saying so.
    fn init(&self) -> Result<(), DriverError> {
        let mut nl = Rtnl::open()?;
        for l in nl.links()?.iter().filter(|l| l.half_made()) {
            nl.delete(&format!("removing half-made link {}", l.name), l.index)?;
        }
        Ok(())
    }

    fn create_network(&self, spec: &NetworkSpec) -> Result<Network, DriverError> {
        let mut nl = Rtnl::open()?;
        let name = bridge_name(&spec.name);
        if let Some(l) = nl.link(&name)? {
            return match network_of(&l) {
                Some(n) if n.name == spec.name && n.cidr == spec.cidr && n.gateway == spec.gateway => Ok(n),
                Some(n) => Err(DriverError::already_exists(format!(
                    "network {:?} already exists with subnet {} (bridge {name})",
                    spec.name, n.cidr
                ))),
                None => Err(DriverError::already_exists(format!(
                    "network {:?}: a link named {name} exists and is not plughost's; it is left alone",
                    spec.name
                ))),
            };
        }
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(name.clone()),
            LinkAttribute::Group(GROUP),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
        ];
        nl.ack(&format!("creating bridge {name}"), RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)?;
        let made = nl
            .link(&name)?
            .ok_or_else(|| DriverError::internal(format!("bridge {name} vanished after its creation")))?;
        let finish = (|| {
            nl.set(&format!("naming bridge {name}"), made.index, vec![LinkAttribute::IfAlias(net_alias(spec))], false)?;
            if let Some(gw) = spec.gateway.as_deref() {
                let gw: Ipv4Addr = gw
                    .parse()
                    .map_err(|_| DriverError::invalid_argument(format!("network {:?}: gateway {gw:?}", spec.name)))?;
                let prefix: u8 = spec.cidr.split('/').nth(1).and_then(|p| p.parse().ok()).ok_or_else(|| {
                    DriverError::invalid_argument(format!("network {:?}: cidr {:?}", spec.name, spec.cidr))
                })?;
                nl.add_address(&format!("giving bridge {name} {gw}/{prefix}"), made.index, gw, prefix)?;
            }
            nl.set(&format!("bringing bridge {name} up"), made.index, Vec::new(), true)
        })();
        if let Err(e) = finish {
            let _ = nl.delete(&format!("removing bridge {name}"), made.index);
            return Err(e);
        }
        Ok(Network {
            name: spec.name.clone(),
            cidr: spec.cidr.clone(),
            gateway: spec.gateway.clone(),
            interface: name,
            details: Vec::new(),
        })
    }

    fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        let mut nl = Rtnl::open()?;
        let links = nl.links()?;
        let bridge = bridge_name(name);
        let Some(b) = links.iter().find(|l| l.name == bridge) else { return Ok(()) };
        if network_of(b).is_none_or(|n| n.name != name) {
            return Err(DriverError::internal(format!(
                "network {name:?}: link {bridge} is not plughost's; left alone"
            )));
        }
        let ports = links.iter().filter(|l| l.controller == Some(b.index) && port_of(l).is_some()).count();
        if ports > 0 {
            return Err(DriverError::busy(format!("network {name:?} has {ports} port(s) attached")));
        }
        nl.delete(&format!("removing bridge {bridge}"), b.index)
    }

    fn attach(&self, spec: &PortSpec) -> Result<Port, DriverError> {
        let (ip, prefix) = parse_address(spec)?;
        let mac = parse_mac(spec)?;
        if spec.id.is_empty() || spec.id.len() > 12 || spec.ifname.is_empty() || spec.ifname.len() > 15 {
            return Err(DriverError::invalid_argument(format!(
                "port {:?}: ids are 1 to 12 characters and interface names 1 to 15",
                spec.id
            )));
        }
        let mut nl = Rtnl::open()?;
        let host = format!("phv{}", spec.id);
        if let Some(l) = nl.link(&host)? {
            return match port_of(&l) {
                Some(p) if spec_of(&p) == *spec => Ok(p),
                Some(p) => Err(DriverError::already_exists(format!(
                    "port {:?} already exists on network {:?} at {}",
                    spec.id, p.network, p.address
                ))),
                None => Err(DriverError::already_exists(format!(
                    "port {:?}: a link named {host} exists and is not plughost's; it is left alone",
                    spec.id
                ))),
            };
        }
        let bridge_name = bridge_name(&spec.network);
        let bridge = nl
            .link(&bridge_name)?
            .filter(|l| network_of(l).is_some_and(|n| n.name == spec.network))
            .ok_or_else(|| DriverError::not_found(format!("network {:?} not found", spec.network)))?;
        let bridge_index = bridge.index;
        // The other end is made in the port's namespace under its final name, or, with none, here.
        let peer_name = if spec.netns.is_empty() { format!("php{}", spec.id) } else { spec.ifname.clone() };
        let ns_file = match spec.netns.as_str() {
            "" => None,
            path => Some(open_namespace(path).map_err(|e| {
                DriverError::invalid_argument(format!("port {:?}: network namespace {path:?}: {e}", spec.id))
            })?),
        };
        let mut peer = LinkMessage::default();
        peer.attributes = vec![LinkAttribute::IfName(peer_name.clone()), LinkAttribute::Address(mac)];
        if let Some(f) = &ns_file {
            peer.attributes.push(LinkAttribute::NetNsFd(f.as_raw_fd()));
        }
        // Made in our group (the kernel ignores an alias at creation): a host killed before the alias
        // below leaves a link that `init` recognises as half-made and removes.
        // On the bridge from the start: every change of a link waits for the kernel's one lock, which a
        // bridge with many ports holds a while after each new one comes up, so an attach makes as few
        // changes as it can (four; measured by `scripts/bench.sh network`).
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(host.clone()),
            LinkAttribute::Group(GROUP),
            LinkAttribute::Controller(bridge_index),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]),
        ];
        nl.ack(&format!("creating veth {host}"), RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)?;
        drop(ns_file);
        let made =
            nl.link(&host)?.ok_or_else(|| DriverError::internal(format!("veth {host} vanished after its creation")))?;
        // The peer comes up first, the host end last: until both are up neither has a carrier, so the
        // kernel makes no IPv6 link-local address before the change that turns them off (made in the
        // same message as the "up", after it).
        let finish = (|| {
            let configure = move |nl: &mut Rtnl| -> Result<(), DriverError> {
                let peer =
                    nl.link(&peer_name)?.ok_or_else(|| DriverError::internal(format!("{peer_name} not found")))?;
                nl.add_address(&format!("giving {peer_name} {ip}/{prefix}"), peer.index, ip, prefix)?;
                nl.set(&format!("bringing {peer_name} up"), peer.index, vec![no_ipv6_link_local()], true)?;
                // (Only when down: a change of a link waits for the kernel's lock, which a bridge with
                // many ports holds a while after each new one comes up.)
                if let Some(lo) = nl.link("lo")?.filter(|lo| !lo.up) {
                    nl.set("bringing lo up", lo.index, Vec::new(), true)?;
                }
                Ok(())
            };
            match spec.netns.as_str() {
                "" => configure(&mut nl),
                path => in_namespace(path, configure),
            }?;
            nl.set(
                &format!("naming {host} and bringing it up"),
                made.index,
                vec![LinkAttribute::IfAlias(port_alias(spec)), no_ipv6_link_local()],
                true,
            )
        })();
        if let Err(e) = finish {
            let _ = nl.delete(&format!("removing veth {host}"), made.index);
            return Err(e);
        }
        Ok(Port {
            id: spec.id.clone(),
            network: spec.network.clone(),
            address: spec.address.clone(),
            mac: spec.mac.clone(),
            ifname: spec.ifname.clone(),
            netns: spec.netns.clone(),
            host_interface: host,
        })
    }

    fn detach(&self, id: &str) -> Result<(), DriverError> {
        let mut nl = Rtnl::open()?;
        let host = format!("phv{id}");
        let Some(l) = nl.link(&host)? else { return Ok(()) };
        if port_of(&l).is_none_or(|p| p.id != id) {
            return Err(DriverError::internal(format!("port {id:?}: link {host} is not plughost's; left alone")));
        }
        // Removing one end removes the pair, the end in the namespace included.
        nl.delete(&format!("removing veth {host}"), l.index)
    }

    fn list_networks(&self) -> Result<Vec<Network>, DriverError> {
        let mut nl = Rtnl::open()?;
        Ok(nl.links()?.iter().filter(|l| l.kind == Some(InfoKind::Bridge)).filter_map(network_of).collect())
    }

    fn list_attachments(&self) -> Result<Vec<Port>, DriverError> {
        let mut nl = Rtnl::open()?;
        Ok(nl.links()?.iter().filter(|l| l.kind == Some(InfoKind::Veth)).filter_map(port_of).collect())
    }

    fn stats(&self) -> Result<NetworkStats, DriverError> {
        Ok(NetworkStats { networks: self.list_networks()?.len() as u64, ports: self.list_attachments()?.len() as u64 })
    }
}

plughost_api::export_driver! {
    kind: network,
    driver: BridgeNetwork,
    name: "bridge-network",
    version: env!("CARGO_PKG_VERSION"),
    summary: "a Linux bridge per network, a veth pair per port, over netlink",
    options: OPTIONS,
    new: BridgeNetwork::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_an_interface_name_and_aliases_read_back() {
        let b = bridge_name("a-network-name-that-is-much-longer-than-fifteen-characters");
        assert!(b.len() <= 15 && b.starts_with("phb"), "{b}");
        assert_ne!(bridge_name("a"), bridge_name("b"));
        let spec = PortSpec {
            id: "p1".into(),
            network: "lan".into(),
            address: "10.1.0.2/24".into(),
            mac: "02:00:00:00:00:01".into(),
            ifname: "eth0".into(),
            netns: "/run/plughost/netns/web".into(),
        };
        let l = Link {
            index: 7,
            name: "phvp1".into(),
            alias: Some(port_alias(&spec)),
            kind: Some(InfoKind::Veth),
            controller: None,
            group: Some(GROUP),
            up: true,
        };
        assert!(!l.half_made());
        assert_eq!(spec_of(&port_of(&l).unwrap()), spec);
        let unnamed = Link { alias: None, ..l };
        assert!(unnamed.half_made(), "ours, left unnamed by a host that died");
        let foreign = Link { alias: Some("someone else's".into()), group: None, ..unnamed };
        assert!(port_of(&foreign).is_none() && !foreign.half_made());
        let foreign_unnamed = Link { alias: None, ..foreign };
        assert!(!foreign_unnamed.half_made(), "not in our group: never touched");
        assert_eq!(parse_mac(&spec).unwrap(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(parse_address(&spec).unwrap(), ("10.1.0.2".parse().unwrap(), 24));
    }
}
