//! Network namespaces bound to files, as `ip netns` keeps them: the compute service gives each instance
//! with networks one, at `<runtime dir>/netns/<instance id>`.
//!
//! A namespace is made by a thread of its own (`unshare(CLONE_NEWNET)` affects only the calling
//! thread), which brings its loopback up and bind-mounts `/proc/thread-self/ns/net` onto the file; the
//! namespace then lives as long as that mount or a process in it. Its identity is the namespace's inode
//! (what `stat` of the bound file and of `/proc/PID/ns/net` give).

use std::ffi::{CStr, CString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// `NS_GET_NSTYPE` (linux/nsfs.h): the type of the namespace a namespace file refers to.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{}: the path has a NUL byte", path.display()))
}

/// Makes the (empty) file a namespace is bound on.
fn new_file(path: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map(drop)
        .map_err(|e| format!("network namespace {}: cannot create its file: {e}", path.display()))
}

/// Bind-mounts `source` on `target`.
fn bind_mount(source: &CStr, target: &CStr) -> std::io::Result<()> {
    // SAFETY: both paths are NUL-terminated strings that outlive the call; no data argument.
    let rc =
        unsafe { libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes a new network namespace bound at `path` (which must not exist), its loopback up; its inode.
pub(crate) fn create(path: &Path) -> Result<u64, String> {
    new_file(path)?;
    let target = c_path(path)?;
    let made = std::thread::Builder::new()
        .name("netns".to_owned())
        .spawn(move || -> Result<(), String> {
            // SAFETY: unshare affects this thread only (a network namespace may be unshared by one
            // thread of a multi-threaded process); the thread ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", std::io::Error::last_os_error()));
            }
            loopback_up()?;
            bind_mount(c"/proc/thread-self/ns/net", &target).map_err(|e| format!("bind mount: {e}"))
        })
        .map_err(|e| format!("network namespace {}: cannot start a thread: {e}", path.display()))?
        .join()
        .unwrap_or_else(|_| Err("its thread panicked".to_owned()));
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(format!("network namespace {}: {e}", path.display()));
    }
    inode(path).ok_or_else(|| format!("network namespace {}: not a namespace after it was made", path.display()))
}

/// Brings `lo` up in the calling thread's network namespace.
fn loopback_up() -> Result<(), String> {
    // SAFETY: a socket we close below; ifreq is plain data, filled in by the kernel for SIOCGIFFLAGS
    // and read back for SIOCSIFFLAGS; the name is NUL-terminated within IFNAMSIZ.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(format!("bringing lo up: {err}"));
        }
    }
    Ok(())
}

/// The inode of the network namespace bound at `path`; none if nothing is (a plain file, no file,
/// another kind of namespace). Paths may come from clients (a port's namespace), so nothing but a
/// regular file is opened (a namespace file is one), and without blocking: a FIFO put there by another
/// user cannot hold the host.
pub(crate) fn inode(path: &Path) -> Option<u64> {
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path).ok()?;
    // SAFETY: an ioctl without an argument on a descriptor we hold; any other file fails (ENOTTY).
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    (kind == libc::CLONE_NEWNET).then(|| f.metadata().ok().map(|m| m.ino())).flatten()
}

/// The inode of process `pid`'s network namespace.
pub(crate) fn of_pid(pid: u32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino())
}

/// Binds the network namespace that `source` refers to (a `/proc/PID/ns/net`, or a bound namespace
/// file seen through `/proc/PID/root`) at `path` again, making the file if it is missing; its inode.
pub(crate) fn bind(source: &Path, path: &Path) -> Result<u64, String> {
    if !path.exists() {
        new_file(path)?;
    }
    bind_mount(&c_path(source)?, &c_path(path)?)
        .map_err(|e| format!("network namespace {}: cannot bind {} there: {e}", path.display(), source.display()))?;
    inode(path).ok_or_else(|| format!("network namespace {}: not a namespace after it was bound", path.display()))
}

/// Unbinds and removes the namespace file at `path` (the namespace goes with its last process); a path
/// that is already gone is fine.
pub(crate) fn remove(path: &Path) -> Result<(), String> {
    let target = c_path(path)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        // EINVAL: not a mount point (made half-way); ENOENT: gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(format!("network namespace {}: cannot unmount it: {e}", path.display()));
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("network namespace {}: cannot remove its file: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_network_namespace_has_an_inode_and_nothing_else_is_waited_on() {
        let dir = std::env::temp_dir().join(format!("plughost-netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = c_path(&fifo).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::write(dir.join("plain"), b"").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo.clone(), dir.join("plain"), dir.join("none"), "/proc/self/ns/mnt".into(), dir.clone()];
        std::thread::spawn(move || tx.send(paths.map(|p| inode(&p))).unwrap());
        let found = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("inode() blocked on a FIFO");
        assert_eq!(found, [None; 5]);
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(inode(Path::new("/proc/self/ns/net")), Some(own));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
