//! A read-mostly cell with near-free reads, for the active driver of a backend.
//!
//! Readers run inside a *read section*: on entry a thread stores a sequence number into its own slot
//! (a plain store to a cache line no other thread writes), on exit it stores 0. A writer replaces the
//! pointer, then waits for a *grace period*: it issues a process-wide memory barrier
//! (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, as userspace RCU's "memb" flavour does) and waits
//! until every read section that was open at that moment has closed. After that no reader can still
//! hold the old pointer, so the old value can be cleaned up and freed.
//!
//! Why it is correct: the reader stores its slot, then loads the pointer; the writer stores the pointer,
//! then (after the barrier) loads every slot. The barrier makes each running thread execute a full
//! fence, so either the writer sees the reader's slot (and waits for it), or the reader's pointer load
//! comes after the writer's pointer store (and sees the new value). Where `membarrier` is not available
//! both sides use a `SeqCst` fence instead (Dekker), which costs the reader a few nanoseconds more.
//!
//! Readers never wait. Writers are serialized per cell; a grace period waits for *all* read sections
//! in the process, so a long driver call delays the retirement (not the replacement) of old values.

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, RwLock};
use std::time::{Duration, Instant};

/// One thread's read-section state, on its own cache line.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot {
    /// 0 outside a read section; otherwise an odd number unique to this section of this thread.
    state: AtomicU64,
}

static REGISTRY: Mutex<Vec<Arc<Slot>>> = Mutex::new(Vec::new());
static MEMBARRIER: AtomicBool = AtomicBool::new(false);
static INIT: Once = Once::new();
/// Readers on threads whose thread-locals are gone (during thread teardown) take this instead.
static FALLBACK: RwLock<()> = RwLock::new(());

fn init() {
    INIT.call_once(|| {
        use rustix::thread::{membarrier, membarrier_query, MembarrierCommand, MembarrierQuery};
        let ok = membarrier_query().contains(MembarrierQuery::PRIVATE_EXPEDITED)
            && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok();
        MEMBARRIER.store(ok, Ordering::SeqCst);
        log::debug!("rcu: membarrier {}", if ok { "available" } else { "unavailable, readers use fences" });
    });
}

struct Local {
    slot: Arc<Slot>,
    nesting: Cell<u32>,
    seq: Cell<u64>,
}

impl Local {
    fn new() -> Local {
        let slot = Arc::new(Slot::default());
        REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).push(slot.clone());
        Local { slot, nesting: Cell::new(0), seq: Cell::new(0) }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.slot.state.store(0, Ordering::Release);
        let mut r = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|s| !Arc::ptr_eq(s, &self.slot));
    }
}

thread_local! {
    static LOCAL: Local = Local::new();
}

enum Section {
    Slot,
    Fallback(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
}

#[inline]
fn enter() -> Section {
    let entered = LOCAL.try_with(|l| {
        let n = l.nesting.get();
        if n == 0 {
            let s = l.seq.get().wrapping_add(1);
            l.seq.set(s);
            l.slot.state.store((s << 1) | 1, Ordering::Relaxed);
            if MEMBARRIER.load(Ordering::Relaxed) {
                compiler_fence(Ordering::SeqCst);
            } else {
                fence(Ordering::SeqCst);
            }
        }
        l.nesting.set(n + 1);
    });
    match entered {
        Ok(()) => Section::Slot,
        Err(_) => Section::Fallback(FALLBACK.read().unwrap_or_else(|p| p.into_inner())),
    }
}

#[inline]
fn exit(section: Section) {
    if let Section::Slot = section {
        let _ = LOCAL.try_with(|l| {
            let n = l.nesting.get() - 1;
            l.nesting.set(n);
            if n == 0 {
                l.slot.state.store(0, Ordering::Release);
            }
        });
    }
}

/// Waits until every read section open now has closed, or `deadline` passes (then `false`).
fn synchronize(deadline: Instant) -> bool {
    if MEMBARRIER.load(Ordering::SeqCst) {
        if rustix::thread::membarrier(rustix::thread::MembarrierCommand::PrivateExpedited).is_err() {
            // Registered at init, so this cannot fail; stay correct if it somehow does.
            fence(Ordering::SeqCst);
        }
    } else {
        fence(Ordering::SeqCst);
    }
    let slots: Vec<Arc<Slot>> = REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mine = LOCAL.try_with(|l| l.slot.clone()).ok();
    for s in slots {
        if mine.as_ref().is_some_and(|m| Arc::ptr_eq(m, &s)) {
            continue; // a writer is never inside its own read section
        }
        let seen = s.state.load(Ordering::Acquire);
        if seen & 1 == 0 {
            continue;
        }
        let mut spins = 0u32;
        while s.state.load(Ordering::Acquire) == seen {
            if Instant::now() >= deadline {
                return false;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
    // Readers that lost their thread-locals hold the fallback lock.
    drop(FALLBACK.write().unwrap_or_else(|p| p.into_inner()));
    true
}

/// A value read far more often than it is replaced.
#[derive(Debug)]
pub(crate) struct RcuCell<T> {
    ptr: AtomicPtr<T>,
    write: Mutex<()>,
}

// SAFETY: the cell hands out `&T` to several threads at once (needs `T: Sync`) and moves values
// between threads when replacing and retiring them (needs `T: Send`).
unsafe impl<T: Send + Sync> Sync for RcuCell<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Send for RcuCell<T> {}

impl<T> RcuCell<T> {
    /// A cell holding `value`.
    pub(crate) fn new(value: T) -> RcuCell<T> {
        init();
        RcuCell { ptr: AtomicPtr::new(Box::into_raw(Box::new(value))), write: Mutex::new(()) }
    }

    /// Runs `f` on the current value inside a read section; the value stays valid until `f` returns.
    /// Never blocks.
    #[inline]
    pub(crate) fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let section = enter();
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: `p` came from `Box::into_raw` and is freed only by `Retired::wait`, after a grace
        // period that waits for this read section, which is open until `exit` below.
        let r = f(unsafe { &*p });
        exit(section);
        r
    }

    /// Installs `value`; the previous value is returned as [`Retired`], to be reclaimed once no
    /// reader can see it. Readers that start after this returns see `value`.
    pub(crate) fn replace(&self, value: T) -> Retired<T> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let new = Box::into_raw(Box::new(value));
        let old = self.ptr.swap(new, Ordering::SeqCst);
        Retired { ptr: old }
    }
}

impl<T> Drop for RcuCell<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self` means no read section can hold a reference into this cell.
        drop(unsafe { Box::from_raw(*self.ptr.get_mut()) });
    }
}

/// A value replaced in an [`RcuCell`], possibly still seen by readers.
#[derive(Debug)]
pub(crate) struct Retired<T> {
    ptr: *mut T,
}

// SAFETY: a retired value is only handed back (by value) after its grace period; moving the handle
// between threads moves ownership of a `T: Send`.
unsafe impl<T: Send> Send for Retired<T> {}

impl<T: Sync> Retired<T> {
    /// Reads the retired value while readers may still be reading it too (shared access only).
    pub(crate) fn peek<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        // SAFETY: the value is alive until `wait` hands it back (which takes `self`), and `T: Sync`
        // makes a shared reference alongside the remaining readers' sound.
        f(unsafe { &*self.ptr })
    }
}

impl<T> Retired<T> {
    /// Waits for the grace period (up to `timeout`) and returns the value, now owned by the caller;
    /// or gives the handle back if readers were still inside after `timeout`.
    pub(crate) fn wait(self, timeout: Duration) -> Result<Box<T>, Retired<T>> {
        if synchronize(Instant::now() + timeout) {
            // SAFETY: the pointer came from `Box::into_raw` in `replace`/`new`, is no longer reachable
            // from the cell, and the grace period just ended, so no reader holds it.
            Ok(unsafe { Box::from_raw(self.ptr) })
        } else {
            Err(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Canary {
        alive: AtomicBool,
        id: usize,
    }

    #[test]
    fn readers_never_see_a_reclaimed_value() {
        let cell = Arc::new(RcuCell::new(Canary { alive: AtomicBool::new(true), id: 0 }));
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (cell, stop, reads) = (cell.clone(), stop.clone(), reads.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        cell.read(|c| {
                            assert!(c.alive.load(Ordering::SeqCst), "read a reclaimed value {}", c.id);
                            // Nested sections are fine.
                            cell.read(|d| assert!(d.alive.load(Ordering::SeqCst)));
                            for _ in 0..200 {
                                std::hint::spin_loop();
                            }
                            assert!(c.alive.load(Ordering::SeqCst), "value {} reclaimed during a read", c.id);
                        });
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        // Readers must really run beside the swaps (on a busy machine they may not have started yet):
        // wait for both to read before the first swap, and for reads to go on every 50 swaps.
        let progress_beyond = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while reads.load(Ordering::Relaxed) <= n {
                assert!(std::time::Instant::now() < deadline, "readers made no progress");
                std::thread::yield_now();
            }
        };
        progress_beyond(1);
        for id in 1..=500 {
            if id % 50 == 0 {
                progress_beyond(reads.load(Ordering::Relaxed));
            }
            let old = cell.replace(Canary { alive: AtomicBool::new(true), id });
            let old = old.wait(Duration::from_secs(30)).unwrap_or_else(|_| panic!("grace period never ended"));
            old.alive.store(false, Ordering::SeqCst);
            // Leak the poisoned allocation (the very memory readers dereference), so that a reader
            // still inside would see `alive == false` rather than freed memory.
            std::mem::forget(old);
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert!(reads.load(Ordering::Relaxed) > 10);
        assert_eq!(cell.read(|c| c.id), 500);
    }

    #[test]
    fn a_grace_period_waits_for_an_open_read_section() {
        let cell = Arc::new(RcuCell::new(1u32));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let c = cell.clone();
        let reader = std::thread::spawn(move || {
            c.read(|v| {
                entered_tx.send(*v).unwrap();
                release_rx.recv().unwrap();
            })
        });
        assert_eq!(entered_rx.recv().unwrap(), 1);
        let retired = cell.replace(2);
        assert_eq!(cell.read(|v| *v), 2, "new readers see the new value at once");
        let retired = retired.wait(Duration::from_millis(100)).expect_err("reader still inside");
        release_tx.send(()).unwrap();
        reader.join().unwrap();
        assert_eq!(retired.wait(Duration::from_secs(10)).ok().map(|b| *b), Some(1));
    }
}
