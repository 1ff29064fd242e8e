//! Address management for the network service (nova-network's cut: the manager picks, the driver
//! plumbs): IPv4 subnets, overlap checks, the lowest free host address, and MAC addresses derived from
//! port ids. Plain code over plain values: what is in use comes from the records, so an address stays
//! taken until its port's record is gone (a port being detached still holds it).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

use crate::control::protocol::{ApiError, ErrorKind};

/// The longest prefix a network may have: a /30 holds two host addresses (one of them usually the
/// gateway). Shorter than /8 is refused too: no host network needs sixteen million addresses.
pub const MAX_PREFIX: u8 = 30;
/// The shortest prefix a network may have.
pub const MIN_PREFIX: u8 = 8;

/// An IPv4 subnet: its network address and prefix length (`10.1.0.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    net: u32,
    prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N`: host bits must be zero, `N` from [`MIN_PREFIX`] to [`MAX_PREFIX`].
    pub fn parse(cidr: &str) -> Result<Subnet, ApiError> {
        let bad = |why: &str| ApiError::invalid(format!("cidr {}: {why}", crate::util::fmt::echo(cidr)));
        let (addr, prefix) = cidr.split_once('/').ok_or_else(|| bad("expected an IPv4 subnet such as 10.1.0.0/24"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address before the /"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("the prefix length after the / is not a number"))?;
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(bad(&format!("prefix length {prefix}: from {MIN_PREFIX} to {MAX_PREFIX}")));
        }
        let net = u32::from(addr);
        let subnet = Subnet { net: net & mask(prefix), prefix };
        if subnet.net != net {
            return Err(bad(&format!("host bits are set; the network is {subnet}")));
        }
        Ok(subnet)
    }

    /// The prefix length.
    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// The network address (never given to a port).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(self.net)
    }

    /// The broadcast address (never given to a port).
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(self.net | !mask(self.prefix))
    }

    /// The first host address: the default gateway.
    pub fn first_host(self) -> Ipv4Addr {
        Ipv4Addr::from(self.net + 1)
    }

    /// How many host addresses it has (network and broadcast excluded).
    pub fn hosts(self) -> u32 {
        (!mask(self.prefix)) - 1
    }

    /// Whether `ip` is one of its host addresses (not the network or broadcast address).
    pub fn is_host(self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip & mask(self.prefix) == self.net && ip != self.net && ip != u32::from(self.broadcast())
    }

    /// Whether the two share any address.
    pub fn overlaps(self, other: Subnet) -> bool {
        let shorter = self.prefix.min(other.prefix);
        self.net & mask(shorter) == other.net & mask(shorter)
    }

    /// `ip/prefix`, as a port's address is given to a driver.
    pub fn with_prefix(self, ip: Ipv4Addr) -> String {
        format!("{ip}/{}", self.prefix)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

/// The gateway of a new network: the one given (a host address of the subnet), or its first host
/// address.
pub fn gateway(subnet: Subnet, given: Option<&str>) -> Result<Ipv4Addr, ApiError> {
    let Some(text) = given else { return Ok(subnet.first_host()) };
    let ip: Ipv4Addr = text
        .parse()
        .map_err(|_| ApiError::invalid(format!("gateway {}: not an IPv4 address", crate::util::fmt::echo(text))))?;
    if !subnet.is_host(ip) {
        return Err(ApiError::invalid(format!("gateway {ip}: not a host address of {subnet}")));
    }
    Ok(ip)
}

/// Refuses `new` if it overlaps one of `existing` (network name, subnet), naming the one it overlaps.
pub fn check_overlap<'a>(
    name: &str,
    new: Subnet,
    existing: impl IntoIterator<Item = (&'a str, Subnet)>,
) -> Result<(), ApiError> {
    match existing.into_iter().find(|(_, s)| s.overlaps(new)) {
        Some((other, s)) => Err(ApiError::invalid(format!(
            "network {}: {new} overlaps network {} ({s})",
            crate::util::fmt::echo(name),
            crate::util::fmt::echo(other)
        ))),
        None => Ok(()),
    }
}

/// The lowest host address of `subnet` that is not the gateway and not in `in_use` (every address a
/// port record holds, detaching ones included); `no_capacity` when there is none.
pub fn allocate(
    name: &str,
    subnet: Subnet,
    gateway: Ipv4Addr,
    in_use: &BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Addr, ApiError> {
    let first = u32::from(subnet.first_host());
    let last = u32::from(subnet.broadcast()) - 1;
    // In use below a candidate are skipped in order: one pass over the sorted set, not a probe per
    // address (a /8 with every address taken is answered without 16 million lookups).
    let mut taken = in_use.range(Ipv4Addr::from(first)..=Ipv4Addr::from(last)).map(|ip| u32::from(*ip)).peekable();
    let gateway = u32::from(gateway);
    let mut candidate = first;
    while candidate <= last {
        if candidate == gateway {
            candidate += 1;
            continue;
        }
        while taken.peek().is_some_and(|t| *t < candidate) {
            taken.next();
        }
        if taken.peek() == Some(&candidate) {
            candidate += 1;
            continue;
        }
        return Ok(Ipv4Addr::from(candidate));
    }
    Err(ApiError::new(
        ErrorKind::NoCapacity,
        format!(
            "network {}: no free address in {subnet} ({} host addresses, the gateway and {} in use)",
            crate::util::fmt::echo(name),
            subnet.hosts(),
            in_use.len()
        ),
    ))
}

/// The MAC address of a port: locally administered and unicast (`02:` and five bytes of the id's
/// BLAKE3 digest), the same for the same id on every host.
pub fn mac_of(port_id: &str) -> String {
    let d = blake3::hash(port_id.as_bytes());
    let b = d.as_bytes();
    format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_parse_strictly() {
        let s = Subnet::parse("10.1.0.0/24").unwrap();
        assert_eq!(
            (s.to_string(), s.network(), s.broadcast(), s.first_host(), s.hosts()),
            ("10.1.0.0/24".to_owned(), ip("10.1.0.0"), ip("10.1.0.255"), ip("10.1.0.1"), 254)
        );
        let e = |c: &str| Subnet::parse(c).unwrap_err().message;
        assert!(e("10.1.0.5/24").contains("host bits are set; the network is 10.1.0.0/24"));
        assert!(e("10.1.0.0/31").contains("prefix length 31: from 8 to 30"));
        assert!(e("10.0.0.0/7").contains("prefix length 7"));
        assert!(e("10.1.0.0").contains("expected an IPv4 subnet"));
        assert!(e("fd00::/64").contains("not an IPv4 address"));
        assert!(e("10.1.0.0/x").contains("not a number"));
        assert!(e("a\nb/24").contains("\\n"), "echoed escaped");
        assert_eq!(Subnet::parse("192.168.7.4/30").unwrap().hosts(), 2);
    }

    #[test]
    fn allocation_takes_the_lowest_free_host_address_skipping_reserved_ones() {
        let s = Subnet::parse("10.2.0.0/29").unwrap(); // hosts .1 to .6
        let gw = gateway(s, None).unwrap();
        assert_eq!(gw, ip("10.2.0.1"));
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        for _ in 0..5 {
            let a = allocate("n", s, gw, &used).unwrap();
            used.insert(a);
            got.push(a.to_string());
        }
        assert_eq!(got, ["10.2.0.2", "10.2.0.3", "10.2.0.4", "10.2.0.5", "10.2.0.6"]);
        // Full: network, gateway and broadcast are never given out.
        let e = allocate("n", s, gw, &used).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoCapacity);
        assert!(
            e.message.contains("no free address in 10.2.0.0/29 (6 host addresses, the gateway and 5 in use)"),
            "{e}"
        );
        // A gap is filled first, lowest first.
        used.remove(&ip("10.2.0.4"));
        used.remove(&ip("10.2.0.3"));
        assert_eq!(allocate("n", s, gw, &used).unwrap(), ip("10.2.0.3"));
        // A gateway elsewhere in the subnet is skipped where it is.
        let gw = gateway(s, Some("10.2.0.2")).unwrap();
        assert_eq!(allocate("n", s, gw, &BTreeSet::new()).unwrap(), ip("10.2.0.1"));
        assert_eq!(allocate("n", s, gw, &BTreeSet::from([ip("10.2.0.1")])).unwrap(), ip("10.2.0.3"));
    }

    #[test]
    fn an_address_held_by_a_record_is_not_given_again() {
        // The service passes every address a port record holds, a port being detached included: until
        // its record is gone, its address is not reused.
        let s = Subnet::parse("10.3.0.0/30").unwrap();
        let gw = gateway(s, None).unwrap();
        let detaching = BTreeSet::from([ip("10.3.0.2")]);
        assert_eq!(allocate("n", s, gw, &detaching).unwrap_err().kind, ErrorKind::NoCapacity);
        assert_eq!(allocate("n", s, gw, &BTreeSet::new()).unwrap(), ip("10.3.0.2"));
        // Addresses outside the subnet in the set do not matter.
        assert_eq!(allocate("n", s, gw, &BTreeSet::from([ip("10.9.9.9")])).unwrap(), ip("10.3.0.2"));
    }

    #[test]
    fn overlapping_subnets_and_bad_gateways_are_refused() {
        let a = Subnet::parse("10.4.0.0/16").unwrap();
        let b = Subnet::parse("10.4.3.0/24").unwrap();
        let c = Subnet::parse("10.5.0.0/24").unwrap();
        assert!(a.overlaps(b) && b.overlaps(a) && !a.overlaps(c));
        let e = check_overlap("inner", b, [("outer", a), ("other", c)]).unwrap_err();
        assert_eq!(e.message, "network \"inner\": 10.4.3.0/24 overlaps network \"outer\" (10.4.0.0/16)");
        assert!(check_overlap("free", Subnet::parse("10.6.0.0/24").unwrap(), [("outer", a)]).is_ok());
        for bad in ["10.5.0.0", "10.5.0.255", "10.6.0.1", "ten"] {
            assert!(gateway(c, Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(gateway(c, Some("10.5.0.254")).unwrap(), ip("10.5.0.254"));
    }

    #[test]
    fn macs_are_locally_administered_unicast_and_stable() {
        let m = mac_of("3f2a9c01");
        assert_eq!(m, mac_of("3f2a9c01"));
        assert_ne!(m, mac_of("3f2a9c02"));
        assert!(m.starts_with("02:") && m.len() == 17, "{m}");
        let first = u8::from_str_radix(&m[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "locally administered, unicast");
    }

    #[test]
    fn a_big_full_subnet_is_answered_in_one_pass() {
        let s = Subnet::parse("10.0.0.0/12").unwrap();
        let gw = gateway(s, None).unwrap();
        let used: BTreeSet<Ipv4Addr> = (2..=u32::from(s.broadcast()) - u32::from(s.network()) - 1)
            .map(|i| Ipv4Addr::from(u32::from(s.network()) + i))
            .collect();
        assert_eq!(allocate("big", s, gw, &used).unwrap_err().kind, ErrorKind::NoCapacity);
    }
}
