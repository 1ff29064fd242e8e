//! The table of service kinds: the one place that names every kind. Configuration, `run` flags,
//! `ctl`, the socket and the worker derive their per-kind parts from it. (Apart from `services/mod.rs`,
//! which the kinds build on, so that no module both defines what a kind is and lists the kinds.)

use super::{compute, network, volume, ServiceKind};

/// Every kind of service, in the order they start and appear in status.
pub static KINDS: &[&ServiceKind] = &[&volume::KIND, &compute::KIND, &network::KIND];

/// A registered kind by name.
pub fn kind(name: &str) -> Option<&'static ServiceKind> {
    KINDS.iter().copied().find(|k| k.name == name)
}
