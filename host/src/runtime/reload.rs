//! What changes a running host's drivers: `swap`, `restart` and `reload` (the trust policy first, never
//! relaxed; then each backend whose driver or options changed).

use std::sync::Arc;

use super::host::Host;
use crate::control::protocol::{ApiError, DriverRef, ErrorKind, Outcome, ReloadEntry, SwapArgs, SwapCheck, SwapReport};

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
    /// (PATH or NAME; default: the configured one, reloaded from disk; with only `args.digest`, the
    /// driver with that content the backend ran before). `args.digest` must match the new content.
    pub fn swap(&self, service: &str, args: &SwapArgs) -> Result<SwapReport, ApiError> {
        let backend = self.backend(service, args.backend.as_deref())?;
        let (driver, expect) = self.swap_target(backend.as_ref(), args)?;
        if let Some(r) = &args.rollout {
            log::info!("{service} backend {:?}: swap for rollout {r}", backend.name());
        }
        backend.swap(self.build_context(), driver.as_deref(), None, None, expect, self.settings.shutdown_timeout)
    }

    /// `swap` with `dry_run`: every check a swap runs before loading, and what it would load.
    pub fn swap_check(&self, service: &str, args: &SwapArgs) -> Result<SwapCheck, ApiError> {
        let backend = self.backend(service, args.backend.as_deref())?;
        let (driver, expect) = self.swap_target(backend.as_ref(), args)?;
        let configured = backend.configured();
        let driver = driver.unwrap_or(configured.driver);
        let pin = match (expect, configured.settings.digest.as_deref()) {
            (Some(e), Some(p)) if !p.eq_ignore_ascii_case(e) => {
                return Err(ApiError::new(
                    ErrorKind::UntrustedDriver,
                    format!(
                        "{service} backend {:?}: pinned to {p} by its configuration; a swap to {e} is refused (change the pin and reload)",
                        backend.name()
                    ),
                ))
            }
            (Some(e), _) => Some(e),
            (None, p) => p,
        };
        let path = crate::loading::drivers::resolve(&driver, &self.settings.driver_dirs)
            .map_err(|why| ApiError::not_found(format!("{service} backend {:?}: {why}", backend.name())))?;
        let digest = self.loader.verify(&path, pin).map_err(|e| {
            let kind = if e.kind.is_trust() { ErrorKind::UntrustedDriver } else { ErrorKind::SwapFailed };
            ApiError::new(kind, format!("{service} backend {:?}: {e}", backend.name()))
        })?;
        let status = backend.status(false, None);
        Ok(SwapCheck {
            backend: backend.name().to_owned(),
            dry_run: true,
            current: DriverRef {
                name: status.driver.name,
                version: status.driver.version,
                digest: status.driver.digest,
                path: Some(status.driver.path),
                draining: false,
            },
            driver,
            path: path.display().to_string(),
            digest,
        })
    }

    /// What a swap loads: the driver named (a PATH inside the driver directories unless allowed), or
    /// with only a digest the driver of that content the backend ran before; and the digest to expect.
    fn swap_target<'a>(
        &self,
        backend: &dyn crate::backend::BackendControl,
        args: &'a SwapArgs,
    ) -> Result<(Option<String>, Option<&'a str>), ApiError> {
        let expect = match args.digest.as_deref() {
            Some(d) if crate::loading::loader::is_digest(d) => Some(d),
            Some(d) => {
                return Err(ApiError::invalid(format!(
                    "swap digest {d:?}: not a digest (blake3: and 64 hex digits, as `plughost inspect` prints)"
                )))
            }
            None => None,
        };
        if let Some(r) = &args.rollout {
            if r.is_empty() || r.len() > 64 || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(ApiError::invalid(format!(
                    "swap rollout {r:?}: not a rollout id (1 to 64 letters, digits, '-' or '_')"
                )));
            }
        }
        let driver = args.driver.as_deref().filter(|d| !d.is_empty());
        if let Some(d) = driver.filter(|d| crate::loading::drivers::is_path(d)) {
            self.check_swap_path(d)?;
        }
        let driver = match (driver, expect) {
            (Some(d), _) => Some(d.to_owned()),
            // Back to an earlier driver: the backend's own history (a PATH there was loaded before, under
            // the rules of its time); failing that, the configured driver, whose content the pin checks.
            (None, Some(digest)) => backend.previous(digest),
            (None, None) => None,
        };
        Ok((driver, expect))
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
                    None,
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
