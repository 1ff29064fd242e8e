//! The machinery every service shares, whatever its kind: its backends (which one is the default, the
//! one message for an unknown one), values refreshed by periodic work, and [`Core`]: backends and
//! records with the health round, the reconcile prologue and the counts, so that a kind's service holds
//! only its policy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use plughost_api::host::Interface;

use super::records::{ReconcileCounts, Record, Records, Scope, Watch};
use crate::backend::{Backend, BackendControl, BackendSpec, BuildContext, Configured, Health};
use crate::control::protocol::{ApiError, ErrorKind};

/// How many entries a paged listing asks its driver for at once (a page of volumes is well under the
/// default `max_frame_bytes`).
pub(crate) const PAGE: u64 = 1000;

/// How long a service waits for its backends' first `init` before it serves without the slow ones.
pub const STARTUP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A service's backends as the host controls them (whatever their kind) and the default one.
pub struct BackendTable {
    /// The service.
    pub service: &'static str,
    /// In configuration order.
    pub controls: Vec<Arc<dyn BackendControl>>,
    /// The backend used when a request names none.
    pub default: String,
}

impl BackendTable {
    /// Where the backend named `name` (or the default one) is in configuration order: the one place
    /// an unknown backend is refused, naming the known ones.
    pub fn position(&self, name: Option<&str>) -> Result<usize, ApiError> {
        let wanted = name.unwrap_or(&self.default);
        self.controls.iter().position(|b| b.name() == wanted).ok_or_else(|| {
            let known: Vec<&str> = self.controls.iter().map(|b| b.name()).collect();
            ApiError::not_found(format!(
                "unknown {} backend {} (known: {})",
                self.service,
                crate::util::fmt::echo(wanted),
                known.join(", ")
            ))
        })
    }

    /// The backend named `name`, or the default one, as the host controls it.
    pub fn pick(&self, name: Option<&str>) -> Result<&Arc<dyn BackendControl>, ApiError> {
        Ok(&self.controls[self.position(name)?])
    }
}

/// The backends of one service and which one is the default.
pub(crate) struct Backends<I: Interface> {
    service: &'static str,
    list: Vec<Arc<Backend<I>>>,
    table: BackendTable,
}

impl<I: Interface> Backends<I> {
    /// Builds every backend of a service; every error found.
    pub(crate) fn build(
        service: &'static str,
        ctx: BuildContext<'_>,
        specs: &[BackendSpec],
        default: &str,
    ) -> Result<Backends<I>, Vec<String>> {
        let mut list = Vec::new();
        let mut errors = Vec::new();
        for b in specs {
            let configured =
                Configured { driver: b.driver.clone(), options: b.options.clone(), settings: b.settings.clone() };
            match Backend::<I>::build(ctx, service, &b.name, configured) {
                Ok(backend) => list.push(Arc::new(backend)),
                Err(e) => errors.push(e.report()),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Every backend's first init runs on its own; the service starts once they are done, or after
        // STARTUP_WAIT at most: a slow one is then `starting` while the others serve.
        for b in &list {
            b.start_init();
        }
        let deadline = std::time::Instant::now() + STARTUP_WAIT;
        while list.iter().any(|b| b.starting()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        for b in list.iter().filter(|b| b.starting()) {
            log::warn!("{service} backend {:?}: init still running after {STARTUP_WAIT:?}; serving without it", b.name);
        }
        Ok(Backends::assemble(service, list, default.to_owned()))
    }

    fn assemble(service: &'static str, list: Vec<Arc<Backend<I>>>, default: String) -> Backends<I> {
        let controls = list.iter().map(|b| b.clone() as Arc<dyn BackendControl>).collect();
        Backends { service, list, table: BackendTable { service, controls, default } }
    }

    /// Backends built elsewhere (tests, benchmarks); the first is the default.
    #[cfg(test)]
    pub(crate) fn from_list(service: &'static str, list: Vec<Backend<I>>) -> Backends<I> {
        let list: Vec<Arc<Backend<I>>> = list.into_iter().map(Arc::new).collect();
        let default = list.first().map(|b| b.name.clone()).unwrap_or_default();
        Backends::assemble(service, list, default)
    }

    /// The backend named `name`, or the default one (see [`BackendTable::position`]).
    pub(crate) fn pick(&self, name: Option<&str>) -> Result<&Arc<Backend<I>>, ApiError> {
        Ok(&self.list[self.table.position(name)?])
    }

    /// The backend holding an existing resource, or `unavailable` if its backend is not configured
    /// (any more).
    pub(crate) fn holding(&self, what: &str, name: &str, backend: &str) -> Result<&Arc<Backend<I>>, ApiError> {
        self.list.iter().find(|b| b.name == backend).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unavailable,
                format!("{what} {name:?}: {} backend {backend:?} is not configured", self.service),
            )
        })
    }

    /// Every backend, in configuration order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Backend<I>>> {
        self.list.iter()
    }

    /// Every backend as the host controls it, and the default one.
    pub(crate) fn table(&self) -> &BackendTable {
        &self.table
    }

    /// An existing record and the backend holding it; with `backend`, checks that it is that one.
    pub(crate) fn locate<R: Record>(
        &self,
        records: &Records<R>,
        name: &str,
        backend: Option<&str>,
    ) -> Result<(R, &Arc<Backend<I>>), ApiError> {
        check_name(R::WHAT, name)?;
        let r = records.existing(name)?;
        if let Some(b) = backend {
            self.pick(Some(b))?;
            if r.backend() != b {
                return Err(ApiError::not_found(format!(
                    "{} {name:?} not found on backend {b:?} (it is on {:?})",
                    R::WHAT,
                    r.backend()
                )));
            }
        }
        let b = self.holding(R::WHAT, name, r.backend())?;
        Ok((r, b))
    }
}

/// The latest value of something (the last reconcile's counts, ...).
#[derive(Debug, Default)]
pub(crate) struct Latest<T>(Mutex<Option<T>>);

impl<T: Clone> Latest<T> {
    pub(crate) fn set(&self, value: T) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }
    pub(crate) fn get(&self) -> Option<T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A value per backend refreshed by periodic work (capacity stats, ...).
#[derive(Debug, Default)]
pub(crate) struct PerBackend<T>(Mutex<BTreeMap<String, T>>);

impl<T: Clone> PerBackend<T> {
    pub(crate) fn set(&self, backend: &str, value: T) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(backend.to_owned(), value);
    }
    pub(crate) fn get(&self, backend: &str) -> Option<T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(backend).cloned()
    }
}

/// What every service has: its backends and records, the counts of its last reconcile, and which
/// driver object served each backend at the last health round.
pub(crate) struct Core<I: Interface, R: Record> {
    /// Its backends.
    pub backends: Backends<I>,
    /// Its records.
    pub records: Records<R>,
    /// The counts of the last reconcile.
    pub last_reconcile: Latest<ReconcileCounts>,
    incarnations: PerBackend<u64>,
    /// Listing entries refused and logged already (backend, why).
    refused_seen: Mutex<std::collections::HashSet<(String, String)>>,
}

impl<I: Interface, R: Record> Core<I, R> {
    /// The core of a service over its backends and records.
    pub(crate) fn new(backends: Backends<I>, records: Records<R>) -> Core<I, R> {
        let core = Core {
            backends,
            records,
            last_reconcile: Latest::default(),
            incarnations: PerBackend::default(),
            refused_seen: Mutex::default(),
        };
        for b in core.backends.iter() {
            core.incarnations.set(&b.name, b.incarnation());
        }
        core
    }

    /// One health round: every backend's health is checked, then `up` runs for each backend that is up,
    /// told whether its records need a reconcile (it came back from down — a root that was missing is
    /// there again — or another driver object serves it: a swap, a restarted worker, which may have
    /// left work half done).
    pub(crate) fn health_round(&self, mut up: impl FnMut(&Arc<Backend<I>>, bool)) {
        for b in self.backends.iter() {
            let was_up = b.health() == Health::Up;
            BackendControl::check_health(b.clone());
            let incarnation = b.incarnation();
            let replaced = self.incarnations.get(&b.name).is_some_and(|seen| seen != incarnation);
            self.incarnations.set(&b.name, incarnation);
            if b.health() == Health::Up {
                up(b, !was_up || replaced);
            }
        }
    }

    /// What a reconcile of backend `b` starts from: the driver's listing (`list`), taken while the
    /// backend is up, and with `concurrent` (requests may run meanwhile) a watch of the names written
    /// from before the listing on. A backend that is down or cannot list keeps its records as they are:
    /// `Err` with the counts saying so.
    pub(crate) fn listing<T>(
        &self,
        b: &Backend<I>,
        concurrent: bool,
        list: impl FnOnce() -> Result<Vec<T>, ApiError>,
    ) -> Result<(Vec<T>, Option<Watch<'_, R>>), ReconcileCounts> {
        let skipped =
            ReconcileCounts { skipped_backends: 1, at: crate::util::time::now(), ..ReconcileCounts::default() };
        if b.health() != Health::Up {
            log::warn!("{} backend {:?} is down: its records are kept as they are", b.service(), b.name);
            return Err(skipped);
        }
        // Before listing: what is written from now on is looked up again (the list may be stale).
        let watch = concurrent.then(|| self.records.watch());
        match list() {
            Ok(found) => Ok((found, watch)),
            Err(e) => {
                log::warn!("{} backend {:?}: cannot list {}s, records kept: {e}", b.service(), b.name, R::WHAT);
                Err(skipped)
            }
        }
    }

    /// Brings the records of backend `b` in line with what its driver reports: page by page when the
    /// driver lists in pages (`page(after, limit)`, the 1.2 extension), else its whole listing (`list`),
    /// each taken as in [`listing`](Self::listing); each name looked up again through `lookup` when the
    /// listing may be stale, `adopt` making the record of a resource found without one (up to the
    /// backend's `max_records`), `verdict` deciding about each record (see `Records::reconcile`).
    ///
    /// Paged, the records of one page's name range are reconciled with that page and written before the
    /// next page is asked for: with `concurrent`, requests are served between pages (and between names),
    /// and the host never holds more than one page of the listing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reconcile<T>(
        &self,
        b: &Backend<I>,
        concurrent: bool,
        mut page: impl FnMut(&str, u64) -> Result<Vec<T>, ApiError>,
        list: impl FnOnce() -> Result<Vec<T>, ApiError>,
        lookup: super::records::Lookup<'_, T>,
        mut adopt: impl FnMut(&T) -> R,
        mut verdict: impl FnMut(R, Option<&T>) -> super::records::Verdict<R>,
    ) -> ReconcileCounts {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let started = std::time::Instant::now();
        let max_records = b.configured().settings.max_records;
        // Counted once (a count per page would scan every record once a page); what each page adopts
        // is taken off as it goes.
        let held = self.records.count_on(&b.name);
        let mut adoptable = max_records.saturating_sub(held);
        let mut first = None;
        let whole = self.listing(b, concurrent, || match page("", PAGE) {
            Err(e) if e.kind == ErrorKind::Unsupported => list(),
            Ok(p) => {
                first = Some(p);
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        });
        let (found, watch) = match whole {
            Ok(listed) => listed,
            Err(skipped) => return skipped,
        };
        let Some(mut current) = first else {
            log::info!(
                "{} backend {:?}: reconciling {} reported {}s with the records",
                b.service(),
                b.name,
                found.len(),
                R::WHAT
            );
            return self.reconcile_found(
                b,
                found,
                Scope::all(adoptable),
                lookup,
                watch.as_ref(),
                &mut adopt,
                &mut verdict,
            );
        };
        let mut total = ReconcileCounts { at: crate::util::time::now(), ..ReconcileCounts::default() };
        let mut watch = watch;
        let mut after = String::new();
        let mut pages = 0u64;
        // No listing is walked further than it could matter: past every record and max_records more,
        // all it could add is refused (a driver that pages forever stops here).
        let walk = max_records.saturating_add(held).saturating_add(PAGE);
        let stop = |total: &mut ReconcileCounts, pages: u64, why: String| {
            log::warn!(
                "{} backend {:?}: {why}; the records past the first {} names are kept as they are",
                b.service(),
                b.name,
                pages * PAGE
            );
            total.skipped_backends = 1;
        };
        loop {
            // A page is taken as user input is: at most the limit, in name order, after the last one.
            let names: Vec<&str> = current.iter().map(|t| (lookup.name_of)(t)).collect();
            if current.len() as u64 > PAGE {
                stop(&mut total, pages, format!("it answered {} {}s to a page of {PAGE}", current.len(), R::WHAT));
                break;
            }
            if !names.windows(2).all(|w| w[0] < w[1]) || names.first().is_some_and(|f| *f <= after.as_str()) {
                stop(
                    &mut total,
                    pages,
                    format!("its page after {} is not in name order", crate::util::fmt::echo(&after)),
                );
                break;
            }
            let end = (current.len() as u64) < PAGE;
            let last = names.last().map(|n| (*n).to_owned()).unwrap_or_default();
            let lower = if pages == 0 { Unbounded } else { Excluded(after.as_str()) };
            let upper = if end { Unbounded } else { Included(last.as_str()) };
            let scope = Scope { names: (lower, upper), adoptable };
            let counts = self.reconcile_found(b, current, scope, lookup, watch.as_ref(), &mut adopt, &mut verdict);
            adoptable = adoptable.saturating_sub(counts.adopted);
            total.add(&counts);
            pages += 1;
            if end {
                break;
            }
            after = last;
            if pages.saturating_mul(PAGE) > walk {
                stop(
                    &mut total,
                    pages,
                    format!("it listed more than {walk} {}s (max_records and every record)", R::WHAT),
                );
                break;
            }
            if pages.is_multiple_of(100) {
                log::info!("{} backend {:?}: reconciled {} pages of {PAGE} {}s", b.service(), b.name, pages, R::WHAT);
            }
            // Between pages nothing is held: requests run. A backend that went down stops the walk.
            if b.health() != Health::Up {
                stop(&mut total, pages, "it went down".to_owned());
                break;
            }
            watch = concurrent.then(|| self.records.watch());
            match page(&after, PAGE) {
                Ok(p) => current = p,
                Err(e) => {
                    stop(
                        &mut total,
                        pages,
                        format!("cannot list {}s after {}: {e}", R::WHAT, crate::util::fmt::echo(&after)),
                    );
                    break;
                }
            }
        }
        log::info!(
            "{} backend {:?}: reconciled {pages} page(s) of reported {}s with the records",
            b.service(),
            b.name,
            R::WHAT
        );
        total.duration_ms = started.elapsed().as_millis() as u64;
        total
    }

    /// Reconciles what a listing (or one page of it) reports with the records of `scope`: entries a user
    /// could not have given are refused (logged once, counted), the rest go to `Records::reconcile`.
    #[allow(clippy::too_many_arguments)]
    fn reconcile_found<T>(
        &self,
        b: &Backend<I>,
        found: Vec<T>,
        scope: Scope<'_>,
        lookup: super::records::Lookup<'_, T>,
        watch: Option<&Watch<'_, R>>,
        adopt: &mut impl FnMut(&T) -> R,
        verdict: &mut impl FnMut(R, Option<&T>) -> super::records::Verdict<R>,
    ) -> ReconcileCounts {
        // What a driver reports is taken as user input is: a name that is not a name, or a size the
        // records cannot hold, is refused (logged once, counted), never recorded nor echoed raw.
        let refuse = |t: &T| -> Option<String> {
            let name = (lookup.name_of)(t);
            check_name(R::WHAT, name).err().map(|e| e.message).or_else(|| (lookup.check)(t).err())
        };
        let total = found.len();
        let found: Vec<T> = found.into_iter().filter(|t| refuse(t).is_none_or(|why| !self.refused(b, why))).collect();
        let refused = (total - found.len()) as u64;
        let recheck = |name: &str| (lookup.recheck)(name).filter(|t| refuse(t).is_none());
        let lookup = super::records::Lookup { name_of: lookup.name_of, recheck: &recheck, check: lookup.check };
        let mut counts = self.records.reconcile(&b.name, found, scope, lookup, watch, adopt, verdict);
        counts.refused += refused;
        counts
    }

    /// Logs a refused listing entry the first time (per backend and reason; a driver that keeps
    /// reporting it does not flood the log). Always `true`: the entry is refused.
    fn refused(&self, b: &Backend<I>, why: String) -> bool {
        let mut seen = self.refused_seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < 10_000 && seen.insert((b.name.clone(), why.clone())) {
            log::warn!("{} backend {:?}: a reported {} was refused: {why}", b.service(), b.name, R::WHAT);
        }
        true
    }

    /// How many refused listing entries were logged (for tests).
    #[cfg(test)]
    pub(crate) fn refused_seen_len(&self) -> usize {
        self.refused_seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Reconciles the records of every backend (or only the one named `only`) with `one` and keeps the
    /// total as the last reconcile's counts.
    pub(crate) fn reconcile_all(&self, only: Option<&str>, mut one: impl FnMut(&Arc<Backend<I>>) -> ReconcileCounts) {
        let started = std::time::Instant::now();
        let mut total = ReconcileCounts { at: crate::util::time::now(), ..ReconcileCounts::default() };
        for b in self.backends.iter().filter(|b| only.is_none_or(|o| o == b.name)) {
            total.add(&one(b));
        }
        total.duration_ms = started.elapsed().as_millis() as u64;
        log::info!("{} records reconciled: {total:?}", R::WHAT);
        self.last_reconcile.set(total);
    }
}

/// Resource names follow [`plughost_api::check_name`], the rule drivers use too.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    plughost_api::check_name(what, name).map_err(ApiError::from)
}
