//! The control plane: the wire types (`protocol`), the socket server, the `ctl` client, and the audit
//! log of what was asked.

pub mod audit;
pub mod ctl;
pub mod protocol;
pub mod request;
pub mod server;
pub mod status;
