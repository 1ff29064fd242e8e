//! Test support for plughost: builds the real binary and driver libraries with cargo, builds
//! deliberately broken fixtures, and drives a real `plughost` process.
//!
//! Everything here is for tests; panicking with a clear message on a broken environment is the point.
#![allow(clippy::unwrap_used)]

pub mod fixtures;
pub mod nats;
pub mod process;
pub mod procs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Where debug artifacts land.
pub fn profile_dir() -> PathBuf {
    target_dir().join("debug")
}

/// The cargo that is running us.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.env("CARGO_TARGET_DIR", target_dir());
    c
}

/// The reference drivers built by [`build`].
pub const DRIVERS: &[&str] =
    &["fake-volume", "fake-compute", "fake-network", "bridge-network", "faulty", "file-volume", "process-compute"];

/// Builds `plughost` and every reference driver (debug profile) once per test process.
pub fn build() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut c = cargo();
        // No `--bin`: it would limit every selected package to binaries and skip the driver libraries.
        c.current_dir(workspace_root()).args(["build", "--quiet", "-p", "host"]);
        for d in DRIVERS {
            c.args(["-p", d]);
        }
        let status = c.status().expect("cargo can be run");
        assert!(status.success(), "building plughost and the drivers failed");
    });
}

/// Where release artifacts land.
pub fn release_dir() -> PathBuf {
    target_dir().join("release")
}

/// Builds `plughost` and every reference driver in release mode (for benchmarks).
pub fn build_release() {
    let mut c = cargo();
    c.current_dir(workspace_root()).args(["build", "--quiet", "--release", "-p", "host"]);
    for d in DRIVERS {
        c.args(["-p", d]);
    }
    assert!(c.status().expect("cargo can be run").success(), "release build failed");
}

/// The built `plughost` binary.
pub fn plughost() -> PathBuf {
    build();
    profile_dir().join("plughost")
}

/// The built library of a reference driver, by package name.
pub fn driver(name: &str) -> PathBuf {
    build();
    profile_dir().join(format!("lib{}.so", name.replace('-', "_")))
}

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the target dir (not /tmp, so it shares the build's filesystem).
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let p = target_dir().join("test-tmp").join(format!("{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A path inside it.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
