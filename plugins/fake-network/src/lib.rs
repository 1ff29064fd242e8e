//! `fake-network`: networks and ports that exist only in memory. Complete (every method keeps the
//! contract on its own state, idempotency included) and needs no privileges: it backs the network
//! service's tests and the conformance suite, and shows the shape of a network driver.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use plughost_api::{
    DriverError, Network, NetworkDriver, NetworkSpec, NetworkStats, OptionSpec, Options, Port, PortSpec,
};

/// The options this driver takes.
pub const OPTIONS: &[OptionSpec] =
    &[OptionSpec::integer("max_ports", "how many ports may be attached at once").default("10000")];

#[derive(Default)]
struct State {
    networks: BTreeMap<String, NetworkSpec>,
    ports: BTreeMap<String, PortSpec>,
}

/// The driver.
pub struct FakeNetwork {
    max_ports: usize,
    state: Mutex<State>,
}

impl FakeNetwork {
    /// Builds the driver from validated options.
    pub fn new(options: &Options) -> Result<FakeNetwork, DriverError> {
        let max = options.integer("max_ports")?;
        let max_ports = usize::try_from(max).map_err(|_| {
            DriverError::invalid_argument(format!("option \"max_ports\": must not be negative, got {max}"))
        })?;
        Ok(FakeNetwork { max_ports, state: Mutex::new(State::default()) })
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, DriverError> {
        self.state.lock().map_err(|_| DriverError::internal("fake-network state lock poisoned by an earlier panic"))
    }
}

fn network(s: &NetworkSpec) -> Network {
    Network {
        name: s.name.clone(),
        cidr: s.cidr.clone(),
        gateway: s.gateway.clone(),
        interface: "memory".to_owned(),
        details: Vec::new(),
    }
}

fn port(s: &PortSpec) -> Port {
    Port {
        id: s.id.clone(),
        network: s.network.clone(),
        address: s.address.clone(),
        mac: s.mac.clone(),
        ifname: s.ifname.clone(),
        netns: s.netns.clone(),
        host_interface: "memory".to_owned(),
    }
}

impl NetworkDriver for FakeNetwork {
    fn create_network(&self, spec: &NetworkSpec) -> Result<Network, DriverError> {
        let mut st = self.lock()?;
        match st.networks.get(&spec.name) {
            Some(have) if have == spec => Ok(network(have)),
            Some(have) => Err(DriverError::already_exists(format!(
                "network {:?} already exists with subnet {}",
                spec.name, have.cidr
            ))),
            None => {
                st.networks.insert(spec.name.clone(), spec.clone());
                Ok(network(spec))
            }
        }
    }

    fn delete_network(&self, name: &str) -> Result<(), DriverError> {
        let mut st = self.lock()?;
        let ports = st.ports.values().filter(|p| p.network == name).count();
        if ports > 0 {
            return Err(DriverError::busy(format!("network {name:?} has {ports} port(s) attached")));
        }
        st.networks.remove(name);
        Ok(())
    }

    fn attach(&self, spec: &PortSpec) -> Result<Port, DriverError> {
        let mut st = self.lock()?;
        if let Some(have) = st.ports.get(&spec.id) {
            return match have == spec {
                true => Ok(port(have)),
                false => Err(DriverError::already_exists(format!(
                    "port {:?} already exists on network {:?} at {}",
                    spec.id, have.network, have.address
                ))),
            };
        }
        if !st.networks.contains_key(&spec.network) {
            return Err(DriverError::not_found(format!("network {:?} not found", spec.network)));
        }
        if st.ports.len() >= self.max_ports {
            return Err(DriverError::no_capacity(format!("{} ports attached (max_ports)", self.max_ports)));
        }
        st.ports.insert(spec.id.clone(), spec.clone());
        Ok(port(spec))
    }

    fn detach(&self, id: &str) -> Result<(), DriverError> {
        self.lock()?.ports.remove(id);
        Ok(())
    }

    fn list_networks(&self) -> Result<Vec<Network>, DriverError> {
        Ok(self.lock()?.networks.values().map(network).collect())
    }

    fn list_attachments(&self) -> Result<Vec<Port>, DriverError> {
        Ok(self.lock()?.ports.values().map(port).collect())
    }

    fn stats(&self) -> Result<NetworkStats, DriverError> {
        let st = self.lock()?;
        Ok(NetworkStats { networks: st.networks.len() as u64, ports: st.ports.len() as u64 })
    }
}

plughost_api::export_driver! {
    kind: network,
    driver: FakeNetwork,
    name: "fake-network",
    version: env!("CARGO_PKG_VERSION"),
    summary: "networks and ports kept in memory (for tests)",
    options: OPTIONS,
    new: FakeNetwork::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_the_conformance_suite() {
        let report = plughost_api::testing::check_network(&|| {
            let o = plughost_api::testing::TestHost::new().options(OPTIONS, &[]).expect("valid");
            Ok(Box::new(FakeNetwork::new(&o)?) as Box<dyn NetworkDriver>)
        });
        assert!(report.passed(), "{report}");
    }
}
