//! Managers: the policy and bookkeeping of one domain. They validate requests, name and track resources,
//! serialize conflicting operations on one resource, and call the backend's driver for the work.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use plugin_api::{CapacityStats, ComputeClient, Instance, InstanceSpec, Volume, VolumeClient};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backend::{unix_secs, ApiError, Backend, Health, Op};

/// Resource names follow [`plugin_api::check_name`], the rule drivers use too.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    plugin_api::check_name(what, name).map_err(ApiError::from)
}

fn str_arg<'a>(args: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    args.get(key).and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("missing string argument {key:?}")))
}

fn opt_str<'a>(args: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(format!("argument {key:?} must be a string"))),
    }
}

fn size_arg(args: &Value, key: &str) -> Result<u64, ApiError> {
    match args.get(key) {
        Some(Value::Number(n)) => {
            n.as_u64().ok_or_else(|| ApiError::invalid(format!("argument {key:?}: expected a non-negative size")))
        }
        Some(Value::String(s)) => {
            plugin_api::parse_size(s).map_err(|e| ApiError::invalid(format!("argument {key:?}: {e}")))
        }
        _ => Err(ApiError::invalid(format!("missing size argument {key:?} (e.g. \"10MiB\")"))),
    }
}

fn new_id() -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", (nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9))
}

/// Per-resource locks: conflicting operations on one name run one after the other.
#[derive(Debug, Default)]
struct NameLocks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl NameLocks {
    fn get(&self, name: &str) -> Arc<Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 4096 {
            m.retain(|_, l| Arc::strong_count(l) > 1);
        }
        m.entry(name.to_owned()).or_default().clone()
    }
}

fn hold(l: &Mutex<()>) -> MutexGuard<'_, ()> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// The backends of one service and which one is the default.
#[derive(Debug)]
pub struct Backends<D> {
    /// In configuration order.
    pub list: Vec<Arc<Backend<D>>>,
    /// Name of the default backend.
    pub default: String,
}

impl<D> Backends<D> {
    fn pick(&self, kind: &str, name: Option<&str>) -> Result<&Arc<Backend<D>>, ApiError> {
        let wanted = name.unwrap_or(&self.default);
        self.list.iter().find(|b| b.name == wanted).ok_or_else(|| {
            let known: Vec<&str> = self.list.iter().map(|b| b.name.as_str()).collect();
            ApiError::not_found(format!("unknown {kind} backend {wanted:?} (known: {})", known.join(", ")))
        })
    }
    fn by_name(&self, name: &str) -> Option<&Arc<Backend<D>>> {
        self.list.iter().find(|b| b.name == name)
    }
}

// ---------------------------------------------------------------------------------------------------
// Volumes

/// What the volume manager knows about one volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Stable id.
    pub id: String,
    /// Name, unique within the service.
    pub name: String,
    /// Backend holding it.
    pub backend: String,
    /// creating / available / extending / snapshotting / deleting / error.
    pub status: String,
    /// Provisioned bytes.
    pub size: u64,
    /// Allocated bytes, as last reported by the driver.
    pub allocated: u64,
    /// Driver-specific location.
    pub location: String,
    /// Snapshot source.
    pub source: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// Last change, seconds since the epoch.
    pub updated_at: u64,
}

impl VolumeRecord {
    fn new(name: &str, backend: &str, status: &str, size: u64, source: Option<&str>) -> VolumeRecord {
        let now = unix_secs(SystemTime::now());
        VolumeRecord {
            id: new_id(),
            name: name.to_owned(),
            backend: backend.to_owned(),
            status: status.to_owned(),
            size,
            allocated: 0,
            location: String::new(),
            source: source.map(str::to_owned),
            created_at: now,
            updated_at: now,
        }
    }

    fn apply(&mut self, v: &Volume) {
        self.size = v.size;
        self.allocated = v.allocated;
        self.location = v.location.clone();
        self.source = v.source.clone();
        self.updated_at = unix_secs(SystemTime::now());
    }
}

/// The volume manager.
#[derive(Debug)]
pub struct VolumeManager {
    backends: Backends<VolumeClient>,
    records: Mutex<BTreeMap<String, VolumeRecord>>,
    locks: NameLocks,
    store: PathBuf,
    /// Held across snapshot-and-write, so that an older snapshot can never be written after a newer one.
    persist_lock: Mutex<()>,
    stats: Mutex<BTreeMap<String, CapacityStats>>,
}

impl VolumeManager {
    /// A manager over `backends`, keeping its records in `store` (JSON), reconciled with what the
    /// drivers report.
    pub fn new(backends: Backends<VolumeClient>, store: PathBuf) -> VolumeManager {
        let records: BTreeMap<String, VolumeRecord> = std::fs::read(&store)
            .ok()
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!("ignoring unreadable volume records {}: {e}", store.display());
                    None
                }
            })
            .unwrap_or_default();
        let m = VolumeManager {
            backends,
            records: Mutex::new(records),
            locks: NameLocks::default(),
            store,
            persist_lock: Mutex::new(()),
            stats: Mutex::new(BTreeMap::new()),
        };
        m.reconcile();
        m
    }

    /// The backends.
    pub fn backends(&self) -> &Backends<VolumeClient> {
        &self.backends
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<String, VolumeRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the records to the store: a snapshot taken and written under `persist_lock`, through a
    /// temporary file that is synced and renamed into place.
    fn persist(&self) {
        let _one_writer = self.persist_lock.lock().unwrap_or_else(|p| p.into_inner());
        let text = match serde_json::to_vec_pretty(&*self.records()) {
            Ok(t) => t,
            Err(e) => return log::error!("cannot serialize volume records: {e}"),
        };
        let tmp = self.store.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.store)
        };
        if let Err(e) = write() {
            log::error!("cannot save volume records to {}: {e}", self.store.display());
        }
    }

    /// Adopts volumes the drivers have but the records lack, and drops records of volumes that a
    /// working backend no longer has.
    pub fn reconcile(&self) {
        for b in &self.backends.list {
            if b.health() != Health::Up {
                continue;
            }
            let vols = match b.call(Op::List, |d| d.list()) {
                Ok(v) => v,
                Err(e) => {
                    log::warn!("volume backend {:?}: cannot list volumes: {e}", b.name);
                    continue;
                }
            };
            let mut recs = self.records();
            for v in &vols {
                let r = recs
                    .entry(v.name.clone())
                    .or_insert_with(|| VolumeRecord::new(&v.name, &b.name, "available", 0, None));
                if r.backend == b.name {
                    r.apply(v);
                    r.status = "available".to_owned();
                }
            }
            recs.retain(|name, r| r.backend != b.name || vols.iter().any(|v| &v.name == name));
        }
        self.persist();
    }

    /// Refreshes capacity stats and health of every backend (a periodic task).
    pub fn periodic(&self) {
        for b in &self.backends.list {
            b.check_health();
            if !b.initialised() {
                continue;
            }
            if let Ok(s) = b.call(Op::Stats, |d| d.stats()) {
                if let Ok(mut m) = self.stats.lock() {
                    m.insert(b.name.clone(), s);
                }
            }
        }
    }

    /// Cached capacity stats of a backend.
    pub fn stats_of(&self, backend: &str) -> Option<CapacityStats> {
        self.stats.lock().ok().and_then(|m| m.get(backend).copied())
    }

    fn record_json(r: &VolumeRecord) -> Value {
        serde_json::to_value(r).unwrap_or(Value::Null)
    }

    /// Handles one request.
    pub fn handle(&self, op: &str, args: &Value) -> Result<Value, ApiError> {
        match op {
            "create" => self.create(args),
            "delete" => self.delete(str_arg(args, "name")?),
            "extend" => self.extend(str_arg(args, "name")?, size_arg(args, "size")?),
            "snapshot" => self.snapshot(str_arg(args, "name")?, str_arg(args, "snapshot")?),
            "get" => self.get(str_arg(args, "name")?),
            "list" => {
                let backend = opt_str(args, "backend")?;
                if let Some(b) = backend {
                    self.backends.pick("volume", Some(b))?;
                }
                let recs = self.records();
                Ok(Value::Array(
                    recs.values().filter(|r| backend.is_none_or(|b| r.backend == b)).map(Self::record_json).collect(),
                ))
            }
            "stats" => {
                let b = self.backends.pick("volume", opt_str(args, "backend")?)?;
                let s = b.call(Op::Stats, |d| d.stats())?;
                Ok(json!({"backend": b.name, "total_bytes": s.total_bytes, "free_bytes": s.free_bytes,
                    "provisioned_bytes": s.provisioned_bytes, "allocated_bytes": s.allocated_bytes, "volumes": s.volumes}))
            }
            other => Err(ApiError::new("invalid_request", format!("unknown volume operation {other:?}"))),
        }
    }

    fn create(&self, args: &Value) -> Result<Value, ApiError> {
        let name = str_arg(args, "name")?;
        check_name("volume", name)?;
        let size = size_arg(args, "size")?;
        let backend = self.backends.pick("volume", opt_str(args, "backend")?)?;
        let lock = self.locks.get(name);
        let _held = hold(&lock);
        self.add(name, backend, size, None, |d| d.create(name, size), Op::Create)
    }

    /// Records `name` as `creating`, runs the driver call that creates it, then records the result or
    /// forgets the name again. The caller holds the name's lock.
    fn add(
        &self,
        name: &str,
        backend: &Backend<VolumeClient>,
        size: u64,
        source: Option<&str>,
        make: impl FnOnce(&VolumeClient) -> Result<Volume, plugin_api::DriverError>,
        op: Op,
    ) -> Result<Value, ApiError> {
        {
            let mut recs = self.records();
            if let Some(r) = recs.get(name) {
                return Err(ApiError::new(
                    "already_exists",
                    format!("volume {name:?} already exists (backend {:?}, {})", r.backend, r.status),
                ));
            }
            recs.insert(name.to_owned(), VolumeRecord::new(name, &backend.name, "creating", size, source));
        }
        let result = backend.call(op, make);
        let out = {
            let mut recs = self.records();
            match result {
                Ok(v) => {
                    let r = recs.get_mut(name).ok_or_else(|| ApiError::new("internal", "record vanished"))?;
                    r.apply(&v);
                    if source.is_some() {
                        r.source = source.map(str::to_owned);
                    }
                    r.status = "available".to_owned();
                    Ok(Self::record_json(r))
                }
                Err(e) => {
                    recs.remove(name);
                    Err(e)
                }
            }
        };
        self.persist();
        out
    }

    fn existing(&self, name: &str) -> Result<(VolumeRecord, Arc<Backend<VolumeClient>>), ApiError> {
        check_name("volume", name)?;
        let r = self
            .records()
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("volume {name:?} not found")))?;
        let b = self.backends.by_name(&r.backend).cloned().ok_or_else(|| {
            ApiError::new("unavailable", format!("volume {name:?}: backend {:?} is not configured", r.backend))
        })?;
        Ok((r, b))
    }

    fn set_status(&self, name: &str, status: &str) {
        if let Some(r) = self.records().get_mut(name) {
            r.status = status.to_owned();
        }
    }

    fn delete(&self, name: &str) -> Result<Value, ApiError> {
        let lock = self.locks.get(name);
        let _held = hold(&lock);
        let (rec, b) = self.existing(name)?;
        self.set_status(name, "deleting");
        let result = b.call(Op::Delete, |d| d.delete(name));
        let out = match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind == "not_found" => Ok(()),
            Err(e) => Err(e),
        };
        match &out {
            Ok(()) => {
                self.records().remove(name);
            }
            Err(_) => self.set_status(name, &rec.status),
        }
        self.persist();
        out.map(|()| json!({"name": name, "deleted": true}))
    }

    fn extend(&self, name: &str, size: u64) -> Result<Value, ApiError> {
        let lock = self.locks.get(name);
        let _held = hold(&lock);
        let (rec, b) = self.existing(name)?;
        if size < rec.size {
            return Err(ApiError::invalid(format!(
                "volume {name:?}: new size {size} is smaller than current size {}",
                rec.size
            )));
        }
        self.set_status(name, "extending");
        let result = b.call(Op::Extend, |d| d.extend(name, size));
        let out = {
            let mut recs = self.records();
            let r = recs.get_mut(name).ok_or_else(|| ApiError::new("internal", "record vanished"))?;
            r.status = "available".to_owned();
            result.map(|v| {
                r.apply(&v);
                Self::record_json(r)
            })
        };
        self.persist();
        out
    }

    fn snapshot(&self, name: &str, snapshot: &str) -> Result<Value, ApiError> {
        check_name("volume", snapshot)?;
        // Lock both names in a fixed order so that two opposite snapshots cannot deadlock.
        let (first, second) = if name <= snapshot { (name, snapshot) } else { (snapshot, name) };
        let (l1, l2) = (self.locks.get(first), self.locks.get(second));
        let _h1 = hold(&l1);
        let _h2 = if first == second { None } else { Some(hold(&l2)) };
        let (rec, b) = self.existing(name)?;
        self.add(snapshot, &b, rec.size, Some(name), |d| d.snapshot(name, snapshot), Op::Snapshot)
    }

    fn get(&self, name: &str) -> Result<Value, ApiError> {
        let (_, b) = self.existing(name)?;
        let fresh = b.call(Op::Get, |d| d.get(name));
        let mut recs = self.records();
        let r = recs.get_mut(name).ok_or_else(|| ApiError::not_found(format!("volume {name:?} not found")))?;
        match fresh {
            Ok(v) => r.apply(&v),
            Err(e) if e.kind == "not_found" => r.status = "error".to_owned(),
            Err(_) => {}
        }
        Ok(Self::record_json(r))
    }

    /// Drivers' cleanup, once no request is in flight.
    pub fn cleanup(&self) {
        self.persist();
        for b in &self.backends.list {
            b.cleanup();
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Compute

/// What the compute manager knows about one instance.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InstanceRecord {
    /// Stable id.
    pub id: String,
    /// Name, unique within the service.
    pub name: String,
    /// Backend running it.
    pub backend: String,
    /// spawning / running / stopped / paused / stopping / starting / rebooting / deleting / error.
    pub status: String,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Exit code of the last run.
    pub exit_code: Option<i32>,
    /// Signal that ended the last run.
    pub exit_signal: Option<i32>,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
    /// CPU time in milliseconds.
    pub cpu_time_ms: u64,
    /// Uptime in milliseconds.
    pub uptime_ms: u64,
    /// Command line.
    pub command: String,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// Last sync, seconds since the epoch.
    pub updated_at: u64,
}

impl InstanceRecord {
    fn new(name: &str, backend: &str, status: &str, command: &str) -> InstanceRecord {
        let now = unix_secs(SystemTime::now());
        InstanceRecord {
            id: new_id(),
            name: name.to_owned(),
            backend: backend.to_owned(),
            status: status.to_owned(),
            pid: None,
            exit_code: None,
            exit_signal: None,
            rss_bytes: 0,
            cpu_time_ms: 0,
            uptime_ms: 0,
            command: command.to_owned(),
            created_at: now,
            updated_at: now,
        }
    }

    fn apply(&mut self, i: &Instance) {
        self.status = i.state.as_str().to_owned();
        self.pid = i.pid;
        self.exit_code = i.exit_code;
        self.exit_signal = i.exit_signal;
        self.rss_bytes = i.rss_bytes;
        self.cpu_time_ms = i.cpu_time_ms;
        self.uptime_ms = i.uptime_ms;
        self.command = i.command.clone();
        self.updated_at = unix_secs(SystemTime::now());
    }
}

/// The compute manager.
#[derive(Debug)]
pub struct ComputeManager {
    backends: Backends<ComputeClient>,
    records: Mutex<BTreeMap<String, InstanceRecord>>,
    locks: NameLocks,
}

impl ComputeManager {
    /// A manager over `backends`; instances already known to the drivers are adopted.
    pub fn new(backends: Backends<ComputeClient>) -> ComputeManager {
        let m = ComputeManager { backends, records: Mutex::new(BTreeMap::new()), locks: NameLocks::default() };
        m.sync();
        m
    }

    /// The backends.
    pub fn backends(&self) -> &Backends<ComputeClient> {
        &self.backends
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<String, InstanceRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs each instance's real state from its driver into the records (a periodic task); also
    /// checks backend health.
    pub fn sync(&self) {
        for b in &self.backends.list {
            b.check_health();
            if !b.initialised() {
                continue;
            }
            let Ok(list) = b.call(Op::List, |d| d.list()) else { continue };
            for i in &list {
                let lock = self.locks.get(&i.name);
                let Ok(_held) = lock.try_lock() else { continue }; // an operation is running; next time
                let mut recs = self.records();
                let r = recs.entry(i.name.clone()).or_insert_with(|| InstanceRecord::new(&i.name, &b.name, "", ""));
                if r.backend == b.name {
                    r.apply(i);
                }
            }
        }
    }

    fn json(r: &InstanceRecord) -> Value {
        serde_json::to_value(r).unwrap_or(Value::Null)
    }

    fn existing(&self, name: &str) -> Result<Arc<Backend<ComputeClient>>, ApiError> {
        check_name("instance", name)?;
        let backend = self
            .records()
            .get(name)
            .map(|r| r.backend.clone())
            .ok_or_else(|| ApiError::not_found(format!("instance {name:?} not found")))?;
        self.backends.by_name(&backend).cloned().ok_or_else(|| {
            ApiError::new("unavailable", format!("instance {name:?}: backend {backend:?} is not configured"))
        })
    }

    fn transition(
        &self,
        name: &str,
        during: &str,
        op: Op,
        f: impl FnOnce(&ComputeClient) -> Result<Instance, plugin_api::DriverError>,
    ) -> Result<Value, ApiError> {
        let lock = self.locks.get(name);
        let _held = hold(&lock);
        let b = self.existing(name)?;
        let before = self.records().get(name).map(|r| r.status.clone()).unwrap_or_default();
        if let Some(r) = self.records().get_mut(name) {
            r.status = during.to_owned();
        }
        let result = b.call(op, f);
        let mut recs = self.records();
        let r = recs.get_mut(name).ok_or_else(|| ApiError::new("internal", "record vanished"))?;
        match result {
            Ok(i) => {
                r.apply(&i);
                Ok(Self::json(r))
            }
            Err(e) => {
                r.status = before;
                Err(e)
            }
        }
    }

    /// Handles one request.
    pub fn handle(&self, op: &str, args: &Value) -> Result<Value, ApiError> {
        match op {
            "spawn" => self.spawn(args),
            "start" => {
                let name = str_arg(args, "name")?;
                self.transition(name, "starting", Op::Start, |d| d.start(name))
            }
            "stop" => {
                let name = str_arg(args, "name")?;
                self.transition(name, "stopping", Op::Stop, |d| d.stop(name))
            }
            "reboot" => {
                let name = str_arg(args, "name")?;
                self.transition(name, "rebooting", Op::Reboot, |d| d.reboot(name))
            }
            "get" => self.get(str_arg(args, "name")?),
            "destroy" => self.destroy(str_arg(args, "name")?),
            "list" => {
                let backend = opt_str(args, "backend")?;
                if let Some(b) = backend {
                    self.backends.pick("compute", Some(b))?;
                }
                self.sync();
                let recs = self.records();
                Ok(Value::Array(
                    recs.values().filter(|r| backend.is_none_or(|b| r.backend == b)).map(Self::json).collect(),
                ))
            }
            other => Err(ApiError::new("invalid_request", format!("unknown compute operation {other:?}"))),
        }
    }

    /// Refreshes one instance from its driver; unlike the transitions, it changes no status by itself.
    fn get(&self, name: &str) -> Result<Value, ApiError> {
        let lock = self.locks.get(name);
        let _held = hold(&lock);
        let b = self.existing(name)?;
        let fresh = b.call(Op::Get, |d| d.get(name))?;
        let mut recs = self.records();
        let r = recs.get_mut(name).ok_or_else(|| ApiError::not_found(format!("instance {name:?} not found")))?;
        r.apply(&fresh);
        Ok(Self::json(r))
    }

    fn spawn(&self, args: &Value) -> Result<Value, ApiError> {
        let name = str_arg(args, "name")?;
        check_name("instance", name)?;
        let command = str_arg(args, "command")?;
        if command.is_empty() {
            return Err(ApiError::invalid(format!("instance {name:?}: empty command")));
        }
        let list = |key: &str| -> Result<Vec<String>, ApiError> {
            match args.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| ApiError::invalid(format!("{key:?} must hold strings")))
                    })
                    .collect(),
                Some(_) => Err(ApiError::invalid(format!("argument {key:?} must be an array of strings"))),
            }
        };
        let env: Vec<(String, String)> = match args.get("env") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|v| (k.clone(), v.to_owned()))
                        .ok_or_else(|| ApiError::invalid(format!("env {k:?}: value must be a string")))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ApiError::invalid("argument \"env\" must be an object of strings")),
        };
        let spec = InstanceSpec {
            name: name.to_owned(),
            command: command.to_owned(),
            args: list("args")?,
            env,
            workdir: opt_str(args, "workdir")?.map(str::to_owned),
        };
        let b = self.backends.pick("compute", opt_str(args, "backend")?)?.clone();
        let lock = self.locks.get(name);
        let _held = hold(&lock);
        {
            let mut recs = self.records();
            if recs.contains_key(name) {
                return Err(ApiError::new("already_exists", format!("instance {name:?} already exists")));
            }
            recs.insert(name.to_owned(), InstanceRecord::new(name, &b.name, "spawning", command));
        }
        let result = b.call(Op::Spawn, |d| d.spawn(&spec));
        let mut recs = self.records();
        match result {
            Ok(i) => {
                let r = recs.get_mut(name).ok_or_else(|| ApiError::new("internal", "record vanished"))?;
                r.apply(&i);
                Ok(Self::json(r))
            }
            Err(e) => {
                recs.remove(name);
                Err(e)
            }
        }
    }

    fn destroy(&self, name: &str) -> Result<Value, ApiError> {
        let lock = self.locks.get(name);
        let _held = hold(&lock);
        let b = self.existing(name)?;
        let before = self.records().get(name).map(|r| r.status.clone()).unwrap_or_default();
        if let Some(r) = self.records().get_mut(name) {
            r.status = "deleting".to_owned();
        }
        match b.call(Op::Destroy, |d| d.destroy(name)) {
            Ok(()) => {}
            Err(e) if e.kind == "not_found" => {}
            Err(e) => {
                if let Some(r) = self.records().get_mut(name) {
                    r.status = before;
                }
                return Err(e);
            }
        }
        self.records().remove(name);
        Ok(json!({"name": name, "destroyed": true}))
    }

    /// Drivers' cleanup, once no request is in flight.
    pub fn cleanup(&self) {
        for b in &self.backends.list {
            b.cleanup();
        }
    }
}
