//! Rolling driver upgrades (`plughost fleet swap`, `fleet rollout`) on hosts of one real nats-server,
//! each under a load loop on its own socket throughout: a good driver reaches every host with no failed
//! request; a driver that goes bad after its swap, whose calls fail by its own fault, or whose init
//! fails on one host, is swapped back everywhere; a rollout whose command is killed is shown, undone or
//! finished from the record; a second rollout of the same backend is refused while one holds it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plughost_tests::nats::Nats;
use plughost_tests::process::{command, run, Daemon, Ran};
use plughost_tests::{driver, fixtures, TempDir};
use serde_json::{json, Value};

const FLEET: &str = "r";

fn digest_of(path: &Path) -> String {
    let r = run(&["inspect", "--json", path.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    v[0]["digest"].as_str().unwrap().to_owned()
}

/// A host of fleet `r` serving file-volume from its own driver directory, which holds `files` (the
/// NAME a host resolves → the library copied there).
struct Host {
    name: String,
    daemon: Daemon,
    _state: TempDir,
    _drivers: TempDir,
}

fn start_host(nats: &Nats, name: &str, files: &[(&str, &Path)]) -> Host {
    let state = TempDir::new(&format!("rollout-{name}"));
    let drivers = TempDir::new(&format!("rollout-{name}-drivers"));
    std::fs::copy(driver("file-volume"), drivers.join("libfile_volume.so")).unwrap();
    for (n, from) in files {
        std::fs::copy(from, drivers.join(format!("lib{}.so", n.replace('-', "_")))).unwrap();
    }
    let dir = drivers.path().to_str().unwrap().to_owned();
    let mut args = vec!["--driver-dir", &dir, "--volume-driver", "file-volume", "--compute-driver", "none"];
    let fleet = nats.host_flags(FLEET, name, "300ms", "3s");
    args.extend(fleet.iter().map(String::as_str));
    let daemon = Daemon::start(state.path(), &args);
    Host { name: name.to_owned(), daemon, _state: state, _drivers: drivers }
}

/// `plughost SUB... --fleet-url URL --fleet-name r ARGS...`.
fn fleet(nats: &Nats, sub: &[&str], args: &[&str]) -> Ran {
    let mut all: Vec<&str> = sub.to_vec();
    all.extend(["--fleet-url", &nats.url, "--fleet-name", FLEET]);
    all.extend_from_slice(args);
    run(&all)
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until_reported(nats: &Nats, n: usize) {
    wait_for(&format!("{n} hosts up in the services table"), 30, || {
        let r = fleet(nats, &["fleet", "status"], &["--json"]);
        let rows: Value = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
        rows.as_array().is_some_and(|rows| rows.len() == n && rows.iter().all(|r| r["state"] == "up"))
    });
}

/// The digest serving `volume/default` on a host.
fn serving(h: &mut Host) -> String {
    let s = h.daemon.ok("", "status", json!({}));
    s["services"][0]["backends"][0]["driver"]["digest"].as_str().unwrap().to_owned()
}

/// A client per host creating, reading and deleting volumes on its socket until stopped; failed
/// requests counted per host.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failures: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(hosts: &[Host]) -> Load {
        // Names of their own: a volume an earlier loop could not delete (its backend down) stays.
        static LOADS: AtomicU64 = AtomicU64::new(0);
        let round = LOADS.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(BTreeMap::<String, Vec<String>>::new()));
        let threads = hosts
            .iter()
            .map(|h| {
                let (socket, name) = (h.daemon.socket.clone(), h.name.clone());
                let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
                std::thread::spawn(move || {
                    let mut c = plughost_tests::process::Client::connect(&socket);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let v = format!("l{round}-{i}");
                        for (op, args) in [
                            ("create", json!({"name": v, "size": "64KiB"})),
                            ("get", json!({"name": v})),
                            ("delete", json!({"name": v})),
                        ] {
                            let a = c.call("volume", op, args).expect("the host keeps its socket open");
                            done.fetch_add(1, Ordering::Relaxed);
                            if a["ok"] != true {
                                failures.lock().unwrap().entry(name.clone()).or_default().push(format!("{op}: {a}"));
                            }
                        }
                        i += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        let load = Load { stop, done, failures, threads };
        let start = load.done.load(Ordering::Relaxed);
        wait_for("the load loop to get going", 30, || load.done.load(Ordering::Relaxed) >= start + 30);
        load
    }

    /// Stops the clients; the failed requests by host.
    fn finish(self) -> BTreeMap<String, Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.failures).unwrap().into_inner().unwrap()
    }
}

/// The rollout id a plain-lines run printed first (`rollout ID: ...`).
fn rollout_id(stdout: &str) -> String {
    let first = stdout.lines().next().unwrap_or_default();
    first.strip_prefix("rollout ").and_then(|r| r.split(':').next()).unwrap_or_else(|| panic!("{stdout}")).to_owned()
}

fn record(nats: &Nats, id: &str) -> Value {
    let r = fleet(nats, &["fleet", "rollout", "status", id], &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

fn states(rec: &Value) -> BTreeMap<String, String> {
    rec["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["host"].as_str().unwrap().to_owned(), h["state"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn a_good_driver_reaches_every_host_and_a_host_with_other_content_is_left_out() {
    let Some(nats) = Nats::start("rollout-good") else { return };
    let old = driver("file-volume");
    let new = fixtures::built().file_volume_b.clone();
    let other = fixtures::built().file_volume_sickly.clone();
    let (d_old, d_new) = (digest_of(&old), digest_of(&new));
    let mut hosts: Vec<Host> =
        ["h1", "h2", "h3"].iter().map(|n| start_host(&nats, n, &[("fast-volume", &new)])).collect();
    // h4's file of that NAME has other content; h5 has none.
    hosts.push(start_host(&nats, "h4", &[("fast-volume", &other)]));
    hosts.push(start_host(&nats, "h5", &[]));
    wait_until_reported(&nats, 5);
    let load = Load::start(&hosts);

    // A dry run plans and names who is left out; nothing changes.
    let r = fleet(
        &nats,
        &["fleet", "swap", "volume", "fast-volume"],
        &["--digest", &d_new, "--canary", "1", "--batch", "1", "--dry-run"],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("batch 1: h1\nbatch 2: h2\nbatch 3: h3\n"), "{}", r.stdout);
    assert!(r.stdout.contains("left out: h4: untrusted_driver:") && r.stdout.contains("digest"), "{}", r.stdout);
    assert!(r.stdout.contains("left out: h5: not_found:") && r.stdout.contains("libfast_volume.so"), "{}", r.stdout);
    assert!(r.stdout.ends_with("dry run: nothing was swapped\n"), "{}", r.stdout);
    // --all-or-nothing refuses the whole rollout over h4 and h5.
    let r = fleet(&nats, &["fleet", "swap", "volume", "fast-volume"], &["--digest", &d_new, "--all-or-nothing"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("refused (--all-or-nothing)") && r.stderr.contains("h4: ") && r.stderr.contains("h5: "),
        "{}",
        r.stderr
    );
    for h in &mut hosts {
        assert_eq!(serving(h), d_old, "{}", h.name);
    }

    let r = fleet(
        &nats,
        &["fleet", "swap", "volume", "fast-volume"],
        &["--digest", &d_new, "--canary", "1", "--batch", "1", "--health-window", "1s"],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let id = rollout_id(&r.stdout);
    // Plain lines (not a terminal): each batch, each swap, then the table.
    for line in
        ["batch 1/3 (canary): 1 host(s)", "h1: swapped to file-volume 1.0.1-b", "batch 3/3: healthy", "left out: h4: "]
    {
        assert!(r.stdout.contains(line), "{line:?} in {}", r.stdout);
    }
    for h in &mut hosts[..3] {
        assert_eq!(serving(h), d_new, "{}", h.name);
    }
    for h in &mut hosts[3..] {
        assert_eq!(serving(h), d_old, "{}", h.name);
    }
    let failures = load.finish();
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    // The record says so from anywhere; each host's audit log names the rollout.
    let rec = record(&nats, &id);
    assert_eq!(rec["state"], "done", "{rec}");
    assert!(states(&rec).values().all(|s| s == "passed"), "{rec}");
    let entries = hosts[1].daemon.ok("", "audit", json!({}));
    let swap = entries.as_array().unwrap().iter().find(|e| e["op"] == "swap").expect("a swap in h2's audit log");
    assert_eq!(
        (swap["args"]["rollout"].as_str(), swap["via"].as_str(), swap["outcome"].as_str()),
        (Some(id.as_str()), Some("fleet"), Some("ok")),
        "{swap}"
    );
    assert_eq!(swap["args"]["digest"], d_new.as_str());
    // Done: the backend is free for the next rollout, which finds nothing to do.
    let r = fleet(&nats, &["fleet", "swap", "volume", "fast-volume"], &["--digest", &d_new, "--hosts", "h1,h2,h3"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("every host already serves this content"), "{}", r.stdout);
}

#[test]
fn a_driver_that_goes_bad_or_fails_on_one_host_is_swapped_back_everywhere() {
    let Some(nats) = Nats::start("rollout-bad") else { return };
    let old = driver("file-volume");
    let sickly = fixtures::built().file_volume_sickly.clone();
    let picky = fixtures::built().file_volume_picky.clone();
    let flaky = fixtures::built().file_volume_flaky.clone();
    let (d_old, d_sickly, d_picky, d_flaky) =
        (digest_of(&old), digest_of(&sickly), digest_of(&picky), digest_of(&flaky));
    let mut hosts: Vec<Host> = ["h1", "h2", "h3"]
        .iter()
        .map(|n| {
            start_host(&nats, n, &[("sickly-volume", &sickly), ("picky-volume", &picky), ("flaky-volume", &flaky)])
        })
        .collect();
    wait_until_reported(&nats, 3);
    let load = Load::start(&hosts);

    // Healthy at its swap, unhealthy at the next periodic check: the canary's window sees the backend
    // down, and every host it reached is swapped back.
    let r = fleet(
        &nats,
        &["fleet", "swap", "volume", "sickly-volume"],
        &["--digest", &d_sickly, "--canary", "1", "--batch", "1", "--health-window", "3s"],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let rec = record(&nats, &rollout_id(&r.stdout));
    assert_eq!(rec["state"], "rolled_back", "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains("its backend is down on the new driver"), "{rec}");
    let st = states(&rec);
    assert!(st["h1"] == "failed" || st["h1"] == "reverted", "{rec}");
    for h in &mut hosts {
        assert_eq!(serving(h), d_old, "{}", h.name);
    }
    let failures = load.finish();
    let untouched: Vec<&String> = st.iter().filter(|(_, s)| *s == "skipped").map(|(h, _)| h).collect();
    assert!(!untouched.is_empty(), "{rec}");
    for h in untouched {
        assert!(!failures.contains_key(h), "{h} was never touched but failed requests: {:?}", failures[h]);
    }

    // The next driver's init fails on h3 only (its volume root has the old layout): h1 and h2 take it,
    // h3 refuses it, and h1 and h2 go back.
    let root = hosts[2].daemon.ok("", "status", json!({}))["services"][0]["backends"][0]["options"]["root"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(Path::new(&root).join(".old-layout"), b"").unwrap();
    let load = Load::start(&hosts);
    let r = fleet(
        &nats,
        &["fleet", "swap", "volume", "picky-volume"],
        &["--digest", &d_picky, "--canary", "1", "--batch", "1", "--health-window", "500ms"],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let rec = record(&nats, &rollout_id(&r.stdout));
    assert_eq!(rec["state"], "rolled_back", "{rec}");
    let st = states(&rec);
    assert_eq!((st["h1"].as_str(), st["h2"].as_str(), st["h3"].as_str()), ("reverted", "reverted", "failed"), "{rec}");
    assert!(
        rec["reason"].as_str().unwrap().contains("host h3: swap failed")
            && rec["reason"].as_str().unwrap().contains("old layout"),
        "{rec}"
    );
    for line in
        ["h2: swapped to file-volume 1.0.3-picky", "h1: swapped back to file-volume", "h2: swapped back to file-volume"]
    {
        assert!(r.stdout.contains(line), "{line:?} in {}", r.stdout);
    }
    for h in &mut hosts {
        assert_eq!(serving(h), d_old, "{}", h.name);
    }
    // Live swaps there and back lose nothing, and a swap refused loses nothing either.
    let failures = load.finish();
    assert!(failures.is_empty(), "failed requests: {failures:?}");

    // Healthy, but its calls fail by its own fault: the canary's window sees the fault rate above the
    // threshold under the load, and the canary goes back.
    std::fs::remove_file(Path::new(&root).join(".old-layout")).unwrap();
    let load = Load::start(&hosts);
    let r = fleet(
        &nats,
        &["fleet", "swap", "volume", "flaky-volume"],
        &["--digest", &d_flaky, "--canary", "1", "--batch", "1", "--health-window", "3s", "--max-error-rate", "0.1"],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let rec = record(&nats, &rollout_id(&r.stdout));
    let reason = rec["reason"].as_str().unwrap();
    assert!(reason.contains("driver calls failed by the driver's fault") && reason.contains("> 10.0%"), "{rec}");
    assert_eq!(rec["state"], "rolled_back", "{rec}");
    for h in &mut hosts {
        assert_eq!(serving(h), d_old, "{}", h.name);
    }
    let failures = load.finish();
    for (h, s) in states(&rec) {
        if s == "skipped" {
            assert!(!failures.contains_key(&h), "{h} was never touched but failed requests: {:?}", failures[&h]);
        }
    }
}

/// Starts `fleet swap` in the background and waits until `host` serves `digest` (its batch swapped).
fn start_and_kill_after(nats: &Nats, args: &[&str], hosts: &mut [Host], host: usize, digest: &str) -> String {
    let mut all = vec!["fleet", "swap"];
    all.extend_from_slice(args);
    all.extend(["--fleet-url", &nats.url, "--fleet-name", FLEET]);
    let mut child =
        command(&all).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    wait_for("the canary to be swapped", 60, || serving(&mut hosts[host]) == digest);
    child.kill().unwrap();
    child.wait().unwrap();
    let r = fleet(nats, &["fleet", "rollout", "status"], &["--json"]);
    let all: Value = serde_json::from_str(&r.stdout).unwrap();
    let running: Vec<&Value> = all.as_array().unwrap().iter().filter(|r| r["state"] == "running").collect();
    assert_eq!(running.len(), 1, "{all}");
    running[0]["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_killed_rollout_is_shown_blocks_others_and_can_be_aborted_or_resumed() {
    let Some(nats) = Nats::start("rollout-killed") else { return };
    let old = driver("file-volume");
    let new = fixtures::built().file_volume_b.clone();
    let (d_old, d_new) = (digest_of(&old), digest_of(&new));
    let mut hosts: Vec<Host> =
        ["h1", "h2", "h3"].iter().map(|n| start_host(&nats, n, &[("fast-volume", &new)])).collect();
    wait_until_reported(&nats, 3);
    let load = Load::start(&hosts);
    let args = [
        "volume",
        "fast-volume",
        "--digest",
        d_new.as_str(),
        "--canary",
        "1",
        "--batch",
        "1",
        "--health-window",
        "60s",
    ];

    // Killed in the canary's window: the record shows the canary swapped and the rest pending.
    let id = start_and_kill_after(&nats, &args, &mut hosts, 0, &d_new);
    let rec = record(&nats, &id);
    let st = states(&rec);
    assert!(st["h1"] == "swapped" || st["h1"] == "swapping", "{rec}");
    assert_eq!((st["h2"].as_str(), st["h3"].as_str()), ("pending", "pending"), "{rec}");
    let r = fleet(&nats, &["fleet", "rollout", "status"], &[]);
    assert!(
        r.stdout.lines().any(|l| l.starts_with(&id) && l.contains("volume/default") && l.contains("running")),
        "{}",
        r.stdout
    );
    // It holds the backend: another rollout of it is refused, naming it.
    let r = fleet(&nats, &["fleet", "swap", "volume", "fast-volume"], &["--digest", &d_new]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains(&format!("rollout {id}")) && r.stderr.contains("fleet rollout resume"), "{}", r.stderr);
    // Abort swaps back what was swapped.
    let r = fleet(&nats, &["fleet", "rollout", "abort", &id], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for h in &mut hosts {
        assert_eq!(serving(h), d_old, "{}", h.name);
    }
    let rec = record(&nats, &id);
    assert_eq!(rec["state"], "rolled_back", "{rec}");
    assert!(rec["reason"].as_str().unwrap().starts_with("aborted by "), "{rec}");

    // Killed again; resumed with a short window, it finishes.
    let id = start_and_kill_after(&nats, &args, &mut hosts, 0, &d_new);
    let r = fleet(&nats, &["fleet", "rollout", "resume", &id], &["--health-window", "500ms"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for h in &mut hosts {
        assert_eq!(serving(h), d_new, "{}", h.name);
    }
    let rec = record(&nats, &id);
    assert_eq!(rec["state"], "done", "{rec}");
    assert!(states(&rec).values().all(|s| s == "passed"), "{rec}");
    let failures = load.finish();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}
