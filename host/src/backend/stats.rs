//! Call statistics cheap enough for the hot path of every driver call.
//!
//! Each thread owns one *stripe* of counters (at most one live thread per stripe), so a counter update
//! is a plain load and store (no locked instruction); readers sum the stripes. A thread gives its stripe
//! back when it exits, and the next owner continues from the values it left (the hand-over goes through
//! a mutex, which orders the two). Threads beyond [`STRIPES`] share one stripe updated with atomic
//! read-modify-write operations. Latency is timed on one call in [`SAMPLE_EVERY`] per thread and method:
//! reading the clock twice costs several times a no-op driver call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// How many threads get a private stripe.
pub const STRIPES: usize = 64;
/// Latency is timed on one call in this many.
pub const SAMPLE_EVERY: u64 = 64;

static FREE: Mutex<Option<Vec<usize>>> = Mutex::new(None);

struct StripeId(Option<usize>);

impl StripeId {
    fn take() -> StripeId {
        let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
        StripeId(free.get_or_insert_with(|| (0..STRIPES).rev().collect()).pop())
    }
}

impl Drop for StripeId {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
            free.get_or_insert_with(Vec::new).push(i);
        }
    }
}

thread_local! {
    static STRIPE: StripeId = StripeId::take();
}

#[inline]
fn my_stripe() -> Option<usize> {
    STRIPE.try_with(|s| s.0).ok().flatten()
}

/// Upper bounds of the latency buckets, in nanoseconds (powers of four from 1 µs to 64 s); one more
/// bucket holds what is slower.
pub const LATENCY_BOUNDS_NS: [u64; 14] = [
    1_000,
    4_000,
    16_000,
    64_000,
    256_000,
    1_000_000,
    4_000_000,
    16_000_000,
    64_000_000,
    256_000_000,
    1_000_000_000,
    4_000_000_000,
    16_000_000_000,
    64_000_000_000,
];
/// Latency buckets: one per bound and one for anything slower.
pub const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;
/// The error kinds counted apart, by name (`ErrorKind::as_str`); anything else is the first, `unknown`.
pub const ERROR_KINDS: [&str; 11] = [
    "unknown",
    "not_found",
    "invalid_argument",
    "already_exists",
    "unsupported",
    "busy",
    "internal",
    "panicked",
    "no_capacity",
    "driver_crashed",
    "timeout",
];

/// The errors of `t` that are the driver's own faults rather than answers about the request.
pub fn faults(t: &Totals) -> u64 {
    ERROR_KINDS
        .iter()
        .zip(t.errors_by_kind.iter())
        .filter(|(k, _)| matches!(**k, "unknown" | "internal" | "panicked" | "driver_crashed" | "timeout"))
        .map(|(_, n)| n)
        .sum()
}

/// The index in [`ERROR_KINDS`] of an error kind's name.
pub fn error_kind_index(name: &str) -> usize {
    ERROR_KINDS.iter().position(|k| *k == name).unwrap_or(0)
}

/// Counters of one method in one stripe.
#[derive(Debug, Default)]
struct Cell5 {
    count: AtomicU64,
    errors: AtomicU64,
    sampled: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    /// Timed calls by latency bucket.
    latency: [AtomicU64; BUCKETS],
    /// Errors by kind.
    kinds: [AtomicU64; ERROR_KINDS.len()],
}

/// One thread's counters for every method, on their own cache lines.
#[repr(align(128))]
#[derive(Debug)]
struct Stripe {
    ops: Box<[Cell5]>,
}

impl Stripe {
    fn new(ops: usize) -> Stripe {
        Stripe { ops: (0..ops).map(|_| Cell5::default()).collect() }
    }
}

/// Totals of one method.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Calls.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Calls whose latency was timed.
    pub sampled: u64,
    /// Sum of timed latencies.
    pub total_ns: u64,
    /// Largest timed latency.
    pub max_ns: u64,
    /// Timed calls by latency bucket ([`LATENCY_BOUNDS_NS`], then slower).
    pub latency: [u64; BUCKETS],
    /// Errors by kind ([`ERROR_KINDS`]).
    pub errors_by_kind: [u64; ERROR_KINDS.len()],
}

/// Call statistics for a fixed set of methods (indexed `0..ops`).
#[derive(Debug)]
pub struct CallStats {
    stripes: Box<[Stripe]>,
    shared: Stripe,
}

/// An open call: where to record it and when it started (if timed).
#[derive(Debug)]
pub struct Pending {
    op: usize,
    stripe: Option<usize>,
    start: Option<Instant>,
}

#[inline]
fn bump(c: &AtomicU64, by: u64, private: bool) {
    if private {
        c.store(c.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
    } else {
        c.fetch_add(by, Ordering::Relaxed);
    }
}

impl CallStats {
    /// Statistics for `ops` methods.
    pub fn new(ops: usize) -> CallStats {
        CallStats { stripes: (0..STRIPES).map(|_| Stripe::new(ops)).collect(), shared: Stripe::new(ops) }
    }

    fn cell(&self, stripe: Option<usize>, op: usize) -> &Cell5 {
        match stripe {
            Some(i) => &self.stripes[i].ops[op],
            None => &self.shared.ops[op],
        }
    }

    /// Starts recording a call of method `op`.
    #[inline]
    pub fn begin(&self, op: usize) -> Pending {
        let stripe = my_stripe();
        let n = self.cell(stripe, op).count.load(Ordering::Relaxed);
        let start = if n.is_multiple_of(SAMPLE_EVERY) { Some(Instant::now()) } else { None };
        Pending { op, stripe, start }
    }

    /// Finishes recording a call; `error` is the index of its error kind in [`ERROR_KINDS`] if it failed.
    #[inline]
    pub fn end(&self, p: Pending, error: Option<usize>) {
        let private = p.stripe.is_some();
        let c = self.cell(p.stripe, p.op);
        if let Some(start) = p.start {
            let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            bump(&c.sampled, 1, private);
            bump(&c.total_ns, ns, private);
            let bucket = LATENCY_BOUNDS_NS.iter().position(|b| ns <= *b).unwrap_or(BUCKETS - 1);
            bump(&c.latency[bucket], 1, private);
            if private {
                if ns > c.max_ns.load(Ordering::Relaxed) {
                    c.max_ns.store(ns, Ordering::Relaxed);
                }
            } else {
                c.max_ns.fetch_max(ns, Ordering::Relaxed);
            }
        }
        bump(&c.count, 1, private);
        if let Some(kind) = error {
            bump(&c.errors, 1, private);
            bump(&c.kinds[kind.min(ERROR_KINDS.len() - 1)], 1, private);
        }
    }

    /// Sums every stripe for method `op`.
    pub fn totals(&self, op: usize) -> Totals {
        let mut t = Totals::default();
        for s in self.stripes.iter().chain(std::iter::once(&self.shared)) {
            let c = &s.ops[op];
            t.count += c.count.load(Ordering::Relaxed);
            t.errors += c.errors.load(Ordering::Relaxed);
            t.sampled += c.sampled.load(Ordering::Relaxed);
            t.total_ns += c.total_ns.load(Ordering::Relaxed);
            t.max_ns = t.max_ns.max(c.max_ns.load(Ordering::Relaxed));
            for (sum, b) in t.latency.iter_mut().zip(&c.latency) {
                *sum += b.load(Ordering::Relaxed);
            }
            for (sum, k) in t.errors_by_kind.iter_mut().zip(&c.kinds) {
                *sum += k.load(Ordering::Relaxed);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_are_exact_across_many_short_lived_threads() {
        let stats = Arc::new(CallStats::new(2));
        // More threads than stripes, in waves, so that stripes are handed over and shared.
        for _ in 0..3 {
            let threads: Vec<_> = (0..STRIPES + 8)
                .map(|i| {
                    let stats = stats.clone();
                    std::thread::spawn(move || {
                        for k in 0..1000 {
                            let p = stats.begin(i % 2);
                            stats.end(p, (k % 10 == 0).then_some(error_kind_index("busy")));
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        let total = 3 * (STRIPES as u64 + 8) * 1000;
        let (a, b) = (stats.totals(0), stats.totals(1));
        assert_eq!(a.count + b.count, total);
        assert_eq!(a.errors + b.errors, total / 10);
        assert_eq!(a.errors_by_kind[error_kind_index("busy")] + b.errors_by_kind[5], total / 10);
        assert_eq!(a.latency.iter().sum::<u64>(), a.sampled, "every timed call is in one bucket");
        assert!(a.sampled > 0 && a.sampled <= a.count / SAMPLE_EVERY + STRIPES as u64 + 1);
    }
}
