//! The running host: the composition root. Builds the services of the service table from the
//! settings, dispatches typed requests to them, assembles status, swaps and reloads backends, runs the
//! periodic tasks, and stops gracefully. The socket itself is `control/server.rs`'s.
//!
//! Files: `host` (composition, dispatch, status, periodic work), `reload` (swap, restart, reload),
//! `run` (serving, signals, stop), `fleet` (remote requests checked against their subject, the report),
//! `notify` (systemd readiness, status, reload, stop and watchdog notifications), `metrics`
//! (OpenMetrics text, the opt-in HTTP listener).

mod fleet;
mod host;
mod metrics;
mod notify;
mod reload;
mod run;

pub use host::Host;
pub use run::{run, Running, STOP_MARGIN};
