//! What every service keeps about its resources, written once: the records, per-name locks that
//! serialize conflicting operations on one resource, the create and transition flows, and persistence.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{ApiError, ErrorKind};

/// A resource record (a volume, an instance).
pub(crate) trait Record: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Its status type.
    type Status: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + Send;
    /// What the resource is called in messages: `volume`, `instance`.
    const WHAT: &'static str;
    /// Its name, unique within the service.
    fn name(&self) -> &str;
    /// The backend holding it.
    fn backend(&self) -> &str;
    /// Its status.
    fn status(&self) -> Self::Status;
    /// Changes its status (clearing `reason` unless it is the error status) and its `updated_at`.
    fn set_status(&mut self, status: Self::Status);
    /// Why it is in error, if it is.
    fn reason(&self) -> Option<&str>;
    /// Puts it in error, saying why.
    fn fail(&mut self, reason: &str);
}

/// Implements [`Record`] for a record type with the usual fields (`name`, `backend`, `status`,
/// `reason`, `updated_at`), given its status type, what it is called and its error status.
macro_rules! impl_record {
    ($record:ty, $status:ty, $what:literal, $error:expr) => {
        impl $crate::services::records::Record for $record {
            type Status = $status;
            const WHAT: &'static str = $what;
            fn name(&self) -> &str {
                &self.name
            }
            fn backend(&self) -> &str {
                &self.backend
            }
            fn status(&self) -> $status {
                self.status
            }
            fn set_status(&mut self, status: $status) {
                self.status = status;
                if status != $error {
                    self.reason = None;
                }
                self.updated_at = $crate::services::records::now();
            }
            fn reason(&self) -> Option<&str> {
                self.reason.as_deref()
            }
            fn fail(&mut self, reason: &str) {
                self.set_status($error);
                self.reason = Some(reason.to_owned());
            }
        }
    };
}
pub(crate) use impl_record;

/// Why a record is in error when its driver no longer reports the resource.
pub(crate) const MISSING: &str = "missing from backend";

/// A fresh record id: 16 hex digits, unique within this host.
pub(crate) fn new_id() -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", (nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9))
}

/// Seconds since the epoch, now.
pub(crate) fn now() -> u64 {
    crate::backend::unix_secs(SystemTime::now())
}

/// Held while an operation on one name runs.
pub(crate) type NameGuard = parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()>;

/// Per-resource locks: conflicting operations on one name run one after the other.
#[derive(Debug, Default)]
struct NameLocks(Mutex<HashMap<String, Arc<parking_lot::Mutex<()>>>>);

impl NameLocks {
    fn get(&self, name: &str) -> Arc<parking_lot::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 4096 {
            m.retain(|_, l| Arc::strong_count(l) > 1);
        }
        m.entry(name.to_owned()).or_default().clone()
    }
}

/// A JSON file of records, rewritten whole (synced, then renamed into place) after every change.
struct JsonStore {
    path: PathBuf,
    write: Mutex<()>,
}

/// The records of one service.
pub(crate) struct Records<R: Record> {
    map: Mutex<BTreeMap<String, R>>,
    locks: NameLocks,
    /// Where they persist (none: as long as the process).
    store: Option<JsonStore>,
}

impl<R: Record> Records<R> {
    /// Records kept in memory only.
    #[cfg(test)]
    pub(crate) fn in_memory() -> Records<R> {
        Records { map: Mutex::new(BTreeMap::new()), locks: NameLocks::default(), store: None }
    }

    /// Records kept in a JSON file, loaded from it now.
    pub(crate) fn json(path: PathBuf) -> Result<Records<R>, String> {
        let map: BTreeMap<String, R> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} records \"{}\" are unreadable: {e}", R::WHAT, path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {} records \"{}\": {e}", R::WHAT, path.display())),
        };
        Ok(Records {
            map: Mutex::new(map),
            locks: NameLocks::default(),
            store: Some(JsonStore { path, write: Mutex::new(()) }),
        })
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, R>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self) {
        let Some(JsonStore { path, write }) = &self.store else { return };
        // One writer at a time, and the snapshot is taken inside: an older snapshot never lands last.
        let _one = write.lock().unwrap_or_else(|p| p.into_inner());
        let text = match serde_json::to_vec_pretty(&*self.map()) {
            Ok(t) => t,
            Err(e) => return log::error!("cannot serialize {} records: {e}", R::WHAT),
        };
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            log::error!("cannot save {} records to \"{}\": {e}", R::WHAT, path.display());
        }
    }

    /// Serializes operations on `name` until the guard is dropped.
    pub(crate) fn hold(&self, name: &str) -> NameGuard {
        self.locks.get(name).lock_arc()
    }

    /// Holds two names, in a fixed order so that two opposite operations cannot deadlock.
    pub(crate) fn hold_two(&self, a: &str, b: &str) -> (NameGuard, Option<NameGuard>) {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        let g1 = self.hold(first);
        let g2 = (first != second).then(|| self.hold(second));
        (g1, g2)
    }

    /// Tries to hold `name` without waiting (periodic work skips names an operation holds).
    pub(crate) fn try_hold(&self, name: &str) -> Option<NameGuard> {
        self.locks.get(name).try_lock_arc()
    }

    /// One record.
    pub(crate) fn get(&self, name: &str) -> Option<R> {
        self.map().get(name).cloned()
    }

    /// One record, or `not_found` naming it.
    pub(crate) fn existing(&self, name: &str) -> Result<R, ApiError> {
        self.get(name).ok_or_else(|| ApiError::not_found(format!("{} {name:?} not found", R::WHAT)))
    }

    /// Every record (of one backend).
    pub(crate) fn list(&self, backend: Option<&str>) -> Vec<R> {
        self.map().values().filter(|r| backend.is_none_or(|b| r.backend() == b)).cloned().collect()
    }

    /// Stores a record (new or changed) and persists.
    pub(crate) fn put(&self, r: R) {
        self.map().insert(r.name().to_owned(), r);
        self.persist();
    }

    /// Changes a record in place if it exists; persists only if `f` says it changed something.
    pub(crate) fn update(&self, name: &str, f: impl FnOnce(&mut R) -> bool) -> Option<R> {
        let (r, changed) = {
            let mut map = self.map();
            let r = map.get_mut(name)?;
            let changed = f(r);
            (r.clone(), changed)
        };
        if changed {
            self.persist();
        }
        Some(r)
    }

    /// Forgets a record and persists.
    pub(crate) fn remove(&self, name: &str) {
        self.map().remove(name);
        self.persist();
    }

    /// Records that the driver no longer has `name` (once; later calls change nothing).
    pub(crate) fn mark_missing(&self, name: &str) -> Option<R> {
        self.update(name, |r| {
            let first = r.reason() != Some(MISSING);
            if first {
                log::warn!("{} {:?}: missing from backend {:?}; kept as error", R::WHAT, r.name(), r.backend());
                r.fail(MISSING);
            }
            first
        })
    }

    /// The refresh flow (`get`). The caller holds the name and passes its current record and what the
    /// driver said: the record takes what the driver reports (`apply` says whether anything worth
    /// writing changed); a driver error is the answer, never the stale record as if it were fresh; a
    /// driver that no longer has it turns the record to error.
    pub(crate) fn refresh<T>(
        &self,
        record: R,
        fetched: Result<T, ApiError>,
        apply: impl FnOnce(&mut R, &T) -> bool,
    ) -> Result<R, ApiError> {
        let name = record.name().to_owned();
        match fetched {
            Ok(v) => Ok(self.update(&name, |r| apply(r, &v)).unwrap_or(record)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(self.mark_missing(&name).unwrap_or(record)),
            Err(e) => Err(e),
        }
    }

    /// The create flow. The caller holds `record`'s name. Records it (in its transitional status) if the
    /// name is free, runs `make` (the driver call), then records the outcome (`apply`) or forgets the
    /// name again.
    pub(crate) fn create<T>(
        &self,
        record: R,
        make: impl FnOnce() -> Result<T, ApiError>,
        apply: impl FnOnce(&mut R, T),
    ) -> Result<R, ApiError> {
        if let Some(existing) = self.get(record.name()) {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} {:?} already exists (backend {:?}, {})",
                    R::WHAT,
                    record.name(),
                    existing.backend(),
                    existing.status()
                ),
            ));
        }
        self.put(record.clone());
        match make() {
            Ok(v) => {
                let mut r = record;
                apply(&mut r, v);
                self.put(r.clone());
                Ok(r)
            }
            Err(e) => {
                self.remove(record.name());
                Err(e)
            }
        }
    }

    /// The transition flow. The caller holds the name and passes its current record. Records the
    /// transitional status `during`, runs `run` (the driver call), then records the outcome (`done`) or
    /// restores the status it had.
    pub(crate) fn transition<T>(
        &self,
        record: R,
        during: R::Status,
        run: impl FnOnce() -> Result<T, ApiError>,
        done: impl FnOnce(&mut R, T),
    ) -> Result<R, ApiError> {
        let before = record.status();
        let mut r = record;
        r.set_status(during);
        self.put(r.clone());
        match run() {
            Ok(v) => {
                done(&mut r, v);
                self.put(r.clone());
                Ok(r)
            }
            Err(e) => {
                r.set_status(before);
                self.put(r);
                Err(e)
            }
        }
    }

    /// The removal flow. The caller holds the name and passes its current record. Records `during`,
    /// runs `run`; a driver that no longer has the resource counts as removed.
    pub(crate) fn removal(
        &self,
        record: R,
        during: R::Status,
        run: impl FnOnce() -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let name = record.name().to_owned();
        let outcome = self.transition(
            record,
            during,
            || match run() {
                Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
                other => other,
            },
            |_, ()| {},
        );
        outcome.map(|_| self.remove(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    struct Thing {
        name: String,
        backend: String,
        status: u8,
        reason: Option<String>,
        updated_at: u64,
    }

    impl_record!(Thing, u8, "thing", 99);

    fn thing(name: &str, status: u8) -> Thing {
        Thing { name: name.into(), backend: "b".into(), status, reason: None, updated_at: 0 }
    }

    #[test]
    fn create_records_the_outcome_or_forgets_the_name() {
        let r = Records::<Thing>::in_memory();
        let made = r.create(thing("a", 0), || Ok(7u8), |t, v| t.status = v).unwrap();
        assert_eq!(made.status, 7);
        assert_eq!(r.get("a").unwrap().status, 7);
        let e = r.create(thing("a", 0), || Ok(1u8), |_, _| {}).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        let e = r.create(thing("b", 0), || Err::<u8, _>(ApiError::internal("no")), |_, _| {}).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(r.get("b").is_none(), "a failed create leaves no record");
    }

    #[test]
    fn transitions_show_while_running_and_restore_on_failure() {
        let r = Records::<Thing>::in_memory();
        r.put(thing("a", 1));
        let seen =
            r.transition(r.get("a").unwrap(), 2, || Ok(r.get("a").unwrap().status), |t, during| t.status = during + 1);
        assert_eq!(seen.unwrap().status, 3, "the transitional status was visible during the call");
        let e = r.transition(r.get("a").unwrap(), 9, || Err::<(), _>(ApiError::internal("x")), |_, ()| {});
        assert!(e.is_err());
        assert_eq!(r.get("a").unwrap().status, 3, "restored");
        r.removal(r.get("a").unwrap(), 5, || Err(ApiError::not_found("gone already"))).unwrap();
        assert!(r.get("a").is_none(), "a driver that lost it counts as removed");
        r.put(thing("b", 1));
        let e = r.refresh(r.get("b").unwrap(), Err::<u8, _>(ApiError::internal("disk on fire")), |_, _| true);
        assert_eq!(e.unwrap_err().message, "disk on fire", "a driver error is the answer");
        let lost = r.refresh(r.get("b").unwrap(), Err::<u8, _>(ApiError::not_found("no")), |_, _| true).unwrap();
        assert_eq!((lost.status, lost.reason.as_deref()), (99, Some(MISSING)));
        let back = r.refresh(lost, Ok(1u8), |t, v| {
            t.set_status(*v);
            true
        });
        assert_eq!(back.unwrap().reason, None);
    }

    #[test]
    fn one_name_at_a_time_and_opposite_pairs_do_not_deadlock() {
        let r = Arc::new(Records::<Thing>::in_memory());
        let held = r.hold("x");
        assert!(r.try_hold("x").is_none());
        assert!(r.try_hold("y").is_some());
        drop(held);
        assert!(r.try_hold("x").is_some());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let (a, b) = if i % 2 == 0 { ("p", "q") } else { ("q", "p") };
                        let _g = r.hold_two(a, b);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn json_store_survives_a_reload() {
        let dir = std::env::temp_dir().join(format!("plughost-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("things.json");
        let r = Records::<Thing>::json(path.clone()).unwrap();
        r.put(thing("a", 1));
        r.put(thing("b", 2));
        r.remove("a");
        let again = Records::<Thing>::json(path.clone()).unwrap();
        assert_eq!(again.list(None), vec![thing("b", 2)]);
        std::fs::write(&path, "{not json").unwrap();
        assert!(Records::<Thing>::json(path).err().is_some_and(|e| e.contains("unreadable")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
