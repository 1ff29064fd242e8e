//! The plughost host library: the loader, managers, services and the control socket.
//!
//! The `plughost` binary is a thin command-line layer over this crate; see `ARCHITECTURE.md`.

pub mod drivers;
pub mod elf;
pub mod error;
pub mod loader;

pub use error::{LoadError, LoadErrorKind};
pub use loader::{Library, Loader};
pub mod backend;
pub mod config;
pub mod ctl;
pub mod managers;
pub mod rcu;
pub mod runtime;
pub mod stats;
