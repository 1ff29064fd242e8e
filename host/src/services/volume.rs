//! The volume service (cinder's volume manager): names and sizes are validated here, each volume has a
//! record (its id, status and where it lives), conflicting operations on one volume run one after the
//! other, and the backend's driver does the work.

use plughost_api::{CapacityStats, Volume};
use plughost_api::{VolumeInterface, VolumeMethod};
use serde::{Deserialize, Serialize};

use super::records::{impl_record, new_id, now, Record, Records, MISSING};
use super::{check_name, BackendTable, Backends, Listed, Named, OnBackend, PerBackend, Reply, Service, ServiceKind};
use crate::backend::{Backend, BackendControl};
use crate::protocol::{ApiError, Capacity, Removed, Size};

/// The volume service in the table.
pub static KIND: ServiceKind = ServiceKind::of::<VolumeService>("volume", "Volume operations", "file-volume");

// ---------------------------------------------------------------------------------------------------
// Protocol

/// A volume operation and its arguments: what the socket carries and what `plughost ctl volume` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeOp {
    /// Create a volume
    Create {
        /// Volume name
        name: String,
        /// Size in bytes, or with a unit: 10MiB
        #[arg(long)]
        size: Size,
        /// Backend (default: the service's default backend)
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
    /// Show one volume, refreshed from its driver
    Get(Named),
    /// List volumes (from the records)
    List(OnBackend),
    /// Grow a volume
    Extend {
        /// Volume name
        name: String,
        /// New size, e.g. 20MiB
        #[arg(long)]
        size: Size,
        /// Check that the volume is on this backend
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
    /// Snapshot a volume into a new one
    Snapshot {
        /// Source volume
        name: String,
        /// Snapshot name
        snapshot: String,
        /// Check that the source is on this backend
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
    /// Restore a volume to a snapshot taken of it (the snapshot is kept)
    Revert {
        /// Volume name
        name: String,
        /// A snapshot of it
        snapshot: String,
        /// Check that the volume is on this backend
        #[arg(long)]
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
    },
    /// Delete a volume
    Delete(Named),
    /// Capacity of a backend, from its driver
    Stats(OnBackend),
}

/// Where a volume is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeStatus {
    /// Being created (or snapshotted into).
    Creating,
    /// Ready.
    Available,
    /// Being grown.
    Extending,
    /// Being restored to a snapshot.
    Reverting,
    /// Being deleted.
    Deleting,
    /// Something is wrong; `reason` says what.
    Error,
}

impl std::fmt::Display for VolumeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeStatus::Creating => "creating",
            VolumeStatus::Available => "available",
            VolumeStatus::Extending => "extending",
            VolumeStatus::Reverting => "reverting",
            VolumeStatus::Deleting => "deleting",
            VolumeStatus::Error => "error",
        })
    }
}

/// What the service knows about one volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Stable id.
    pub id: String,
    /// Name, unique within the service.
    pub name: String,
    /// Backend holding it.
    pub backend: String,
    /// Where it is in its life.
    pub status: VolumeStatus,
    /// Provisioned bytes.
    pub size: u64,
    /// Allocated bytes, as last reported by the driver.
    pub allocated: u64,
    /// Driver-specific location.
    pub location: String,
    /// The volume it was snapshotted from.
    pub source: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// Last change, seconds since the epoch.
    pub updated_at: u64,
    /// Why the status is `error`.
    #[serde(default)]
    pub reason: Option<String>,
    /// Found on the backend without a record and adopted (with a new id).
    #[serde(default)]
    pub adopted: bool,
}

impl VolumeRecord {
    fn new(name: &str, backend: &str, status: VolumeStatus, size: u64, source: Option<&str>) -> VolumeRecord {
        let t = now();
        VolumeRecord {
            id: new_id(),
            name: name.to_owned(),
            backend: backend.to_owned(),
            status,
            size,
            allocated: 0,
            location: String::new(),
            source: source.map(str::to_owned),
            created_at: t,
            updated_at: t,
            reason: None,
            adopted: false,
        }
    }

    /// Takes what the driver reports; whether anything changed.
    fn apply(&mut self, v: &Volume) -> bool {
        let changed = self.size != v.size
            || self.allocated != v.allocated
            || self.location != v.location
            || (v.source.is_some() && self.source != v.source);
        self.size = v.size;
        self.allocated = v.allocated;
        self.location.clone_from(&v.location);
        if v.source.is_some() {
            self.source.clone_from(&v.source);
        }
        if changed {
            self.updated_at = now();
        }
        changed
    }
}

impl_record!(VolumeRecord, VolumeStatus, "volume", VolumeStatus::Error);

impl Listed for VolumeRecord {
    const COLUMNS: &'static [&'static str] = &["SIZE", "ALLOCATED", "LOCATION"];
    fn cells(&self) -> Vec<String> {
        use crate::ctl::human_size;
        vec![human_size(self.size), human_size(self.allocated), self.location.clone()]
    }
}

/// The answer to `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStats {
    /// The backend.
    pub backend: String,
    /// Total bytes.
    pub total_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Sum of provisioned sizes.
    pub provisioned_bytes: u64,
    /// Sum of allocated bytes.
    pub allocated_bytes: u64,
    /// Number of volumes.
    pub volumes: u64,
}

/// What volume operations answer.
pub type VolumeReply = Reply<VolumeRecord, VolumeStats>;

// ---------------------------------------------------------------------------------------------------
// The service

/// The volume service.
pub struct VolumeService {
    backends: Backends<VolumeInterface>,
    records: Records<VolumeRecord>,
    capacity: PerBackend<CapacityStats>,
}

impl VolumeService {
    /// Brings the records of one backend in line with what its driver reports, after a restart:
    /// operations interrupted in the middle are finished or undone, volumes the driver no longer has are
    /// kept as `error` ("missing from backend"), volumes it has without a record are adopted. Nothing is
    /// silently dropped or given a new id.
    fn reconcile(&self, b: &Backend<VolumeInterface>) {
        if b.health() != crate::backend::Health::Up {
            log::warn!("volume backend {:?} is down: its records are kept as they are", b.name);
            return;
        }
        let vols = match b.call(VolumeMethod::list, |d| d.list()) {
            Ok(v) => v,
            Err(e) => return log::warn!("volume backend {:?}: cannot list volumes, records kept: {e}", b.name),
        };
        let reported: std::collections::BTreeMap<&str, &Volume> = vols.iter().map(|v| (v.name.as_str(), v)).collect();
        let mut finished_deletes = std::collections::BTreeSet::new();
        for r in self.records.list(Some(&b.name)) {
            let _held = self.records.hold(&r.name);
            let found = reported.get(r.name.as_str());
            match (r.status, found) {
                (VolumeStatus::Creating | VolumeStatus::Extending | VolumeStatus::Reverting, Some(v)) => {
                    log::info!("volume {:?}: interrupted {} completed on the backend; now available", r.name, r.status);
                    self.records.update(&r.name, |r| {
                        r.apply(v);
                        r.set_status(VolumeStatus::Available);
                        true
                    });
                }
                (VolumeStatus::Creating, None) => {
                    log::info!("volume {:?}: interrupted create never completed; record removed", r.name);
                    self.records.remove(&r.name);
                }
                (VolumeStatus::Deleting, Some(_)) => match b.call(VolumeMethod::delete, |d| d.delete(&r.name)) {
                    Ok(()) => {
                        log::info!("volume {:?}: interrupted delete finished", r.name);
                        self.records.remove(&r.name);
                        finished_deletes.insert(r.name.clone());
                    }
                    Err(e) => {
                        log::warn!("volume {:?}: cannot finish an interrupted delete: {e}", r.name);
                        self.records.update(&r.name, |r| {
                            r.fail(&format!("interrupted delete could not finish: {}", e.message));
                            true
                        });
                    }
                },
                (VolumeStatus::Deleting, None) => {
                    log::info!("volume {:?}: interrupted delete had completed; record removed", r.name);
                    self.records.remove(&r.name);
                }
                (_, Some(v)) => {
                    self.records.update(&r.name, |r| {
                        let back = r.status == VolumeStatus::Error;
                        if back {
                            log::info!("volume {:?} is on its backend again; available", r.name);
                            r.set_status(VolumeStatus::Available);
                        }
                        r.apply(v) || back
                    });
                }
                (_, None) => {
                    self.records.mark_missing(&r.name);
                }
            }
        }
        for v in vols.iter().filter(|v| !finished_deletes.contains(&v.name)) {
            let _held = self.records.hold(&v.name);
            if self.records.get(&v.name).is_none() {
                log::info!("volume {:?}: found on backend {:?} without a record; adopted", v.name, b.name);
                let mut r = VolumeRecord::new(&v.name, &b.name, VolumeStatus::Available, 0, None);
                r.adopted = true;
                r.apply(v);
                self.records.put(r);
            }
        }
    }

    fn create(&self, name: &str, size: u64, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        check_name("volume", name)?;
        let b = self.backends.pick(backend)?;
        let _held = self.records.hold(name);
        let record = VolumeRecord::new(name, &b.name, VolumeStatus::Creating, size, None);
        self.records.create(record, || b.call(VolumeMethod::create, |d| d.create(name, size)), made)
    }

    fn snapshot(&self, name: &str, snapshot: &str, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        check_name("volume", snapshot)?;
        let _held = self.records.hold_two(name, snapshot);
        let (source, b) = self.backends.locate(&self.records, name, backend)?;
        let record = VolumeRecord::new(snapshot, &b.name, VolumeStatus::Creating, source.size, Some(name));
        self.records.create(record, || b.call(VolumeMethod::snapshot, |d| d.snapshot(name, snapshot)), made)
    }

    fn extend(&self, name: &str, size: u64, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        let _held = self.records.hold(name);
        let (r, b) = self.backends.locate(&self.records, name, backend)?;
        if size < r.size {
            return Err(ApiError::invalid(format!(
                "volume {name:?}: new size {size} is smaller than current size {}",
                r.size
            )));
        }
        self.records.transition(
            r,
            VolumeStatus::Extending,
            || b.call(VolumeMethod::extend, |d| d.extend(name, size)),
            made,
        )
    }

    /// Restores `name` to `snapshot`, which must be a snapshot of it on the same backend.
    fn revert(&self, name: &str, snapshot: &str, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        let _held = self.records.hold_two(name, snapshot);
        let (r, b) = self.backends.locate(&self.records, name, backend)?;
        let (snap, _) = self.backends.locate(&self.records, snapshot, Some(&r.backend))?;
        if snap.source.as_deref() != Some(name) {
            return Err(ApiError::invalid(format!("volume {snapshot:?} is not a snapshot of {name:?}")));
        }
        self.records.transition(
            r,
            VolumeStatus::Reverting,
            || b.call(VolumeMethod::revert, |d| d.revert(name, snapshot)),
            made,
        )
    }

    fn delete(&self, name: &str, backend: Option<&str>) -> Result<Removed, ApiError> {
        let _held = self.records.hold(name);
        let (r, b) = self.backends.locate(&self.records, name, backend)?;
        self.records.removal(r, VolumeStatus::Deleting, || b.call(VolumeMethod::delete, |d| d.delete(name)))?;
        Ok(Removed { name: name.to_owned(), deleted: Some(true), destroyed: None })
    }

    /// Refreshes one volume from its driver. A driver error is the answer (the record is not shown as if
    /// it were fresh); a driver that no longer has the volume turns the record to `error`.
    fn get(&self, name: &str, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        let _held = self.records.hold(name);
        let (r, b) = self.backends.locate(&self.records, name, backend)?;
        self.records.refresh(r, b.call(VolumeMethod::get, |d| d.get(name)), |r, v| {
            let back = r.status == VolumeStatus::Error && r.reason.as_deref() == Some(MISSING);
            if back {
                r.set_status(VolumeStatus::Available);
            }
            r.apply(v) || back
        })
    }

    fn stats(&self, backend: Option<&str>) -> Result<VolumeStats, ApiError> {
        let b = self.backends.pick(backend)?;
        let s = b.call(VolumeMethod::stats, |d| d.stats())?;
        self.capacity.set(&b.name, s);
        Ok(VolumeStats {
            backend: b.name.clone(),
            total_bytes: s.total_bytes,
            free_bytes: s.free_bytes,
            provisioned_bytes: s.provisioned_bytes,
            allocated_bytes: s.allocated_bytes,
            volumes: s.volumes,
        })
    }
}

/// Records what the driver made and marks the volume available.
fn made(r: &mut VolumeRecord, v: Volume) {
    r.apply(&v);
    r.set_status(VolumeStatus::Available);
}

impl Service for VolumeService {
    type Op = VolumeOp;
    fn handle(&self, op: VolumeOp) -> Result<VolumeReply, ApiError> {
        Ok(match op {
            VolumeOp::Create { name, size, backend } => {
                VolumeReply::One(self.create(&name, size.get(), backend.as_deref())?)
            }
            VolumeOp::Get(Named { name, backend }) => VolumeReply::One(self.get(&name, backend.as_deref())?),
            VolumeOp::List(OnBackend { backend }) => {
                if let Some(b) = &backend {
                    self.backends.pick(Some(b))?;
                }
                VolumeReply::Many(self.records.list(backend.as_deref()))
            }
            VolumeOp::Extend { name, size, backend } => {
                VolumeReply::One(self.extend(&name, size.get(), backend.as_deref())?)
            }
            VolumeOp::Snapshot { name, snapshot, backend } => {
                VolumeReply::One(self.snapshot(&name, &snapshot, backend.as_deref())?)
            }
            VolumeOp::Revert { name, snapshot, backend } => {
                VolumeReply::One(self.revert(&name, &snapshot, backend.as_deref())?)
            }
            VolumeOp::Delete(Named { name, backend }) => VolumeReply::Removed(self.delete(&name, backend.as_deref())?),
            VolumeOp::Stats(OnBackend { backend }) => VolumeReply::Other(self.stats(backend.as_deref())?),
        })
    }

    type Reply = VolumeReply;
    type Interface = VolumeInterface;
    type Record = VolumeRecord;

    fn new(backends: Backends<VolumeInterface>, records: Records<VolumeRecord>) -> VolumeService {
        let s = VolumeService { backends, records, capacity: PerBackend::default() };
        for b in s.backends.iter() {
            s.reconcile(b);
        }
        s
    }

    fn kind(&self) -> &'static ServiceKind {
        &KIND
    }

    fn periodic(&self) {
        for b in self.backends.iter() {
            let was_up = b.health() == crate::backend::Health::Up;
            b.check_health();
            if b.health() != crate::backend::Health::Up {
                continue;
            }
            if !was_up {
                // Back from down (a root that was missing is there again): look again.
                self.reconcile(b);
            }
            if let Ok(s) = b.call(VolumeMethod::stats, |d| d.stats()) {
                self.capacity.set(&b.name, s);
            }
        }
    }

    fn table(&self) -> &BackendTable {
        self.backends.table()
    }

    fn capacity(&self, backend: &str) -> Option<Capacity> {
        self.capacity.get(backend).map(|s| Capacity {
            total_bytes: s.total_bytes,
            free_bytes: s.free_bytes,
            provisioned_bytes: s.provisioned_bytes,
            volumes: s.volumes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorKind;
    use plughost_api::{DriverError, VolumeClient, VolumeDriver};
    use std::collections::BTreeMap;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::sync::Mutex;

    /// An in-memory driver whose `extend` can be held until the test lets it go, and whose `get` can be
    /// told to fail.
    #[derive(Default)]
    struct Scripted {
        volumes: Mutex<BTreeMap<String, u64>>,
        hold_extend: Mutex<Option<mpsc::Receiver<()>>>,
        fail_get: std::sync::atomic::AtomicBool,
        creates: std::sync::atomic::AtomicUsize,
    }

    fn vol(name: &str, size: u64) -> Volume {
        Volume { name: name.into(), size, location: format!("mem:{name}"), ..Volume::default() }
    }

    impl VolumeDriver for Scripted {
        fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {
            self.creates.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            let mut m = self.volumes.lock().unwrap();
            if m.contains_key(name) {
                return Err(DriverError::already_exists(format!("volume {name:?} exists")));
            }
            m.insert(name.into(), size);
            Ok(vol(name, size))
        }
        fn delete(&self, name: &str) -> Result<(), DriverError> {
            self.volumes.lock().unwrap().remove(name).map(drop).ok_or_else(|| DriverError::not_found("gone"))
        }
        fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {
            if let Some(rx) = self.hold_extend.lock().unwrap().take() {
                let _ = rx.recv();
            }
            self.volumes.lock().unwrap().insert(name.into(), new_size);
            Ok(vol(name, new_size))
        }
        fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
            let size = *self.volumes.lock().unwrap().get(name).ok_or_else(|| DriverError::not_found("no source"))?;
            self.create(snapshot, size).map(|v| Volume { source: Some(name.into()), ..v })
        }
        fn list(&self) -> Result<Vec<Volume>, DriverError> {
            Ok(self.volumes.lock().unwrap().iter().map(|(n, s)| vol(n, *s)).collect())
        }
        fn get(&self, name: &str) -> Result<Volume, DriverError> {
            if self.fail_get.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(DriverError::internal("disk on fire"));
            }
            self.volumes.lock().unwrap().get(name).map(|s| vol(name, *s)).ok_or_else(|| DriverError::not_found("no"))
        }
        fn stats(&self) -> Result<CapacityStats, DriverError> {
            Ok(CapacityStats::default())
        }
    }

    fn service_with(driver: Arc<Scripted>, records: Records<VolumeRecord>) -> VolumeService {
        struct Shared(Arc<Scripted>);
        impl VolumeDriver for Shared {
            fn create(&self, n: &str, s: u64) -> Result<Volume, DriverError> {
                self.0.create(n, s)
            }
            fn delete(&self, n: &str) -> Result<(), DriverError> {
                self.0.delete(n)
            }
            fn extend(&self, n: &str, s: u64) -> Result<Volume, DriverError> {
                self.0.extend(n, s)
            }
            fn snapshot(&self, n: &str, s: &str) -> Result<Volume, DriverError> {
                self.0.snapshot(n, s)
            }
            fn list(&self) -> Result<Vec<Volume>, DriverError> {
                self.0.list()
            }
            fn get(&self, n: &str) -> Result<Volume, DriverError> {
                self.0.get(n)
            }
            fn stats(&self) -> Result<CapacityStats, DriverError> {
                self.0.stats()
            }
        }
        // Through the real stable-ABI objects, as a loaded driver would be called.
        let client: Box<dyn VolumeDriver> = Box::new(VolumeClient::in_process(Shared(driver)));
        let backend = Backend::<VolumeInterface>::in_process("volume", "default", client, "scripted");
        VolumeService::new(Backends::from_list("volume", vec![backend]), records)
    }

    fn service() -> (VolumeService, Arc<Scripted>) {
        let d = Arc::new(Scripted::default());
        (service_with(d.clone(), Records::in_memory()), d)
    }

    #[test]
    fn names_sizes_and_backends_are_validated_before_the_driver_is_called() {
        let (s, d) = service();
        for bad in ["../etc", "", "a/b", ".hidden"] {
            assert_eq!(s.create(bad, 1, None).unwrap_err().kind, ErrorKind::InvalidArgument, "{bad:?}");
        }
        let e = s.create("v", 1, Some("nope")).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::NotFound, "unknown volume backend \"nope\" (known: default)")
        );
        assert_eq!(d.creates.load(std::sync::atomic::Ordering::SeqCst), 0);
        s.create("v", 100, None).unwrap();
        let e = s.extend("v", 50, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("smaller than current size 100"), "{e}");
        let e = s.create("v", 1, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        assert_eq!(e.message, "volume \"v\" already exists (backend \"default\", available)");
        assert_eq!(s.get("missing", None).unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn a_transition_is_visible_while_the_driver_works_and_the_name_is_held() {
        let (s, d) = service();
        s.create("v", 10, None).unwrap();
        let (tx, rx) = mpsc::channel();
        *d.hold_extend.lock().unwrap() = Some(rx);
        let s = Arc::new(s);
        let s2 = s.clone();
        let extending = std::thread::spawn(move || s2.extend("v", 20, None));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.records.get("v").unwrap().status != VolumeStatus::Extending {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        // Another operation on the same name waits for the extend; one on another name does not.
        let s3 = s.clone();
        let deleting = std::thread::spawn(move || s3.delete("v", None));
        s.create("w", 1, None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!deleting.is_finished(), "delete waited for the extend of the same volume");
        tx.send(()).unwrap();
        assert_eq!(extending.join().unwrap().unwrap().size, 20);
        assert!(deleting.join().unwrap().is_ok());
        assert!(s.records.get("v").is_none());
    }

    #[test]
    fn revert_needs_a_snapshot_of_the_volume_and_answers_what_the_driver_says() {
        let (s, _) = service();
        s.create("v", 10, None).unwrap();
        s.create("other", 10, None).unwrap();
        s.snapshot("v", "v-snap", None).unwrap();
        let e = s.revert("v", "other", None).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::InvalidArgument, "volume \"other\" is not a snapshot of \"v\"")
        );
        assert_eq!(s.revert("v", "missing", None).unwrap_err().kind, ErrorKind::NotFound);
        // This driver does not implement revert: the default answers, and the record is as it was.
        let e = s.revert("v", "v-snap", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert_eq!(s.records.get("v").unwrap().status, VolumeStatus::Available);
    }

    #[test]
    fn concurrent_creates_of_one_name_reach_the_driver_once() {
        let (s, d) = service();
        let s = Arc::new(s);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.create("same", 1, None))
            })
            .collect();
        let ok = threads.into_iter().map(|t| t.join().unwrap()).filter(Result::is_ok).count();
        assert_eq!(ok, 1);
        assert_eq!(d.creates.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn get_answers_driver_errors_and_marks_volumes_the_driver_lost() {
        let (s, d) = service();
        s.create("v", 10, None).unwrap();
        d.fail_get.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = s.get("v", None).unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (ErrorKind::Internal, "disk on fire"));
        d.fail_get.store(false, std::sync::atomic::Ordering::SeqCst);
        d.volumes.lock().unwrap().remove("v");
        let r = s.get("v", None).unwrap();
        assert_eq!((r.status, r.reason.as_deref()), (VolumeStatus::Error, Some(MISSING)));
        assert_eq!(s.get("v", Some("default")).unwrap().name, "v");
        assert_eq!(s.get("v", Some("nope")).unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn reconcile_finishes_or_undoes_interrupted_work_and_never_drops_or_reidentifies() {
        let d = Arc::new(Scripted::default());
        d.volumes.lock().unwrap().extend([
            ("kept".to_owned(), 5),
            ("made".to_owned(), 6),
            ("stray".to_owned(), 7),
            ("half-deleted".to_owned(), 1),
        ]);
        let records = Records::in_memory();
        let rec = |name: &str, status| VolumeRecord::new(name, "default", status, 1, None);
        let kept = rec("kept", VolumeStatus::Available);
        records.put(kept.clone());
        records.put(rec("made", VolumeStatus::Creating));
        records.put(rec("never-made", VolumeStatus::Creating));
        records.put(rec("lost", VolumeStatus::Available));
        records.put(rec("half-deleted", VolumeStatus::Deleting));
        let s = service_with(d.clone(), records);
        let get = |n: &str| s.records.get(n);
        assert_eq!(get("kept").unwrap().id, kept.id, "same id");
        assert_eq!(get("kept").unwrap().size, 5, "refreshed from the driver");
        assert_eq!(get("made").unwrap().status, VolumeStatus::Available);
        assert!(get("never-made").is_none());
        assert_eq!(get("lost").unwrap().reason.as_deref(), Some(MISSING));
        assert!(get("half-deleted").is_none());
        assert!(!d.volumes.lock().unwrap().contains_key("half-deleted"), "the interrupted delete was finished");
        let stray = get("stray").unwrap();
        assert!(stray.adopted && stray.status == VolumeStatus::Available);
    }
}
