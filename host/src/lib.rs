//! The plughost host library: the loader, services, backends and the control socket.
//!
//! The `plughost` binary is a thin command-line layer over this crate; see `ARCHITECTURE.md`. This
//! library is not a stable API (plughost-api is): it exports what the binary, the tests and the
//! benchmarks use.

pub mod audit;
pub mod backend;
pub mod check;
pub mod config;
pub mod ctl;
pub mod drivers;
pub mod elf;
pub mod error;
pub mod loader;
pub mod protocol;
pub(crate) mod rcu;
pub mod runtime;
pub mod sample;
pub mod sandbox;
pub mod scaffold;
pub mod server;
pub mod services;
pub mod state;
pub mod stats;
pub mod trust;
pub(crate) mod util;
pub mod worker;

pub use error::{LoadError, LoadErrorKind};
pub use loader::{Library, Loader};
