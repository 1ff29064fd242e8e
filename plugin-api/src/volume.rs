//! The volume driver interface (after cinder's `VolumeDriver`): block-storage volumes identified by name.

use abi_stable::std_types::{ROption, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::interface::{driver_interface, record_conversions};

/// A volume as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
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
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
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

impl crate::interface::Ret for CapacityStats {
    type Ffi = CapacityStats;
    fn into_ffi(self) -> CapacityStats {
        self
    }
    fn from_ffi(ffi: CapacityStats) -> CapacityStats {
        ffi
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

record_conversions!(Volume => FfiVolume);

driver_interface! {
    /// What a volume driver implements. Every method may be called from several threads at once.
    ///
    /// Drivers keep as little state as they can: the host's volume service keeps the records,
    /// serializes conflicting operations on one volume and validates names and sizes before calling the
    /// driver. Errors name the volume (`volume "v1" not found`) and use the kinds the contract requires:
    /// `not_found` for a volume that does not exist, `already_exists` for a name in use,
    /// `invalid_argument` for a shrink or a size over the driver's limit, `no_capacity` when full.
    kind volume = 1, "volume": VolumeDriver, VolumeClient, VolumeAdapter, VolumeDriverFfi, VolumeDriverFfi_TO;
    host VolumeInterface, VolumeCall, VolumeReply, RemoteVolume, VolumeMethod;
    methods {
        /// Creates a volume of `size` bytes.
        fn create(name: &str => RStr<'_>, String, size: u64 => u64, u64) -> Volume => FfiVolume;
        /// Deletes a volume.
        fn delete(name: &str => RStr<'_>, String) -> () => ();
        /// Grows a volume to `new_size` bytes; a smaller size is `invalid_argument`.
        fn extend(name: &str => RStr<'_>, String, new_size: u64 => u64, u64) -> Volume => FfiVolume;
        /// Creates `snapshot`, a point-in-time copy of `name`, and returns it (with `source` = `name`).
        fn snapshot(name: &str => RStr<'_>, String, snapshot: &str => RStr<'_>, String) -> Volume => FfiVolume;
        /// Every volume the backend holds.
        fn list() -> Vec<Volume> => RVec<FfiVolume>;
        /// One volume.
        fn get(name: &str => RStr<'_>, String) -> Volume => FfiVolume;
        /// Backend capacity.
        fn stats() -> CapacityStats => CapacityStats;
        /// Writes `data` at `offset`; returns the bytes written. Optional.
        fn write_at(name: &str => RStr<'_>, String, offset: u64 => u64, u64, data: &[u8] => RSlice<'_, u8>, Vec<u8>)
            -> u64 => u64, default {
            let _ = (offset, data);
            Err(crate::DriverError::unsupported(format!("volume {name:?}: this driver does not support writes")))
        };
        /// Reads up to `len` bytes at `offset`. Optional.
        fn read_at(name: &str => RStr<'_>, String, offset: u64 => u64, u64, len: u64 => u64, u64)
            -> Vec<u8> => RVec<u8>, default {
            let _ = (offset, len);
            Err(crate::DriverError::unsupported(format!("volume {name:?}: this driver does not support reads")))
        };
    }
    extensions {
        /// Added in 1.1.0: revert to a snapshot (cinder's revert-to-snapshot).
        "volume.revert" => VolumeRevertFfi, VolumeRevertFfi_TO, revert {
            /// Restores volume `name` to the content and size of `snapshot`, a snapshot taken of it, and
            /// returns the volume; the snapshot is kept. `not_found` if either is missing,
            /// `invalid_argument` if `snapshot` is not a snapshot of `name`. Optional (added in 1.1.0):
            /// a driver without it, or built against 1.0, answers `unsupported`.
            fn revert(name: &str => RStr<'_>, String, snapshot: &str => RStr<'_>, String) -> Volume => FfiVolume, default {
                let _ = snapshot;
                Err(crate::DriverError::unsupported(format!("volume {name:?}: this driver does not support revert")))
            };
        }
        /// Added in 1.2.0: the listing in pages.
        "volume.list_after" => VolumeListAfterFfi, VolumeListAfterFfi_TO, list_after {
            /// The volumes whose names sort after `after` (byte order; `""` for the first page), in name
            /// order, at most `limit` of them: fewer than `limit` means there are no more. The host
            /// reconciles a backend page by page with it, serving requests between pages, and never
            /// needs the whole listing at once. Optional (added in 1.2.0): without it the host calls
            /// `list`, which for very many volumes may be more than an isolated worker may send in one
            /// answer (`max_frame_bytes`).
            fn list_after(after: &str => RStr<'_>, String, limit: u64 => u64, u64) -> Vec<Volume> => RVec<FfiVolume>, default {
                let _ = (after, limit);
                Err(crate::DriverError::unsupported("this driver does not list volumes in pages"))
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DriverError;
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
        // Optional methods a driver does not implement answer `unsupported`.
        assert_eq!(client.read_at("v", 0, 1).unwrap_err().kind(), crate::ErrorKind::UNSUPPORTED);
    }
}
