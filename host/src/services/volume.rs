//! The volume service (cinder's volume manager): names and sizes are validated here, each volume has a
//! record (its id, status and where it lives), conflicting operations on one volume run one after the
//! other, and the backend's driver does the work.

use plughost_api::Volume;
use plughost_api::{VolumeInterface, VolumeMethod};
use serde::{Deserialize, Serialize};

use super::meta::{columns, record};
use super::records::{
    creation_undone, finish_removal, removal_done, Counter, Lookup, Meta, ReconcileCounts, Record, Verdict, MISSING,
};
use super::{check_name, Core, Listed, Named, OnBackend, PerBackend, Reply, Service, ServiceKind};
use crate::backend::Backend;
use crate::control::protocol::{ApiError, Capacity, Removed, Size};
use crate::state::{value, Column, RowReader};
use rusqlite::types::Value;

/// The volume service in the table.
pub(crate) static KIND: ServiceKind =
    ServiceKind::of::<VolumeService>("volume", "Volume operations", "file-volume", true, &[]);

// ---------------------------------------------------------------------------------------------------
// Protocol

/// A volume operation and its arguments: what the socket carries and what `plughost ctl volume` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[strum(serialize_all = "snake_case")]
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

impl super::Operation for VolumeOp {
    fn reads(&self) -> bool {
        matches!(self, VolumeOp::Get(_) | VolumeOp::List(_) | VolumeOp::Stats(_))
    }
    fn name(&self) -> &'static str {
        self.into()
    }
}

/// Where a volume is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::Display, strum::EnumString)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub(crate) enum VolumeStatus {
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

/// What the service knows about one volume: the shared `Meta` and its own fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VolumeRecord {
    /// Id, name, backend, status, times, reason, adoption, driver digest.
    #[serde(flatten)]
    pub meta: Meta<VolumeStatus>,
    /// Provisioned bytes.
    pub size: u64,
    /// Allocated bytes, as last reported by the driver.
    pub allocated: u64,
    /// Driver-specific location.
    pub location: String,
    /// The volume it was snapshotted from.
    pub source: Option<String>,
}

/// The `volumes` table: one column per field.
const COLUMNS: &[Column] = columns![
    "size": Int,
    "allocated": Int,
    "location": Text,
    "source": Text,
];

impl VolumeRecord {
    fn new(name: &str, backend: &str, status: VolumeStatus, size: u64, source: Option<&str>) -> VolumeRecord {
        VolumeRecord {
            meta: Meta::new(name, backend, status),
            size,
            allocated: 0,
            location: String::new(),
            source: source.map(str::to_owned),
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
        self.meta.touch(changed)
    }
}

/// The volumes table, version by version (append; never change one that shipped).
const MIGRATIONS: &[&str] = &[
    // 1 (made by the host's first migration in databases from before kinds had their own).
    "CREATE TABLE volumes (
        name TEXT PRIMARY KEY NOT NULL,
        id TEXT NOT NULL UNIQUE,
        backend TEXT NOT NULL,
        status TEXT NOT NULL,
        size INTEGER NOT NULL,
        allocated INTEGER NOT NULL,
        location TEXT NOT NULL,
        source TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        reason TEXT,
        adopted INTEGER NOT NULL DEFAULT 0,
        driver_digest TEXT
    ) WITHOUT ROWID;
    CREATE INDEX volumes_backend ON volumes (backend);",
];

record!(VolumeRecord, VolumeStatus, error: VolumeStatus::Error, "volume", "volumes", COLUMNS, MIGRATIONS, {
    fn column(&self, name: &str) -> Result<Value, String> {
        match name {
            "size" => value::int(self.size),
            "allocated" => value::int(self.allocated),
            "location" => Ok(value::text(&self.location)),
            "source" => Ok(value::opt_text(self.source.as_deref())),
            other => Err(format!("no field {other:?} in a volume record")),
        }
    }
    fn from_row(meta: Meta<VolumeStatus>, row: &mut RowReader) -> Result<VolumeRecord, String> {
        Ok(VolumeRecord {
            meta,
            size: row.int("size")?,
            allocated: row.int("allocated")?,
            location: row.text("location")?,
            source: row.opt_text("source")?,
        })
    }
});

impl Listed for VolumeRecord {
    const HEADINGS: &'static [&'static str] = &["SIZE", "ALLOCATED", "LOCATION"];
    fn cells(&self) -> Vec<String> {
        use crate::util::fmt::human_size;
        vec![human_size(self.size), human_size(self.allocated), self.location.clone()]
    }
}

/// The answer to `stats`: a backend's capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VolumeStats {
    /// The backend.
    pub backend: String,
    /// Its capacity, as the driver reports it now.
    #[serde(flatten)]
    pub capacity: Capacity,
}

pub(crate) type VolumeReply = Reply<VolumeRecord, VolumeStats>;

// ---------------------------------------------------------------------------------------------------
// The service

/// The volume service.
pub(crate) struct VolumeService {
    core: Core<VolumeInterface, VolumeRecord>,
    capacity: PerBackend<Capacity>,
}

impl VolumeService {
    /// Brings the records of one backend in line with what its driver reports (at start, and when a
    /// backend that was down is up again): operations interrupted in the middle are finished or undone,
    /// volumes the driver no longer has are kept as `error` ("missing from backend"), volumes it has
    /// without a record are adopted. Nothing is silently dropped or given a new id.
    fn reconcile(&self, b: &Backend<VolumeInterface>, concurrent: bool) -> ReconcileCounts {
        use VolumeStatus as S;
        self.core.reconcile(
            b,
            concurrent,
            |after, limit| b.call(VolumeMethod::list_after, |d| d.list_after(after, limit)),
            || b.call(VolumeMethod::list, |d| d.list()),
            Lookup {
                name_of: |v: &Volume| &v.name,
                recheck: &|name| b.call(VolumeMethod::get, |d| d.get(name)).ok(),
                check: |v: &Volume| match (i64::try_from(v.size), i64::try_from(v.allocated)) {
                    (Ok(_), Ok(_)) => Ok(()),
                    _ => Err(format!(
                        "volume {}: size {} or allocated {} out of range",
                        crate::util::fmt::echo(&v.name),
                        v.size,
                        v.allocated
                    )),
                },
            },
            |v| {
                let mut r = VolumeRecord::new(&v.name, &b.name, S::Available, 0, None);
                r.apply(v);
                r
            },
            |mut r, found| match (r.meta.status, found) {
                (S::Creating | S::Extending | S::Reverting, Some(v)) => {
                    log::info!(
                        "volume {:?}: interrupted {} completed on the backend; now available",
                        r.meta.name,
                        r.meta.status
                    );
                    r.apply(v);
                    r.set_status(S::Available);
                    Verdict::Put(r, Counter::Completed)
                }
                (S::Creating, None) => creation_undone(&r, "create"),
                (S::Deleting, Some(_)) => {
                    let name = r.meta.name.clone();
                    finish_removal(r, "delete", || b.call(VolumeMethod::delete, |d| d.delete(&name)))
                }
                (S::Deleting, None) => removal_done(&r, "delete"),
                (_, Some(v)) => {
                    let back = r.meta.status == S::Error && r.meta.reason.as_deref() == Some(MISSING);
                    if back {
                        log::info!("volume {:?} is on its backend again; available", r.meta.name);
                        r.set_status(S::Available);
                    }
                    match r.apply(v) || back {
                        true => Verdict::Put(r, Counter::Refreshed),
                        false => Verdict::Unchanged,
                    }
                }
                (_, None) => Verdict::Missing,
            },
        )
    }

    /// Reconciles every backend and keeps the counts for `status`.
    fn reconcile_all(&self) {
        self.core.reconcile_all(None, |b| self.reconcile(b, false));
    }

    /// A record left `creating` by a create or snapshot whose worker died is settled when its name is
    /// asked for again (`Records::settle`): the driver has the volume → available; not → forgotten.
    fn settle_interrupted(&self, name: &str) -> Result<(), ApiError> {
        self.core.records.settle(
            name,
            VolumeStatus::Creating,
            |r| {
                let b = self.core.backends.holding("volume", name, &r.meta.backend)?;
                b.call(VolumeMethod::get, |d| d.get(name))
            },
            made_from,
        )
    }

    fn create(&self, name: &str, size: u64, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        check_name("volume", name)?;
        check_size(name, size)?;
        let b = self.core.backends.pick(backend)?;
        let _held = self.core.records.hold(name);
        self.settle_interrupted(name)?;
        let mut record = VolumeRecord::new(name, &b.name, VolumeStatus::Creating, size, None);
        record.meta.driver_digest = Some(b.digest());
        self.core.records.create(record, || b.call(VolumeMethod::create, |d| d.create(name, size)), made)
    }

    fn snapshot(&self, name: &str, snapshot: &str, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        check_name("volume", snapshot)?;
        let _held = self.core.records.hold_two(name, snapshot);
        self.settle_interrupted(snapshot)?;
        let (source, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        let mut record = VolumeRecord::new(snapshot, &b.name, VolumeStatus::Creating, source.size, Some(name));
        record.meta.driver_digest = Some(b.digest());
        self.core.records.create(record, || b.call(VolumeMethod::snapshot, |d| d.snapshot(name, snapshot)), made)
    }

    fn extend(&self, name: &str, size: u64, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        check_size(name, size)?;
        let _held = self.core.records.hold(name);
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        if size < r.size {
            return Err(ApiError::invalid(format!(
                "volume {name:?}: new size {size} is smaller than current size {}",
                r.size
            )));
        }
        self.core.records.transition(
            r,
            VolumeStatus::Extending,
            || b.call(VolumeMethod::extend, |d| d.extend(name, size)),
            made,
        )
    }

    /// Restores `name` to `snapshot`, which must be a snapshot of it on the same backend.
    fn revert(&self, name: &str, snapshot: &str, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        let _held = self.core.records.hold_two(name, snapshot);
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        let (snap, _) = self.core.backends.locate(&self.core.records, snapshot, Some(&r.meta.backend))?;
        if snap.source.as_deref() != Some(name) {
            return Err(ApiError::invalid(format!("volume {snapshot:?} is not a snapshot of {name:?}")));
        }
        self.core.records.transition(
            r,
            VolumeStatus::Reverting,
            || b.call(VolumeMethod::revert, |d| d.revert(name, snapshot)),
            made,
        )
    }

    fn delete(&self, name: &str, backend: Option<&str>) -> Result<Removed, ApiError> {
        let _held = self.core.records.hold(name);
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        self.core.records.removal(r, VolumeStatus::Deleting, || b.call(VolumeMethod::delete, |d| d.delete(name)))?;
        Ok(Removed { name: name.to_owned(), deleted: Some(true), destroyed: None })
    }

    /// Refreshes one volume from its driver. A driver error is the answer (the record is not shown as if
    /// it were fresh); a driver that no longer has the volume turns the record to `error`.
    fn get(&self, name: &str, backend: Option<&str>) -> Result<VolumeRecord, ApiError> {
        let _held = self.core.records.hold(name);
        self.settle_interrupted(name)?;
        let (r, b) = self.core.backends.locate(&self.core.records, name, backend)?;
        self.core.records.refresh(r, b.call(VolumeMethod::get, |d| d.get(name)), |r, v| {
            let back = r.meta.status == VolumeStatus::Error && r.meta.reason.as_deref() == Some(MISSING);
            if back {
                r.set_status(VolumeStatus::Available);
            }
            r.apply(v) || back
        })
    }

    fn stats(&self, backend: Option<&str>) -> Result<VolumeStats, ApiError> {
        let b = self.core.backends.pick(backend)?;
        let s = b.call(VolumeMethod::stats, |d| d.stats())?;
        let capacity = Capacity::from(s);
        self.capacity.set(&b.name, capacity);
        Ok(VolumeStats { backend: b.name.clone(), capacity })
    }
}

/// A size the records can hold (a signed 64-bit column), refused before anything is written.
fn check_size(name: &str, size: u64) -> Result<(), ApiError> {
    if i64::try_from(size).is_err() {
        return Err(ApiError::invalid(format!(
            "volume {name:?}: size {size} is too large (at most {} bytes)",
            i64::MAX
        )));
    }
    Ok(())
}

/// Records what the driver made and marks the volume available.
fn made(r: &mut VolumeRecord, v: Volume) {
    made_from(r, &v);
}

fn made_from(r: &mut VolumeRecord, v: &Volume) {
    r.apply(v);
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
                    self.core.backends.pick(Some(b))?;
                }
                VolumeReply::Many(self.core.records.list(backend.as_deref()))
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

    type Other = VolumeStats;
    type Interface = VolumeInterface;
    type Record = VolumeRecord;

    fn new(core: Core<VolumeInterface, VolumeRecord>) -> Result<VolumeService, String> {
        let s = VolumeService { core, capacity: PerBackend::default() };
        s.reconcile_all();
        Ok(s)
    }

    const KIND: &'static ServiceKind = &KIND;

    fn core(&self) -> &Core<VolumeInterface, VolumeRecord> {
        &self.core
    }

    fn periodic(&self) {
        self.core.health_round(|b, changed| {
            if changed {
                self.core.last_reconcile.set(self.reconcile(b, true));
            }
            if let Ok(s) = b.call(VolumeMethod::stats, |d| d.stats()) {
                self.capacity.set(&b.name, Capacity::from(s));
            }
        });
    }

    fn capacity(&self, backend: &str) -> Option<Capacity> {
        self.capacity.get(backend)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::control::protocol::ErrorKind;
    use crate::services::records::Records;
    use plughost_api::{CapacityStats, DriverError, VolumeClient, VolumeDriver};
    use std::collections::BTreeMap;
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::sync::Mutex;

    /// An in-memory driver whose `extend` can be held until the test lets it go, and whose `get` can be
    /// told to fail.
    #[derive(Default)]
    pub(crate) struct Scripted {
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
        VolumeService::new(Core::new(crate::services::Backends::from_list("volume", vec![backend]), records)).unwrap()
    }

    /// A volume service over an in-memory driver (through the real stable-ABI objects).
    pub(crate) fn service() -> (VolumeService, Arc<Scripted>) {
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
        while s.core.records.get("v").unwrap().meta.status != VolumeStatus::Extending {
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
        assert!(s.core.records.get("v").is_none());
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
        assert_eq!(s.core.records.get("v").unwrap().meta.status, VolumeStatus::Available);
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
        assert_eq!((r.meta.status, r.meta.reason.as_deref()), (VolumeStatus::Error, Some(MISSING)));
        assert_eq!(s.get("v", Some("default")).unwrap().meta.name, "v");
        assert_eq!(s.get("v", Some("nope")).unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn what_a_driver_lists_is_refused_as_user_input_would_be() {
        let (svc, d) = service();
        let hostile = ["", "../../etc/evil", "a\nb", "\u{1b}[2Jx", &"x".repeat(100_000)];
        {
            let mut m = d.volumes.lock().unwrap();
            for name in hostile {
                m.insert(name.to_owned(), 1);
            }
            m.insert("fine".to_owned(), 1);
            m.insert("too-big".to_owned(), u64::MAX);
        }
        let b = svc.core.backends.pick(None).unwrap().clone();
        let counts = svc.reconcile(&b, true);
        assert_eq!((counts.adopted, counts.refused), (1, 6), "{counts:?}");
        let names: Vec<String> = svc.core.records.list(None).into_iter().map(|r| r.meta.name).collect();
        assert_eq!(names, ["fine"]);
        // Refused every time it is listed, logged once.
        assert_eq!(svc.reconcile(&b, true).refused, 6);
        assert_eq!(svc.core.refused_seen_len(), 6);
    }

    #[test]
    fn a_create_asked_again_after_an_interrupted_one_settles_it_at_once() {
        let d = Arc::new(Scripted::default());
        let s = service_with(d.clone(), Records::in_memory());
        // Two intents left behind by calls whose worker died: one the driver did, one it never got.
        d.volumes.lock().unwrap().insert("done".to_owned(), 9);
        for name in ["done", "never"] {
            s.core.records.put(VolumeRecord::new(name, "default", VolumeStatus::Creating, 9, None)).unwrap();
        }
        let e = s.create("done", 9, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        assert!(e.message.contains("available"), "{}", e.message);
        assert_eq!(s.core.records.get("done").unwrap().meta.status, VolumeStatus::Available);
        let made = s.create("never", 3, None).unwrap();
        assert_eq!((made.meta.status, made.size), (VolumeStatus::Available, 3));
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
        records.put(kept.clone()).unwrap();
        records.put(rec("made", VolumeStatus::Creating)).unwrap();
        records.put(rec("never-made", VolumeStatus::Creating)).unwrap();
        records.put(rec("lost", VolumeStatus::Available)).unwrap();
        records.put(rec("half-deleted", VolumeStatus::Deleting)).unwrap();
        let s = service_with(d.clone(), records);
        let get = |n: &str| s.core.records.get(n);
        assert_eq!(get("kept").unwrap().meta.id, kept.meta.id, "same id");
        assert_eq!(get("kept").unwrap().size, 5, "refreshed from the driver");
        assert_eq!(get("made").unwrap().meta.status, VolumeStatus::Available);
        assert!(get("never-made").is_none());
        assert_eq!(get("lost").unwrap().meta.reason.as_deref(), Some(MISSING));
        assert!(get("half-deleted").is_none());
        assert!(!d.volumes.lock().unwrap().contains_key("half-deleted"), "the interrupted delete was finished");
        let stray = get("stray").unwrap();
        assert!(stray.meta.adopted && stray.meta.status == VolumeStatus::Available);
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::services::records::Records;
    use crate::state::StateDb;
    use std::sync::Arc;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("plughost-volume-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn records_survive_a_reopen_field_for_field() {
        let dir = temp_dir("reopen");
        let db = Arc::new(StateDb::open(&dir).unwrap());
        let r = Records::<VolumeRecord>::open(db.clone(), &dir).unwrap();
        let mut a = VolumeRecord::new("a", "default", VolumeStatus::Available, 1 << 40, None);
        a.allocated = 4096;
        a.location = "/x/a".into();
        a.meta.adopted = true;
        a.meta.driver_digest = Some("blake3:00ff".into());
        let mut b = VolumeRecord::new("b", "fast", VolumeStatus::Error, 7, Some("a"));
        b.meta.reason = Some("missing from backend".into());
        r.put(a.clone()).unwrap();
        r.put(b.clone()).unwrap();
        r.put(VolumeRecord::new("c", "default", VolumeStatus::Creating, 1, None)).unwrap();
        r.remove("c").unwrap();
        drop(r);
        let again = Records::<VolumeRecord>::open(db, &dir).unwrap();
        assert_eq!(again.list(None), vec![a, b]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_legacy_volumes_json_is_imported_once_with_its_ids() {
        let dir = temp_dir("import");
        // The format written before the state database (plughost 0.1).
        let legacy = r#"{
  "old": {"id": "1f2e3d4c5b6a7980", "name": "old", "backend": "default", "status": "available",
          "size": 1048576, "allocated": 0, "location": "/v/old", "source": null,
          "created_at": 1700000000, "updated_at": 1700000001},
  "snap": {"id": "0a0b0c0d0e0f1011", "name": "snap", "backend": "default", "status": "available",
           "size": 1048576, "allocated": 4096, "location": "/v/snap", "source": "old",
           "created_at": 1700000002, "updated_at": 1700000003, "reason": null}
}"#;
        std::fs::write(dir.join("volumes.json"), legacy).unwrap();
        let db = Arc::new(StateDb::open(&dir).unwrap());
        let r = Records::<VolumeRecord>::open(db.clone(), &dir).unwrap();
        assert_eq!(r.get("old").unwrap().meta.id, "1f2e3d4c5b6a7980");
        assert_eq!(r.get("snap").unwrap().source.as_deref(), Some("old"));
        assert!(!dir.join("volumes.json").exists());
        assert!(dir.join("volumes.json.imported").exists());
        r.remove("old").unwrap();
        // A crash between the import's commit and the rename: the file is back, but it is not imported
        // again (the removal stands).
        std::fs::rename(dir.join("volumes.json.imported"), dir.join("volumes.json")).unwrap();
        let again = Records::<VolumeRecord>::open(db, &dir).unwrap();
        assert!(again.get("old").is_none());
        assert!(dir.join("volumes.json.imported").exists());
        std::fs::write(dir.join("volumes.json"), "{not json").unwrap();
        let db = Arc::new(StateDb::open(&temp_dir("import-bad")).unwrap());
        let e = Records::<VolumeRecord>::open(db, &dir).err().unwrap().to_string();
        assert!(e.starts_with("volume records in \"") && e.contains("volumes.json\": key must be a string"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
