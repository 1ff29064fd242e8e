//! The loader: turns a path into a verified driver library, or a [`LoadError`] saying why not.
//!
//! Order of checks, cheapest and safest first; no code from the library runs before the dynamic loader
//! opens it in step 5:
//! 0. the trust policy (`trust::check_driver_file`): the file and everything above it belong
//!    to root or the host's user and nobody else can write them;
//! 1. the path is opened once; everything after reads that one descriptor: it must be a regular file no
//!    larger than the size cap;
//! 2. its ELF header is read and checked (a complete shared object for this machine) before the rest
//!    of the file is read;
//! 3. the whole file is read, its dynamic symbol table must export the plughost root symbol (foreign
//!    libraries are refused without being loaded), and its BLAKE3 digest is computed and checked against
//!    the backend's pin and the allow list; a digest already verified in this process reuses that
//!    library;
//! 4. the bytes just hashed are copied into a sealed memfd (**copy-on-load**: the dynamic loader caches
//!    by path, so a rebuilt file at the same path would otherwise not load, and overwriting a mapped file
//!    in place crashes the process; a sealed memfd also means the bytes loaded are the bytes checked, as
//!    nobody can change them); with [`Loader::with_probe`] the copy is first loaded by a throw-away child
//!    process, so that a library whose initializers crash, exit or hang is refused;
//! 5. the copy is opened with `RTLD_NOW` and abi_stable checks its header, the plugin API version, and
//!    the layout of the root module and of the kind's interface ([`plughost_api::host::open`]);
//! 6. the metadata (name, version, option schema, panic strategy) is validated.
//!
//! Why this file is long: the order of the checks is the safety argument, kept in one file so that it
//! reads top to bottom.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use plughost_api::host::{ConstructError, Constructed, DriverLibrary, Interface, OpenError};
use plughost_api::{DriverKind, ErrorKind, OptionSpec, Options};

use crate::loading::elf;
use crate::loading::error::{LoadError, LoadErrorKind};

/// The default cap on a driver file's size.
pub const DEFAULT_MAX_DRIVER_BYTES: u64 = 256 << 20;

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
    /// Plugin API version it was built against.
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
        plughost_api::host::validate(self.options(), given).map_err(|errs| self.option_errors(errs))
    }

    /// What the driver's constructor gets for the options a user configured: placeholders
    /// (`${state_dir}`, `${backend}`) expanded in values and defaults, then validated; the same
    /// function a driver's tests use (`plughost_api::testing::TestHost::options`), so that they agree.
    pub fn prepare_options(
        &self,
        given: &[(String, String)],
        state_dir: &Path,
        backend: &str,
    ) -> Result<Options, LoadError> {
        plughost_api::host::prepare_options(self.options(), given, state_dir, backend)
            .map_err(|errs| self.option_errors(errs))
    }

    /// Options as status shows them: secret values replaced by `(secret)`.
    pub fn shown_options(&self, given: &Options) -> std::collections::BTreeMap<String, String> {
        given
            .pairs()
            .iter()
            .map(|(k, v)| {
                let secret = self.options().iter().any(|o| o.name() == k && o.is_secret());
                (k.clone(), if secret { "(secret)".to_owned() } else { v.clone() })
            })
            .collect()
    }

    fn option_errors(&self, errs: Vec<plughost_api::host::OptionError>) -> LoadError {
        {
            let first = errs.first().map(|e| e.to_string()).unwrap_or_default();
            let reason = if errs.len() == 1 {
                format!("driver {:?}: {first}", self.name())
            } else {
                format!("driver {:?}: {} invalid options", self.name(), errs.len())
            };
            let details = if errs.len() == 1 { Vec::new() } else { errs.iter().map(|e| e.to_string()).collect() };
            LoadError::new(LoadErrorKind::InvalidOptions, &self.path, reason).with_details(details)
        }
    }

    /// Refuses a library of another kind than `kind`: the one place this is checked.
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

    /// Constructs the driver as kind `I`. Errors and panics come back as [`LoadError`]s.
    pub fn construct<I: Interface>(&self, options: &Options) -> Result<Constructed<I>, LoadError> {
        self.expect_kind(I::KIND)?;
        self.lib.construct::<I>(options).map_err(|e| match e {
            ConstructError::WrongKind { .. } => self.expect_kind(I::KIND).err().unwrap_or_else(|| {
                LoadError::new(LoadErrorKind::WrongKind, &self.path, format!("not a {} driver", I::KIND))
            }),
            ConstructError::Driver(e) if e.kind() == ErrorKind::PANICKED => LoadError::new(
                LoadErrorKind::ConstructorPanicked,
                &self.path,
                format!(
                    "constructor panicked: {}; return an Err(DriverError) from the constructor instead",
                    e.message()
                ),
            ),
            ConstructError::Driver(e) => LoadError::new(
                LoadErrorKind::ConstructorFailed,
                &self.path,
                format!("constructor failed: {}", e.message()),
            ),
            ConstructError::Layout(summary) => {
                LoadError::new(LoadErrorKind::LayoutMismatch, &self.path, format!("layout mismatch: {summary}"))
            }
        })
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

/// A file read and checked, not loaded.
struct ReadFile {
    bytes: Vec<u8>,
    digest: String,
    key: FileKey,
}

/// The outcome of [`Loader::check`].
enum Checked {
    /// Unchanged since this loader verified it.
    Known { digest: String, key: FileKey, lib: DriverLibrary },
    /// Read and checked; not loaded.
    Read(ReadFile),
}

/// A library's bytes, checked and sealed in a memfd, for a worker ([`Loader::checked_copy`]).
#[derive(Debug)]
pub struct CheckedCopy {
    /// The sealed memfd.
    pub fd: OwnedFd,
    /// The digest of its content.
    pub digest: String,
    /// Its size.
    pub size: u64,
}

/// What [`Loader::describe`] found.
#[derive(Debug, Clone)]
pub struct Described {
    /// The content digest.
    pub digest: String,
    /// The file size.
    pub size: u64,
    /// What the library says about itself.
    pub meta: DriverMeta,
}

/// What a driver library says about itself (its static metadata), as a child reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DriverMeta {
    /// Driver name.
    pub name: String,
    /// Driver kind.
    pub kind: String,
    /// Driver version.
    pub version: String,
    /// Plugin API version it was built against.
    pub api_version: String,
    /// One line.
    pub summary: String,
    /// The option schema.
    pub options: Vec<OptionDescription>,
}

impl DriverMeta {
    /// The metadata of a loaded library.
    pub fn of(lib: &Library) -> DriverMeta {
        DriverMeta {
            name: lib.name().to_owned(),
            kind: lib.kind().to_string(),
            version: lib.version().to_owned(),
            api_version: lib.api_version().to_owned(),
            summary: lib.summary().to_owned(),
            options: lib.options().iter().map(OptionDescription::of).collect(),
        }
    }
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
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Loads and verifies driver libraries. One per process is enough; it is `Sync`.
#[derive(Debug)]
pub struct Loader {
    verified: Mutex<HashMap<String, DriverLibrary>>,
    mapped: Mutex<Vec<Mapped>>,
    /// Path → (file identity, digest) of files already verified: an unchanged file is not re-read.
    seen: Mutex<HashMap<PathBuf, (FileKey, String)>>,
    /// The `plughost` executable used to probe new content in a child process first, if set.
    probe: Option<PathBuf>,
    max_bytes: u64,
    /// Refuse driver files others could have written (the trust policy); off: warn only.
    strict: std::sync::atomic::AtomicBool,
    /// Digests outside which nothing loads, if set (replaced on reload).
    allowlist: Mutex<Option<Allowlist>>,
    /// Whether paths go through the trust policy at all (not for a copy the parent process verified).
    check_paths: bool,
}

/// `trust.allowlist`: the digests allowed to load.
#[derive(Debug, Clone)]
pub struct Allowlist {
    /// The file it was read from.
    pub path: PathBuf,
    digests: std::collections::HashSet<String>,
}

impl Allowlist {
    /// Reads an allow list: one `blake3:HEX` per line; `#` starts a comment; blank lines are ignored.
    pub fn read(path: &Path) -> Result<Allowlist, String> {
        if let Err(u) = crate::loading::trust::check_config_file(path) {
            if !u.missing {
                return Err(format!("trust.allowlist \"{}\": untrusted: {}", path.display(), u.relative_to(path)));
            }
        }
        let text = fs::read_to_string(path)
            .map_err(|e| format!("trust.allowlist \"{}\": {}", path.display(), crate::util::fmt::io_text(&e)))?;
        let mut digests = std::collections::HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            if !is_digest(entry) {
                return Err(format!(
                    "trust.allowlist \"{}\": line {}: {entry:?} is not blake3: and 64 hex digits",
                    path.display(),
                    n + 1
                ));
            }
            digests.insert(entry.to_ascii_lowercase());
        }
        Ok(Allowlist { path: path.to_owned(), digests })
    }
}

/// Whether `s` is a digest as plughost writes them: `blake3:` and 64 hex digits.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("blake3:").is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

impl Default for Loader {
    fn default() -> Loader {
        Loader::new()
    }
}

/// A sealed memfd holding a library's bytes; kept open for as long as the library may be mapped (the
/// dynamic loader knows it by its `/proc/self/fd/N` name, which must not be reused).
#[derive(Debug)]
struct SealedCopy {
    fd: OwnedFd,
}

impl SealedCopy {
    fn new(name: &str, bytes: &[u8]) -> io::Result<SealedCopy> {
        use std::io::Write;
        let cname =
            std::ffi::CString::new(format!("plughost-driver:{name}")).map_err(|_| io::ErrorKind::InvalidInput)?;
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create(&cname, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        let mut file = fs::File::from(fd);
        file.write_all(bytes)?;
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL)?;
        Ok(SealedCopy { fd: file.into() })
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

impl Loader {
    /// A loader; private copies live in memory (sealed memfds), so it needs no directory.
    pub fn new() -> Loader {
        Loader {
            verified: Mutex::new(HashMap::new()),
            mapped: Mutex::new(Vec::new()),
            seen: Mutex::new(HashMap::new()),
            probe: None,
            max_bytes: DEFAULT_MAX_DRIVER_BYTES,
            strict: std::sync::atomic::AtomicBool::new(true),
            allowlist: Mutex::new(None),
            check_paths: true,
        }
    }

    /// A loader for a copy another (parent) process already checked, hashed and sealed, and passes by
    /// descriptor (`/proc/self/fd/N`): it is opened as it is (the trust policy, the file checks and the
    /// private copy were the parent's).
    pub fn for_verified_copy() -> Loader {
        Loader { check_paths: false, ..Loader::new() }
    }

    /// With `strict` off, driver files the trust policy would refuse are loaded, with a warning.
    pub fn with_strict(self, strict: bool) -> Loader {
        self.set_trust(strict, None);
        self
    }

    /// Changes the trust policy and the allow list (at start, and on reload).
    pub fn set_trust(&self, strict: bool, allowlist: Option<Allowlist>) {
        self.strict.store(strict, std::sync::atomic::Ordering::SeqCst);
        *self.allowlist.lock().unwrap_or_else(|p| p.into_inner()) = allowlist;
    }

    /// Whether the trust policy is enforced.
    pub fn strict(&self) -> bool {
        self.strict.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes the loader try every new file content in a child process (`EXE __probe`) before loading it
    /// here: a library whose initializers crash, exit or hang is refused instead of taking this process
    /// down. `exe` is the `plughost` binary.
    pub fn with_probe(mut self, exe: PathBuf) -> Loader {
        self.probe = Some(exe);
        self
    }

    /// Refuses driver files larger than `bytes`.
    pub fn with_max_bytes(mut self, bytes: u64) -> Loader {
        self.max_bytes = bytes;
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
        self.load_pinned(path, None)
    }

    /// Loads and verifies `path`, whose content must have digest `pin` if given.
    pub fn load_pinned(&self, path: &Path, pin: Option<&str>) -> Result<Library, LoadError> {
        let err = |kind, reason: String| LoadError::new(kind, path, reason);
        if !self.check_paths {
            // A sealed copy the parent process read, checked and hashed: opened as it is.
            let lib = open_verified(path, path)?;
            check_metadata(&lib)
                .map_err(|(reason, details)| err(LoadErrorKind::InvalidMetadata, reason).with_details(details))?;
            let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            return Ok(Library {
                path: path.to_owned(),
                digest: "verified-by-parent".to_owned(),
                size,
                loaded_at: SystemTime::now(),
                lib,
            });
        }
        let checked = match self.check(path, pin)? {
            Checked::Known { digest, key, lib } => {
                log::debug!("{}: unchanged since it was verified ({digest})", path.display());
                return Ok(Library {
                    path: path.to_owned(),
                    digest,
                    size: key.size,
                    loaded_at: SystemTime::now(),
                    lib,
                });
            }
            Checked::Read(c) => c,
        };
        let ReadFile { bytes, digest, key } = checked;
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
                lib
            }
        };
        // Remember the identity only if the file did not change while we read it.
        if fs::metadata(path).map(|m| FileKey::of(&m) == key).unwrap_or(false) {
            if let Ok(mut m) = self.seen.lock() {
                m.insert(path.to_owned(), (key, digest.clone()));
            }
        }
        let _ = err;
        Ok(Library { path: path.to_owned(), digest, size: bytes.len() as u64, loaded_at: SystemTime::now(), lib })
    }

    /// Everything checked without loading anything: the trust policy, the file (one descriptor, size
    /// cap, ELF header first), the root symbol, the digest against the pin and the allow list.
    /// Every check a load runs before loading (the trust policy, the file, the digest against `pin` and
    /// the allow list), and the content's digest; nothing is loaded (`swap` with `dry_run`).
    pub fn verify(&self, path: &Path, pin: Option<&str>) -> Result<String, LoadError> {
        Ok(match self.check(path, pin)? {
            Checked::Known { digest, .. } => digest,
            Checked::Read(r) => r.digest,
        })
    }

    fn check(&self, path: &Path, pin: Option<&str>) -> Result<Checked, LoadError> {
        let err = |kind, reason: String| LoadError::new(kind, path, reason);
        let trusted = if self.check_paths { crate::loading::trust::check_driver_file(path) } else { Ok(()) };
        if let Err(u) = trusted {
            if u.missing {
                return Err(err(LoadErrorKind::NotFound, no_such_file(path)));
            }
            if self.strict() {
                return Err(err(LoadErrorKind::UntrustedDriver, format!("untrusted: {u}")));
            }
            log::warn!("loading {} although it is untrusted (trust.strict is off): {u}", path.display());
        }
        let file =
            fs::OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => err(LoadErrorKind::NotFound, no_such_file(path)),
                _ => err(LoadErrorKind::NotAFile, format!("cannot read: {}", crate::util::fmt::io_text(&e))),
            })?;
        let meta = file.metadata().map_err(|e| err(LoadErrorKind::NotAFile, format!("cannot read: {e}")))?;
        if !meta.is_file() {
            let what = if meta.is_dir() { "a directory" } else { "not a regular file" };
            return Err(err(LoadErrorKind::NotAFile, format!("{what}, not a shared object")));
        }
        if meta.len() > self.max_bytes {
            return Err(err(
                LoadErrorKind::TooLarge,
                format!("{} bytes, larger than the {}-byte limit for driver files", meta.len(), self.max_bytes),
            ));
        }
        let key = FileKey::of(&meta);
        let known = self.seen.lock().ok().and_then(|m| m.get(path).filter(|(k, _)| *k == key).map(|(_, d)| d.clone()));
        if let Some(digest) = known {
            self.check_digest(path, &digest, pin)?;
            if let Some(lib) = self.verified.lock().ok().and_then(|m| m.get(&digest).copied()) {
                return Ok(Checked::Known { digest, key, lib });
            }
        }
        let bytes = read_checked(&file, meta.len()).map_err(|(kind, reason)| err(kind, reason))?;
        if elf::defines_dynamic_symbol(&bytes, plughost_api::host::ROOT_SYMBOL) == Some(false) {
            return Err(err(
                LoadErrorKind::NotADriver,
                "a shared library but not a plughost driver (no plughost root module; drivers use plughost_api::export_driver!)"
                    .to_owned(),
            ));
        }
        let digest = digest_of(&bytes);
        self.check_digest(path, &digest, pin)?;
        Ok(Checked::Read(ReadFile { bytes, digest, key }))
    }

    /// Everything `check` does (the trust policy, the file, the digest), then a sealed copy of the bytes checked, for a worker to
    /// load: nothing of the library is loaded in this process.
    pub fn checked_copy(&self, path: &Path, pin: Option<&str>) -> Result<CheckedCopy, LoadError> {
        let (bytes, digest) = match self.check(path, pin)? {
            Checked::Read(ReadFile { bytes, digest, .. }) => (bytes, digest),
            Checked::Known { .. } => {
                // Verified (and loaded) here before: read it again for the copy, and check the digest
                // of what was read.
                let (bytes, digest) = read_again(path)?;
                self.check_digest(path, &digest, pin)?;
                (bytes, digest)
            }
        };
        let copy = sealed_copy(path, &bytes, &digest)?;
        Ok(CheckedCopy { fd: copy.fd, digest, size: bytes.len() as u64 })
    }

    /// What a library says about itself, without loading it in this process: everything
    /// `check` does here, then a sandboxed child ([`crate::loading::sandbox`]) loads a sealed copy
    /// and reports. For `inspect`, `list` and `config sample`.
    pub fn describe(&self, path: &Path) -> Result<Described, LoadError> {
        let exe = self.probe.as_ref().ok_or_else(|| {
            LoadError::new(LoadErrorKind::RuntimeDir, path, "no plughost executable to describe drivers with")
        })?;
        let (bytes, digest) = match self.check(path, None)? {
            Checked::Read(ReadFile { bytes, digest, .. }) => (bytes, digest),
            Checked::Known { .. } => read_again(path)?,
        };
        let copy = sealed_copy(path, &bytes, &digest)?;
        let answer = in_child(exe, path, &copy)?;
        match answer {
            ChildAnswer::Described(meta) => Ok(Described { digest, size: bytes.len() as u64, meta }),
            ChildAnswer::Rejected { kind, reason, details } => {
                let kind = LoadErrorKind::from_name(&kind).unwrap_or(LoadErrorKind::InvalidMetadata);
                Err(LoadError::new(kind, path, reason).with_details(details))
            }
        }
    }

    /// [`describe`](Self::describe), and the content checked against `pin` (for `config check`).
    pub fn describe_pinned(&self, path: &Path, pin: Option<&str>) -> Result<Described, LoadError> {
        let d = self.describe(path)?;
        self.check_digest(path, &d.digest, pin)?;
        Ok(d)
    }

    /// The pin and the allow list, checked on the digest before anything of the file is loaded.
    fn check_digest(&self, path: &Path, digest: &str, pin: Option<&str>) -> Result<(), LoadError> {
        if let Some(pin) = pin.filter(|p| !p.eq_ignore_ascii_case(digest)) {
            return Err(LoadError::new(
                LoadErrorKind::DigestMismatch,
                path,
                format!("content {digest} differs from the pinned digest {pin}"),
            ));
        }
        if let Some(list) = &*self.allowlist.lock().unwrap_or_else(|p| p.into_inner()) {
            if !list.digests.contains(digest) {
                return Err(LoadError::new(
                    LoadErrorKind::NotAllowed,
                    path,
                    format!("content {digest} is not in the allow list {}", list.path.display()),
                ));
            }
        }
        Ok(())
    }

    fn open_copy(&self, path: &Path, bytes: &[u8], digest: &str) -> Result<DriverLibrary, LoadError> {
        let err = |kind, reason: String| LoadError::new(kind, path, reason);
        let copy = sealed_copy(path, bytes, digest)?;
        if let Some(exe) = &self.probe {
            // Whatever the child thinks of the library, it survived loading it; the checks below give
            // the same answer here.
            in_child(exe, path, &copy)?;
        }
        let opened = open_verified(path, &copy.path());
        match &opened {
            // Never loaded: the descriptor (and its name) can go.
            Err(e) if e.kind == LoadErrorKind::DlopenFailed => drop(copy),
            // Mapped (even if refused afterwards): abi_stable never unloads, so keep its name taken.
            _ => {
                std::mem::forget(copy);
                if let Ok(mut m) = self.mapped.lock() {
                    m.push(Mapped { digest: digest.to_owned(), path: path.to_owned(), size: bytes.len() as u64 });
                }
            }
        }
        let lib = opened?;
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

/// Reads a file through one descriptor: the ELF header first (refusing what is not a shared object for
/// this machine without reading further), then the rest.
fn read_checked(mut file: &fs::File, len: u64) -> Result<Vec<u8>, (LoadErrorKind, String)> {
    let elf_problem = |p| match p {
        elf::ElfProblem::NotElf(r) => (LoadErrorKind::NotElf, r),
        elf::ElfProblem::WrongMachine(r) => (LoadErrorKind::WrongMachine, r),
    };
    let mut bytes = Vec::with_capacity(elf::HEADER_LEN);
    file.by_ref()
        .take(elf::HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| (LoadErrorKind::NotAFile, format!("cannot read: {e}")))?;
    elf::check_header(&bytes, len).map_err(elf_problem)?;
    // Only a plausible shared object gets memory for its whole size.
    bytes.reserve(usize::try_from(len).unwrap_or(0).saturating_sub(bytes.len()));
    file.read_to_end(&mut bytes).map_err(|e| (LoadErrorKind::NotAFile, format!("cannot read: {e}")))?;
    elf::check(&bytes).map_err(elf_problem)?;
    Ok(bytes)
}

/// How long a child may take to load a library before the library counts as hanging the loader.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A signal's name, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGXCPU => "SIGXCPU",
        _ => "signal",
    }
}

/// The bytes of a library in a sealed memfd.
/// A file's digest as plughost names it (`blake3:HEX`).
fn digest_of(bytes: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(bytes).to_hex())
}

/// A library verified here before, read again (for a sealed copy or a description) with its digest.
fn read_again(path: &Path) -> Result<(Vec<u8>, String), LoadError> {
    let bytes = fs::read(path).map_err(|e| {
        LoadError::new(LoadErrorKind::NotAFile, path, format!("cannot read: {}", crate::util::fmt::io_text(&e)))
    })?;
    let digest = digest_of(&bytes);
    Ok((bytes, digest))
}

fn sealed_copy(path: &Path, bytes: &[u8], digest: &str) -> Result<SealedCopy, LoadError> {
    let short = digest.trim_start_matches("blake3:").get(..12).unwrap_or("0");
    SealedCopy::new(short, bytes).map_err(|e| {
        LoadError::new(LoadErrorKind::RuntimeDir, path, format!("cannot make a private copy in memory: {e}"))
    })
}

/// What a child said about a library.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildAnswer {
    /// It loaded, and this is what it says about itself.
    Described(DriverMeta),
    /// The child's loader refused it (a refusal the parent's own checks would make too).
    Rejected {
        /// The [`LoadErrorKind`] name.
        kind: String,
        /// The one-line reason.
        reason: String,
        /// Detail lines.
        details: Vec<String>,
    },
}

/// The child side (`plughost __describe`): loads the library on fd 3 (already checked by the parent)
/// and says what it found. Run after [`crate::loading::sandbox::enter`].
pub fn child_answer() -> ChildAnswer {
    match Loader::for_verified_copy().load(&crate::loading::sandbox::library_path()) {
        Ok(lib) => ChildAnswer::Described(DriverMeta::of(&lib)),
        Err(e) => ChildAnswer::Rejected { kind: e.kind.as_str().to_owned(), reason: e.reason, details: e.details },
    }
}

/// Loads the copy in a sandboxed child (`exe __describe`, the copy on fd 3). A child that dies,
/// exits without answering, or hangs makes this fail with [`LoadErrorKind::Crashed`].
fn in_child(exe: &Path, path: &Path, copy: &SealedCopy) -> Result<ChildAnswer, LoadError> {
    use std::os::unix::process::ExitStatusExt;
    let crashed = |reason: String| LoadError::new(LoadErrorKind::Crashed, path, reason);
    let outcome = crate::loading::sandbox::run(exe, &["__describe"], &copy.fd, PROBE_TIMEOUT).map_err(|e| {
        LoadError::new(LoadErrorKind::RuntimeDir, path, format!("cannot start a child process {}: {e}", exe.display()))
    })?;
    let (status, printed) = match outcome {
        crate::loading::sandbox::Outcome::Hung => {
            return Err(crashed(format!(
                "loading it hung a probe process for {}s; not loaded",
                PROBE_TIMEOUT.as_secs()
            )))
        }
        crate::loading::sandbox::Outcome::Exited(status, printed) => (status, printed),
    };
    if let Some(sig) = status.signal() {
        return Err(crashed(format!(
            "loading it killed a probe process (signal {sig}, {}); not loaded",
            signal_name(sig)
        )));
    }
    let answer = printed.lines().find_map(|l| serde_json::from_str::<ChildAnswer>(l).ok());
    match (status.code(), answer) {
        (Some(0), Some(a)) => Ok(a),
        (code, _) => Err(crashed(format!(
            "a probe process exited with status {} while loading it; not loaded",
            code.unwrap_or(-1)
        ))),
    }
}

/// "no such file", with the fix when the author's crate built only an rlib where the `.so` was expected
/// (`crate-type` without `cdylib`).
fn no_such_file(path: &Path) -> String {
    let rlib = path.extension().filter(|e| *e == "so").map(|_| path.with_extension("rlib"));
    match rlib.filter(|r| r.is_file()) {
        Some(r) => format!(
            "no such file, but {} is there: the crate builds no shared library; add crate-type = [\"cdylib\", \"rlib\"] under [lib] in its Cargo.toml",
            r.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        ),
        None => "no such file".to_owned(),
    }
}

/// The fix for a driver built against another major version of plughost-api.
fn api_version_fix() -> String {
    let mut v = plughost_api::API_VERSION.split('.');
    let (major, minor) = (v.next().unwrap_or("1"), v.next().unwrap_or("0"));
    format!("; rebuild it against plughost-api {major}.x (plughost-api = \"{major}.{minor}\" in its Cargo.toml)")
}

fn open_verified(path: &Path, copy: &Path) -> Result<DriverLibrary, LoadError> {
    let err = |kind, reason: String| LoadError::new(kind, path, reason);
    plughost_api::host::open(copy).map_err(|e| {
        let reason = e.to_string();
        match e {
            OpenError::Dlopen(_) | OpenError::Other(_) => err(LoadErrorKind::DlopenFailed, reason),
            OpenError::NotADriver => err(LoadErrorKind::NotADriver, reason),
            OpenError::AbiStable { .. } => err(LoadErrorKind::IncompatibleAbiStable, reason),
            OpenError::ApiVersion { .. } => err(LoadErrorKind::IncompatibleApiVersion, reason + &api_version_fix()),
            OpenError::Layout { full, details, .. } => {
                log::debug!("{}: full layout report:\n{full}", path.display());
                err(LoadErrorKind::LayoutMismatch, reason).with_details(details)
            }
            OpenError::UnknownKind(_) => err(LoadErrorKind::InvalidMetadata, reason),
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
    if !lib.kind().is_known() {
        problems.push("unknown driver kind (built against a newer plugin API?)".to_owned());
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
            if let Err(e) = plughost_api::host::normalize_value(o.ty(), d) {
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

/// One option of a driver's schema.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OptionDescription {
    /// Its name.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Its default (never shown for a secret).
    pub default: Option<String>,
    /// Whether it must be given.
    pub required: bool,
    /// Whether its value is never shown.
    pub secret: bool,
    /// One line of help.
    pub help: String,
}

impl OptionDescription {
    /// An option of a schema.
    pub fn of(o: &plughost_api::OptionSpec) -> OptionDescription {
        OptionDescription {
            name: o.name().to_owned(),
            ty: o.ty().to_string(),
            default: if o.is_secret() { None } else { o.default_value().map(str::to_owned) },
            required: o.is_required(),
            secret: o.is_secret(),
            help: o.help().to_owned(),
        }
    }
}
