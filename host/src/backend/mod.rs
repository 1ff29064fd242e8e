//! A backend: one constructed driver serving a service, swappable while serving, with its health and
//! per-method call statistics. One type for every driver kind (`Backend<I>` over the plugin API's
//! [`Interface`](plughost_api::host::Interface)); services reach drivers only through [`Backend::call`].
//!
//! Files: `health` (whether it serves), `prepare` (resolving, loading, constructing and initialising a
//! driver, in this process or a worker), `call` (the backend: its active driver in an RCU cell, calls,
//! the first init), `swap` (what the host does with any backend: swap, restart, status, health checks,
//! retirement of an old driver), `settings`, `rcu`, `stats`.

mod call;
mod health;
mod prepare;
pub(crate) mod rcu;
pub mod settings;
pub mod stats;
mod swap;

pub use call::Backend;
pub use health::{Health, HealthCell};
pub use prepare::{Active, BackendCause, BackendError, BuildContext, Configured, Driver, DriverInfo};
pub use settings::{BackendSettings, BackendSpec, Isolation};
pub use swap::BackendControl;
