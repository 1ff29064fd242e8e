//! The conformance suite (feature `testing`): the contract every driver of a kind must meet, written
//! once and run two ways: in a driver's own `cargo test`, on its Rust type, through the same stable-ABI
//! glue a host uses; and by `plughost check LIB.so`, through the real loader, on the built library.
//!
//! ```
//! # use std::collections::BTreeMap;
//! # use std::sync::Mutex;
//! # use plughost_api::{CapacityStats, DriverError, Options, Volume, VolumeDriver};
//! # #[derive(Default)] struct Mine(Mutex<BTreeMap<String, u64>>);
//! # fn v(n: &str, s: u64) -> Volume { Volume { name: n.into(), size: s, ..Volume::default() } }
//! # fn nf(n: &str) -> DriverError { DriverError::not_found(format!("volume {n:?} not found")) }
//! # impl VolumeDriver for Mine {
//! #     fn create(&self, n: &str, s: u64) -> Result<Volume, DriverError> {
//! #         let mut m = self.0.lock().unwrap();
//! #         if m.contains_key(n) { return Err(DriverError::already_exists(format!("volume {n:?} exists"))); }
//! #         m.insert(n.into(), s); Ok(v(n, s))
//! #     }
//! #     fn delete(&self, n: &str) -> Result<(), DriverError> { self.0.lock().unwrap().remove(n).map(drop).ok_or_else(|| nf(n)) }
//! #     fn extend(&self, n: &str, s: u64) -> Result<Volume, DriverError> {
//! #         let mut m = self.0.lock().unwrap();
//! #         let cur = m.get_mut(n).ok_or_else(|| nf(n))?;
//! #         if s < *cur { return Err(DriverError::invalid_argument(format!("volume {n:?}: cannot shrink"))); }
//! #         *cur = s; Ok(v(n, s))
//! #     }
//! #     fn snapshot(&self, n: &str, s: &str) -> Result<Volume, DriverError> {
//! #         let size = self.get(n)?.size;
//! #         self.create(s, size).map(|x| Volume { source: Some(n.into()), ..x })
//! #     }
//! #     fn list(&self) -> Result<Vec<Volume>, DriverError> { Ok(self.0.lock().unwrap().iter().map(|(n, s)| v(n, *s)).collect()) }
//! #     fn get(&self, n: &str) -> Result<Volume, DriverError> { self.0.lock().unwrap().get(n).map(|s| v(n, *s)).ok_or_else(|| nf(n)) }
//! #     fn stats(&self) -> Result<CapacityStats, DriverError> {
//! #         let m = self.0.lock().unwrap();
//! #         Ok(CapacityStats { volumes: m.len() as u64, provisioned_bytes: m.values().sum(), ..Default::default() })
//! #     }
//! # }
//! // In the driver crate's tests:
//! let report = plughost_api::testing::check_volume(&|| Ok(Box::new(plughost_api::VolumeClient::in_process(Mine::default()))));
//! report.assert_passed();
//! ```
//!
//! Each check runs on a fresh driver from `make` (initialised first, cleaned up last) and uses names of
//! its own (`conformance-...`), which it removes again, so that drivers whose state outlives an instance
//! (files on disk) are checked too. A check fails on a wrong outcome, on any panic (kind `panicked`), and
//! on an error whose message is empty or longer than one line.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::{
    ComputeDriver, DriverError, ErrorKind, InstanceSpec, InstanceState, NetworkDriver, NetworkSpec, OptionSpec,
    Options, PortSpec, VolumeDriver,
};

/// What a host gives a driver, for the driver's own tests: a private state directory (removed when this
/// is dropped), a backend name, and [`options`](Self::options), which expands and validates options
/// exactly as `plughost run` and `plughost check` do, so that `cargo test` fails where they would.
///
/// ```
/// use plughost_api::testing::TestHost;
/// use plughost_api::OptionSpec;
/// const OPTIONS: &[OptionSpec] = &[
///     OptionSpec::path("root", "where volumes live").default("${state_dir}/volumes/${backend}"),
///     OptionSpec::string("token", "API token").required(),
/// ];
/// let host = TestHost::new();
/// let options = host.options(OPTIONS, &[("token", "t0")]).unwrap();
/// assert_eq!(options.path("root").unwrap(), host.state_dir().join("volumes/default"));
/// let missing = host.options(OPTIONS, &[]).unwrap_err();
/// assert_eq!(missing.message(), "option \"token\": required option missing");
/// ```
#[derive(Debug)]
pub struct TestHost {
    state_dir: PathBuf,
    backend: String,
}

impl TestHost {
    /// A fresh state directory (mode 0700, under the temp dir, a name nobody can guess in advance) and
    /// the backend name `default`, as a host's first backend has.
    ///
    /// # Panics
    /// If no directory can be created in the temp dir: there is nothing to test with.
    pub fn new() -> TestHost {
        TestHost::with_backend("default")
    }

    /// The same with another backend name (what `${backend}` expands to).
    ///
    /// # Panics
    /// As [`new`](Self::new).
    pub fn with_backend(backend: &str) -> TestHost {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..100 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let name = format!("plughost-test-{}-{seq}-{nanos:x}", std::process::id());
            let dir = base.join(name);
            // Not recursive: an existing path (someone else's) is never used; try another name.
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return TestHost { state_dir: dir, backend: backend.to_owned() },
                Err(e) => last = Some(e),
            }
        }
        panic!("cannot create a test state directory in \"{}\": {last:?}", base.display())
    }

    /// The state directory (what `${state_dir}` expands to).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The backend name (what `${backend}` expands to).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The options a host would give the driver for `given` (`KEY`, `VALUE` as a user writes them):
    /// placeholders expanded in values and defaults, unknown keys, bad values and missing required
    /// options refused with the host's messages (`option "root": required option missing`), joined by
    /// `; ` in one `invalid_argument` error.
    pub fn options(&self, schema: &'static [OptionSpec], given: &[(&str, &str)]) -> Result<Options, DriverError> {
        let given: Vec<(String, String)> = given.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        match crate::options::prepare(schema, &given, &self.state_dir, &self.backend) {
            Ok(o) => Ok(o.with_schema(schema)),
            Err(errors) => {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                Err(DriverError::invalid_argument(text.join("; ")))
            }
        }
    }
}

impl Default for TestHost {
    fn default() -> TestHost {
        TestHost::new()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The outcome of one named check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's name (stable: tools and tests refer to it).
    pub name: &'static str,
    /// Whether the driver met it.
    pub passed: bool,
    /// Why it failed, or a note (an optional method the driver does not provide).
    pub detail: String,
}

/// The outcome of a whole suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The driver kind checked.
    pub kind: &'static str,
    /// One result per check, in suite order.
    pub results: Vec<CheckResult>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed)
    }

    /// The names of the checks that failed.
    pub fn failed(&self) -> Vec<&'static str> {
        self.results.iter().filter(|r| !r.passed).map(|r| r.name).collect()
    }

    /// A table: one line per check.
    pub fn table(&self) -> String {
        let width = self.results.iter().map(|r| r.name.len()).max().unwrap_or(0);
        self.results
            .iter()
            .map(|r| {
                let mark = if r.passed { "pass" } else { "FAIL" };
                let detail = if r.detail.is_empty() { String::new() } else { format!("  {}", r.detail) };
                format!("{}\n", format!("{mark}  {:width$}{detail}", r.name).trim_end())
            })
            .collect()
    }

    /// Panics, listing every failed check, unless all passed (for `cargo test`).
    #[track_caller]
    pub fn assert_passed(&self) {
        assert!(
            self.passed(),
            "{} driver conformance: {} failed\n{}",
            self.kind,
            self.failed().join(", "),
            self.table()
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table())
    }
}

/// Why a check failed.
type Fail = String;

/// What a check expects of a call's error: its kind, a one-line non-empty message, and never a panic.
fn expect_err<T: fmt::Debug>(what: &str, r: Result<T, DriverError>, kind: ErrorKind) -> Result<(), Fail> {
    match r {
        Ok(v) => Err(format!("{what}: expected {kind}, got Ok({v:?})")),
        Err(e) => {
            well_formed(what, &e)?;
            if e.kind() == kind {
                Ok(())
            } else {
                Err(format!("{what}: expected {kind}, got {}: {}", e.kind(), e.message()))
            }
        }
    }
}

/// What a check expects of a call that must succeed.
fn expect_ok<T>(what: &str, r: Result<T, DriverError>) -> Result<T, Fail> {
    r.map_err(|e| match well_formed(what, &e) {
        Err(f) => f,
        Ok(()) => format!("{what}: {}: {}", e.kind(), e.message()),
    })
}

fn well_formed(what: &str, e: &DriverError) -> Result<(), Fail> {
    if e.kind() == ErrorKind::PANICKED {
        return Err(format!("{what}: the driver panicked: {}", e.message()));
    }
    if e.message().trim().is_empty() {
        return Err(format!("{what}: error {} with an empty message", e.kind()));
    }
    if e.message().contains('\n') {
        return Err(format!("{what}: error message is not one line: {:?}", e.message()));
    }
    Ok(())
}

fn check(cond: bool, message: impl FnOnce() -> String) -> Result<(), Fail> {
    if cond {
        Ok(())
    } else {
        Err(message())
    }
}

/// Runs `body` on a fresh driver from `make`, initialised first and cleaned up last.
fn with_driver<D: ?Sized>(
    make: &dyn Fn() -> Result<Box<D>, DriverError>,
    init: fn(&D) -> Result<(), DriverError>,
    cleanup: fn(&D) -> Result<(), DriverError>,
    body: impl FnOnce(&D) -> Result<String, Fail>,
) -> Result<String, Fail> {
    let d = expect_ok("constructing the driver", make())?;
    expect_ok("init", init(&d))?;
    let outcome = body(&d);
    let cleaned = expect_ok("cleanup", cleanup(&d));
    let note = outcome?;
    cleaned.map(|()| note)
}

/// Where a suite is, as it runs (see [`check_volume_with_progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// The named check is about to run (on a freshly constructed driver).
    Started(&'static str),
    /// A check ran, with this outcome.
    Finished(&'a CheckResult),
}

/// Runs each named check through `body`, telling `progress` before and after.
fn run_checks<C>(
    kind: &'static str,
    checks: &[(&'static str, C)],
    progress: &mut dyn FnMut(Progress<'_>),
    body: impl Fn(&C) -> Result<String, Fail>,
) -> Report {
    let mut results = Vec::with_capacity(checks.len());
    for (name, check) in checks {
        progress(Progress::Started(name));
        let result = match body(check) {
            Ok(note) => CheckResult { name, passed: true, detail: note },
            Err(why) => CheckResult { name, passed: false, detail: why },
        };
        progress(Progress::Finished(&result));
        results.push(result);
    }
    Report { kind, results }
}

const MIB: u64 = 1 << 20;

/// 8 threads each make 10 (volume) or 4 (compute) resources and remove every other one; the names kept,
/// or the first failure.
fn churn(
    per_thread: usize,
    make: &(dyn Fn(&str) -> Result<(), Fail> + Sync),
    remove: &(dyn Fn(&str) -> Result<(), Fail> + Sync),
) -> Result<Vec<String>, Fail> {
    let kept = std::sync::Mutex::new(Vec::new());
    let failure = std::sync::Mutex::new(None::<Fail>);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (kept, failure) = (&kept, &failure);
            s.spawn(move || {
                for (i, n) in names(&format!("conc{t}"), per_thread).into_iter().enumerate() {
                    let step = make(&n).and_then(|()| if i % 2 == 0 { remove(&n) } else { Ok(()) });
                    match step {
                        Ok(()) if i % 2 == 1 => kept.lock().unwrap_or_else(|p| p.into_inner()).push(n),
                        Ok(()) => {}
                        Err(e) => {
                            failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(kept.into_inner().unwrap_or_else(|p| p.into_inner())),
    }
}

/// Checks that the listed names starting with `prefix` are exactly `expected`.
fn listed_exactly(listed: Vec<String>, prefix: &str, mut expected: Vec<String>) -> Result<(), Fail> {
    let mut ours: Vec<String> = listed.into_iter().filter(|n| n.starts_with(prefix)).collect();
    ours.sort();
    expected.sort();
    check(ours == expected, || format!("list shows {ours:?}, expected {expected:?}"))
}

/// Makes three resources, lists, removes them; the list showed exactly them.
fn list_round_trip(
    make: &dyn Fn(&str) -> Result<(), Fail>,
    list: &dyn Fn() -> Result<Vec<String>, Fail>,
    remove: &dyn Fn(&str) -> Result<(), Fail>,
) -> Result<String, Fail> {
    let made = names("list", 3);
    for n in &made {
        make(n)?;
    }
    let listed = list();
    for n in &made {
        remove(n)?;
    }
    listed_exactly(listed?, "conformance-list-", made)?;
    Ok(String::new())
}

/// Churns, lists, removes what was kept; the list showed exactly what was kept.
fn churn_round_trip(
    per_thread: usize,
    make: &(dyn Fn(&str) -> Result<(), Fail> + Sync),
    list: &dyn Fn() -> Result<Vec<String>, Fail>,
    remove: &(dyn Fn(&str) -> Result<(), Fail> + Sync),
) -> Result<String, Fail> {
    let kept = churn(per_thread, make, remove)?;
    let listed = list();
    for n in &kept {
        let _ = remove(n);
    }
    listed_exactly(listed?, "conformance-conc", kept)?;
    Ok(String::new())
}

/// Names of one check's own, removed again at the end.
fn names(check: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("conformance-{check}-{i}")).collect()
}

// ---------------------------------------------------------------------------------------------------
// Volume

type VolumeCheck = fn(&dyn VolumeDriver) -> Result<String, Fail>;

/// The volume checks, in order.
pub const VOLUME_CHECKS: &[&str] = &[
    "lifecycle",
    "create_then_get",
    "create_existing_is_already_exists",
    "missing_is_not_found",
    "extend_grows",
    "shrink_is_invalid_argument",
    "snapshot_records_its_source",
    "snapshot_onto_existing_is_already_exists",
    "delete_removes",
    "list_matches_creates",
    "stats_match_list",
    "concurrent_create_delete",
    "write_read_round_trip",
    "revert_to_snapshot",
    "list_after_pages_the_listing",
];

fn volume_checks() -> Vec<(&'static str, VolumeCheck)> {
    let bodies: [VolumeCheck; 15] = [
        |d| {
            expect_ok("health", d.health())?;
            Ok(String::new())
        },
        |d| {
            let [a] = names_n("get");
            let made = expect_ok("create", d.create(&a, MIB))?;
            check(made.name == a && made.size == MIB, || format!("create returned {made:?}"))?;
            let got = expect_ok("get", d.get(&a))?;
            check(got.name == a && got.size == MIB, || format!("get returned {got:?}"))?;
            expect_ok("delete", d.delete(&a))?;
            Ok(String::new())
        },
        |d| {
            let [a] = names_n("dup");
            expect_ok("create", d.create(&a, MIB))?;
            let dup = expect_err("create of an existing volume", d.create(&a, MIB), ErrorKind::ALREADY_EXISTS);
            expect_ok("delete", d.delete(&a))?;
            dup.map(|()| String::new())
        },
        |d| {
            let [a, b] = names_n("missing");
            expect_err("get of a missing volume", d.get(&a), ErrorKind::NOT_FOUND)?;
            expect_err("delete of a missing volume", d.delete(&a), ErrorKind::NOT_FOUND)?;
            expect_err("extend of a missing volume", d.extend(&a, MIB), ErrorKind::NOT_FOUND)?;
            expect_err("snapshot of a missing volume", d.snapshot(&a, &b), ErrorKind::NOT_FOUND)?;
            Ok(String::new())
        },
        |d| {
            let [a] = names_n("extend");
            expect_ok("create", d.create(&a, MIB))?;
            let grown = expect_ok("extend", d.extend(&a, 2 * MIB));
            let got = d.get(&a);
            expect_ok("delete", d.delete(&a))?;
            let grown = grown?;
            check(grown.size == 2 * MIB, || format!("extend returned {grown:?}"))?;
            let got = expect_ok("get", got)?;
            check(got.size == 2 * MIB, || format!("get after extend returned {got:?}"))?;
            Ok(String::new())
        },
        |d| {
            let [a] = names_n("shrink");
            expect_ok("create", d.create(&a, 2 * MIB))?;
            let shrink = expect_err("extend to a smaller size", d.extend(&a, MIB), ErrorKind::INVALID_ARGUMENT);
            expect_ok("delete", d.delete(&a))?;
            shrink.map(|()| String::new())
        },
        |d| {
            let [a, s] = names_n("snap");
            expect_ok("create", d.create(&a, MIB))?;
            let snap = expect_ok("snapshot", d.snapshot(&a, &s));
            let _ = d.delete(&s);
            expect_ok("delete", d.delete(&a))?;
            let snap = snap?;
            check(snap.name == s && snap.source.as_deref() == Some(a.as_str()) && snap.size == MIB, || {
                format!("snapshot returned {snap:?}")
            })?;
            Ok(String::new())
        },
        |d| {
            let [a, b] = names_n("snapdup");
            expect_ok("create", d.create(&a, MIB))?;
            expect_ok("create", d.create(&b, MIB))?;
            let dup = expect_err("snapshot onto an existing name", d.snapshot(&a, &b), ErrorKind::ALREADY_EXISTS);
            expect_ok("delete", d.delete(&a))?;
            expect_ok("delete", d.delete(&b))?;
            dup.map(|()| String::new())
        },
        |d| {
            let [a] = names_n("delete");
            expect_ok("create", d.create(&a, MIB))?;
            expect_ok("delete", d.delete(&a))?;
            expect_err("get after delete", d.get(&a), ErrorKind::NOT_FOUND)?;
            let listed = expect_ok("list", d.list())?;
            check(!listed.iter().any(|v| v.name == a), || format!("{a} is still listed after delete"))?;
            Ok(String::new())
        },
        |d| {
            list_round_trip(
                &|n| expect_ok("create", d.create(n, MIB)).map(drop),
                &|| expect_ok("list", d.list()).map(|l| l.into_iter().map(|v| v.name).collect()),
                &|n| expect_ok("delete", d.delete(n)),
            )
        },
        |d| {
            let made = names("stats", 2);
            for n in &made {
                expect_ok("create", d.create(n, MIB))?;
            }
            let (stats, listed) = (d.stats(), d.list());
            for n in &made {
                expect_ok("delete", d.delete(n))?;
            }
            let (stats, listed) = (expect_ok("stats", stats)?, expect_ok("list", listed)?);
            check(stats.volumes == listed.len() as u64, || {
                format!("stats counts {} volumes, list shows {}", stats.volumes, listed.len())
            })?;
            let sum: u64 = listed.iter().map(|v| v.size).sum();
            check(stats.provisioned_bytes == sum, || {
                format!("stats says {} bytes provisioned, the listed sizes add up to {sum}", stats.provisioned_bytes)
            })?;
            Ok(String::new())
        },
        |d| {
            churn_round_trip(
                10,
                &|n| expect_ok("create", d.create(n, MIB)).map(drop),
                &|| expect_ok("list", d.list()).map(|l| l.into_iter().map(|v| v.name).collect()),
                &|n| expect_ok("delete", d.delete(n)),
            )
        },
        |d| {
            let [a] = names_n("io");
            expect_ok("create", d.create(&a, MIB))?;
            let outcome = (|| {
                match d.write_at(&a, 4096, b"conformance") {
                    Err(e) if e.kind() == ErrorKind::UNSUPPORTED => {
                        return Ok("write_at unsupported (optional)".to_owned())
                    }
                    other => {
                        let n = expect_ok("write_at", other)?;
                        check(n == 11, || format!("write_at reported {n} bytes written, expected 11"))?;
                    }
                }
                match d.read_at(&a, 4096, 11) {
                    Err(e) if e.kind() == ErrorKind::UNSUPPORTED => Ok("read_at unsupported (optional)".to_owned()),
                    other => {
                        let back = expect_ok("read_at", other)?;
                        check(back == b"conformance", || format!("read_at returned {back:?}"))?;
                        Ok(String::new())
                    }
                }
            })();
            expect_ok("delete", d.delete(&a))?;
            outcome
        },
        |d| {
            let [a, s] = names_n("revert");
            expect_ok("create", d.create(&a, MIB))?;
            let outcome = (|| {
                expect_ok("snapshot", d.snapshot(&a, &s))?;
                expect_ok("extend", d.extend(&a, 2 * MIB))?;
                match d.revert(&a, &s) {
                    Err(e) if e.kind() == ErrorKind::UNSUPPORTED => {
                        well_formed("revert", &e)?;
                        Ok("revert unsupported (optional)".to_owned())
                    }
                    other => {
                        let v = expect_ok("revert", other)?;
                        check(v.name == a && v.size == MIB, || {
                            format!("revert returned {v:?}, expected {a} at the snapshot's size")
                        })?;
                        expect_err(
                            "revert to a missing snapshot",
                            d.revert(&a, "conformance-revert-none"),
                            ErrorKind::NOT_FOUND,
                        )?;
                        Ok(String::new())
                    }
                }
            })();
            let _ = d.delete(&s);
            expect_ok("delete", d.delete(&a))?;
            outcome
        },
        |d| {
            let made: [String; 5] = names_n("page");
            for n in &made {
                expect_ok("create", d.create(n, MIB))?;
            }
            let outcome = (|| {
                // Pages of 2 from the start, then on from each page's last name, until a short page.
                let mut paged = Vec::new();
                let mut after = String::new();
                loop {
                    let page = match d.list_after(&after, 2) {
                        Err(e) if e.kind() == ErrorKind::UNSUPPORTED => {
                            well_formed("list_after", &e)?;
                            return Ok("list_after unsupported (optional)".to_owned());
                        }
                        other => expect_ok("list_after", other)?,
                    };
                    check(page.len() <= 2, || format!("list_after with limit 2 returned {} volumes", page.len()))?;
                    let names: Vec<&str> = page.iter().map(|v| v.name.as_str()).collect();
                    check(
                        names.windows(2).all(|w| w[0] < w[1]) && names.first().is_none_or(|f| *f > after.as_str()),
                        || format!("list_after({after:?}, 2) returned {names:?}: not in name order after {after:?}"),
                    )?;
                    let short = page.len() < 2;
                    if let Some(last) = page.last() {
                        after = last.name.clone();
                    }
                    paged.extend(page.into_iter().map(|v| v.name));
                    check(paged.len() <= 100_000, || "list_after never ends".to_owned())?;
                    if short {
                        break;
                    }
                }
                let mut listed: Vec<String> = expect_ok("list", d.list())?.into_iter().map(|v| v.name).collect();
                listed.sort();
                check(paged == listed, || format!("the pages of list_after give {paged:?}, list gives {listed:?}"))?;
                Ok(String::new())
            })();
            for n in &made {
                let _ = d.delete(n);
            }
            outcome
        },
    ];
    VOLUME_CHECKS.iter().copied().zip(bodies).collect()
}

fn names_n<const N: usize>(check: &str) -> [String; N] {
    std::array::from_fn(|i| format!("conformance-{check}-{i}"))
}

/// Runs the volume suite on drivers made by `make` (each check gets a fresh one).
pub fn check_volume(make: &dyn Fn() -> Result<Box<dyn VolumeDriver>, DriverError>) -> Report {
    check_volume_with_progress(make, &mut |_| {})
}

/// [`check_volume`], telling `progress` as each check starts and ends: a tool that runs the suite
/// in a child process learns which check was running when a driver took the process down.
pub fn check_volume_with_progress(
    make: &dyn Fn() -> Result<Box<dyn VolumeDriver>, DriverError>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Report {
    run_checks("volume", &volume_checks(), progress, |body| {
        with_driver(make, |d: &dyn VolumeDriver| d.init(), |d| d.cleanup(), body)
    })
}

// ---------------------------------------------------------------------------------------------------
// Compute

type ComputeCheck = fn(&dyn ComputeDriver, &InstanceSpec) -> Result<String, Fail>;

/// The checks of the conformance suite for drivers of `kind` (`None`: no suite for that kind here).
pub fn checks_of(kind: crate::DriverKind) -> Option<&'static [&'static str]> {
    match kind {
        k if k == crate::DriverKind::VOLUME => Some(VOLUME_CHECKS),
        k if k == crate::DriverKind::COMPUTE => Some(COMPUTE_CHECKS),
        k if k == crate::DriverKind::NETWORK => Some(NETWORK_CHECKS),
        _ => None,
    }
}

/// The compute checks, in order.
pub const COMPUTE_CHECKS: &[&str] = &[
    "lifecycle",
    "spawn_then_get",
    "spawn_existing_is_already_exists",
    "missing_is_not_found",
    "stop_then_start",
    "start_running_is_busy",
    "reboot_runs",
    "destroy_removes",
    "list_matches_spawns",
    "concurrent_spawn_destroy",
    "spawn_in_refuses_what_is_not_a_network_namespace",
];

fn spec_for(template: &InstanceSpec, name: &str) -> InstanceSpec {
    InstanceSpec { name: name.to_owned(), ..template.clone() }
}

fn compute_checks() -> Vec<(&'static str, ComputeCheck)> {
    let bodies: [ComputeCheck; 11] = [
        |d, _| {
            expect_ok("health", d.health())?;
            Ok(String::new())
        },
        |d, t| {
            let [a] = names_n("spawn");
            let i = expect_ok("spawn", d.spawn(&spec_for(t, &a)));
            let got = d.get(&a);
            let _ = d.destroy(&a);
            let i = i?;
            check(i.name == a && i.state == InstanceState::Running, || format!("spawn returned {i:?}"))?;
            let got = expect_ok("get", got)?;
            check(got.name == a && got.state == InstanceState::Running, || format!("get returned {got:?}"))?;
            Ok(String::new())
        },
        |d, t| {
            let [a] = names_n("dup");
            expect_ok("spawn", d.spawn(&spec_for(t, &a)))?;
            let dup = expect_err("spawn of an existing instance", d.spawn(&spec_for(t, &a)), ErrorKind::ALREADY_EXISTS);
            expect_ok("destroy", d.destroy(&a))?;
            dup.map(|()| String::new())
        },
        |d, _| {
            let [a] = names_n("missing");
            expect_err("get of a missing instance", d.get(&a), ErrorKind::NOT_FOUND)?;
            expect_err("stop of a missing instance", d.stop(&a), ErrorKind::NOT_FOUND)?;
            expect_err("start of a missing instance", d.start(&a), ErrorKind::NOT_FOUND)?;
            expect_err("reboot of a missing instance", d.reboot(&a), ErrorKind::NOT_FOUND)?;
            expect_err("destroy of a missing instance", d.destroy(&a), ErrorKind::NOT_FOUND)?;
            Ok(String::new())
        },
        |d, t| {
            let [a] = names_n("stopstart");
            expect_ok("spawn", d.spawn(&spec_for(t, &a)))?;
            let outcome = (|| {
                let stopped = expect_ok("stop", d.stop(&a))?;
                check(stopped.state == InstanceState::Stopped, || format!("stop returned {stopped:?}"))?;
                let started = expect_ok("start", d.start(&a))?;
                check(started.state == InstanceState::Running, || format!("start returned {started:?}"))?;
                Ok(String::new())
            })();
            expect_ok("destroy", d.destroy(&a))?;
            outcome
        },
        |d, t| {
            let [a] = names_n("busy");
            expect_ok("spawn", d.spawn(&spec_for(t, &a)))?;
            let busy = expect_err("start of a running instance", d.start(&a), ErrorKind::BUSY);
            expect_ok("destroy", d.destroy(&a))?;
            busy.map(|()| String::new())
        },
        |d, t| {
            let [a] = names_n("reboot");
            expect_ok("spawn", d.spawn(&spec_for(t, &a)))?;
            let rebooted = expect_ok("reboot", d.reboot(&a));
            expect_ok("destroy", d.destroy(&a))?;
            let rebooted = rebooted?;
            check(rebooted.state == InstanceState::Running, || format!("reboot returned {rebooted:?}"))?;
            Ok(String::new())
        },
        |d, t| {
            let [a] = names_n("destroy");
            expect_ok("spawn", d.spawn(&spec_for(t, &a)))?;
            expect_ok("destroy", d.destroy(&a))?;
            expect_err("get after destroy", d.get(&a), ErrorKind::NOT_FOUND)?;
            let listed = expect_ok("list", d.list())?;
            check(!listed.iter().any(|i| i.name == a), || format!("{a} is still listed after destroy"))?;
            Ok(String::new())
        },
        |d, t| {
            list_round_trip(
                &|n| expect_ok("spawn", d.spawn(&spec_for(t, n))).map(drop),
                &|| expect_ok("list", d.list()).map(|l| l.into_iter().map(|i| i.name).collect()),
                &|n| expect_ok("destroy", d.destroy(n)),
            )
        },
        |d, t| {
            churn_round_trip(
                4,
                &|n| expect_ok("spawn", d.spawn(&spec_for(t, n))).map(drop),
                &|| expect_ok("list", d.list()).map(|l| l.into_iter().map(|i| i.name).collect()),
                &|n| expect_ok("destroy", d.destroy(n)),
            )
        },
        |d, t| {
            // The optional `compute.spawn_in` (1.2): a path that is not a network namespace is refused
            // and leaves no instance.
            let [a] = names_n("netns");
            let not_netns = "/proc/self/ns/mnt";
            match d.spawn_in(&spec_for(t, &a), not_netns) {
                Err(e) if e.kind() == ErrorKind::UNSUPPORTED => {
                    well_formed("spawn_in", &e)?;
                    Ok("spawn_in unsupported (optional)".to_owned())
                }
                Err(e) => {
                    well_formed("spawn_in", &e)?;
                    check(e.kind() == ErrorKind::INVALID_ARGUMENT, || {
                        format!("spawn_in into {not_netns} answered {:?}, expected invalid_argument: {e}", e.kind())
                    })?;
                    expect_err("get after a refused spawn_in", d.get(&a), ErrorKind::NOT_FOUND)?;
                    Ok(String::new())
                }
                Ok(i) => {
                    let _ = d.destroy(&a);
                    Err(format!("spawn_in into {not_netns} (a mount namespace) succeeded: {i:?}"))
                }
            }
        },
    ];
    COMPUTE_CHECKS.iter().copied().zip(bodies).collect()
}

/// A harmless instance for the compute checks: `sleep 60`.
pub fn harmless_instance() -> InstanceSpec {
    InstanceSpec { name: String::new(), command: "sleep".into(), args: vec!["60".into()], ..InstanceSpec::default() }
}

/// Runs the compute suite on drivers made by `make`, spawning instances like `template` (its name is
/// replaced; [`harmless_instance`] is a good one).
pub fn check_compute(
    make: &dyn Fn() -> Result<Box<dyn ComputeDriver>, DriverError>,
    template: &InstanceSpec,
) -> Report {
    check_compute_with_progress(make, template, &mut |_| {})
}

/// [`check_compute`], telling `progress` as each check starts and ends (see
/// [`check_volume_with_progress`]).
pub fn check_compute_with_progress(
    make: &dyn Fn() -> Result<Box<dyn ComputeDriver>, DriverError>,
    template: &InstanceSpec,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Report {
    run_checks("compute", &compute_checks(), progress, |body| {
        with_driver(make, |d: &dyn ComputeDriver| d.init(), |d| d.cleanup(), |d| body(d, template))
    })
}

// ---------------------------------------------------------------------------------------------------
// Network

type NetworkCheck = fn(&dyn NetworkDriver) -> Result<String, Fail>;

/// The network checks, in order.
pub const NETWORK_CHECKS: &[&str] = &[
    "lifecycle",
    "create_network_is_idempotent",
    "create_network_with_another_subnet_is_already_exists",
    "delete_network_of_nothing_succeeds",
    "attach_is_idempotent_and_reports_its_spec",
    "attach_to_a_missing_network_is_not_found",
    "attach_with_another_spec_is_already_exists",
    "detach_of_nothing_succeeds",
    "delete_network_with_ports_is_busy",
    "stats_match_lists",
];

fn net_spec(name: &str, third: u8) -> NetworkSpec {
    NetworkSpec {
        name: name.to_owned(),
        cidr: format!("10.99.{third}.0/24"),
        gateway: Some(format!("10.99.{third}.1")),
    }
}

fn port_spec(id: &str, network: &str, third: u8, host: u8) -> PortSpec {
    PortSpec {
        id: id.to_owned(),
        network: network.to_owned(),
        address: format!("10.99.{third}.{host}/24"),
        mac: format!("02:00:0a:63:{third:02x}:{host:02x}"),
        ifname: "eth0".to_owned(),
        netns: String::new(),
    }
}

fn network_checks() -> Vec<(&'static str, NetworkCheck)> {
    let bodies: [NetworkCheck; 10] = [
        |d| {
            expect_ok("health", d.health())?;
            let [n] = names_n("net-life");
            let made = expect_ok("create_network", d.create_network(&net_spec(&n, 1)))?;
            check(made.name == n && made.cidr == "10.99.1.0/24", || format!("create_network returned {made:?}"))?;
            let p = expect_ok("attach", d.attach(&port_spec("cnf-p1", &n, 1, 2)))?;
            check(p.id == "cnf-p1" && p.network == n, || format!("attach returned {p:?}"))?;
            expect_ok("detach", d.detach("cnf-p1"))?;
            expect_ok("delete_network", d.delete_network(&n))?;
            Ok(String::new())
        },
        |d| {
            let [n] = names_n("net-again");
            let first = expect_ok("create_network", d.create_network(&net_spec(&n, 2)))?;
            let again = expect_ok(
                "create_network of an existing network with the same spec",
                d.create_network(&net_spec(&n, 2)),
            )?;
            check(first == again, || format!("a second create_network returned {again:?}, the first {first:?}"))?;
            let count = expect_ok("list_networks", d.list_networks())?.iter().filter(|x| x.name == n).count();
            check(count == 1, || format!("list_networks shows {n} {count} times"))?;
            expect_ok("delete_network", d.delete_network(&n))?;
            Ok(String::new())
        },
        |d| {
            let [n] = names_n("net-clash");
            expect_ok("create_network", d.create_network(&net_spec(&n, 3)))?;
            let clash = expect_err(
                "create_network with another subnet",
                d.create_network(&net_spec(&n, 4)),
                ErrorKind::ALREADY_EXISTS,
            );
            expect_ok("delete_network", d.delete_network(&n))?;
            clash.map(|()| String::new())
        },
        |d| {
            expect_ok("delete_network of a network that is not there", d.delete_network("conformance-net-none"))?;
            Ok(String::new())
        },
        |d| {
            let [n] = names_n("net-attach");
            expect_ok("create_network", d.create_network(&net_spec(&n, 5)))?;
            let spec = port_spec("cnf-p5", &n, 5, 9);
            let outcome = (|| {
                let p = expect_ok("attach", d.attach(&spec))?;
                check(
                    (p.address.as_str(), p.mac.as_str(), p.ifname.as_str())
                        == (spec.address.as_str(), spec.mac.as_str(), spec.ifname.as_str()),
                    || format!("attach returned {p:?} for {spec:?}"),
                )?;
                let again = expect_ok("attach of an existing port with the same spec", d.attach(&spec))?;
                check(again == p, || format!("a second attach returned {again:?}, the first {p:?}"))?;
                let listed = expect_ok("list_attachments", d.list_attachments())?;
                check(listed.iter().filter(|x| x.id == spec.id).count() == 1, || {
                    format!("list_attachments shows {listed:?}")
                })?;
                Ok(String::new())
            })();
            let _ = d.detach(&spec.id);
            expect_ok("delete_network", d.delete_network(&n))?;
            outcome
        },
        |d| {
            expect_err(
                "attach to a missing network",
                d.attach(&port_spec("cnf-p6", "conformance-net-none", 6, 2)),
                ErrorKind::NOT_FOUND,
            )?;
            Ok(String::new())
        },
        |d| {
            let [n] = names_n("net-port-clash");
            expect_ok("create_network", d.create_network(&net_spec(&n, 7)))?;
            expect_ok("attach", d.attach(&port_spec("cnf-p7", &n, 7, 2)))?;
            let clash = expect_err(
                "attach of an existing port with another address",
                d.attach(&port_spec("cnf-p7", &n, 7, 3)),
                ErrorKind::ALREADY_EXISTS,
            );
            let _ = d.detach("cnf-p7");
            expect_ok("delete_network", d.delete_network(&n))?;
            clash.map(|()| String::new())
        },
        |d| {
            expect_ok("detach of a port that is not there", d.detach("cnf-p-none"))?;
            Ok(String::new())
        },
        |d| {
            let [n] = names_n("net-busy");
            expect_ok("create_network", d.create_network(&net_spec(&n, 8)))?;
            expect_ok("attach", d.attach(&port_spec("cnf-p8", &n, 8, 2)))?;
            let busy = expect_err("delete_network of a network with a port", d.delete_network(&n), ErrorKind::BUSY);
            expect_ok("detach", d.detach("cnf-p8"))?;
            expect_ok("delete_network once its ports are gone", d.delete_network(&n))?;
            busy.map(|()| String::new())
        },
        |d| {
            let [a, b] = names_n("net-stats");
            expect_ok("create_network", d.create_network(&net_spec(&a, 10)))?;
            expect_ok("create_network", d.create_network(&net_spec(&b, 11)))?;
            expect_ok("attach", d.attach(&port_spec("cnf-p10", &a, 10, 2)))?;
            let outcome = (|| {
                let s = expect_ok("stats", d.stats())?;
                let nets = expect_ok("list_networks", d.list_networks())?.len() as u64;
                let ports = expect_ok("list_attachments", d.list_attachments())?.len() as u64;
                check((s.networks, s.ports) == (nets, ports), || {
                    format!("stats says {} networks and {} ports, the lists {nets} and {ports}", s.networks, s.ports)
                })?;
                Ok(String::new())
            })();
            let _ = d.detach("cnf-p10");
            let _ = d.delete_network(&a);
            let _ = d.delete_network(&b);
            outcome
        },
    ];
    NETWORK_CHECKS.iter().copied().zip(bodies).collect()
}

/// Runs the network suite on drivers made by `make` (each check gets a fresh one). It makes networks
/// in `10.99.0.0/16` and ports with no namespace and ids of at most 10 characters (a host gives at
/// most 11): a driver that plumbs real links needs a network namespace of its own to run it in.
pub fn check_network(make: &dyn Fn() -> Result<Box<dyn NetworkDriver>, DriverError>) -> Report {
    check_network_with_progress(make, &mut |_| {})
}

/// [`check_network`], telling `progress` as each check starts and ends (see
/// [`check_volume_with_progress`]).
pub fn check_network_with_progress(
    make: &dyn Fn() -> Result<Box<dyn NetworkDriver>, DriverError>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Report {
    run_checks("network", &network_checks(), progress, |body| {
        with_driver(make, |d: &dyn NetworkDriver| d.init(), |d| d.cleanup(), body)
    })
}
