//! The volume driver interface (after cinder's `VolumeDriver`): block-storage volumes identified by name.

use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::panic::guard;
use crate::DriverError;

/// A volume as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Volume {
    /// The volume's name, unique within the driver.
    pub name: String,
    /// Provisioned size in bytes.
    pub size: u64,
    /// Bytes actually allocated on the backing store (less than `size` for sparse volumes).
    pub allocated: u64,
    /// Where the volume lives, in the driver's own terms (a file path, a LUN, `memory`).
    pub location: String,
    /// The volume this one was snapshotted from, if any.
    pub source: Option<String>,
}

/// Capacity of a volume backend.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityStats {
    /// Total capacity in bytes.
    pub total_bytes: u64,
    /// Free capacity in bytes.
    pub free_bytes: u64,
    /// Sum of the provisioned sizes of all volumes.
    pub provisioned_bytes: u64,
    /// Sum of the bytes actually allocated by all volumes.
    pub allocated_bytes: u64,
    /// Number of volumes (snapshots included).
    pub volumes: u64,
}

/// What a volume driver implements. Every method may be called from several threads at once.
///
/// Drivers keep as little state as they can: the host's manager keeps the records, serializes
/// conflicting operations on one volume and validates names and sizes before calling the driver.
pub trait VolumeDriver: Send + Sync + 'static {
    /// Called once after construction, before any other call. An error makes the service report down.
    fn init(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Called once when the host stops or retires the driver, after the last call.
    fn cleanup(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Called periodically; an error means the backend is unhealthy and says why.
    fn health(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Creates a volume of `size` bytes.
    fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError>;
    /// Deletes a volume.
    fn delete(&self, name: &str) -> Result<(), DriverError>;
    /// Grows a volume to `new_size` bytes (never shrinks).
    fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError>;
    /// Creates `snapshot`, a point-in-time copy of `name`, and returns it.
    fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError>;
    /// Every volume the backend holds.
    fn list(&self) -> Result<Vec<Volume>, DriverError>;
    /// One volume.
    fn get(&self, name: &str) -> Result<Volume, DriverError>;
    /// Backend capacity.
    fn stats(&self) -> Result<CapacityStats, DriverError>;
    /// Writes `data` at `offset`; returns the bytes written. Optional.
    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<u64, DriverError> {
        let _ = (offset, data);
        Err(DriverError::unsupported(format!("volume {name:?}: this driver does not support writes")))
    }
    /// Reads up to `len` bytes at `offset`. Optional.
    fn read_at(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, DriverError> {
        let _ = (offset, len);
        Err(DriverError::unsupported(format!("volume {name:?}: this driver does not support reads")))
    }
}

/// Stable-ABI mirror of [`Volume`].
#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiVolume {
    name: RString,
    size: u64,
    allocated: u64,
    location: RString,
    source: ROption<RString>,
}

impl From<Volume> for FfiVolume {
    fn from(v: Volume) -> FfiVolume {
        FfiVolume {
            name: v.name.into(),
            size: v.size,
            allocated: v.allocated,
            location: v.location.into(),
            source: v.source.map(RString::from).into(),
        }
    }
}

impl From<FfiVolume> for Volume {
    fn from(v: FfiVolume) -> Volume {
        Volume {
            name: v.name.into(),
            size: v.size,
            allocated: v.allocated,
            location: v.location.into(),
            source: v.source.into_option().map(String::from),
        }
    }
}

#[allow(non_local_definitions, missing_docs, clippy::undocumented_unsafe_blocks)]
pub(crate) mod ffi {
    use super::*;

    /// The stable-ABI trait object behind [`VolumeDriver`]. Methods are append-only: a new method goes
    /// after the one marked `last_prefix_field`, must have a default body, and older drivers then use
    /// that default.
    #[abi_stable::sabi_trait]
    pub trait VolumeDriverFfi: Send + Sync {
        fn init(&self) -> RResult<(), DriverError>;
        fn cleanup(&self) -> RResult<(), DriverError>;
        fn health(&self) -> RResult<(), DriverError>;
        fn create(&self, name: RStr<'_>, size: u64) -> RResult<FfiVolume, DriverError>;
        fn delete(&self, name: RStr<'_>) -> RResult<(), DriverError>;
        fn extend(&self, name: RStr<'_>, new_size: u64) -> RResult<FfiVolume, DriverError>;
        fn snapshot(&self, name: RStr<'_>, snapshot: RStr<'_>) -> RResult<FfiVolume, DriverError>;
        fn list(&self) -> RResult<RVec<FfiVolume>, DriverError>;
        fn get(&self, name: RStr<'_>) -> RResult<FfiVolume, DriverError>;
        fn stats(&self) -> RResult<CapacityStats, DriverError>;
        fn write_at(&self, name: RStr<'_>, offset: u64, data: RSlice<'_, u8>) -> RResult<u64, DriverError>;
        #[sabi(last_prefix_field)]
        fn read_at(&self, name: RStr<'_>, offset: u64, len: u64) -> RResult<RVec<u8>, DriverError>;
    }
}

pub(crate) use ffi::VolumeDriverFfi;
/// The boxed stable-ABI volume driver object that crosses the library boundary.
#[doc(hidden)]
pub type VolumeDriverBox = ffi::VolumeDriverFfi_TO<'static, abi_stable::std_types::RBox<()>>;

/// Plugin side: wraps an author's driver, turning every panic into [`crate::ErrorKind::PANICKED`].
pub(crate) struct VolumeAdapter<D>(pub(crate) D);

impl<D: VolumeDriver> VolumeDriverFfi for VolumeAdapter<D> {
    fn init(&self) -> RResult<(), DriverError> {
        guard(|| self.0.init())
    }
    fn cleanup(&self) -> RResult<(), DriverError> {
        guard(|| self.0.cleanup())
    }
    fn health(&self) -> RResult<(), DriverError> {
        guard(|| self.0.health())
    }
    fn create(&self, name: RStr<'_>, size: u64) -> RResult<FfiVolume, DriverError> {
        guard(|| self.0.create(name.as_str(), size).map(Into::into))
    }
    fn delete(&self, name: RStr<'_>) -> RResult<(), DriverError> {
        guard(|| self.0.delete(name.as_str()))
    }
    fn extend(&self, name: RStr<'_>, new_size: u64) -> RResult<FfiVolume, DriverError> {
        guard(|| self.0.extend(name.as_str(), new_size).map(Into::into))
    }
    fn snapshot(&self, name: RStr<'_>, snapshot: RStr<'_>) -> RResult<FfiVolume, DriverError> {
        guard(|| self.0.snapshot(name.as_str(), snapshot.as_str()).map(Into::into))
    }
    fn list(&self) -> RResult<RVec<FfiVolume>, DriverError> {
        guard(|| self.0.list().map(|v| v.into_iter().map(Into::into).collect()))
    }
    fn get(&self, name: RStr<'_>) -> RResult<FfiVolume, DriverError> {
        guard(|| self.0.get(name.as_str()).map(Into::into))
    }
    fn stats(&self) -> RResult<CapacityStats, DriverError> {
        guard(|| self.0.stats())
    }
    fn write_at(&self, name: RStr<'_>, offset: u64, data: RSlice<'_, u8>) -> RResult<u64, DriverError> {
        guard(|| self.0.write_at(name.as_str(), offset, data.as_slice()))
    }
    fn read_at(&self, name: RStr<'_>, offset: u64, len: u64) -> RResult<RVec<u8>, DriverError> {
        guard(|| self.0.read_at(name.as_str(), offset, len).map(RVec::from))
    }
}

/// Host side: a constructed volume driver from a loaded library, with the author's std-typed API.
///
/// Every call is a plain function-pointer call into the library; arguments are passed by reference
/// (a `&[u8]` crosses as a pointer and a length, without copying).
pub struct VolumeClient {
    inner: VolumeDriverBox,
}

impl std::fmt::Debug for VolumeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeClient")
    }
}

impl VolumeClient {
    pub(crate) fn new(inner: VolumeDriverBox) -> VolumeClient {
        VolumeClient { inner }
    }
    /// Wraps a driver compiled into this process (tests, benchmarks, statically linked drivers).
    pub fn in_process<D: VolumeDriver>(driver: D) -> VolumeClient {
        VolumeClient::new(ffi::VolumeDriverFfi_TO::from_value(VolumeAdapter(driver), abi_stable::sabi_trait::TD_Opaque))
    }
    /// See [`VolumeDriver::init`].
    pub fn init(&self) -> Result<(), DriverError> {
        self.inner.init().into_result()
    }
    /// See [`VolumeDriver::cleanup`].
    pub fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.cleanup().into_result()
    }
    /// See [`VolumeDriver::health`].
    pub fn health(&self) -> Result<(), DriverError> {
        self.inner.health().into_result()
    }
    /// See [`VolumeDriver::create`].
    pub fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {
        self.inner.create(name.into(), size).into_result().map(Into::into)
    }
    /// See [`VolumeDriver::delete`].
    pub fn delete(&self, name: &str) -> Result<(), DriverError> {
        self.inner.delete(name.into()).into_result()
    }
    /// See [`VolumeDriver::extend`].
    pub fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {
        self.inner.extend(name.into(), new_size).into_result().map(Into::into)
    }
    /// See [`VolumeDriver::snapshot`].
    pub fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
        self.inner.snapshot(name.into(), snapshot.into()).into_result().map(Into::into)
    }
    /// See [`VolumeDriver::list`].
    pub fn list(&self) -> Result<Vec<Volume>, DriverError> {
        self.inner.list().into_result().map(|v| v.into_iter().map(Into::into).collect())
    }
    /// See [`VolumeDriver::get`].
    pub fn get(&self, name: &str) -> Result<Volume, DriverError> {
        self.inner.get(name.into()).into_result().map(Into::into)
    }
    /// See [`VolumeDriver::stats`].
    pub fn stats(&self) -> Result<CapacityStats, DriverError> {
        self.inner.stats().into_result()
    }
    /// See [`VolumeDriver::write_at`].
    pub fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<u64, DriverError> {
        self.inner.write_at(name.into(), offset, data.into()).into_result()
    }
    /// See [`VolumeDriver::read_at`].
    pub fn read_at(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, DriverError> {
        self.inner.read_at(name.into(), offset, len).into_result().map(RVec::into_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Records where the data it is given lives.
    struct Recorder(Arc<AtomicUsize>);

    impl VolumeDriver for Recorder {
        fn create(&self, _: &str, _: u64) -> Result<Volume, DriverError> {
            Err(DriverError::unsupported("test"))
        }
        fn delete(&self, _: &str) -> Result<(), DriverError> {
            Err(DriverError::unsupported("test"))
        }
        fn extend(&self, _: &str, _: u64) -> Result<Volume, DriverError> {
            Err(DriverError::unsupported("test"))
        }
        fn snapshot(&self, _: &str, _: &str) -> Result<Volume, DriverError> {
            Err(DriverError::unsupported("test"))
        }
        fn list(&self) -> Result<Vec<Volume>, DriverError> {
            Err(DriverError::unsupported("test"))
        }
        fn get(&self, _: &str) -> Result<Volume, DriverError> {
            Err(DriverError::unsupported("test"))
        }
        fn stats(&self) -> Result<CapacityStats, DriverError> {
            Err(DriverError::unsupported("test"))
        }
        fn write_at(&self, _: &str, _: u64, data: &[u8]) -> Result<u64, DriverError> {
            self.0.store(data.as_ptr() as usize, Ordering::SeqCst);
            Ok(data.len() as u64)
        }
    }

    #[test]
    fn buffers_cross_the_stable_abi_without_copying() {
        let seen = Arc::new(AtomicUsize::new(0));
        let client = VolumeClient::in_process(Recorder(seen.clone()));
        let buf = vec![1u8; 4096];
        assert_eq!(client.write_at("v", 0, &buf), Ok(4096));
        assert_eq!(seen.load(Ordering::SeqCst), buf.as_ptr() as usize, "the driver saw the caller's own bytes");
        // Optional methods an older driver lacks answer `unsupported`.
        assert_eq!(client.read_at("v", 0, 1).unwrap_err().kind(), crate::ErrorKind::UNSUPPORTED);
    }
}
