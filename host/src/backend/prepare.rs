//! Resolving, loading, validating, constructing and initialising a driver for a backend, in this
//! process or (isolation `process`) in a worker: what a build, a swap and a restart share.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use plughost_api::host::Interface;

use super::health::*;
use super::settings::{BackendSettings, Isolation};
use crate::control::protocol::DriverRef;
use crate::loading::drivers::resolve;
use crate::loading::error::LoadError;
use crate::loading::loader::{Library, Loader};
use crate::worker::{SetupReply, SupervisedTransport, Supervisor, WorkerConfig};

/// What a backend needs from the host to build drivers.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// The process's loader.
    pub loader: &'a Loader,
    /// For `${state_dir}` in option values.
    pub state_dir: &'a Path,
    /// For NAME lookups.
    pub driver_dirs: &'a [PathBuf],
    /// The `plughost` executable, to start workers for isolated backends.
    pub exe: Option<&'a Path>,
}

/// The configured driver (PATH or NAME, as given) and raw options: what a reload rebuilds from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// PATH or NAME.
    pub driver: String,
    /// Raw options, before `${...}` expansion and validation.
    pub options: Vec<(String, String)>,
    /// Host-level settings (not the driver's business).
    pub settings: BackendSettings,
}

/// Why a backend's driver could not be built: the backend, and what went wrong (named once each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    /// `volume`, `compute`, ...
    pub service: &'static str,
    /// The backend.
    pub backend: String,
    /// What went wrong.
    pub cause: BackendCause,
}

/// What went wrong building a backend's driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendCause {
    /// The driver NAME is in none of the driver directories.
    NotFound(String),
    /// The file was refused, or the driver could not be constructed.
    Load(LoadError),
}

impl BackendError {
    fn details(&self) -> &[String] {
        match &self.cause {
            BackendCause::NotFound(_) => &[],
            BackendCause::Load(e) => &e.details,
        }
    }

    /// The headline and indented detail lines, as printed at start.
    pub fn report(&self) -> String {
        let mut s = self.to_string();
        for d in self.details() {
            s.push_str("\n  ");
            s.push_str(d);
        }
        s
    }

    /// Everything on one line, as answered on the socket.
    pub fn one_line(&self) -> String {
        let mut s = self.to_string();
        for d in self.details() {
            s.push_str("; ");
            s.push_str(d);
        }
        s
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} backend {:?}: ", self.service, self.backend)?;
        match &self.cause {
            BackendCause::NotFound(reason) => f.write_str(reason),
            BackendCause::Load(e) => write!(f, "{e}"),
        }
    }
}

/// What a driver was built from, as status shows it.
#[derive(Debug, Clone)]
pub struct DriverInfo {
    /// Driver name.
    pub name: String,
    /// Driver version.
    pub version: String,
    /// Plugin API version it was built against.
    pub api_version: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Content digest.
    pub digest: String,
    /// File size.
    pub size: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
}

impl DriverInfo {
    pub(super) fn of(lib: &Library) -> DriverInfo {
        DriverInfo {
            name: lib.name().to_owned(),
            version: lib.version().to_owned(),
            api_version: lib.api_version().to_owned(),
            path: lib.path.clone(),
            digest: lib.digest.clone(),
            size: lib.size,
            loaded_at: lib.loaded_at,
        }
    }

    pub(super) fn reference(&self, path: bool) -> DriverRef {
        DriverRef {
            name: self.name.clone(),
            version: self.version.clone(),
            digest: self.digest.clone(),
            path: path.then(|| self.path.display().to_string()),
            draining: false,
        }
    }
}

/// A constructed driver: in this process (called by its concrete type, without dynamic dispatch) or
/// any other implementation of the author trait (in-process test drivers; drivers in another process).
pub enum Driver<I: Interface> {
    /// A driver loaded in this process.
    Loaded(I::Client),
    /// Any other.
    Other(Box<I::Object>),
}

impl<I: Interface> Driver<I> {
    /// The driver as the author trait object.
    #[inline(always)]
    pub fn object(&self) -> &I::Object {
        match self {
            Driver::Loaded(c) => I::as_object(c),
            Driver::Other(o) => o,
        }
    }
}

/// The driver currently serving a backend, with what it was built from.
pub struct Active<I: Interface> {
    /// The constructed driver.
    pub driver: Driver<I>,
    /// What it was built from.
    pub info: DriverInfo,
    /// Options as shown in status (secrets replaced by `(secret)`).
    pub shown_options: BTreeMap<String, String>,
    /// Why `init` failed, if it did: the backend is then down and refuses calls.
    pub init_error: Option<String>,
    /// 0 for the driver loaded at start, +1 for each swap.
    pub generation: u64,
    /// Extensions the driver provides.
    pub extensions: Vec<String>,
    /// The worker process serving it, for an isolated backend.
    pub supervisor: Option<Arc<Supervisor>>,
    /// `init` has not run yet (in-process drivers: it runs bounded, or in the background at start).
    pub init_pending: bool,
}

impl<I: Interface> Active<I> {
    /// Runs the driver's cleanup (if it initialised) and stops its worker, if it has one.
    pub(super) fn finish(&self, service: &str, backend: &str) {
        if self.init_error.is_none() {
            if let Err(e) = I::cleanup(self.driver.object()) {
                log::warn!("{service} backend {backend:?}: cleanup failed: {e}");
            }
        }
        if let Some(s) = &self.supervisor {
            s.stop();
        }
    }
}

/// Runs an in-process driver's `init` in a thread of its own, waiting up to `timeout`. A driver whose
/// `init` does not return in time is given up on: the thread keeps it until `init` returns, then drops
/// it (no `cleanup`: it never served).
pub(super) fn init_bounded<I: Interface>(active: Active<I>, timeout: Duration) -> Result<Active<I>, String> {
    let shared = Arc::new(active);
    let (tx, rx) = std::sync::mpsc::channel();
    let mine = shared.clone();
    let handle = std::thread::Builder::new()
        .name("driver-init".to_owned())
        .spawn(move || {
            let r = I::init(mine.driver.object());
            drop(mine);
            let _ = tx.send(r);
        })
        .map_err(|e| format!("cannot start a thread for init: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = handle.join();
            let mut active = Arc::try_unwrap(shared)
                .unwrap_or_else(|_| unreachable!("the init thread dropped its reference before answering"));
            active.init_error = r.err().map(|e| format!("driver init failed: {}", e.message()));
            active.init_pending = false;
            Ok(active)
        }
        Err(_) => Err(format!("driver init did not finish within {}s", timeout.as_secs_f64())),
    }
}

/// Resolves, loads, validates, constructs and initialises a driver, in this process or (isolation
/// `process`) in a worker. Load, option and constructor errors are `Err`; an `init` failure is recorded
/// in `Active::init_error`.
pub(super) fn prepare<I: Interface>(
    ctx: BuildContext<'_>,
    service: &'static str,
    backend: &str,
    configured: &Configured,
    generation: u64,
    health: &Arc<HealthCell>,
) -> Result<Active<I>, BackendError> {
    let fail = |e| BackendError { service, backend: backend.to_owned(), cause: BackendCause::Load(e) };
    let path = resolve(&configured.driver, ctx.driver_dirs).map_err(|reason| BackendError {
        service,
        backend: backend.to_owned(),
        cause: BackendCause::NotFound(reason),
    })?;
    let pin = configured.settings.digest.as_deref();
    if configured.settings.isolation == Isolation::Process {
        return prepare_isolated(ctx, service, backend, configured, generation, health, &path).map_err(fail);
    }
    let library = ctx.loader.load_pinned(&path, pin).map_err(fail)?;
    library.expect_kind(I::KIND).map_err(fail)?;
    let options = library.prepare_options(&configured.options, ctx.state_dir, backend).map_err(fail)?;
    let shown_options = library.shown_options(&options);
    let constructed = library.construct::<I>(&options).map_err(fail)?;
    let driver = Driver::Loaded(constructed.driver);
    let extensions = constructed.extensions.iter().map(|e| (*e).to_owned()).collect();
    Ok(Active {
        driver,
        info: DriverInfo::of(&library),
        shown_options,
        init_error: None,
        generation,
        extensions,
        supervisor: None,
        init_pending: true,
    })
}

/// [`prepare`] for an isolated backend: every check that needs no loading here, then a worker loads,
/// constructs and initialises the driver. Nothing of the library is mapped into this process.
pub(super) fn prepare_isolated<I: Interface>(
    ctx: BuildContext<'_>,
    service: &'static str,
    backend: &str,
    configured: &Configured,
    generation: u64,
    health: &Arc<HealthCell>,
    path: &Path,
) -> Result<Active<I>, LoadError> {
    let settings = &configured.settings;
    let exe = ctx.exe.ok_or_else(|| {
        LoadError::new(
            crate::loading::error::LoadErrorKind::RuntimeDir,
            path,
            "no plughost executable to start a worker with",
        )
    })?;
    let copy = ctx.loader.checked_copy(path, settings.digest.as_deref())?;
    let user = match &settings.user {
        Some(u) => Some(
            crate::util::users::user_ids(u, settings.group.as_deref())
                .map_err(|e| LoadError::new(crate::loading::error::LoadErrorKind::RuntimeDir, path, e))?,
        ),
        None => None,
    };
    let config = WorkerConfig {
        exe: exe.to_owned(),
        kind: I::KIND.as_str(),
        setup: crate::worker::Setup {
            service: service.to_owned(),
            backend: backend.to_owned(),
            path: path.to_owned(),
            state_dir: ctx.state_dir.to_owned(),
            options: configured.options.clone(),
            memory_limit: settings.memory_limit,
        },
        user,
        call_timeout: settings.call_timeout,
        max_frame_bytes: usize::try_from(settings.max_frame_bytes).unwrap_or(usize::MAX),
    };
    let cell = health.clone();
    let on_health = Box::new(move |down: Option<String>| {
        cell.set(match down {
            Some(r) => Health::Down(r),
            None => Health::Up,
        })
    });
    let (supervisor, reply) = Supervisor::start(config, copy.fd, on_health)?;
    match reply {
        SetupReply::Refused { kind, reason, details } => {
            supervisor.stop();
            let kind = crate::loading::error::LoadErrorKind::from_name(&kind)
                .unwrap_or(crate::loading::error::LoadErrorKind::InvalidMetadata);
            Err(LoadError::new(kind, path, reason).with_details(details))
        }
        SetupReply::Ready { name, version, api_version, extensions, shown_options, init_error } => {
            let driver = Driver::Other(I::remote(Box::new(SupervisedTransport::<I>::new(supervisor.clone()))));
            let info = DriverInfo {
                name,
                version,
                api_version,
                path: path.to_owned(),
                digest: copy.digest,
                size: copy.size,
                loaded_at: SystemTime::now(),
            };
            Ok(Active {
                driver,
                info,
                shown_options,
                init_error,
                generation,
                extensions,
                supervisor: Some(supervisor),
                init_pending: false,
            })
        }
    }
}
