//! The contract between the plughost host and its driver plugins.
//!
//! A driver is a `cdylib` crate that depends on this crate only. It implements [`VolumeDriver`] or
//! [`ComputeDriver`] with ordinary Rust types, declares its options, and exports itself with
//! [`export_driver!`]. A complete driver:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Mutex;
//! use plughost_api::{CapacityStats, DriverError, OptionSpec, Options, Volume, VolumeDriver};
//!
//! const OPTIONS: &[OptionSpec] = &[OptionSpec::size("capacity", "total space").default("1GiB")];
//!
//! struct Tiny { capacity: u64, volumes: Mutex<BTreeMap<String, u64>> }
//!
//! impl Tiny {
//!     fn new(options: &Options) -> Result<Tiny, DriverError> {
//!         Ok(Tiny { capacity: options.size("capacity")?, volumes: Mutex::new(BTreeMap::new()) })
//!     }
//!     fn volume(name: &str, size: u64) -> Volume {
//!         Volume { name: name.into(), size, location: "memory".into(), ..Volume::default() }
//!     }
//!     fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, u64>>, DriverError> {
//!         self.volumes.lock().map_err(|_| DriverError::internal("lock poisoned"))
//!     }
//! }
//!
//! impl VolumeDriver for Tiny {
//!     fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {
//!         let mut v = self.lock()?;
//!         if v.contains_key(name) { return Err(DriverError::already_exists(format!("volume {name:?} exists"))); }
//!         let used: u64 = v.values().sum();
//!         if used + size > self.capacity { return Err(DriverError::no_capacity(format!("volume {name:?}: full"))); }
//!         v.insert(name.into(), size);
//!         Ok(Tiny::volume(name, size))
//!     }
//!     fn delete(&self, name: &str) -> Result<(), DriverError> {
//!         self.lock()?.remove(name).map(drop).ok_or_else(|| DriverError::not_found(format!("volume {name:?} not found")))
//!     }
//!     fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {
//!         let mut v = self.lock()?;
//!         let size = v.get_mut(name).ok_or_else(|| DriverError::not_found(format!("volume {name:?} not found")))?;
//!         if new_size < *size { return Err(DriverError::invalid_argument(format!("volume {name:?}: cannot shrink"))); }
//!         *size = new_size;
//!         Ok(Tiny::volume(name, new_size))
//!     }
//!     fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
//!         let size = self.get(name)?.size;
//!         self.create(snapshot, size).map(|s| Volume { source: Some(name.into()), ..s })
//!     }
//!     fn list(&self) -> Result<Vec<Volume>, DriverError> {
//!         Ok(self.lock()?.iter().map(|(n, s)| Tiny::volume(n, *s)).collect())
//!     }
//!     fn get(&self, name: &str) -> Result<Volume, DriverError> {
//!         let v = self.lock()?;
//!         v.get(name).map(|s| Tiny::volume(name, *s)).ok_or_else(|| DriverError::not_found(format!("volume {name:?} not found")))
//!     }
//!     fn stats(&self) -> Result<CapacityStats, DriverError> {
//!         let used: u64 = self.lock()?.values().sum();
//!         Ok(CapacityStats { total_bytes: self.capacity, free_bytes: self.capacity - used, ..Default::default() })
//!     }
//! }
//!
//! plughost_api::export_driver! {
//!     kind: volume,
//!     driver: Tiny,
//!     name: "tiny-volume",
//!     version: "0.1.0",
//!     summary: "volumes that live in memory",
//!     options: OPTIONS,
//!     new: Tiny::new,
//! }
//! # fn main() {}
//! ```
//!
//! # Depending on this crate
//! The package is `plughost-api` (library `plughost_api`). It is not on crates.io yet: `plughost new`
//! lays the exact source its host was built with down next to a new driver (`vendor/plughost-api`) and
//! patches it in, and `plughost api-source DIR` writes it anywhere; once it is published, deleting the
//! patch is the only change. On crates.io, `plugin_api` and `plughost` are unrelated projects. A
//! driver's `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # cdylib: the driver; rlib: so that its own tests can use it
//!
//! [dependencies]
//! plughost-api = "1.2"
//!
//! [dev-dependencies]
//! plughost-api = { version = "1.2", features = ["testing"] }   # conformance suite, TestHost
//!
//! [patch.crates-io]   # until plughost-api is on crates.io
//! plughost-api = { path = "vendor/plughost-api" }
//! ```
//!
//! To pin a release from git instead: `{ git = "https://github.com/plughost/plughost", rev = "..." }` with
//! the commit that `RELEASES` lists for it.
//!
//! # Rules a driver must follow
//! - Build as a `cdylib` with `panic = "unwind"` (the default); hosts refuse `panic = "abort"` builds,
//!   whose panics could not be contained.
//! - Methods are called concurrently from several threads; use interior locking.
//! - Return errors, don't panic. A panic is caught inside the plugin and reported as
//!   [`ErrorKind::PANICKED`], but the driver's state may then be inconsistent.
//! - Don't rely on being unloaded: libraries stay mapped until the host exits.
//!
//! # Compatibility promise
//! The plugin API version a driver was built against is recorded in the library and checked by the host
//! before any driver code runs, followed by a check of the layout of every type in the interface.
//! - Same major version (`1.x` host, `1.y` driver): loads, whichever is newer. A newer host asks an older
//!   driver for the methods added since and answers with their documented default (`unsupported`) when
//!   the driver lacks them; an older host ignores what a newer driver adds. How: the evolution rules in
//!   the [`interface`] module.
//! - Different major version: refused, naming both versions.
//!
//! What each released host does with each released driver (`tests/tests/integration/compat.rs` builds every
//! release listed in `RELEASES` from the repository's history, runs each host with each driver, and
//! checks this table; "revert" is the method 1.1.0 added):
//!
//! <!-- compat-table -->
//! | driver built against | host 1.0.0 | host 1.1.0 | host 1.2.0 |
//! |---|---|---|---|
//! | 1.0.0 | loads, revert not offered by this host | loads, revert answers unsupported | loads, revert answers unsupported |
//! | 1.1.0 | loads, revert not offered by this host | loads, revert works | loads, revert works |
//! | 1.2.0 | loads, revert not offered by this host | loads, revert works | loads, revert works |
//!
//! - A driver built against a modified copy of this crate under the same version: refused as a layout
//!   mismatch, naming the differing type and field.
//! - A driver built with a different abi_stable ABI (0.10 and older): refused.

#![deny(missing_docs)]

mod compute;
mod error;
#[cfg(feature = "host")]
pub mod host;
pub mod interface;
mod module;
mod network;
mod options;
mod panic;
#[cfg(feature = "testing")]
pub mod testing;
mod volume;

#[cfg(feature = "host")]
pub use compute::{ComputeCall, ComputeInterface, ComputeMethod, ComputeReply, RemoteCompute};
pub use compute::{ComputeClient, ComputeDriver, Instance, InstanceSpec, InstanceState};
pub use error::{check_name, DriverError, ErrorKind};
pub use module::DriverKind;
#[doc(hidden)]
pub use module::{__private, DriverModule, DriverModuleRef, RawOptions};
pub use options::{expand_placeholders, parse_bool, parse_size, OptionSpec, OptionType, Options};

/// Host side: `plughost_api::host::validate` (feature `host`). Hidden here, removed from the root in 2.0.
#[doc(hidden)]
#[deprecated(
    since = "1.2.0",
    note = "host side: use plughost_api::host::validate (feature `host`), or testing::TestHost::options in a driver's tests"
)]
pub fn validate(schema: &[OptionSpec], given: &[(String, String)]) -> Result<Options, Vec<options::OptionError>> {
    options::validate(schema, given)
}

/// Host side: `plughost_api::host::normalize_value` (feature `host`). Hidden here, removed from the root
/// in 2.0.
#[doc(hidden)]
#[deprecated(since = "1.2.0", note = "host side: use plughost_api::host::normalize_value (feature `host`)")]
pub fn normalize_value(ty: OptionType, raw: &str) -> Result<String, String> {
    options::normalize_value(ty, raw)
}

/// Host side: `plughost_api::host::OptionError` (feature `host`). Hidden here, removed from the root in
/// 2.0.
#[doc(hidden)]
#[deprecated(since = "1.2.0", note = "host side: use plughost_api::host::OptionError (feature `host`)")]
pub type OptionError = options::OptionError;
pub use network::{Network, NetworkClient, NetworkDriver, NetworkSpec, NetworkStats, Port, PortSpec};
#[cfg(feature = "host")]
pub use network::{NetworkCall, NetworkInterface, NetworkMethod, NetworkReply, RemoteNetwork};
pub use volume::{CapacityStats, Volume, VolumeClient, VolumeDriver};
#[cfg(feature = "host")]
pub use volume::{RemoteVolume, VolumeCall, VolumeInterface, VolumeMethod, VolumeReply};

/// The version of the plugin API a library was built against (this crate's version).
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

// The driver kinds. Adding one: its interface file (`mod`, `pub use` above), a line in `KINDS` and a
// line in `kinds`; see "Adding a driver kind" in ARCHITECTURE.md.

/// The registry of kinds: what the host checks a library's kind and interface layout against.
const KINDS: &[module::KindInfo] = &[
    module::KindInfo::of(volume::__kind::KIND, volume::__kind::NAME, volume::__kind::LAYOUT, volume::__kind::PARAMS),
    module::KindInfo::of(
        compute::__kind::KIND,
        compute::__kind::NAME,
        compute::__kind::LAYOUT,
        compute::__kind::PARAMS,
    ),
    module::KindInfo::of(
        network::__kind::KIND,
        network::__kind::NAME,
        network::__kind::LAYOUT,
        network::__kind::PARAMS,
    ),
];

/// The kinds by the name `export_driver!` takes (`kind: volume`).
#[doc(hidden)]
pub mod kinds {
    pub use crate::compute::__kind as compute;
    pub use crate::network::__kind as network;
    pub use crate::volume::__kind as volume;
}
