//! Every integration test, in one binary (ripgrep's pattern): the host and the test support link once,
//! not once per area. Run one area with `cargo test --test integration loader::`.
//!
//! Areas: `loader` (every rejection kind), `service` (flags, config, ctl), `swap` (live swap), `protocol`
//! (the documented wire), `durability` (kill -9 at any instant), `instances` (outliving the host),
//! `isolation` (worker faults), `trust` (a second user), `authoring` (`check`, `new`, packaging),
//! `compat` (every released host against every released driver), `architecture` (no import cycle),
//! `network` (the network service), `fleet` (hosts on a real broker), `rollout` (drivers rolled through a fleet), `operator` (systemd,
//! health, metrics, packaging).
#![allow(clippy::unwrap_used)]

mod architecture;
mod authoring;
mod compat;
mod durability;
mod fleet;
mod instances;
mod isolation;
mod loader;
mod network;
mod operator;
mod protocol;
mod rollout;
mod service;
mod swap;
mod trust;
