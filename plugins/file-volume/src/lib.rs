//! `file-volume`: each volume is a sparse file `<root>/<name>.vol`. Snapshots are copies (a reflink
//! where the filesystem supports it, otherwise a copy of the data extents only, keeping holes). Listing
//! and lookups read the directory, so the driver keeps no state of its own and survives restarts.
//!
//! Nothing half-made is ever visible: a new volume or snapshot is written under a temporary name
//! (`.partial.*`, never listed) and renamed into place only when complete; an interrupted one (a crash,
//! `kill -9`, a stop that outlasted the shutdown timeout) leaves only a temporary file, removed at the
//! next `init`.
//!
//! A missing root is never silently recreated empty. The root carries a marker (`.file-volume`) and
//! its parent remembers it (`.<root name>.file-volume`): the first start creates the root (or takes an
//! existing directory) and both markers; later, a root that is missing (moved away) or unmarked (an
//! unmounted filesystem's mount point) makes the driver unhealthy, so the backend is down with the
//! reason and its records are kept, until the root is back (the next health check sees it) or option
//! `create_root` says to start afresh.
//!
//! Sizes: a volume may be as large as the root's filesystem allows for one file (found once, by growing
//! an unnamed sparse file: 16 TiB - 4 KiB on ext4 with 4 KiB blocks), or `max_volume_size` if given;
//! a larger size is `invalid_argument` naming the limit, before anything is made. With
//! `overcommit_ratio` R, the sizes of all volumes (and those being made) stay within R times the
//! filesystem's size: past it, `no_capacity`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use plughost_api::{CapacityStats, DriverError, OptionSpec, Options, Volume, VolumeDriver};

/// The options this driver takes. `${state_dir}` and `${backend}` are expanded by the host.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::path("root", "directory holding the volume files (created at first use)")
        .default("${state_dir}/volumes/${backend}"),
    OptionSpec::boolean(
        "create_root",
        "create a missing root, or take a directory without this driver's marker, even where a root was used before (an empty one then replaces it)",
    )
    .default("false"),
    OptionSpec::size(
        "max_volume_size",
        "largest volume size accepted (default: the largest file the root's filesystem can hold)",
    ),
    OptionSpec::string(
        "overcommit_ratio",
        "most bytes volumes may be given, as a multiple of the filesystem's size (1 = no overcommit; default: no limit)",
    ),
    OptionSpec::boolean("reflink", "try a reflink (FICLONE) for snapshots before copying").default("true"),
    OptionSpec::boolean("sync", "fsync new volumes and the volume root, so that they survive a power loss")
        .default("true"),
];

/// The driver.
#[derive(Debug)]
pub struct FileVolume {
    root: PathBuf,
    /// `max_volume_size`, when given.
    max_size: Option<u64>,
    /// The largest file the root's filesystem can hold, once found (see [`largest_file`]).
    fs_max: std::sync::OnceLock<u64>,
    /// `overcommit_ratio`, when given.
    overcommit: Option<f64>,
    /// Volumes being created, extended or snapshotted, with the size each will have: counted at that
    /// size whether or not the listing shows them yet.
    reserved: std::sync::Mutex<Vec<(String, u64)>>,
    reflink: bool,
    sync: bool,
    create_root: bool,
    /// Why the root cannot be used, until it can (checked again by `health`).
    root_problem: std::sync::Mutex<Option<String>>,
}

const SUFFIX: &str = ".vol";
/// The marker in the root.
const MARKER: &str = ".file-volume";
const SOURCE_PREFIX: &str = ".source.";
const PARTIAL_PREFIX: &str = ".partial.";

/// Volume names follow [`plughost_api::check_name`]: nothing can escape the root.
pub fn check_name(name: &str) -> Result<(), DriverError> {
    plughost_api::check_name("volume", name)
}

impl FileVolume {
    /// The volumes whose names sort after `after`, in name order, at most `limit`: one pass over the
    /// directory for the names and which have a source record, then a stat of each one kept (so that
    /// 100k volumes cost 100k stats, not also 100k failed opens, and a page costs a page of stats).
    fn listed(&self, after: &str, limit: usize) -> Result<Vec<Volume>, DriverError> {
        let rd = fs::read_dir(&self.root)
            .map_err(|e| DriverError::io(format!("listing volume root {}", self.root.display()), &e))?;
        let mut volumes = Vec::new();
        let mut sourced = std::collections::HashSet::new();
        for entry in rd {
            let entry = entry.map_err(|e| DriverError::io("listing volume root", &e))?;
            let file_name = entry.file_name();
            let Some(n) = file_name.to_str() else { continue };
            if let Some(name) = n.strip_suffix(SUFFIX) {
                if name > after && check_name(name).is_ok() {
                    volumes.push((name.to_owned(), entry));
                }
            } else if let Some(name) = n.strip_prefix(SOURCE_PREFIX) {
                sourced.insert(name.to_owned());
            }
        }
        volumes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::with_capacity(volumes.len().min(limit));
        for (name, entry) in volumes {
            if out.len() == limit {
                break;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(e) => {
                    return Err(DriverError::io(format!("volume {name:?}: reading {}", entry.path().display()), &e))
                }
            };
            let source = match sourced.contains(&name) {
                true => fs::read_to_string(self.source_path(&name)).ok().map(|s| s.trim().to_owned()),
                false => None,
            };
            out.push(Volume {
                size: meta.len(),
                allocated: meta.blocks() * 512,
                location: entry.path().display().to_string(),
                source,
                name,
            });
        }
        Ok(out)
    }
    /// Builds the driver from validated options. Touches nothing on disk until `init`.
    pub fn new(options: &Options) -> Result<FileVolume, DriverError> {
        let root = options.path("root")?;
        Ok(FileVolume {
            root,
            max_size: match options.get("max_volume_size") {
                Some(_) => Some(options.size("max_volume_size")?),
                None => None,
            },
            fs_max: std::sync::OnceLock::new(),
            overcommit: match options.get("overcommit_ratio") {
                None | Some("") => None,
                Some(text) => match text.trim().parse::<f64>() {
                    Ok(r) if r.is_finite() && r > 0.0 => Some(r),
                    _ => {
                        return Err(DriverError::invalid_argument(format!(
                            "option \"overcommit_ratio\": expected a positive number, got {text:?}"
                        )))
                    }
                },
            },
            reserved: std::sync::Mutex::new(Vec::new()),
            reflink: options.boolean("reflink")?,
            sync: options.boolean("sync")?,
            create_root: options.boolean("create_root")?,
            root_problem: std::sync::Mutex::new(None),
        })
    }

    /// The parent's memory of the root: `<parent>/.<root name>.file-volume` (none for `/`).
    fn parent_marker(&self) -> Option<PathBuf> {
        let name = self.root.file_name()?.to_str()?;
        Some(self.root.parent()?.join(format!(".{name}{MARKER}")))
    }

    /// Writes both markers (the parent's is best effort: its directory may not be ours to write).
    fn mark_root(&self) -> Result<(), DriverError> {
        let text = format!("file-volume root {}\n", self.root.display());
        let marker = self.root.join(MARKER);
        fs::write(&marker, &text).map_err(|e| DriverError::io(format!("writing {}", marker.display()), &e))?;
        if let Some(p) = self.parent_marker() {
            let _ = fs::write(p, &text);
        }
        if self.sync {
            let _ = File::open(&self.root).and_then(|d| d.sync_all());
        }
        Ok(())
    }

    /// Makes the root usable if the rules allow, or says why not: creates it at first use (no parent
    /// marker yet) or with `create_root`; takes an unmarked directory on the same terms.
    fn prepare_root(&self) -> Result<(), String> {
        let first_use = self.parent_marker().is_none_or(|p| !p.exists());
        let may_create = first_use || self.create_root;
        match fs::metadata(&self.root) {
            Ok(m) if !m.is_dir() => Err(format!("volume root {} is not a directory", self.root.display())),
            Ok(_) if self.root.join(MARKER).exists() => Ok(()),
            Ok(_) if may_create => self.mark_root().map_err(|e| e.message().to_owned()),
            Ok(_) => Err(format!(
                "volume root {} lacks its marker {MARKER}: not the directory this backend used (an unmounted filesystem?); mount it, or set create_root = true to use it as it is",
                self.root.display()
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound && may_create => fs::create_dir_all(&self.root)
                .map_err(|e| format!("creating volume root {}: {e}", self.root.display()))
                .and_then(|()| self.mark_root().map_err(|e| e.message().to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
                "volume root {} is missing (it held this backend's volumes: moved away or not mounted?); put it back, or set create_root = true to start an empty one",
                self.root.display()
            )),
            Err(e) => Err(format!("volume root {}: {e}", self.root.display())),
        }
    }

    /// Checks the root (at `init`, and again while it was unusable or if its marker is gone); once it
    /// is usable, removes what interrupted operations left in it.
    fn root_ready(&self, init: bool) -> Result<(), DriverError> {
        let mut problem = self.root_problem.lock().unwrap_or_else(|p| p.into_inner());
        if init || problem.is_some() || !self.root.join(MARKER).exists() {
            match self.prepare_root() {
                Ok(()) => {
                    *problem = None;
                    self.remove_leftovers()?;
                }
                Err(why) => {
                    *problem = Some(why.clone());
                    return Err(DriverError::internal(why));
                }
            }
        }
        Ok(())
    }

    fn path(&self, name: &str) -> Result<PathBuf, DriverError> {
        check_name(name)?;
        Ok(self.root.join(format!("{name}{SUFFIX}")))
    }

    fn source_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{SOURCE_PREFIX}{name}"))
    }

    /// A fresh temporary path for something being made for `name`; never listed. It carries this
    /// process's identity, so that `init` removes only what other (dead) processes left.
    fn partial_path(&self, name: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!("{PARTIAL_PREFIX}{name}.{}.{n}", process_token()))
    }

    /// Renames a complete temporary file into place, refusing to replace an existing volume. With
    /// `sync`, the file and the directory entry reach the disk before this returns.
    fn publish(&self, tmp: &Path, file: &File, dst: &Path, name: &str) -> Result<(), DriverError> {
        if self.sync {
            file.sync_all().map_err(|e| DriverError::io(format!("volume {name:?}: syncing"), &e))?;
        }
        rename_noreplace(tmp, dst).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => DriverError::already_exists(format!("volume {name:?} already exists")),
            _ => DriverError::io(format!("volume {name:?}: renaming into place"), &e),
        })?;
        if self.sync {
            File::open(&self.root)
                .and_then(|d| d.sync_all())
                .map_err(|e| DriverError::io(format!("volume {name:?}: syncing the volume root"), &e))?;
        }
        Ok(())
    }

    /// Copies `src` (`len` bytes; a reflink where possible, otherwise the data extents) to a fresh
    /// temporary file for `name`; returns its path and the open file. The caller publishes it or removes it.
    fn copy_to_partial(&self, src: &File, len: u64, name: &str) -> Result<(PathBuf, File), DriverError> {
        let tmp = self.partial_path(name);
        let dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| DriverError::io(format!("volume {name:?}: creating {}", tmp.display()), &e))?;
        let copied = if self.reflink && try_reflink(src, &dst) { Ok(()) } else { sparse_copy(src, &dst, len) };
        match copied {
            Ok(()) => Ok((tmp, dst)),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(DriverError::io(format!("volume {name:?}: copying"), &e))
            }
        }
    }

    /// Removes what interrupted operations left: temporary files and source records of volumes that
    /// were never completed.
    fn remove_leftovers(&self) -> Result<(), DriverError> {
        let rd = fs::read_dir(&self.root)
            .map_err(|e| DriverError::io(format!("listing volume root {}", self.root.display()), &e))?;
        for entry in rd.flatten() {
            let file_name = entry.file_name();
            let Some(n) = file_name.to_str() else { continue };
            let leftover = if let Some(rest) = n.strip_prefix(PARTIAL_PREFIX) {
                // Work in flight in this process (another driver instance, during a swap) is not a
                // leftover.
                rest.rsplit('.').nth(1).is_none_or(|token| token != process_token())
            } else if let Some(vol) = n.strip_prefix(SOURCE_PREFIX) {
                !self.root.join(format!("{vol}{SUFFIX}")).exists()
            } else {
                false
            };
            if leftover {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn info(&self, name: &str, path: &Path) -> Result<Volume, DriverError> {
        let meta = fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DriverError::not_found(format!("volume {name:?} not found")),
            _ => DriverError::io(format!("volume {name:?}: reading {}", path.display()), &e),
        })?;
        let source = fs::read_to_string(self.source_path(name)).ok().map(|s| s.trim().to_owned());
        Ok(Volume {
            name: name.to_owned(),
            size: meta.len(),
            allocated: meta.blocks() * 512,
            location: path.display().to_string(),
            source,
        })
    }

    fn check_size(&self, name: &str, size: u64) -> Result<(), DriverError> {
        if let Some(max) = self.max_size.filter(|&max| size > max) {
            return Err(DriverError::invalid_argument(format!(
                "volume {name:?}: size {size} exceeds max_volume_size {max}"
            )));
        }
        if let Some(max) = self.fs_max().filter(|&max| size > max) {
            return Err(DriverError::invalid_argument(format!(
                "volume {name:?}: size {size} exceeds {max}, the largest file the filesystem of {} can hold",
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Reserves volume `name` at `size` under `overcommit_ratio` (nothing without it), until the
    /// reservation drops: the sizes of the volumes listed and of those being made or grown (each counted
    /// once, at its new size) must stay within the ratio of the filesystem's size, or the answer is
    /// `no_capacity`.
    fn provision(&self, name: &str, size: u64) -> Result<Option<Reservation<'_>>, DriverError> {
        let Some(ratio) = self.overcommit else { return Ok(None) };
        let (total, _) = self.space()?;
        let limit = (total as f64 * ratio) as u64;
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let pending = |n: &str| n == name || reserved.iter().any(|(r, _)| r == n);
        let listed: u64 = self.list()?.iter().filter(|v| !pending(&v.name)).map(|v| v.size).sum();
        let after = reserved.iter().map(|(_, s)| *s).fold(listed.saturating_add(size), u64::saturating_add);
        if after > limit {
            return Err(DriverError::no_capacity(format!(
                "volume {name:?}: size {size} would provision {after} bytes, above {limit} (overcommit_ratio {ratio} of the {total} bytes of the filesystem of {})",
                self.root.display()
            )));
        }
        reserved.push((name.to_owned(), size));
        Ok(Some(Reservation { driver: self, name: name.to_owned() }))
    }

    /// The root's filesystem: total and available bytes.
    fn space(&self) -> Result<(u64, u64), DriverError> {
        let c = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes())
            .map_err(|_| DriverError::invalid_argument("volume root contains a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(DriverError::io(format!("statvfs {}", self.root.display()), &io::Error::last_os_error()));
        }
        Ok((st.f_blocks as u64 * st.f_frsize as u64, st.f_bavail as u64 * st.f_frsize as u64))
    }

    /// The largest file the root's filesystem can hold, found at the first call that can (the root may
    /// not be there yet); `None` until then, and the filesystem's own refusal (EFBIG) still answers
    /// `invalid_argument`.
    fn fs_max(&self) -> Option<u64> {
        if let Some(&max) = self.fs_max.get() {
            return Some(max);
        }
        let max = largest_file(&self.root).ok()?;
        Some(*self.fs_max.get_or_init(|| max))
    }
}

/// A volume counted at its new size against `overcommit_ratio` while it is being made or grown.
struct Reservation<'a> {
    driver: &'a FileVolume,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.driver.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = reserved.iter().position(|(n, _)| *n == self.name) {
            reserved.swap_remove(i);
        }
    }
}

/// The largest size a file in `dir` can have (the filesystem's limit, e.g. 16 TiB - 4 KiB on ext4 with
/// 4 KiB blocks, 8 EiB on xfs), or the process's file size limit if lower: found by bisection, growing
/// an unnamed file (O_TMPFILE, sparse: nothing is written) that vanishes when closed.
fn largest_file(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir)?;
    let mut limit = i64::MAX as u64;
    // Growing a file past RLIMIT_FSIZE raises SIGXFSZ, which kills the process: stay within it.
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `rl`, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut rl) } == 0 && rl.rlim_cur != libc::RLIM_INFINITY {
        limit = limit.min(rl.rlim_cur);
    }
    if f.set_len(limit).is_ok() {
        return Ok(limit);
    }
    // `fits` holds, `too_big` does not.
    let (mut fits, mut too_big) = (0u64, limit);
    while too_big - fits > 1 {
        let mid = fits + (too_big - fits) / 2;
        match f.set_len(mid) {
            Ok(()) => fits = mid,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EFBIG | libc::EINVAL)) => too_big = mid,
            Err(e) => return Err(e),
        }
    }
    Ok(fits)
}

/// Copies `src` to `dst` keeping holes: only data extents (SEEK_DATA/SEEK_HOLE) are read and written.
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let fd = src.as_raw_fd();
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    let mut buf = vec![0u8; 1 << 20];
    while pos < end {
        // SAFETY: `fd` is a valid open descriptor owned by `src` for the duration of the call.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = data;
        while off < hole {
            let n = usize::try_from((hole - off).min(buf.len() as i64)).unwrap_or(buf.len());
            let got = src.read_at(&mut buf[..n], off as u64)?;
            if got == 0 {
                break;
            }
            dst.write_all_at(&buf[..got], off as u64)?;
            off += got as i64;
        }
        pos = hole;
    }
    Ok(())
}

fn try_reflink(src: &File, dst: &File) -> bool {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are valid and open for the duration of the call; FICLONE takes the
    // source descriptor as its argument and touches no memory of ours.
    unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) == 0 }
}

/// This process, uniquely on this boot: its pid and its start time (so that a later process reusing
/// the pid is told apart).
fn process_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let start = fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| s.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(19).map(str::to_owned)))
            .unwrap_or_default();
        format!("{}-{start}", std::process::id())
    })
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `dst`.
fn rename_noreplace(src: &Path, dst: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput);
    let (s, d) = (c(src)?, c(dst)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 touches no memory of ours.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, s.as_ptr(), libc::AT_FDCWD, d.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    // No RENAME_NOREPLACE on this filesystem: a hard link fails on an existing name just as well.
    fs::hard_link(src, dst)?;
    fs::remove_file(src)
}

impl VolumeDriver for FileVolume {
    /// Prepares the root (see the module docs). A root that cannot be used does not fail `init`: the
    /// driver reports unhealthy with the reason until it can be, so that it recovers on its own when the
    /// root comes back.
    fn init(&self) -> Result<(), DriverError> {
        let _ = self.root_ready(true);
        Ok(())
    }

    fn health(&self) -> Result<(), DriverError> {
        self.root_ready(false)
    }

    fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {
        let path = self.path(name)?;
        self.check_size(name, size)?;
        if path.exists() {
            return Err(DriverError::already_exists(format!("volume {name:?} already exists")));
        }
        let _reservation = self.provision(name, size)?;
        let tmp = self.partial_path(name);
        let made = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| DriverError::io(format!("volume {name:?}: creating {}", tmp.display()), &e))?;
            f.set_len(size).map_err(|e| DriverError::io(format!("volume {name:?}: sizing {}", tmp.display()), &e))?;
            let _ = fs::remove_file(self.source_path(name));
            self.publish(&tmp, &f, &path, name)
        })();
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.info(name, &path)
    }

    fn delete(&self, name: &str) -> Result<(), DriverError> {
        let path = self.path(name)?;
        fs::remove_file(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DriverError::not_found(format!("volume {name:?} not found")),
            _ => DriverError::io(format!("volume {name:?}: removing {}", path.display()), &e),
        })?;
        let _ = fs::remove_file(self.source_path(name));
        Ok(())
    }

    fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {
        let path = self.path(name)?;
        self.check_size(name, new_size)?;
        let current = self.info(name, &path)?;
        if new_size < current.size {
            return Err(DriverError::invalid_argument(format!(
                "volume {name:?}: new size {new_size} is smaller than current size {}",
                current.size
            )));
        }
        let _reservation = self.provision(name, new_size)?;
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| DriverError::io(format!("volume {name:?}: opening {}", path.display()), &e))?;
        f.set_len(new_size).map_err(|e| DriverError::io(format!("volume {name:?}: extending"), &e))?;
        self.info(name, &path)
    }

    fn snapshot(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
        let src_path = self.path(name)?;
        let dst_path = self.path(snapshot)?;
        let src = File::open(&src_path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DriverError::not_found(format!("volume {name:?} not found")),
            _ => DriverError::io(format!("volume {name:?}: opening"), &e),
        })?;
        if dst_path.exists() {
            return Err(DriverError::already_exists(format!("volume {snapshot:?} already exists")));
        }
        let len = src.metadata().map_err(|e| DriverError::io(format!("volume {name:?}"), &e))?.len();
        let _reservation = self.provision(snapshot, len)?;
        // The source record first (a leftover without its volume is removed at init), then the data under
        // a temporary name, renamed into place once complete.
        let made = (|| {
            let source_tmp = self.partial_path(&format!("{snapshot}.source"));
            fs::write(&source_tmp, name)
                .and_then(|()| fs::rename(&source_tmp, self.source_path(snapshot)))
                .map_err(|e| DriverError::io(format!("snapshot {snapshot:?}: recording its source"), &e))?;
            let (tmp, dst) = self.copy_to_partial(&src, len, snapshot)?;
            self.publish(&tmp, &dst, &dst_path, snapshot).inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            })
        })();
        if let Err(e) = made {
            if !dst_path.exists() {
                let _ = fs::remove_file(self.source_path(snapshot));
            }
            return Err(e);
        }
        self.info(snapshot, &dst_path)
    }

    fn revert(&self, name: &str, snapshot: &str) -> Result<Volume, DriverError> {
        let vol_path = self.path(name)?;
        let snap_path = self.path(snapshot)?;
        if !vol_path.exists() {
            return Err(DriverError::not_found(format!("volume {name:?} not found")));
        }
        let snap = File::open(&snap_path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DriverError::not_found(format!("volume {snapshot:?} not found")),
            _ => DriverError::io(format!("volume {snapshot:?}: opening"), &e),
        })?;
        let source = fs::read_to_string(self.source_path(snapshot)).ok().map(|s| s.trim().to_owned());
        if source.as_deref() != Some(name) {
            return Err(DriverError::invalid_argument(format!("volume {snapshot:?} is not a snapshot of {name:?}")));
        }
        let len = snap.metadata().map_err(|e| DriverError::io(format!("volume {snapshot:?}"), &e))?.len();
        // The snapshot's content under a temporary name, renamed over the volume once complete: a revert
        // interrupted at any point leaves the volume as it was.
        let (tmp, dst) = self.copy_to_partial(&snap, len, name)?;
        let made = (|| {
            if self.sync {
                dst.sync_all().map_err(|e| DriverError::io(format!("volume {name:?}: syncing"), &e))?;
            }
            fs::rename(&tmp, &vol_path)
                .map_err(|e| DriverError::io(format!("volume {name:?}: renaming into place"), &e))?;
            if self.sync {
                File::open(&self.root)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| DriverError::io(format!("volume {name:?}: syncing the volume root"), &e))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.info(name, &vol_path)
    }

    fn list(&self) -> Result<Vec<Volume>, DriverError> {
        self.listed("", usize::MAX)
    }

    fn list_after(&self, after: &str, limit: u64) -> Result<Vec<Volume>, DriverError> {
        self.listed(after, usize::try_from(limit).unwrap_or(usize::MAX))
    }

    fn get(&self, name: &str) -> Result<Volume, DriverError> {
        let path = self.path(name)?;
        self.info(name, &path)
    }

    fn stats(&self) -> Result<CapacityStats, DriverError> {
        let (total_bytes, free_bytes) = self.space()?;
        let vols = self.list()?;
        Ok(CapacityStats {
            total_bytes,
            free_bytes,
            provisioned_bytes: vols.iter().map(|v| v.size).sum(),
            allocated_bytes: vols.iter().map(|v| v.allocated).sum(),
            volumes: vols.len() as u64,
        })
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<u64, DriverError> {
        let path = self.path(name)?;
        let f = OpenOptions::new().write(true).open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DriverError::not_found(format!("volume {name:?} not found")),
            _ => DriverError::io(format!("volume {name:?}: opening"), &e),
        })?;
        let size = f.metadata().map_err(|e| DriverError::io(format!("volume {name:?}"), &e))?.len();
        if offset.checked_add(data.len() as u64).is_none_or(|end| end > size) {
            return Err(DriverError::invalid_argument(format!("volume {name:?}: write past the end (size {size})")));
        }
        f.write_all_at(data, offset).map_err(|e| DriverError::io(format!("volume {name:?}: writing"), &e))?;
        Ok(data.len() as u64)
    }

    fn read_at(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, DriverError> {
        let path = self.path(name)?;
        let f = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DriverError::not_found(format!("volume {name:?} not found")),
            _ => DriverError::io(format!("volume {name:?}: opening"), &e),
        })?;
        let size = f.metadata().map_err(|e| DriverError::io(format!("volume {name:?}"), &e))?.len();
        let n = usize::try_from(offset.saturating_add(len).min(size).saturating_sub(offset))
            .map_err(|_| DriverError::invalid_argument("read too large"))?;
        let mut buf = vec![0u8; n];
        f.read_exact_at(&mut buf, offset).map_err(|e| DriverError::io(format!("volume {name:?}: reading"), &e))?;
        Ok(buf)
    }
}

plughost_api::export_driver! {
    kind: volume,
    driver: FileVolume,
    name: "file-volume",
    version: env!("CARGO_PKG_VERSION"),
    summary: "each volume a sparse file under a root directory; snapshots by reflink or sparse copy",
    options: OPTIONS,
    new: FileVolume::new,
}

#[cfg(test)]
mod tests {
    use super::*;
    use plughost_api::ErrorKind;

    fn driver(dir: &Path) -> FileVolume {
        let o = Options::from_pairs([
            ("root", dir.to_str().unwrap()),
            ("max_volume_size", "1073741824"),
            ("reflink", "false"),
        ]);
        let d = FileVolume::new(&o).unwrap();
        d.init().unwrap();
        d
    }

    #[test]
    fn without_max_volume_size_the_filesystem_sets_the_limit() {
        let dir = std::env::temp_dir().join(format!("file-volume-fsmax-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let d = FileVolume::new(&Options::from_pairs([("root", dir.to_str().unwrap()), ("sync", "false")])).unwrap();
        d.init().unwrap();
        let max = largest_file(&dir).unwrap();
        // The probe agrees with the filesystem on a named file of its own.
        let f = File::create(dir.join("probe")).unwrap();
        f.set_len(max).unwrap();
        if max < i64::MAX as u64 {
            let e = f.set_len(max + 1).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
            // Above it: invalid_argument before anything is made, naming the limit and the root.
            let e = d.create("over", max + 1).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::INVALID_ARGUMENT, "{e:?}");
            assert!(e.message().contains(&format!("exceeds {max}, the largest file the filesystem of")), "{e:?}");
            assert!(!dir.join("over.vol").exists());
        }
        drop(f);
        fs::remove_file(dir.join("probe")).unwrap();
        // At it: a sparse volume of exactly that size (16 TiB - 4 KiB on ext4), nothing written.
        assert_eq!(d.create("at", max).unwrap().size, max);
        assert_eq!(d.extend("at", max.saturating_add(1)).unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT);
        d.delete("at").unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overcommit_ratio_bounds_what_is_provisioned_even_under_concurrent_creates() {
        let dir = std::env::temp_dir().join(format!("file-volume-overcommit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let total = driver(&dir).space().unwrap().0;
        // A ratio that allows 101 MiB on this filesystem.
        let ratio = format!("{}", (101u64 << 20) as f64 / total as f64);
        let o = Options::from_pairs([
            ("root", dir.to_str().unwrap()),
            ("sync", "false"),
            ("reflink", "false"),
            ("overcommit_ratio", ratio.as_str()),
        ]);
        let d = FileVolume::new(&o).unwrap();
        d.init().unwrap();
        d.create("a", 60 << 20).unwrap();
        let e = d.create("b", 50 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NO_CAPACITY, "{e:?}");
        assert!(e.message().contains("overcommit_ratio"), "{e:?}");
        assert!(!dir.join("b.vol").exists());
        assert_eq!(d.extend("a", 90 << 20).unwrap().size, 90 << 20);
        assert_eq!(d.extend("a", 110 << 20).unwrap_err().kind(), ErrorKind::NO_CAPACITY);
        assert_eq!(d.snapshot("a", "s").unwrap_err().kind(), ErrorKind::NO_CAPACITY);
        assert!(!dir.join("s.vol").exists());
        d.delete("a").unwrap();
        // Eight at once, 20 MiB each: exactly five fit.
        let made = std::thread::scope(|s| {
            let d = &d;
            let threads: Vec<_> = (0..8).map(|i| s.spawn(move || d.create(&format!("c{i}"), 20 << 20))).collect();
            threads.into_iter().map(|t| t.join().unwrap()).filter(|r| r.is_ok()).count()
        });
        assert_eq!(made, 5);
        assert_eq!(d.stats().unwrap().provisioned_bytes, 100 << 20);
        for bad in ["0", "-1", "many", "inf"] {
            let o = Options::from_pairs([("root", dir.to_str().unwrap()), ("overcommit_ratio", bad)]);
            let e = FileVolume::new(&o).err().unwrap();
            assert!(e.message().contains("option \"overcommit_ratio\""), "{bad}: {e:?}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sparse_files_snapshots_and_names() {
        let dir = std::env::temp_dir().join(format!("file-volume-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let d = driver(&dir);
        let v = d.create("v1", 10 << 20).unwrap();
        assert_eq!(fs::metadata(dir.join("v1.vol")).unwrap().len(), 10 << 20);
        assert!(v.allocated < v.size, "sparse: {v:?}");
        d.write_at("v1", 5 << 20, b"data in the middle").unwrap();
        let s = d.snapshot("v1", "s1").unwrap();
        assert_eq!((s.size, s.source.as_deref()), (10 << 20, Some("v1")));
        assert!(s.allocated < s.size, "snapshot stays sparse: {s:?}");
        assert_eq!(d.read_at("s1", 5 << 20, 18).unwrap(), b"data in the middle");
        d.write_at("v1", 5 << 20, b"DATA CHANGED LATER").unwrap();
        assert_eq!(d.revert("s1", "v1").unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT, "v1 is not a snapshot of s1");
        let reverted = d.revert("v1", "s1").unwrap();
        assert_eq!((reverted.size, reverted.source), (10 << 20, None));
        assert_eq!(d.read_at("v1", 5 << 20, 18).unwrap(), b"data in the middle");
        assert_eq!(d.revert("v1", "nope").unwrap_err().kind(), ErrorKind::NOT_FOUND);
        assert_eq!(d.extend("v1", 20 << 20).unwrap().size, 20 << 20);
        assert_eq!(d.extend("v1", 1).unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT);
        assert_eq!(d.create("v1", 1).unwrap_err().kind(), ErrorKind::ALREADY_EXISTS);
        assert_eq!(d.create("big", 2 << 30).unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT);
        for bad in ["../escape", "a/b", ".hidden", "", "-x"] {
            assert_eq!(d.create(bad, 1).unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT, "{bad:?}");
        }
        assert_eq!(d.list().unwrap().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["s1", "v1"]);
        assert!(d.stats().unwrap().total_bytes > 0);
        d.delete("v1").unwrap();
        assert_eq!(d.get("v1").unwrap_err().kind(), ErrorKind::NOT_FOUND);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interrupted_work_is_never_listed_and_is_removed_at_init() {
        let dir = std::env::temp_dir().join(format!("file-volume-partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let d = driver(&dir);
        d.create("v1", 1 << 20).unwrap();
        // What a kill -9 in the middle of `snapshot v1 s1` leaves behind.
        fs::write(dir.join(".source.s1"), "v1").unwrap();
        fs::write(dir.join(".partial.s1.123-456.0"), vec![1u8; 4096]).unwrap();
        // Work in flight in this process is not touched by another instance's init.
        let mine = d.partial_path("w");
        fs::write(&mine, b"in flight").unwrap();
        assert_eq!(d.list().unwrap().iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["v1"]);
        assert_eq!(d.get("s1").unwrap_err().kind(), ErrorKind::NOT_FOUND);
        let again = driver(&dir);
        assert!(mine.exists(), "another instance's work in flight survives init");
        fs::remove_file(&mine).unwrap();
        let mut left: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, [MARKER, "v1.vol"]);
        assert_eq!(again.snapshot("v1", "s1").unwrap().source.as_deref(), Some("v1"));
        assert_eq!(again.snapshot("v1", "s1").unwrap_err().kind(), ErrorKind::ALREADY_EXISTS);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The first start makes the root; later a missing or unmarked root keeps the driver unhealthy (never
    /// recreated empty) until it is back or `create_root` says otherwise.
    #[test]
    fn a_root_used_before_is_never_recreated_empty() {
        let base = std::env::temp_dir().join(format!("file-volume-root-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let root = base.join("vols");
        let d = driver(&root);
        d.create("v", 1 << 20).unwrap();
        assert!(root.join(MARKER).exists() && base.join(".vols.file-volume").exists());
        fs::rename(&root, base.join("moved")).unwrap();
        let again = driver(&root);
        let e = again.health().unwrap_err();
        assert!(e.message().contains("is missing (it held this backend's volumes"), "{}", e.message());
        assert!(!root.exists(), "not recreated");
        // An empty directory in its place (a mount point without its filesystem) is not taken either.
        fs::create_dir(&root).unwrap();
        let e = again.health().unwrap_err();
        assert!(e.message().contains("lacks its marker .file-volume"), "{}", e.message());
        fs::remove_dir(&root).unwrap();
        // Back where it was: healthy again, without a restart, with its volume.
        fs::rename(base.join("moved"), &root).unwrap();
        again.health().unwrap();
        assert_eq!(again.get("v").unwrap().size, 1 << 20);
        // create_root starts an empty one.
        fs::rename(&root, base.join("moved")).unwrap();
        let o = Options::for_schema(OPTIONS, [("root", root.to_str().unwrap()), ("create_root", "true")]);
        let fresh = FileVolume::new(&o).unwrap();
        fresh.init().unwrap();
        fresh.health().unwrap();
        assert!(fresh.list().unwrap().is_empty());
        fs::remove_dir_all(&base).unwrap();
    }
}
