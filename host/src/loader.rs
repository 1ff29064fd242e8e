//! The loader: turns a path into a verified driver library, or a [`LoadError`] saying why not.
//!
//! Order of checks, cheapest and safest first; no driver code runs before the last one passes:
//! 1. the path is a readable regular file;
//! 2. it is a complete ELF shared object for this machine, exporting the plughost root symbol
//!    (read from the file; foreign libraries are refused without being loaded);
//! 3. its content digest is computed; a digest already verified in this process reuses that library;
//! 4. it is copied to a private runtime directory under a unique name (**copy-on-load**: the dynamic
//!    loader caches by path, so a rebuilt file at the same path would otherwise not load, and
//!    overwriting a mapped file in place crashes the process); with [`Loader::with_probe`] the copy is
//!    first loaded by a throw-away child process, so that a library whose initializers crash, exit or
//!    hang is refused; then the copy is opened here with `RTLD_NOW`, so that unresolved symbols fail
//!    here rather than at the first call;
//! 5. abi_stable checks its header, the plugin-api version and the layout of every interface type;
//! 6. the metadata (name, version, option schema, panic strategy) is validated.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use plugin_api::host::{DriverLibrary, OpenError};
use plugin_api::{ComputeClient, DriverError, DriverKind, ErrorKind, OptionSpec, Options, VolumeClient};

use crate::elf;
use crate::error::{LoadError, LoadErrorKind};

/// A verified driver library, ready to construct drivers from.
#[derive(Debug, Clone)]
pub struct Library {
    /// The path as given by the user.
    pub path: PathBuf,
    /// `blake3:` and the hex BLAKE3 digest of the file's content when it was loaded.
    pub digest: String,
    /// File size in bytes.
    pub size: u64,
    /// When it was loaded (or found already loaded).
    pub loaded_at: SystemTime,
    lib: DriverLibrary,
}

impl Library {
    /// Driver name.
    pub fn name(&self) -> &'static str {
        self.lib.name()
    }
    /// Driver kind.
    pub fn kind(&self) -> DriverKind {
        self.lib.kind()
    }
    /// Driver version.
    pub fn version(&self) -> &'static str {
        self.lib.version()
    }
    /// plugin-api version it was built against.
    pub fn api_version(&self) -> &'static str {
        self.lib.api_version()
    }
    /// One-line summary.
    pub fn summary(&self) -> &'static str {
        self.lib.summary()
    }
    /// Option schema.
    pub fn options(&self) -> &'static [OptionSpec] {
        self.lib.options()
    }

    /// Validates user options against the schema; every problem becomes one detail line.
    pub fn validate_options(&self, given: &[(String, String)]) -> Result<Options, LoadError> {
        plugin_api::validate(self.options(), given).map_err(|errs| {
            let first = errs.first().map(|e| e.to_string()).unwrap_or_default();
            let reason = if errs.len() == 1 {
                format!("driver {:?}: {first}", self.name())
            } else {
                format!("driver {:?}: {} invalid options", self.name(), errs.len())
            };
            let details = if errs.len() == 1 { Vec::new() } else { errs.iter().map(|e| e.to_string()).collect() };
            LoadError::new(LoadErrorKind::InvalidOptions, &self.path, reason).with_details(details)
        })
    }

    fn constructor_error(&self, e: DriverError) -> LoadError {
        let kind = if e.kind() == ErrorKind::PANICKED {
            LoadErrorKind::ConstructorPanicked
        } else {
            LoadErrorKind::ConstructorFailed
        };
        let what =
            if kind == LoadErrorKind::ConstructorPanicked { "constructor panicked" } else { "constructor failed" };
        LoadError::new(kind, &self.path, format!("{what}: {}", e.message()))
    }

    /// Constructs a volume driver. Errors and panics come back as [`LoadError`]s.
    pub fn new_volume(&self, options: &Options) -> Result<VolumeClient, LoadError> {
        self.expect_kind(DriverKind::VOLUME)?;
        self.lib.new_volume(options).map_err(|e| self.constructor_error(e))
    }

    /// Constructs a compute driver. Errors and panics come back as [`LoadError`]s.
    pub fn new_compute(&self, options: &Options) -> Result<ComputeClient, LoadError> {
        self.expect_kind(DriverKind::COMPUTE)?;
        self.lib.new_compute(options).map_err(|e| self.constructor_error(e))
    }

    /// Refuses a library of another kind than `kind`.
    pub fn expect_kind(&self, kind: DriverKind) -> Result<(), LoadError> {
        if self.kind() == kind {
            return Ok(());
        }
        Err(LoadError::new(
            LoadErrorKind::WrongKind,
            &self.path,
            format!("\"{}\" is a {} driver, expected a {kind} driver", self.name(), self.kind()),
        ))
    }
}

/// A library mapped into this process (they are never unmapped).
#[derive(Debug, Clone)]
pub struct Mapped {
    /// The digest of its content.
    pub digest: String,
    /// The path it was first loaded from.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// Loads and verifies driver libraries. One per process is enough; it is `Sync`.
#[derive(Debug)]
pub struct Loader {
    dir: PathBuf,
    temporary: bool,
    counter: AtomicU64,
    verified: Mutex<HashMap<String, DriverLibrary>>,
    mapped: Mutex<Vec<Mapped>>,
    /// Path → (file identity, digest) of files already verified: an unchanged file is not re-read.
    seen: Mutex<HashMap<PathBuf, (FileKey, String)>>,
    /// The `plughost` executable used to probe new content in a child process first, if set.
    probe: Option<PathBuf>,
}

/// What identifies a file's content without reading it: any write changes mtime or ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    fn of(meta: &fs::Metadata) -> FileKey {
        use std::os::unix::fs::MetadataExt;
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

impl Loader {
    /// A loader whose private copies go to `dir` (created with mode 0700 if missing).
    pub fn new(dir: &Path) -> Result<Loader, LoadError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| {
            LoadError::new(LoadErrorKind::RuntimeDir, dir, format!("cannot create runtime directory: {e}"))
        })?;
        Ok(Loader {
            dir: dir.to_owned(),
            temporary: false,
            counter: AtomicU64::new(0),
            verified: Mutex::new(HashMap::new()),
            mapped: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            probe: None,
        })
    }

    /// A loader with a fresh private directory under the system temp dir, removed on drop.
    pub fn temporary() -> Result<Loader, LoadError> {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("plughost-{}-{nanos}", std::process::id()));
        let mut l = Loader::new(&dir)?;
        l.temporary = true;
        Ok(l)
    }

    /// Makes the loader try every new file content in a child process (`EXE __probe COPY`) before
    /// loading it here: a library whose initializers crash, exit or hang is refused instead of taking
    /// this process down. `exe` is the `plughost` binary.
    pub fn with_probe(mut self, exe: PathBuf) -> Loader {
        self.probe = Some(exe);
        self
    }

    /// Every library mapped by this loader so far.
    pub fn mapped(&self) -> Vec<Mapped> {
        self.mapped.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Loads `path` and checks that it holds a driver of `kind`.
    pub fn load_kind(&self, path: &Path, kind: DriverKind) -> Result<Library, LoadError> {
        let lib = self.load(path)?;
        lib.expect_kind(kind)?;
        Ok(lib)
    }

    /// Loads and verifies `path`. See the module documentation for the order of checks.
    pub fn load(&self, path: &Path) -> Result<Library, LoadError> {
        let err = |kind, reason: String| LoadError::new(kind, path, reason);
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => err(LoadErrorKind::NotFound, "no such file".to_owned()),
            _ => err(LoadErrorKind::NotAFile, format!("cannot read: {e}")),
        })?;
        if !meta.is_file() {
            let what = if meta.is_dir() { "a directory" } else { "not a regular file" };
            return Err(err(LoadErrorKind::NotAFile, format!("{what}, not a shared object")));
        }
        let key = FileKey::of(&meta);
        let known = self.seen.lock().ok().and_then(|m| m.get(path).filter(|(k, _)| *k == key).map(|(_, d)| d.clone()));
        if let Some(digest) = known {
            if let Some(lib) = self.verified.lock().ok().and_then(|m| m.get(&digest).copied()) {
                log::debug!("{}: unchanged since it was verified ({digest})", path.display());
                return Ok(Library {
                    path: path.to_owned(),
                    digest,
                    size: key.size,
                    loaded_at: SystemTime::now(),
                    lib,
                });
            }
        }
        let bytes = fs::read(path).map_err(|e| err(LoadErrorKind::NotAFile, format!("cannot read: {e}")))?;
        elf::check(&bytes).map_err(|p| match p {
            elf::ElfProblem::NotElf(r) => err(LoadErrorKind::NotElf, r),
            elf::ElfProblem::WrongMachine(r) => err(LoadErrorKind::WrongMachine, r),
        })?;
        if elf::defines_dynamic_symbol(&bytes, plugin_api::__private::ROOT_SYMBOL) == Some(false) {
            return Err(err(
                LoadErrorKind::NotADriver,
                "a shared library but not a plughost driver (no plughost root module; drivers use plugin_api::export_driver!)"
                    .to_owned(),
            ));
        }
        let digest = format!("blake3:{}", blake3::hash(&bytes).to_hex());
        let cached = self.verified.lock().ok().and_then(|m| m.get(&digest).copied());
        let lib = match cached {
            Some(lib) => {
                log::debug!("{}: content {digest} already verified in this process", path.display());
                lib
            }
            None => {
                let lib = self.open_copy(path, &bytes, &digest)?;
                if let Ok(mut m) = self.verified.lock() {
                    m.insert(digest.clone(), lib);
                }
                if let Ok(mut m) = self.mapped.lock() {
                    m.push(Mapped { digest: digest.clone(), path: path.to_owned(), size: bytes.len() as u64 });
                }
                lib
            }
        };
        // Remember the identity only if the file did not change while we read it.
        if fs::metadata(path).map(|m| FileKey::of(&m) == key).unwrap_or(false) {
            if let Ok(mut m) = self.seen.lock() {
                m.insert(path.to_owned(), (key, digest.clone()));
            }
        }
        Ok(Library { path: path.to_owned(), digest, size: bytes.len() as u64, loaded_at: SystemTime::now(), lib })
    }

    fn open_copy(&self, path: &Path, bytes: &[u8], digest: &str) -> Result<DriverLibrary, LoadError> {
        let err = |kind, reason: String| LoadError::new(kind, path, reason);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let file_name =
            path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "driver.so".into());
        let short = digest.trim_start_matches("blake3:").get(..12).unwrap_or("0");
        let copy = self.dir.join(format!("{}-{n}-{short}-{file_name}", std::process::id()));
        let write = || -> io::Result<()> {
            use io::Write;
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o500).open(&copy)?;
            // A reflink (XFS, Btrfs) shares the blocks copy-on-write: nearly free, and still immune to
            // later writes to the original. It must be the content we hashed: check the size and
            // identity of the source around it, and fall back to writing the bytes we have.
            if let Ok(src) = fs::File::open(path) {
                if reflink(&src, &f) && src.metadata().map(|m| m.len() == bytes.len() as u64).unwrap_or(false) {
                    let same = fs::read(&copy).map(|b| b == bytes).unwrap_or(false);
                    if same {
                        return Ok(());
                    }
                    f.set_len(0)?;
                }
            }
            // No fsync: the copy is only read back by this process through the page cache, and is made
            // anew after a crash.
            f.write_all(bytes)
        };
        write().map_err(|e| err(LoadErrorKind::RuntimeDir, format!("cannot copy to {}: {e}", copy.display())))?;
        let probed = match &self.probe {
            Some(exe) => probe(exe, path, &copy),
            None => Ok(()),
        };
        let result = probed.and_then(|()| open_verified(path, &copy));
        // The mapping stays valid after unlink; removing the copy keeps the runtime directory clean.
        if let Err(e) = fs::remove_file(&copy) {
            log::warn!("cannot remove private copy {}: {e}", copy.display());
        }
        let lib = result?;
        check_metadata(&lib)
            .map_err(|(reason, details)| err(LoadErrorKind::InvalidMetadata, reason).with_details(details))?;
        log::info!(
            "loaded driver {:?} {} ({}) from {} [{digest}]",
            lib.name(),
            lib.version(),
            lib.kind(),
            path.display()
        );
        Ok(lib)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if self.temporary {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// How long a probe may take before the library counts as hanging the loader.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGTRAP => "SIGTRAP",
        _ => "signal",
    }
}

/// Loads `copy` in a child process (`exe __probe copy`). Only a child that dies, exits without
/// answering, or hangs makes this fail; ordinary rejections are left to the in-process checks, which
/// give the same answer without the risk.
fn probe(exe: &Path, path: &Path, copy: &Path) -> Result<(), LoadError> {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let crashed = |reason: String| LoadError::new(LoadErrorKind::Crashed, path, reason);
    let mut child = Command::new(exe)
        .arg("__probe")
        .arg(copy)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            LoadError::new(LoadErrorKind::RuntimeDir, path, format!("cannot start probe {}: {e}", exe.display()))
        })?;
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(crashed(format!(
                    "loading it hung a probe process for {}s; not loaded",
                    PROBE_TIMEOUT.as_secs()
                )));
            }
            Err(e) => return Err(crashed(format!("cannot wait for the probe process: {e}"))),
        }
    };
    let mut answer = String::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read;
        let _ = out.read_to_string(&mut answer);
    }
    if let Some(sig) = status.signal() {
        return Err(crashed(format!(
            "loading it killed a probe process (signal {sig}, {}); not loaded",
            signal_name(sig)
        )));
    }
    if status.code() != Some(0) || !answer.starts_with("probe:") {
        return Err(crashed(format!(
            "a probe process exited with status {} while loading it; not loaded",
            status.code().unwrap_or(-1)
        )));
    }
    Ok(())
}

/// `FICLONE`: makes `dst` share `src`'s blocks. `false` where the filesystem cannot.
fn reflink(src: &fs::File, dst: &fs::File) -> bool {
    use std::os::unix::io::AsRawFd;
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads only the source
    // descriptor number passed as its argument.
    unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) == 0 }
}

fn open_verified(path: &Path, copy: &Path) -> Result<DriverLibrary, LoadError> {
    let err = |kind, reason: String| LoadError::new(kind, path, reason);
    // SAFETY: `copy` is a private, just-written copy of a complete ELF shared object for this machine
    // that exports the plughost root symbol (checked above). Opening it runs its ELF initializers, as
    // any dlopen does; no plughost entry point is called here. The handle is leaked on purpose: driver
    // libraries are never unloaded (unloading Rust libraries with thread-locals is unsound).
    let pre = unsafe {
        libloading::os::unix::Library::open(
            Some(copy),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    };
    match pre {
        Ok(handle) => std::mem::forget(handle),
        Err(e) => {
            let text = e.to_string();
            let copy_prefix = format!("{}: ", copy.display());
            let text = text.split(&copy_prefix).last().unwrap_or(&text).replace('\n', " ");
            return Err(err(LoadErrorKind::DlopenFailed, format!("dynamic loader refused it: {text}")));
        }
    }
    plugin_api::host::open(copy).map_err(|e| {
        let reason = e.to_string();
        match e {
            OpenError::Dlopen(_) | OpenError::Other(_) => err(LoadErrorKind::DlopenFailed, reason),
            OpenError::NotADriver => err(LoadErrorKind::NotADriver, reason),
            OpenError::AbiStable { .. } => err(LoadErrorKind::IncompatibleAbiStable, reason),
            OpenError::ApiVersion { .. } => err(LoadErrorKind::IncompatibleApiVersion, reason),
            OpenError::Layout { summary, full } => {
                log::debug!("{}: full layout report:\n{full}", path.display());
                err(LoadErrorKind::LayoutMismatch, reason).with_details(summary)
            }
            OpenError::ModuleInit(_) => err(LoadErrorKind::InvalidMetadata, reason),
        }
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.')
}

/// Checks what a library says about itself.
fn check_metadata(lib: &DriverLibrary) -> Result<(), (String, Vec<String>)> {
    let mut problems = Vec::new();
    if !valid_name(lib.name()) {
        problems.push(format!("driver name {:?} is not 1-64 characters of a-z, 0-9, '-', '_', '.'", lib.name()));
    }
    if lib.version().trim().is_empty() || lib.version().contains(char::is_whitespace) {
        problems.push(format!("driver version {:?} is empty or has spaces", lib.version()));
    }
    if lib.summary().contains('\n') {
        problems.push("summary is not one line".to_owned());
    }
    if lib.kind().as_str() == "unknown" {
        problems.push("unknown driver kind (built against a newer plugin-api?)".to_owned());
    }
    if !lib.panic_unwind() {
        problems.push("built with panic=abort: a panic in the driver would kill the host".to_owned());
    }
    let opts = lib.options();
    for (i, o) in opts.iter().enumerate() {
        if !valid_name(o.name()) {
            problems.push(format!("option name {:?} is not 1-64 characters of a-z, 0-9, '-', '_', '.'", o.name()));
        }
        if opts[..i].iter().any(|p| p.name() == o.name()) {
            problems.push(format!("option {:?} is declared twice", o.name()));
        }
        if !o.ty().is_known() {
            problems.push(format!("option {:?} has an unknown type", o.name()));
        } else if let Some(d) = o.default_value() {
            if let Err(e) = plugin_api::normalize_value(o.ty(), d) {
                problems.push(format!("option {:?}: default {d:?} is not a valid {}: {e}", o.name(), o.ty()));
            }
        }
    }
    match problems.len() {
        0 => Ok(()),
        1 => Err((format!("invalid metadata: {}", problems[0]), Vec::new())),
        n => Err((format!("invalid metadata: {n} problems"), problems)),
    }
}
