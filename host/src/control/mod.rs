//! The control plane: the wire types (`protocol`), the socket server, the `ctl` client (local, or a
//! remote host through the fleet: `fleet`; a driver rolled through the fleet: `rollout`), and the audit
//! log of what was asked.

pub(crate) mod audit;
pub mod ctl;
pub mod fleet;
pub mod outcome;
pub mod protocol;
pub mod request;
pub mod rollout;
pub(crate) mod server;
pub(crate) mod status;
