//! `fake-volume`: volumes that live in memory. Complete (every method works on its own state), for tests
//! and as the smallest real example of a volume driver.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use plughost_api::{CapacityStats, DriverError, OptionSpec, Options, Volume, VolumeDriver};

/// The options this driver takes.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::size("capacity", "total capacity; creating or extending past it fails").default("100GiB"),
    OptionSpec::string("label", "free text shown in each volume's location").default("memory"),
];

struct Vol {
    size: u64,
    data: Vec<u8>,
    source: Option<String>,
}

/// The driver.
pub struct FakeVolume {
    capacity: u64,
    label: String,
    volumes: Mutex<BTreeMap<String, Vol>>,
}

impl FakeVolume {
    /// Builds the driver from validated options.
    pub fn new(options: &Options) -> Result<FakeVolume, DriverError> {
        Ok(FakeVolume {
            capacity: options.size("capacity")?,
            label: options.string("label")?,
            volumes: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, BTreeMap<String, Vol>>, DriverError> {
        self.volumes.lock().map_err(|_| DriverError::internal("fake-volume state lock poisoned by an earlier panic"))
    }

    fn info(&self, name: &str, v: &Vol) -> Volume {
        Volume {
            name: name.to_owned(),
            size: v.size,
            allocated: v.data.len() as u64,
            location: format!("{}:{name}", self.label),
            source: v.source.clone(),
        }
    }

    fn provisioned(map: &BTreeMap<String, Vol>) -> u64 {
        map.values().map(|v| v.size).sum()
    }

    fn ensure_room(&self, map: &BTreeMap<String, Vol>, extra: u64) -> Result<(), DriverError> {
        let used = Self::provisioned(map);
        if used.saturating_add(extra) > self.capacity {
            return Err(DriverError::no_capacity(format!(
                "fake-volume: {extra} more bytes requested, {} of {} free",
                self.capacity.saturating_sub(used),
                self.capacity
            )));
        }
        Ok(())
    }
}

fn not_found(name: &str) -> DriverError {
    DriverError::not_found(format!("volume {name:?} not found"))
}

impl VolumeDriver for FakeVolume {
    fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {
        let mut map = self.lock()?;
        if map.contains_key(name) {
            return Err(DriverError::already_exists(format!("volume {name:?} already exists")));
        }
        self.ensure_room(&map, size)?;
        let v = Vol { size, data: Vec::new(), source: None };
        let info = self.info(name, &v);
        map.insert(name.to_owned(), v);
        Ok(info)
    }

    fn delete(&self, name: &str) -> Result<(), DriverError> {
        self.lock()?.remove(name).map(drop).ok_or_else(|| not_found(name))
    }

    fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {
        let mut map = self.lock()?;
        let old = map.get(name).ok_or_else(|| not_found(name))?.size;
        if new_size < old {
            return Err(DriverError::invalid_argument(format!(
                "volume {name:?}: new size {new_size} is smaller than current size {old}"
            )));
        }
        self.ensure_room(&map, new_size - old)?;
        let v = map.get_mut(name).ok_or_else(|| not_found(name))?;
        v.size = new_size;
        Ok(self.info(name, v))
    }

    fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
        let mut map = self.lock()?;
        if map.contains_key(snapshot) {
            return Err(DriverError::already_exists(format!("volume {snapshot:?} already exists")));
        }
        let src = map.get(name).ok_or_else(|| not_found(name))?;
        let copy = Vol { size: src.size, data: src.data.clone(), source: Some(name.to_owned()) };
        self.ensure_room(&map, copy.size)?;
        let info = self.info(snapshot, &copy);
        map.insert(snapshot.to_owned(), copy);
        Ok(info)
    }

    fn list(&self) -> Result<Vec<Volume>, DriverError> {
        Ok(self.lock()?.iter().map(|(n, v)| self.info(n, v)).collect())
    }

    fn list_after(&self, after: &str, limit: u64) -> Result<Vec<Volume>, DriverError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let map = self.lock()?;
        let take = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(map.range::<str, _>((Excluded(after), Unbounded)).take(take).map(|(n, v)| self.info(n, v)).collect())
    }

    fn revert(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
        let mut map = self.lock()?;
        let snap = map.get(snapshot).ok_or_else(|| not_found(snapshot))?;
        if snap.source.as_deref() != Some(name) {
            return Err(DriverError::invalid_argument(format!("volume {snapshot:?} is not a snapshot of {name:?}")));
        }
        let (size, data) = (snap.size, snap.data.clone());
        let current = map.get(name).ok_or_else(|| not_found(name))?.size;
        self.ensure_room(&map, size.saturating_sub(current))?;
        let v = map.get_mut(name).ok_or_else(|| not_found(name))?;
        v.size = size;
        v.data = data;
        Ok(self.info(name, v))
    }

    fn get(&self, name: &str) -> Result<Volume, DriverError> {
        let map = self.lock()?;
        map.get(name).map(|v| self.info(name, v)).ok_or_else(|| not_found(name))
    }

    fn stats(&self) -> Result<CapacityStats, DriverError> {
        let map = self.lock()?;
        let provisioned = Self::provisioned(&map);
        Ok(CapacityStats {
            total_bytes: self.capacity,
            free_bytes: self.capacity.saturating_sub(provisioned),
            provisioned_bytes: provisioned,
            allocated_bytes: map.values().map(|v| v.data.len() as u64).sum(),
            volumes: map.len() as u64,
        })
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<u64, DriverError> {
        let mut map = self.lock()?;
        let v = map.get_mut(name).ok_or_else(|| not_found(name))?;
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= v.size).ok_or_else(|| {
            DriverError::invalid_argument(format!("volume {name:?}: write past the end (size {})", v.size))
        })?;
        let (start, end) = (offset as usize, end as usize);
        if v.data.len() < end {
            v.data.resize(end, 0);
        }
        v.data[start..end].copy_from_slice(data);
        Ok(data.len() as u64)
    }

    fn read_at(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, DriverError> {
        let map = self.lock()?;
        let v = map.get(name).ok_or_else(|| not_found(name))?;
        let end = offset.saturating_add(len).min(v.size);
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        let have = v.data.len() as u64;
        if offset < have {
            let upto = end.min(have);
            out[..(upto - offset) as usize].copy_from_slice(&v.data[offset as usize..upto as usize]);
        }
        Ok(out)
    }
}

plughost_api::export_driver! {
    kind: volume,
    driver: FakeVolume,
    name: "fake-volume",
    version: env!("CARGO_PKG_VERSION"),
    summary: "volumes kept in memory (for tests and as an example)",
    options: OPTIONS,
    new: FakeVolume::new,
}

#[cfg(test)]
mod tests {
    use super::*;
    use plughost_api::ErrorKind;

    fn driver(capacity: &str) -> FakeVolume {
        let o =
            plughost_api::testing::TestHost::new().options(OPTIONS, &[("capacity", capacity)]).expect("valid options");
        FakeVolume::new(&o).expect("constructs")
    }

    #[test]
    fn lifecycle() {
        let d = driver("1MiB");
        assert_eq!(d.create("a", 1000).expect("create").size, 1000);
        assert_eq!(d.create("a", 1).unwrap_err().kind(), ErrorKind::ALREADY_EXISTS);
        assert_eq!(d.extend("a", 2000).expect("extend").size, 2000);
        assert_eq!(d.extend("a", 10).unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT);
        d.write_at("a", 10, b"hello").expect("write");
        let s = d.snapshot("a", "a-snap").expect("snapshot");
        assert_eq!(s.source.as_deref(), Some("a"));
        assert_eq!(d.read_at("a-snap", 10, 5).expect("read"), b"hello");
        assert_eq!(d.list().expect("list").len(), 2);
        assert_eq!(d.stats().expect("stats").provisioned_bytes, 4000);
        assert_eq!(d.create("big", 1 << 20).unwrap_err().kind(), ErrorKind::NO_CAPACITY);
        d.delete("a").expect("delete");
        assert_eq!(d.get("a").unwrap_err().kind(), ErrorKind::NOT_FOUND);
        assert_eq!(d.write_at("a-snap", 1999, b"xy").unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT);
    }
}
