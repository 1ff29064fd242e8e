//! The network driver interface (after nova-network's and CNI's cut): the host's network manager keeps
//! the records and does the address management (which subnet, which address, which MAC); the driver
//! does the plumbing (a bridge per network, an interface per port in an instance's network namespace).
//! Added in plughost-api 1.2.0.

use abi_stable::std_types::{ROption, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;

use crate::interface::{driver_interface, record_conversions};

/// A network to make: its name, its IPv4 subnet and gateway, as the host's manager chose them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
pub struct NetworkSpec {
    /// The network's name, unique within the driver.
    pub name: String,
    /// Its subnet, `10.1.0.0/24`.
    pub cidr: String,
    /// Its gateway address (inside the subnet), if it has one.
    pub gateway: Option<String>,
}

/// A network as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
pub struct Network {
    /// The network's name.
    pub name: String,
    /// Its subnet.
    pub cidr: String,
    /// Its gateway, if it has one.
    pub gateway: Option<String>,
    /// What carries it on the machine, in the driver's terms (a bridge's name, `memory`).
    pub interface: String,
    /// Driver-specific facts shown with the network, as name/value pairs.
    pub details: Vec<(String, String)>,
}

/// A port to attach: one interface of an instance on a network, everything chosen by the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
pub struct PortSpec {
    /// The port's id, unique within the driver (what the driver names its links after).
    pub id: String,
    /// The network it is on.
    pub network: String,
    /// Its address with the subnet's prefix length, `10.1.0.2/24`.
    pub address: String,
    /// Its MAC address, `02:..`.
    pub mac: String,
    /// The interface's name inside the namespace, `eth0`.
    pub ifname: String,
    /// The network namespace it goes in (a path such as `/run/plughost/netns/web`), or empty for none.
    pub netns: String,
}

/// A port as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
pub struct Port {
    /// The port's id.
    pub id: String,
    /// Its network.
    pub network: String,
    /// Its address with the prefix length.
    pub address: String,
    /// Its MAC address.
    pub mac: String,
    /// The interface's name inside the namespace.
    pub ifname: String,
    /// The namespace it is in, or empty.
    pub netns: String,
    /// Its other end on the machine, in the driver's terms (a veth's name, `memory`).
    pub host_interface: String,
}

/// What a network backend holds.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
pub struct NetworkStats {
    /// Networks.
    pub networks: u64,
    /// Ports attached.
    pub ports: u64,
}

impl crate::interface::Ret for NetworkStats {
    type Ffi = NetworkStats;
    fn into_ffi(self) -> NetworkStats {
        self
    }
    fn from_ffi(ffi: NetworkStats) -> NetworkStats {
        ffi
    }
}

fn pairs(v: Vec<(String, String)>) -> RVec<Tuple2<RString, RString>> {
    v.into_iter().map(|(k, v)| Tuple2(k.into(), v.into())).collect()
}

fn unpairs(v: RVec<Tuple2<RString, RString>>) -> Vec<(String, String)> {
    v.into_iter().map(|Tuple2(k, v)| (k.into(), v.into())).collect()
}

/// Stable-ABI mirror of [`NetworkSpec`].
#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiNetworkSpec {
    name: RString,
    cidr: RString,
    gateway: ROption<RString>,
}

impl From<NetworkSpec> for FfiNetworkSpec {
    fn from(s: NetworkSpec) -> FfiNetworkSpec {
        FfiNetworkSpec { name: s.name.into(), cidr: s.cidr.into(), gateway: s.gateway.map(RString::from).into() }
    }
}

impl From<FfiNetworkSpec> for NetworkSpec {
    fn from(s: FfiNetworkSpec) -> NetworkSpec {
        NetworkSpec { name: s.name.into(), cidr: s.cidr.into(), gateway: s.gateway.into_option().map(String::from) }
    }
}

/// Stable-ABI mirror of [`Network`].
#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiNetwork {
    name: RString,
    cidr: RString,
    gateway: ROption<RString>,
    interface: RString,
    details: RVec<Tuple2<RString, RString>>,
}

impl From<Network> for FfiNetwork {
    fn from(n: Network) -> FfiNetwork {
        FfiNetwork {
            name: n.name.into(),
            cidr: n.cidr.into(),
            gateway: n.gateway.map(RString::from).into(),
            interface: n.interface.into(),
            details: pairs(n.details),
        }
    }
}

impl From<FfiNetwork> for Network {
    fn from(n: FfiNetwork) -> Network {
        Network {
            name: n.name.into(),
            cidr: n.cidr.into(),
            gateway: n.gateway.into_option().map(String::from),
            interface: n.interface.into(),
            details: unpairs(n.details),
        }
    }
}

/// Stable-ABI mirror of [`PortSpec`].
#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiPortSpec {
    id: RString,
    network: RString,
    address: RString,
    mac: RString,
    ifname: RString,
    netns: RString,
}

impl From<PortSpec> for FfiPortSpec {
    fn from(s: PortSpec) -> FfiPortSpec {
        FfiPortSpec {
            id: s.id.into(),
            network: s.network.into(),
            address: s.address.into(),
            mac: s.mac.into(),
            ifname: s.ifname.into(),
            netns: s.netns.into(),
        }
    }
}

impl From<FfiPortSpec> for PortSpec {
    fn from(s: FfiPortSpec) -> PortSpec {
        PortSpec {
            id: s.id.into(),
            network: s.network.into(),
            address: s.address.into(),
            mac: s.mac.into(),
            ifname: s.ifname.into(),
            netns: s.netns.into(),
        }
    }
}

/// Stable-ABI mirror of [`Port`].
#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiPort {
    id: RString,
    network: RString,
    address: RString,
    mac: RString,
    ifname: RString,
    netns: RString,
    host_interface: RString,
}

impl From<Port> for FfiPort {
    fn from(p: Port) -> FfiPort {
        FfiPort {
            id: p.id.into(),
            network: p.network.into(),
            address: p.address.into(),
            mac: p.mac.into(),
            ifname: p.ifname.into(),
            netns: p.netns.into(),
            host_interface: p.host_interface.into(),
        }
    }
}

impl From<FfiPort> for Port {
    fn from(p: FfiPort) -> Port {
        Port {
            id: p.id.into(),
            network: p.network.into(),
            address: p.address.into(),
            mac: p.mac.into(),
            ifname: p.ifname.into(),
            netns: p.netns.into(),
            host_interface: p.host_interface.into(),
        }
    }
}

record_conversions!(NetworkSpec => FfiNetworkSpec);
record_conversions!(Network => FfiNetwork);
record_conversions!(PortSpec => FfiPortSpec);
record_conversions!(Port => FfiPort);

driver_interface! {
    /// What a network driver implements: plumbing only. Every method may be called from several threads
    /// at once.
    ///
    /// The host's network manager owns the records and the address management: it picks each
    /// network's subnet and gateway and each port's address, MAC and interface name, and the driver
    /// makes them so. Like CNI's ADD and DEL, the calls are idempotent: `create_network` of a network
    /// that exists with the same spec, and `attach` of a port that exists with the same spec, return it;
    /// `delete_network` and `detach` of what is not there succeed. A name or id in use with another spec
    /// is `already_exists`; `attach` to a missing network is `not_found`; `delete_network` of a network
    /// with ports is `busy`. An option or spec this machine cannot serve is `unsupported`, in one line.
    kind network = 3, "network": NetworkDriver, NetworkClient, NetworkAdapter, NetworkDriverFfi, NetworkDriverFfi_TO;
    host NetworkInterface, NetworkCall, NetworkReply, RemoteNetwork, NetworkMethod;
    methods {
        /// Makes a network (or returns it, if it exists with this spec).
        fn create_network(spec: &NetworkSpec => FfiNetworkSpec, NetworkSpec) -> Network => FfiNetwork;
        /// Removes a network that has no ports (nothing to do if it is not there).
        fn delete_network(name: &str => RStr<'_>, String) -> () => ();
        /// Attaches a port (or returns it, if it exists with this spec).
        fn attach(spec: &PortSpec => FfiPortSpec, PortSpec) -> Port => FfiPort;
        /// Detaches a port and removes what the driver made for it (nothing to do if it is not there).
        fn detach(id: &str => RStr<'_>, String) -> () => ();
        /// Every network.
        fn list_networks() -> Vec<Network> => RVec<FfiNetwork>;
        /// Every port.
        fn list_attachments() -> Vec<Port> => RVec<FfiPort>;
        /// What the backend holds.
        fn stats() -> NetworkStats => NetworkStats;
    }
    extensions {}
}
