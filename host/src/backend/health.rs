//! Whether a backend serves: its health, shared with its worker's supervisor, and its first init.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Whether a backend can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Initialised and the last health check passed.
    Up,
    /// `init` failed, or the last health check failed; the reason says which. Calls are refused with
    /// `unavailable` until a health check passes (or a swap brings a working driver).
    Down(String),
}

/// Where a backend's first `init` is (it runs in the background at start).
#[derive(Debug, Clone)]
pub(super) enum InitState {
    /// Running since then.
    Running(Instant),
    /// Failed or timed out: the backend stays down until a swap.
    Failed(String),
    /// Done (or not needed).
    Done,
}

/// A backend's health, shared with its worker's supervisor (which takes it down when the circuit
/// opens, and up again on `ctl restart`).
#[derive(Debug)]
pub struct HealthCell {
    health: Mutex<Health>,
    /// `health == Up`, read on every call without a lock.
    pub(super) serving: AtomicBool,
    label: String,
}

impl HealthCell {
    pub(super) fn new(service: &str, backend: &str) -> HealthCell {
        HealthCell {
            health: Mutex::new(Health::Down("starting".to_owned())),
            serving: AtomicBool::new(false),
            label: format!("{service} backend {backend:?}"),
        }
    }

    pub(super) fn get(&self) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn set(&self, h: Health) {
        let mut g = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if *g != h {
            match &h {
                Health::Up => log::info!("{} is up", self.label),
                // Starting is expected, not a fault; a backend stuck there is reported by its
                // reason's growing "init running for Ns" at each health check.
                Health::Down(r) if r.starts_with("starting") => log::info!("{} is {r}", self.label),
                Health::Down(r) => log::warn!("{} is down: {r}", self.label),
            }
        }
        self.serving.store(h == Health::Up, Ordering::Relaxed);
        *g = h;
    }
}
