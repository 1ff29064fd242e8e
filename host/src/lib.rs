//! The plughost host library: the loader, services, backends and the control socket.
//!
//! The `plughost` binary is a thin command-line layer over this crate; see `ARCHITECTURE.md`. This
//! library is not a stable API (plughost-api is): it exports what the binary, the tests and the
//! benchmarks use. Folders are layers, bottom up: `util` (leaf helpers), `loading` (trust, ELF checks,
//! the loader, the sandbox, driver directories), `control::protocol` (the wire types), `backend` (one
//! driver behind a swap-safe cell), `worker` (isolated backends), `state` (the state database),
//! `services` (policy and records per kind), `config`, `control` (socket, `ctl`, audit), `runtime`
//! (composition, reload, run), `authoring` (`check`, `new`).

#![warn(unreachable_pub)]

pub mod authoring;
pub mod backend;
pub mod config;
pub mod control;
pub mod loading;
pub mod runtime;
pub mod services;
pub(crate) mod state;
pub(crate) mod util;
pub mod worker;

pub use loading::error::{LoadError, LoadErrorKind};
pub use loading::loader::{Library, Loader};
