//! plughost's fleet: every host's control requests on NATS subjects, the services table of host reports
//! in a JetStream key-value bucket, and placement over it.
//!
//! This is the only crate that names tokio or async-nats. The host talks to it through plain threads and
//! one trait:
//!
//! - [`Agent`] (a host's side): one OS thread runs a current-thread runtime holding the one broker
//!   connection. Requests on the host's subjects go through a bounded queue to a pool of OS threads that
//!   call the host's [`Responder`], the same request handler as the Unix socket; a full queue answers
//!   `busy` at once, and a request past its `Plughost-Deadline` is answered `timeout` without running.
//!   Every `report_interval`, and at once when asked ([`Agent::report_now`]) or after reconnecting, the
//!   host's report goes into the bucket `ph_<fleet>_hosts` under its host name.
//! - [`Client`] (an operator's side): blocking calls for `ctl --host`, `fleet status` and `place`.
//! - [`subject`], [`report`] and [`place`]: the subjects and headers, the report's schema, and the
//!   scheduler's filters and weighers (plain code, no broker).
//!
//! Without fleet settings the host never builds an [`Agent`]: no thread starts and nothing changes.

mod agent;
mod bucket;
mod client;
pub mod names;
pub mod place;
pub mod report;
mod settings;
pub mod subject;

pub use agent::{Agent, AgentStatus, Incoming, Responder};
pub use client::{Client, ClientError, Echo, HostEntry, Versioned};
pub use settings::{check_url, Credentials, FleetSettings};
