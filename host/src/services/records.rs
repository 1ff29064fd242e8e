//! What every service keeps about its resources, written once: the records, per-name locks that
//! serialize conflicting operations on one resource, the create and transition flows, and persistence.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) use super::meta::Meta;
use super::meta::{from_row, to_row};
pub(crate) use super::meta::{Record, MISSING};
pub use crate::control::protocol::ReconcileCounts;
use crate::control::protocol::{ApiError, ErrorKind};
use crate::state::{StateDb, StateError, Table, Write};

/// Which records a reconcile covers, and how many new ones it may adopt.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope<'a> {
    /// The names covered (a page's range; everything for a whole listing).
    pub names: (std::ops::Bound<&'a str>, std::ops::Bound<&'a str>),
    /// Resources found without a record that may be adopted.
    pub adoptable: u64,
}

impl Scope<'_> {
    /// Every record of the backend.
    pub(crate) fn all(adoptable: u64) -> Scope<'static> {
        Scope { names: (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded), adoptable }
    }
}

/// How a reconcile reads what a driver reports: each reported resource's name, and a fresh look at one
/// name (when the listing may be stale).
pub(crate) struct Lookup<'a, T> {
    /// The name of a reported resource.
    pub name_of: fn(&T) -> &str,
    /// The resource of this name as the driver reports it now, if it has one.
    pub recheck: &'a dyn Fn(&str) -> Option<T>,
    /// What the kind refuses in a reported resource besides its name (a size out of range).
    pub check: fn(&T) -> Result<(), String>,
}

impl<T> Clone for Lookup<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Lookup<'_, T> {}

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

/// Where a service's records persist: its table in the state database.
struct Store {
    db: Arc<StateDb>,
    table: Table,
}

/// One change to the records, applied with others in one transaction.
#[derive(Debug)]
pub(crate) enum Change<R> {
    /// Insert or replace.
    Put(R),
    /// Forget the record of this name.
    Remove(String),
}

/// What a reconcile decided about one name (the caller logs the decision itself).
#[derive(Debug)]
pub(crate) enum Verdict<R> {
    /// Nothing to change.
    Unchanged,
    /// Show this record (counters that are not worth a write); nothing is written.
    Refresh(R),
    /// Store this record, counting it under `counter`.
    Put(R, Counter),
    /// Forget the record, counting it under `counter`.
    Remove(Counter),
    /// The driver no longer has it: the record becomes `error` ("missing from backend"), kept.
    Missing,
}

/// What a reconcile counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counter {
    /// A record refreshed from what the driver reports.
    Refreshed,
    /// An interrupted operation that had completed on the backend: finished.
    Completed,
    /// An interrupted operation that had not: undone.
    Undone,
    /// A resource found on the backend without a record: adopted.
    Adopted,
    /// An interrupted operation that could not be finished: the record is in error.
    Failed,
}

impl ReconcileCounts {
    fn count(&mut self, c: Counter) {
        match c {
            Counter::Refreshed => self.refreshed += 1,
            Counter::Completed => self.completed += 1,
            Counter::Undone => self.undone += 1,
            Counter::Adopted => self.adopted += 1,
            Counter::Failed => self.failed += 1,
        }
    }

    /// Adds another backend's counts.
    pub(crate) fn add(&mut self, o: &ReconcileCounts) {
        self.records += o.records;
        self.refreshed += o.refreshed;
        self.completed += o.completed;
        self.undone += o.undone;
        self.missing += o.missing;
        self.adopted += o.adopted;
        self.refused += o.refused;
        self.failed += o.failed;
        self.skipped_backends += o.skipped_backends;
    }
}

/// The records of one service: in memory for reads, in the state database for durability. Every change
/// is written (and synced) before it is visible in memory and before the operation that made it goes on.
pub(crate) struct Records<R: Record> {
    map: Mutex<BTreeMap<String, R>>,
    locks: NameLocks,
    /// Where they persist (none: as long as the process).
    store: Option<Store>,
    /// The names written while a concurrent reconcile runs (see [`Records::watch`]).
    touched: Mutex<Touched>,
}

/// The names written since the oldest running [`Watch`] began.
#[derive(Debug, Default)]
struct Touched {
    watches: usize,
    names: HashSet<String>,
}

/// While it lives, every name written is remembered: a concurrent reconcile looks up again, under the
/// name's lock, what a driver listing taken after the watch began may report stale.
pub(crate) struct Watch<'a, R: Record> {
    records: &'a Records<R>,
}

impl<R: Record> Drop for Watch<'_, R> {
    fn drop(&mut self) {
        let mut t = self.records.touched();
        t.watches -= 1;
        if t.watches == 0 {
            t.names = HashSet::new();
        }
    }
}

impl<R: Record> Records<R> {
    /// Records kept in memory only.
    #[cfg(test)]
    pub(crate) fn in_memory() -> Records<R> {
        Records {
            map: Mutex::new(BTreeMap::new()),
            locks: NameLocks::default(),
            store: None,
            touched: Mutex::default(),
        }
    }

    /// The records in their table of `db`, loaded now. A legacy JSON file of them in `state_dir`
    /// (`volumes.json`) is imported first, once, and renamed `….imported`.
    /// The records of another table of the same database (a kind with two record types: networks and
    /// their ports), in memory only when these are.
    pub(crate) fn sibling<S: Record>(&self) -> Result<Records<S>, StateError> {
        match &self.store {
            Some(store) => {
                let dir = store.db.path().parent().map(Path::to_path_buf).unwrap_or_default();
                Records::open(store.db.clone(), &dir)
            }
            None => Ok(Records {
                map: Mutex::new(BTreeMap::new()),
                locks: NameLocks::default(),
                store: None,
                touched: Mutex::new(Touched::default()),
            }),
        }
    }

    pub(crate) fn open(db: Arc<StateDb>, state_dir: &Path) -> Result<Records<R>, StateError> {
        db.migrate_kind(R::TABLE, R::MIGRATIONS)?;
        let table = Table::new(R::TABLE, R::COLUMNS);
        import_legacy::<R>(&db, &table, state_dir)?;
        let started = std::time::Instant::now();
        let rows = db.rows(&table)?;
        let mut map = BTreeMap::new();
        for row in rows {
            let r: R = from_row(row).map_err(|reason| StateError::Corrupt {
                what: format!("a row of table {}", R::TABLE),
                path: db.path().to_owned(),
                reason,
            })?;
            map.insert(r.name().to_owned(), r);
        }
        log::info!("{} records: {} loaded from {} in {:?}", R::WHAT, map.len(), db.path().display(), started.elapsed());
        Ok(Records {
            map: Mutex::new(map),
            locks: NameLocks::default(),
            store: Some(Store { db, table }),
            touched: Mutex::default(),
        })
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, R>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touched(&self) -> MutexGuard<'_, Touched> {
        self.touched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts remembering the names written from now on, for a concurrent reconcile: take it before
    /// listing what the driver has.
    pub(crate) fn watch(&self) -> Watch<'_, R> {
        self.touched().watches += 1;
        Watch { records: self }
    }

    /// Writes `changes` in one transaction, then shows them in memory. On a write error nothing changes.
    pub(crate) fn write(&self, changes: Vec<Change<R>>) -> Result<(), ApiError> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(Store { db, table }) = &self.store {
            let writes = changes
                .iter()
                .map(|c| match c {
                    Change::Put(r) => to_row(r)
                        .map(Write::Put)
                        .map_err(|e| ApiError::internal(format!("cannot store {} {:?}: {e}", R::WHAT, r.name()))),
                    Change::Remove(name) => Ok(Write::Remove(name.clone())),
                })
                .collect::<Result<Vec<_>, _>>()?;
            db.write(table, &writes).map_err(|e| {
                let what = match &changes[..] {
                    [Change::Put(r)] => format!("{} {:?}", R::WHAT, r.name()),
                    [Change::Remove(n)] => format!("{} {n:?}", R::WHAT),
                    _ => format!("{} {} records", changes.len(), R::WHAT),
                };
                log::error!("cannot record {what}: {e}");
                // A full disk is a capacity problem the caller can act on, not an internal fault.
                let kind = if e.disk_full() { ErrorKind::NoCapacity } else { ErrorKind::Internal };
                ApiError::new(kind, format!("cannot record {what}: {e}"))
            })?;
        }
        {
            let mut t = self.touched();
            if t.watches > 0 {
                for c in &changes {
                    let name = match c {
                        Change::Put(r) => r.name(),
                        Change::Remove(name) => name,
                    };
                    t.names.insert(name.to_owned());
                }
            }
        }
        let mut map = self.map();
        for c in changes {
            match c {
                Change::Put(r) => {
                    map.insert(r.name().to_owned(), r);
                }
                Change::Remove(name) => {
                    map.remove(&name);
                }
            }
        }
        Ok(())
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

    /// What `f` takes from each record that it takes anything from, without copying the records (a
    /// question asked of every record on a hot path: a network's addresses in use at each attach).
    pub(crate) fn filter_map<T>(&self, f: impl FnMut(&R) -> Option<T>) -> Vec<T> {
        self.map().values().filter_map(f).collect()
    }

    /// How many records `backend` holds.
    pub(crate) fn count_on(&self, backend: &str) -> u64 {
        self.map().values().filter(|r| r.backend() == backend).count() as u64
    }

    /// How many records there are of each backend and status.
    pub(crate) fn by_status(&self) -> std::collections::BTreeMap<(String, String), u64> {
        let mut counts = std::collections::BTreeMap::new();
        for r in self.map().values() {
            *counts.entry((r.backend().to_owned(), r.status().to_string())).or_insert(0) += 1;
        }
        counts
    }

    /// How many records one backend holds.
    pub(crate) fn count(&self, backend: &str) -> usize {
        self.map().values().filter(|r| r.backend() == backend).count()
    }

    /// How many records there are.
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Stores a record (new or changed).
    pub(crate) fn put(&self, r: R) -> Result<(), ApiError> {
        self.write(vec![Change::Put(r)])
    }

    /// Changes a record if it exists; stores it only if `f` says it changed something worth writing
    /// (what `f` changed is shown either way).
    pub(crate) fn update(&self, name: &str, f: impl FnOnce(&mut R) -> bool) -> Result<Option<R>, ApiError> {
        let Some(mut r) = self.get(name) else { return Ok(None) };
        if f(&mut r) {
            self.put(r.clone())?;
        } else {
            self.map().insert(name.to_owned(), r.clone());
        }
        Ok(Some(r))
    }

    /// Forgets a record.
    pub(crate) fn remove(&self, name: &str) -> Result<(), ApiError> {
        self.write(vec![Change::Remove(name.to_owned())])
    }

    /// Records that the driver no longer has `name` (once; later calls change nothing).
    pub(crate) fn mark_missing(&self, name: &str) -> Result<Option<R>, ApiError> {
        self.update(name, |r| mark_missing(r))
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
            Ok(v) => Ok(self.update(&name, |r| apply(r, &v))?.unwrap_or(record)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(self.mark_missing(&name)?.unwrap_or(record)),
            Err(e) => Err(e),
        }
    }

    /// Settles an intent left by a call whose outcome was unknown (an isolated worker died during it)
    /// as soon as its name is asked for again, rather than at the next reconcile. The caller holds the
    /// name, so no call on it is in flight: a record still in `intent` is an interrupted one. `ask`
    /// asks the driver about it: found → `done` completes the record; `not_found` → the intent is
    /// dropped (the driver never did it); any other error is the answer.
    pub(crate) fn settle<T>(
        &self,
        name: &str,
        intent: R::Status,
        ask: impl FnOnce(&R) -> Result<T, ApiError>,
        done: impl FnOnce(&mut R, &T),
    ) -> Result<(), ApiError> {
        let Some(r) = self.get(name).filter(|r| r.status() == intent) else { return Ok(()) };
        match ask(&r) {
            Ok(found) => {
                log::info!("{} {name:?}: interrupted {intent} completed on the backend", R::WHAT);
                self.update(name, |r| {
                    done(r, &found);
                    true
                })?;
                Ok(())
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                log::info!("{} {name:?}: interrupted {intent} never happened on the backend; intent dropped", R::WHAT);
                self.remove(name)
            }
            Err(e) => Err(e),
        }
    }

    /// The create flow. The caller holds `record`'s name. Records it (in its transitional status: the
    /// intent) if the name is free, runs `make` (the driver call), then records the outcome (`apply`)
    /// or forgets the name again. The driver is not called unless the intent is on disk.
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
        self.put(record.clone())?;
        match make() {
            Ok(v) => {
                let mut r = record;
                apply(&mut r, v);
                self.put(r.clone())?;
                Ok(r)
            }
            // The driver's process died (or was stopped) during the call: whether it did the work is
            // not known. The intent stays; the reconcile after the worker's restart settles it.
            Err(e) if outcome_unknown(&e) => Err(e),
            Err(e) => {
                self.remove(record.name())?;
                Err(e)
            }
        }
    }

    /// The transition flow. The caller holds the name and passes its current record. Records the
    /// transitional status `during` (the intent), runs `run` (the driver call), then records the outcome
    /// (`done`) or restores the record as it was.
    pub(crate) fn transition<T>(
        &self,
        record: R,
        during: R::Status,
        run: impl FnOnce() -> Result<T, ApiError>,
        done: impl FnOnce(&mut R, T),
    ) -> Result<R, ApiError> {
        let before = record.clone();
        let mut r = record;
        r.set_status(during);
        self.put(r.clone())?;
        match run() {
            Ok(v) => {
                done(&mut r, v);
                self.put(r.clone())?;
                Ok(r)
            }
            Err(e) if outcome_unknown(&e) => Err(e),
            Err(e) => {
                self.put(before)?;
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
        self.transition(
            record,
            during,
            || match run() {
                Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
                other => other,
            },
            |_, ()| {},
        )?;
        self.remove(&name)
    }

    /// Brings the records of `backend` in line with what its driver reports (`reported`, named by
    /// `name_of`), one name at a time in name order. `verdict` decides for each name from its record
    /// (if any) and what the driver reports (if anything); it may call the driver (to finish an
    /// interrupted delete) and logs its decision.
    ///
    /// With `concurrent` (operations may be running: periodic work; a [`Watch`] taken before `reported`
    /// was listed), names an operation holds are skipped, and each change is written while its name is
    /// held. The list may predate an operation that finished since: a record missing from it, and any
    /// name written since the watch began, is looked up once more with `recheck` under its lock (so a
    /// volume deleted meanwhile is not adopted again, nor a size refreshed back). Without it (start-up,
    /// nothing served yet), every change is written in one transaction. A name reported by this backend
    /// but recorded on another one is left alone, logged.
    ///
    /// `scope` limits it to the records whose names fall in a range (a page of a paged listing: what
    /// `reported` covers); `adoptable` is how many resources without a record it may adopt (the
    /// backend's `max_records` less what it holds): the rest are refused, logged, counted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reconcile<T>(
        &self,
        backend: &str,
        reported: Vec<T>,
        scope: Scope<'_>,
        lookup: Lookup<'_, T>,
        concurrent: Option<&Watch<'_, R>>,
        mut adopt: impl FnMut(&T) -> R,
        mut verdict: impl FnMut(R, Option<&T>) -> Verdict<R>,
    ) -> ReconcileCounts {
        let started = std::time::Instant::now();
        let mut counts = ReconcileCounts { at: crate::util::time::now(), ..ReconcileCounts::default() };
        let mut adoptable = scope.adoptable;
        let mut by_name: BTreeMap<String, Option<T>> = {
            let map = self.map();
            map.range::<str, _>(scope.names)
                .filter(|(_, r)| r.backend() == backend)
                .map(|(n, _)| (n.clone(), None))
                .collect()
        };
        let mut rest = Vec::new();
        let Lookup { name_of, recheck, .. } = lookup;
        for t in reported {
            match by_name.get_mut(name_of(&t)) {
                Some(slot) => *slot = Some(t),
                None => rest.push(t),
            }
        }
        for t in rest {
            by_name.insert(name_of(&t).to_owned(), Some(t));
        }
        let total = by_name.len();
        let mut changes = Vec::new();
        let mut held = Vec::new();
        for (i, (name, found)) in by_name.into_iter().enumerate() {
            if i > 0 && i % 20_000 == 0 {
                log::info!("{} backend {backend:?}: reconciled {i} of {total} names", R::WHAT);
            }
            let guard = if concurrent.is_some() {
                match self.try_hold(&name) {
                    Some(g) => g,
                    None => continue,
                }
            } else {
                self.hold(&name)
            };
            let record = self.get(&name);
            if let Some(r) = &record {
                if r.backend() != backend {
                    log::warn!(
                        "{} {name:?}: reported by backend {backend:?} but recorded on {:?}; left alone",
                        R::WHAT,
                        r.backend()
                    );
                    continue;
                }
                counts.records += 1;
            }
            let found = match (found, &record, concurrent) {
                (None, Some(_), Some(_)) => recheck(&name),
                (_, _, Some(_)) if self.touched().names.contains(&name) => recheck(&name),
                (found, _, _) => found,
            };
            if record.is_none() && found.is_none() {
                // Reported, then gone (deleted meanwhile): nothing to record.
                continue;
            }
            let Some(existing) = record else {
                // Found without a record: adopted (a new record, marked so), never dropped; past the
                // backend's max_records, refused (an isolated driver cannot make the host hold more).
                if adoptable == 0 {
                    if counts.refused == 0 {
                        log::warn!(
                            "{} backend {backend:?}: holds max_records {}s; {name:?} and any further ones found are not adopted",
                            R::WHAT,
                            R::WHAT
                        );
                    }
                    counts.refused += 1;
                    continue;
                }
                adoptable -= 1;
                let t = found.as_ref().expect("a name without a record was reported by the driver");
                let mut r = adopt(t);
                r.meta_mut().adopted = true;
                log::info!("{} {name:?}: found on backend {backend:?} without a record; adopted", R::WHAT);
                counts.count(Counter::Adopted);
                self.write_or_collect(
                    Change::Put(r),
                    concurrent.is_some().then_some(guard),
                    &mut changes,
                    &mut held,
                    backend,
                );
                continue;
            };
            let change = match verdict(existing.clone(), found.as_ref()) {
                Verdict::Unchanged => None,
                Verdict::Refresh(r) => {
                    self.map().insert(name, r);
                    None
                }
                Verdict::Put(r, c) => {
                    counts.count(c);
                    Some(Change::Put(r))
                }
                Verdict::Remove(c) => {
                    counts.count(c);
                    Some(Change::Remove(name))
                }
                Verdict::Missing => {
                    let mut r = existing;
                    mark_missing(&mut r).then(|| {
                        counts.missing += 1;
                        Change::Put(r)
                    })
                }
            };
            if let Some(c) = change {
                self.write_or_collect(c, concurrent.is_some().then_some(guard), &mut changes, &mut held, backend);
            }
        }
        self.flush(&mut changes, &mut held, backend);
        counts.duration_ms = started.elapsed().as_millis() as u64;
        counts
    }

    /// A reconcile's change. While requests run, it is written with its name still held: changes
    /// gather with their names' locks (taken without waiting, so a reconcile never waits for a request)
    /// and go in one transaction every [`BATCH`] changes, then the names are let go. At start-up
    /// (nothing served), every change goes in one transaction at the end.
    fn write_or_collect(
        &self,
        c: Change<R>,
        guard: Option<NameGuard>,
        changes: &mut Vec<Change<R>>,
        held: &mut Vec<NameGuard>,
        backend: &str,
    ) {
        changes.push(c);
        let now = guard.is_some();
        held.extend(guard);
        if now && changes.len() >= BATCH {
            self.flush(changes, held, backend);
        }
    }

    /// Writes what a reconcile decided so far, then lets its names go.
    fn flush(&self, changes: &mut Vec<Change<R>>, held: &mut Vec<NameGuard>, backend: &str) {
        if let Err(e) = self.write(std::mem::take(changes)) {
            log::error!("{} backend {backend:?}: reconcile could not record its decisions: {}", R::WHAT, e.message);
        }
        held.clear();
    }
}

/// How many changes a reconcile that runs beside requests writes in one transaction.
const BATCH: usize = 256;

/// The reconcile's verdict on an interrupted removal (`op`: `delete`, `destroy`) whose resource the
/// driver still has: `run` finishes it and the record goes, or the record stays in error saying why.
pub(crate) fn finish_removal<R: Record>(mut r: R, op: &str, run: impl FnOnce() -> Result<(), ApiError>) -> Verdict<R> {
    match run() {
        Ok(()) => {
            log::info!("{} {:?}: interrupted {op} finished", R::WHAT, r.name());
            Verdict::Remove(Counter::Completed)
        }
        Err(e) => {
            log::warn!("{} {:?}: cannot finish an interrupted {op}: {e}", R::WHAT, r.name());
            r.fail(&format!("interrupted {op} could not finish: {}", e.message));
            Verdict::Put(r, Counter::Failed)
        }
    }
}

/// The reconcile's verdict for a kind whose records have one making and one removing transition (a
/// network: `creating`/`deleting`; a port: `attaching`/`detaching`): an interrupted make completed
/// (`apply`, then `done`) or undone; an interrupted removal finished (`remove`) or found done; a settled
/// record refreshed (`apply` says whether anything changed) or marked missing; one marked missing that
/// the driver has again (made again after a reboot, say) is `done` again.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lifecycle_verdict<R: Record, T>(
    mut r: R,
    found: Option<&T>,
    (making, make_op): (R::Status, &str),
    (removing, remove_op): (R::Status, &str),
    done: R::Status,
    apply: impl FnOnce(&mut R, &T) -> bool,
    remove: impl FnOnce(&str) -> Result<(), ApiError>,
) -> Verdict<R> {
    let status = r.status();
    match found {
        Some(t) if status == making => {
            apply(&mut r, t);
            r.set_status(done);
            Verdict::Put(r, Counter::Completed)
        }
        None if status == making => creation_undone(&r, make_op),
        Some(_) if status == removing => {
            let name = r.name().to_owned();
            finish_removal(r, remove_op, || remove(&name))
        }
        None if status == removing => removal_done(&r, remove_op),
        Some(t) if status == <R::Status as super::meta::Status>::ERROR && r.reason() == Some(MISSING) => {
            log::info!("{} {:?}: on backend {:?} again", R::WHAT, r.name(), r.backend());
            apply(&mut r, t);
            r.set_status(done);
            Verdict::Put(r, Counter::Refreshed)
        }
        Some(t) => match apply(&mut r, t) {
            true => Verdict::Put(r, Counter::Refreshed),
            false => Verdict::Unchanged,
        },
        None => Verdict::Missing,
    }
}

/// The verdict on an interrupted removal whose resource the driver no longer has: it had completed.
pub(crate) fn removal_done<R: Record>(r: &R, op: &str) -> Verdict<R> {
    log::info!("{} {:?}: interrupted {op} had completed; record removed", R::WHAT, r.name());
    Verdict::Remove(Counter::Completed)
}

/// The verdict on an interrupted creation (`op`: `create`, `spawn`) whose resource the driver never
/// made: undone.
pub(crate) fn creation_undone<R: Record>(r: &R, op: &str) -> Verdict<R> {
    log::info!("{} {:?}: interrupted {op} never completed; record removed", R::WHAT, r.name());
    Verdict::Remove(Counter::Undone)
}

/// Whether a failed driver call may still have done its work (its worker died or was stopped during
/// the call): then a flow leaves the intent recorded, for the next reconcile to settle.
pub(crate) fn outcome_unknown(e: &ApiError) -> bool {
    matches!(e.kind, ErrorKind::DriverCrashed | ErrorKind::Timeout)
}

/// Marks a record missing from its backend; whether it was not already.
fn mark_missing<R: Record>(r: &mut R) -> bool {
    let first = r.reason() != Some(MISSING);
    if first {
        log::warn!("{} {:?}: missing from backend {:?}; kept as error", R::WHAT, r.name(), r.backend());
        r.fail(MISSING);
    }
    first
}

/// Imports `STATE_DIR/<table>.json` (the format before the state database) once, then renames it
/// `<table>.json.imported`.
fn import_legacy<R: Record>(db: &StateDb, table: &Table, state_dir: &Path) -> Result<(), StateError> {
    let file = format!("{}.json", R::TABLE);
    let path = state_dir.join(&file);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StateError::Io { path, reason: crate::util::fmt::io_text(&e) }),
    };
    if !db.imported(&file)? {
        let corrupt =
            |reason: String| StateError::Corrupt { what: format!("{} records", R::WHAT), path: path.clone(), reason };
        let old: BTreeMap<String, R> = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let rows = old.values().map(to_row).collect::<Result<Vec<_>, _>>().map_err(corrupt)?;
        let n = rows.len();
        db.import(&file, table, rows)?;
        log::info!("imported {n} {} records from {}", R::WHAT, path.display());
    }
    let done = state_dir.join(format!("{file}.imported"));
    std::fs::rename(&path, &done)
        .and_then(|()| std::fs::File::open(state_dir)?.sync_all())
        .map_err(|e| StateError::Io { path: path.clone(), reason: crate::util::fmt::io_text(&e) })?;
    log::info!("{} renamed {}", path.display(), done.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::meta::{from_row, to_row, Status};
    use crate::state::{Column, RowReader};
    use rusqlite::types::Value;
    use serde::Deserialize;
    use serde::Serialize;

    /// A record with the shared meta and nothing of its own; its fields read through to the meta.
    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    struct Thing {
        #[serde(flatten)]
        meta: Meta<u8>,
    }

    impl std::ops::Deref for Thing {
        type Target = Meta<u8>;
        fn deref(&self) -> &Meta<u8> {
            &self.meta
        }
    }

    impl std::ops::DerefMut for Thing {
        fn deref_mut(&mut self) -> &mut Meta<u8> {
            &mut self.meta
        }
    }

    impl Status for u8 {
        const ERROR: u8 = 99;
    }

    impl Record for Thing {
        type Status = u8;
        const WHAT: &'static str = "thing";
        const TABLE: &'static str = "things";
        const COLUMNS: &'static [Column] = &[];
        const MIGRATIONS: &'static [&'static str] = &[];
        fn meta(&self) -> &Meta<u8> {
            &self.meta
        }
        fn meta_mut(&mut self) -> &mut Meta<u8> {
            &mut self.meta
        }
        fn column(&self, name: &str) -> Result<Value, String> {
            Err(format!("no column {name:?}"))
        }
        fn from_row(meta: Meta<u8>, _: &mut RowReader) -> Result<Thing, String> {
            Ok(Thing { meta })
        }
    }

    fn thing(name: &str, status: u8) -> Thing {
        Thing { meta: Meta { updated_at: 0, ..Meta::new(name, "b", status) } }
    }

    #[test]
    fn records_go_to_rows_and_back_as_they_were() {
        fn round_trip<R: Record + PartialEq + std::fmt::Debug>(r: R) {
            let row = to_row(&r).unwrap();
            assert_eq!(row.len(), R::COLUMNS.len());
            assert_eq!(from_row::<R>(row).unwrap(), r);
        }
        let volume: crate::services::volume::VolumeRecord = serde_json::from_value(serde_json::json!({
            "id": "1", "name": "v", "backend": "b", "status": "extending", "created_at": 1, "updated_at": 2,
            "reason": null, "adopted": true, "driver_digest": "blake3:00",
            "size": u64::MAX >> 1, "allocated": 0, "location": "", "source": "w"
        }))
        .unwrap();
        round_trip(volume.clone());
        let instance: crate::services::compute::InstanceRecord = serde_json::from_value(serde_json::json!({
            "id": "2", "name": "i", "backend": "b", "status": "error", "created_at": 1, "updated_at": 2,
            "reason": "gone", "pid": 7, "exit_code": null, "exit_signal": 9, "exit_unknown": false,
            "rss_bytes": 1, "cpu_time_ms": 2, "uptime_ms": 3, "command": "sleep 1", "started_at_ms": null,
            "details": {"pgid": "7"}, "spec": {"command": "sleep", "args": ["1"], "env": {"A": "b"}, "workdir": null}
        }))
        .unwrap();
        round_trip(instance);
        // What a column cannot hold is refused, naming the column.
        let mut big = volume;
        big.size = u64::MAX;
        assert!(to_row(&big).unwrap_err().starts_with("size: "), "{:?}", to_row(&big));
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
        r.put(thing("a", 1)).unwrap();
        let seen =
            r.transition(r.get("a").unwrap(), 2, || Ok(r.get("a").unwrap().status), |t, during| t.status = during + 1);
        assert_eq!(seen.unwrap().status, 3, "the transitional status was visible during the call");
        let e = r.transition(r.get("a").unwrap(), 9, || Err::<(), _>(ApiError::internal("x")), |_, ()| {});
        assert!(e.is_err());
        assert_eq!(r.get("a").unwrap().status, 3, "restored");
        r.removal(r.get("a").unwrap(), 5, || Err(ApiError::not_found("gone already"))).unwrap();
        assert!(r.get("a").is_none(), "a driver that lost it counts as removed");
        r.put(thing("b", 1)).unwrap();
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

    /// The driver's list is taken, then an operation deletes one name and changes another before the
    /// reconcile reaches them: what the list says of them is stale and must not be written back.
    #[test]
    fn a_concurrent_reconcile_does_not_write_back_what_changed_after_the_listing() {
        let r = Records::<Thing>::in_memory();
        r.put(thing("changed", 1)).unwrap();
        r.put(thing("deleted", 1)).unwrap();
        let driver = Mutex::new(BTreeMap::from([("changed".to_owned(), 1u8), ("deleted".to_owned(), 1u8)]));
        let watch = r.watch();
        let listed: Vec<(String, u8)> = driver.lock().unwrap().iter().map(|(n, s)| (n.clone(), *s)).collect();
        // Meanwhile, under their locks: one deleted, one changed (driver first, then the record).
        driver.lock().unwrap().remove("deleted");
        r.write(vec![Change::Remove("deleted".to_owned())]).unwrap();
        driver.lock().unwrap().insert("changed".to_owned(), 2);
        r.put(thing("changed", 2)).unwrap();
        let counts = r.reconcile(
            "b",
            listed,
            Scope::all(u64::MAX),
            Lookup {
                name_of: |(n, _)| n,
                recheck: &|name| driver.lock().unwrap().get(name).map(|s| (name.to_owned(), *s)),
                check: |_| Ok(()),
            },
            Some(&watch),
            |(n, s)| thing(n, *s),
            |rec, found| match found {
                Some((_, s)) if rec.status != *s => Verdict::Put(thing(&rec.name, *s), Counter::Refreshed),
                Some(_) => Verdict::Unchanged,
                None => Verdict::Missing,
            },
        );
        drop(watch);
        assert!(r.get("deleted").is_none(), "a name deleted after the listing was adopted again");
        assert_eq!(r.get("changed").unwrap().status, 2, "a stale listing was written back");
        assert_eq!((counts.adopted, counts.refreshed, counts.missing), (0, 0, 0), "{counts:?}");
        assert!(r.touched().names.is_empty() && r.touched().watches == 0);
    }

    #[test]
    fn a_page_touches_only_its_names_and_adoption_stops_at_its_budget() {
        use std::ops::Bound::{Excluded, Included};
        let r = Records::<Thing>::in_memory();
        for n in ["a", "c", "e", "g"] {
            r.put(thing(n, 1)).unwrap();
        }
        // The page covers (a, e]: it reports c, d and e; a and g are outside it, and d and x are new.
        let page = vec![("c".to_owned(), 1u8), ("d".to_owned(), 1), ("e".to_owned(), 1)];
        let none = |_: &str| None;
        let lookup = Lookup { name_of: |(n, _): &(String, u8)| n.as_str(), recheck: &none, check: |_| Ok(()) };
        let verdict = |_: Thing, found: Option<&(String, u8)>| match found {
            Some(_) => Verdict::Unchanged,
            None => Verdict::Missing,
        };
        let scope = Scope { names: (Excluded("a"), Included("e")), adoptable: 1 };
        let counts = r.reconcile("b", page, scope, lookup, None, |(n, s)| thing(n, *s), verdict);
        assert_eq!((counts.records, counts.adopted, counts.missing, counts.refused), (2, 1, 0, 0), "{counts:?}");
        assert!(r.get("d").is_some(), "adopted within its budget");
        // g is outside the page: not missing. A second page with no budget refuses what it would adopt.
        assert_ne!(r.get("g").unwrap().meta.reason.as_deref(), Some(MISSING));
        let scope = Scope { names: (Excluded("e"), std::ops::Bound::Unbounded), adoptable: 0 };
        let counts = r.reconcile("b", vec![("x".to_owned(), 1)], scope, lookup, None, |(n, s)| thing(n, *s), verdict);
        assert_eq!((counts.records, counts.adopted, counts.missing, counts.refused), (1, 0, 1, 1), "{counts:?}");
        assert!(r.get("x").is_none(), "nothing adopted past max_records");
        assert_eq!(r.get("g").unwrap().meta.reason.as_deref(), Some(MISSING), "g was in this page's range");
    }
}
