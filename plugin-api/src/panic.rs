//! Panic containment inside the plugin.
//!
//! A panic must never unwind out of an `extern "C"` entry point: abi_stable's guard would then exit the
//! whole host process. Every entry point the export macro generates runs driver code inside [`guard`],
//! which turns a panic into a [`DriverError`] of kind [`ErrorKind::PANICKED`] carrying the panic message
//! and location. The plugin has its own copy of std and so its own panic hook: [`install_hook`] replaces
//! it, so that a contained panic is recorded instead of printed; a panic outside any entry point (on a
//! thread the driver spawned) is still printed to stderr.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use abi_stable::std_types::RResult;

use crate::{DriverError, ErrorKind};

thread_local! {
    static IN_GUARD: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs driver code, turning a panic into an error value.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, DriverError>) -> RResult<T, DriverError> {
    let outer = IN_GUARD.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_GUARD.with(|g| g.set(outer));
    match result {
        Ok(r) => r.into(),
        Err(payload) => {
            let recorded = LAST_PANIC.with(|p| p.borrow_mut().take());
            let message = recorded.unwrap_or_else(|| payload_text(payload.as_ref()).to_owned());
            RResult::RErr(DriverError::new(ErrorKind::PANICKED, format!("driver panicked: {message}")))
        }
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// Installs the plugin-local panic hook (once per library). Called by the generated root module.
pub(crate) fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_GUARD.with(Cell::get) {
                let text = payload_text(info.payload()).replace('\n', " ");
                let text = match info.location() {
                    Some(l) => format!("{text} at {}:{}", l.file(), l.line()),
                    None => text,
                };
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
            } else {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_turns_panics_into_errors() {
        let r: RResult<(), DriverError> = guard(|| panic!("boom {}", 42));
        let e = r.into_result().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PANICKED);
        assert_eq!(e.message(), "driver panicked: boom 42");
        let ok: RResult<u8, DriverError> = guard(|| Ok(7));
        assert_eq!(ok.into_result(), Ok(7));
    }
}
