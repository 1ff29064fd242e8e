//! The contract between the plughost host and its driver plugins.
//!
//! A driver is a `cdylib` crate that depends on this crate only. It implements [`VolumeDriver`] or
//! [`ComputeDriver`] with ordinary Rust types, declares its options, and exports itself with
//! [`export_driver!`]. A complete driver:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Mutex;
//! use plugin_api::{CapacityStats, DriverError, OptionSpec, Options, Volume, VolumeDriver};
//!
//! const OPTIONS: &[OptionSpec] = &[OptionSpec::size("capacity", "total space").default("1GiB")];
//!
//! struct Tiny { capacity: u64, volumes: Mutex<BTreeMap<String, u64>> }
//!
//! impl Tiny {
//!     fn new(options: &Options) -> Result<Tiny, DriverError> {
//!         let capacity = options.size("capacity")?.unwrap_or(1 << 30);
//!         Ok(Tiny { capacity, volumes: Mutex::new(BTreeMap::new()) })
//!     }
//!     fn volume(name: &str, size: u64) -> Volume {
//!         Volume { name: name.into(), size, location: "memory".into(), ..Volume::default() }
//!     }
//! }
//!
//! impl VolumeDriver for Tiny {
//!     fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {
//!         let mut v = self.volumes.lock().map_err(|_| DriverError::internal("lock poisoned"))?;
//!         if v.contains_key(name) { return Err(DriverError::already_exists(format!("volume {name:?} exists"))); }
//!         v.insert(name.into(), size);
//!         Ok(Tiny::volume(name, size))
//!     }
//!     fn delete(&self, name: &str) -> Result<(), DriverError> {
//!         let mut v = self.volumes.lock().map_err(|_| DriverError::internal("lock poisoned"))?;
//!         v.remove(name).map(drop).ok_or_else(|| DriverError::not_found(format!("volume {name:?} not found")))
//!     }
//!     fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {
//!         let mut v = self.volumes.lock().map_err(|_| DriverError::internal("lock poisoned"))?;
//!         let size = v.get_mut(name).ok_or_else(|| DriverError::not_found(format!("volume {name:?} not found")))?;
//!         *size = new_size.max(*size);
//!         Ok(Tiny::volume(name, *size))
//!     }
//!     fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
//!         let size = self.get(name)?.size;
//!         self.create(snapshot, size).map(|s| Volume { source: Some(name.into()), ..s })
//!     }
//!     fn list(&self) -> Result<Vec<Volume>, DriverError> {
//!         let v = self.volumes.lock().map_err(|_| DriverError::internal("lock poisoned"))?;
//!         Ok(v.iter().map(|(n, s)| Tiny::volume(n, *s)).collect())
//!     }
//!     fn get(&self, name: &str) -> Result<Volume, DriverError> {
//!         let v = self.volumes.lock().map_err(|_| DriverError::internal("lock poisoned"))?;
//!         v.get(name).map(|s| Tiny::volume(name, *s)).ok_or_else(|| DriverError::not_found(format!("volume {name:?} not found")))
//!     }
//!     fn stats(&self) -> Result<CapacityStats, DriverError> {
//!         let used: u64 = self.list()?.iter().map(|v| v.size).sum();
//!         Ok(CapacityStats { total_bytes: self.capacity, free_bytes: self.capacity.saturating_sub(used), ..Default::default() })
//!     }
//! }
//!
//! plugin_api::export_driver! {
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
//! # Rules a driver must follow
//! - Build as `crate-type = ["cdylib"]` with `panic = "unwind"` (the default); hosts refuse `panic = "abort"`
//!   builds, whose panics could not be contained.
//! - Methods are called concurrently from several threads; use interior locking.
//! - Return errors, don't panic. A panic is caught inside the plugin and reported as
//!   [`ErrorKind::PANICKED`], but the driver's state may then be inconsistent.
//! - Don't rely on being unloaded: libraries stay mapped until the host exits.
//!
//! # Compatibility promise
//! The plugin-api version a driver was built against is recorded in the library and checked by the host
//! before any driver code runs, followed by a check of the layout of every type in the interface.
//! - Same major version (`1.x` host, `1.y` driver): loads, whichever is newer. Minor versions only append
//!   (see the evolution rules in the `module` source); a newer driver's extra methods are ignored by an
//!   older host, and an older driver's missing methods answer with their default (`unsupported`).
//! - Different major version: refused, naming both versions.
//! - A driver built against a modified copy of this crate under the same version: refused as a layout
//!   mismatch, naming the first differing type.
//! - A driver built with a different abi_stable ABI (0.10 and older): refused.

#![deny(missing_docs)]

mod compute;
mod error;
#[cfg(feature = "host")]
pub mod host;
mod module;
mod options;
mod panic;
mod volume;

pub use compute::{ComputeClient, ComputeDriver, Instance, InstanceSpec, InstanceState};
pub use error::{check_name, DriverError, ErrorKind};
pub use module::DriverKind;
#[doc(hidden)]
pub use module::{__private, DriverModule, DriverModuleRef, RawOptions};
pub use options::{normalize_value, parse_bool, parse_size, validate, OptionError, OptionSpec, OptionType, Options};
pub use volume::{CapacityStats, Volume, VolumeClient, VolumeDriver};
#[doc(hidden)]
pub use {compute::ComputeDriverBox, volume::VolumeDriverBox};

/// The version of plugin-api a library was built against (this crate's version).
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");
