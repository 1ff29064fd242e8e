//! What changes a running host's drivers: `swap`, `restart` and `reload` (the trust policy first, never
//! relaxed; then each backend whose driver or options changed).

use std::sync::Arc;

use super::host::Host;
use crate::control::protocol::{ApiError, ErrorKind, Outcome, ReloadEntry, SwapArgs, SwapReport};

impl Host {
    /// `restart`: a fresh worker for an isolated backend (closing its circuit), or the configured driver
    /// loaded again for an in-process one.
    pub fn restart(
        &self,
        service: &str,
        args: &crate::control::protocol::RestartArgs,
    ) -> Result<crate::control::protocol::RestartReport, ApiError> {
        let backend = self.backend(service, args.backend.as_deref())?;
        backend.restart(self.build_context(), self.settings.shutdown_timeout)
    }

    /// A service's backend by name (default: its default backend), or `not_found` naming the known ones.
    fn backend(&self, service: &str, name: Option<&str>) -> Result<&Arc<dyn crate::backend::BackendControl>, ApiError> {
        self.service(service)?.table().pick(name)
    }

    /// `swap`: replaces a backend's driver (default: the service's default backend) with `args.driver`
    /// (PATH or NAME; default: the configured one, reloaded from disk).
    pub fn swap(&self, service: &str, args: &SwapArgs) -> Result<SwapReport, ApiError> {
        let backend = self.backend(service, args.backend.as_deref())?;
        let driver = args.driver.as_deref().filter(|d| !d.is_empty());
        if let Some(d) = driver.filter(|d| crate::loading::drivers::is_path(d)) {
            self.check_swap_path(d)?;
        }
        backend.swap(self.build_context(), driver, None, None, self.settings.shutdown_timeout)
    }

    /// A swap to a PATH (rather than a NAME looked up in the driver directories) must stay inside the
    /// driver directories unless `trust.allow_swap_paths` says otherwise: whoever can write the socket
    /// should not be able to point the host at any file on the machine.
    fn check_swap_path(&self, given: &str) -> Result<(), ApiError> {
        if self.trust.lock().unwrap_or_else(|p| p.into_inner()).allow_swap_paths {
            return Ok(());
        }
        let path = std::fs::canonicalize(given)
            .map_err(|e| ApiError::not_found(format!("swap to {given:?}: {}", crate::util::fmt::io_text(&e))))?;
        let inside =
            self.settings.driver_dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| path.starts_with(d));
        if inside {
            return Ok(());
        }
        let dirs: Vec<String> = self.settings.driver_dirs.iter().map(|d| d.display().to_string()).collect();
        Err(ApiError::new(
            ErrorKind::PermissionDenied,
            format!(
                "swap to {given:?}: outside the driver directories ({}); put it in one (--driver-dir, driver_dirs), or allow any path with --allow-swap-paths (trust.allow_swap_paths = true)",
                dirs.join(", ")
            ),
        ))
    }

    /// Re-reads the configuration (the file and the flags given at start) and swaps each backend whose
    /// driver or options changed. An invalid configuration changes nothing. Adding or removing
    /// services or backends needs a restart and is reported as `ignored`.
    pub fn reload(&self) -> Result<Vec<ReloadEntry>, ApiError> {
        super::notify::reloading();
        let r = self.reload_now();
        super::notify::reloaded(&self.status_line());
        r
    }

    fn reload_now(&self) -> Result<Vec<ReloadEntry>, ApiError> {
        let wanted = self.source.load().map_err(|errs| {
            let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
            log::error!("reload: configuration rejected, nothing changed: {}", text.join("; "));
            ApiError::new(
                ErrorKind::InvalidConfig,
                format!("configuration rejected, nothing changed: {}", text.join("; ")),
            )
        })?;
        // The trust policy and the allow list first: the swaps below load under the new ones. A reload
        // never relaxes them: the config is a trust root, and relaxing takes a restart.
        let relaxed = self.trust.lock().unwrap_or_else(|p| p.into_inner()).relaxed_by(&wanted.trust);
        if !relaxed.is_empty() {
            let text = format!(
                "configuration rejected, nothing changed: a reload cannot relax the trust policy ({}); restart the host to relax it",
                relaxed.join(", ")
            );
            log::error!("reload: {text}");
            return Err(ApiError::new(ErrorKind::InvalidConfig, text));
        }
        let allowlist = match &wanted.trust.allowlist {
            Some(p) => Some(crate::loading::loader::Allowlist::read(p).map_err(|e| {
                log::error!("reload: configuration rejected, nothing changed: {e}");
                ApiError::new(ErrorKind::InvalidConfig, format!("configuration rejected, nothing changed: {e}"))
            })?),
            None => None,
        };
        self.loader.set_trust(wanted.trust.strict, allowlist);
        *self.trust.lock().unwrap_or_else(|p| p.into_inner()) = wanted.trust.clone();
        let entry = |service: &str, backend: Option<&str>, outcome| ReloadEntry {
            service: Some(service.to_owned()),
            backend: backend.map(str::to_owned),
            outcome,
            error: None,
            reason: None,
            swap: None,
        };
        let mut report = Vec::new();
        for s in &self.services {
            let name = s.kind().name;
            let Some(spec) = wanted.services.iter().find(|w| w.kind.name == name) else {
                report.push(ReloadEntry {
                    reason: Some("disabling a service needs a restart".into()),
                    ..entry(name, None, Outcome::Ignored)
                });
                continue;
            };
            for b in s.backends() {
                let Some(w) = spec.backends.iter().find(|w| w.name == b.name()) else {
                    report.push(ReloadEntry {
                        reason: Some("removing a backend needs a restart".into()),
                        ..entry(name, Some(b.name()), Outcome::Ignored)
                    });
                    continue;
                };
                let current = b.configured();
                // A changed pin is checked against the file, as a swap would: not taken on trust.
                let same_pin = current.settings.digest == w.settings.digest;
                if current.driver == w.driver && current.options == w.options && same_pin {
                    let outcome = if current.settings == w.settings {
                        Outcome::Unchanged
                    } else {
                        b.set_settings(w.settings.clone());
                        Outcome::Updated
                    };
                    report.push(entry(name, Some(b.name()), outcome));
                    continue;
                }
                match b.swap(
                    self.build_context(),
                    Some(&w.driver),
                    Some(w.options.clone()),
                    Some(w.settings.clone()),
                    self.settings.shutdown_timeout,
                ) {
                    Ok(r) => {
                        report.push(ReloadEntry { swap: Some(r), ..entry(name, Some(b.name()), Outcome::Swapped) })
                    }
                    Err(e) => {
                        log::error!("reload: {name} backend {:?}: {}", b.name(), e.message);
                        report.push(ReloadEntry {
                            error: Some(e.message),
                            ..entry(name, Some(b.name()), Outcome::Failed)
                        });
                    }
                }
            }
            for w in &spec.backends {
                if !s.backends().iter().any(|b| b.name() == w.name) {
                    report.push(ReloadEntry {
                        reason: Some("adding a backend needs a restart".into()),
                        ..entry(name, Some(&w.name), Outcome::Ignored)
                    });
                }
            }
        }
        for w in &wanted.services {
            if !self.services.iter().any(|s| s.kind().name == w.kind.name) {
                report.push(ReloadEntry {
                    reason: Some("enabling a service needs a restart".into()),
                    ..entry(w.kind.name, None, Outcome::Ignored)
                });
            }
        }
        for r in &report {
            log::info!("reload: {:?}", r);
        }
        Ok(report)
    }
}
