//! Isolated backends: the same driver `.so` in a worker process, so that no driver can take the host
//! down. Real workers, real signals, real crashes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plughost_tests::process::{Client, Daemon};
use plughost_tests::procs::{wait_for, Proc};
use plughost_tests::TempDir;
use serde_json::{json, Value};

/// A config with a healthy in-process default backend, and the given extra volume backends.
fn config(t: &TempDir, backends: &str) -> String {
    let cfg = t.join("plughost.toml");
    let text = format!("[volume]\ndriver = \"fake-volume\"\n{backends}\n[compute]\ndriver = \"fake-compute\"\n");
    std::fs::write(&cfg, text).unwrap();
    cfg.display().to_string()
}

fn isolated_faulty(name: &str, options: &str, extra: &str) -> String {
    format!(
        "[[volume.backends]]\nname = \"{name}\"\ndriver = \"faulty\"\nisolation = \"process\"\n{extra}\noptions = {{ {options} }}\n"
    )
}

fn backend(d: &mut Daemon, name: &str) -> Value {
    let status = d.ok("", "status", json!({}));
    status["services"][0]["backends"].as_array().unwrap().iter().find(|b| b["name"] == name).unwrap().clone()
}

/// Keeps loading the healthy backend and the other service; counts failures.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(socket: &Path, clients: usize) -> Load {
        let (stop, failures, done) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = (0..clients)
            .map(|c| {
                let (socket, stop, failures, done) = (socket.to_owned(), stop.clone(), failures.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut cl = Client::connect(&socket);
                    let name = format!("load-{c}");
                    let created = cl.call("volume", "create", json!({"name": name, "size": 4096})).unwrap();
                    assert_eq!(created["ok"], true, "{created}");
                    while !stop.load(Ordering::Relaxed) {
                        for (svc, op, args) in [
                            ("volume", "get", json!({"name": name})),
                            ("compute", "list", json!({})),
                            ("", "ping", json!({})),
                        ] {
                            match cl.call(svc, op, args) {
                                Some(v) if v["ok"] == true => {}
                                other => {
                                    eprintln!("failed: {svc} {op}: {other:?}");
                                    failures.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, failures, done, threads }
    }

    /// Stops the clients; (requests done, failures).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (self.done.load(Ordering::Relaxed), self.failures.load(Ordering::Relaxed))
    }
}

fn wait_running(d: &mut Daemon, name: &str) -> Value {
    let mut last = Value::Null;
    wait_for(&format!("backend {name}'s worker to run"), || {
        last = backend(d, name);
        last["worker"]["state"] == "running" && last["state"] == "up"
    });
    last
}

#[test]
fn each_fault_is_answered_with_its_kind_and_the_worker_comes_back() {
    let t = TempDir::new("iso-faults");
    // (fault, answer kind, words in the answer, call_timeout in ms, more settings). The leak must
    // be stopped by its memory limit, not by a timeout, however slowly a busy machine touches pages.
    let faults = [
        ("segv", "driver_crashed", "SIGSEGV", 1500, ""),
        ("abort", "driver_crashed", "SIGABRT", 1500, ""),
        ("exit", "driver_crashed", "exited with status 3", 1500, ""),
        ("leak", "driver_crashed", "", 60_000, "memory_limit = \"256MiB\"\n"),
        ("hang", "timeout", "did not answer within 1.5s", 1500, ""),
        ("deadlock", "timeout", "did not answer within 1.5s", 1500, ""),
    ];
    let mut backends = String::new();
    for (kind, _, _, timeout, extra) in &faults {
        let extra = format!("call_timeout = {timeout}\n{extra}");
        backends.push_str(&isolated_faulty(kind, &format!("crash = \"{kind}\", crash_on = \"create\""), &extra));
    }
    let cfg = config(&t, &backends);
    let mut d = Daemon::start(&t.join("state"), &["--config", &cfg]);
    let load = Load::start(&d.socket, 2);
    for (kind, want, why, timeout, _) in faults {
        let before = wait_running(&mut d, kind);
        let pid = before["worker"]["pid"].as_u64().unwrap();
        let started = Instant::now();
        let v = d.call("volume", "create", json!({"name": format!("x-{kind}"), "size": 4096, "backend": kind}));
        let took = started.elapsed();
        assert_eq!(v["error"]["kind"], want, "{kind}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("volume backend \"{kind}\"")) && msg.contains(why), "{kind}: {msg}");
        // Within the call timeout and a margin (generous: the machine may be busy).
        assert!(took < Duration::from_millis(timeout) + Duration::from_secs(5), "{kind}: answered after {took:?}");
        let mut after = Value::Null;
        wait_for(&format!("{kind}: a new worker"), || {
            after = backend(&mut d, kind);
            after["worker"]["state"] == "running"
                && after["worker"]["pid"].as_u64() != Some(pid)
                && after["state"] == "up"
        });
        assert!(after["worker"]["restarts"].as_u64().unwrap() >= 1, "{after}");
        let last = after["worker"]["last_crash"]["reason"].as_str().unwrap_or_default();
        if want == "timeout" {
            // The host killed it, and the crash record says why rather than just SIGKILL.
            assert!(last.contains("killed by plughost: create did not answer"), "{kind}: {last}");
        } else {
            assert!(last.contains(why), "{kind}: {last}");
        }
        // The next call succeeds (the intent record of the create is settled by the reconcile).
        assert_eq!(d.ok("volume", "stats", json!({"backend": kind}))["backend"], kind);
        assert_eq!(backend(&mut d, "default")["state"], "up");
    }
    let (done, failures) = load.finish();
    assert_eq!(failures, 0, "{failures} of {done} requests on the healthy backend failed");
    assert!(done > 0);
}

#[test]
fn a_thousand_faults_leave_the_healthy_backend_and_the_host_alone() {
    let t = TempDir::new("iso-thousand");
    let mut backends = String::new();
    let kinds = ["segv", "abort", "exit"];
    for kind in kinds {
        // create: periodic work never calls it, so every crash is one of ours.
        backends.push_str(&isolated_faulty(kind, &format!("crash = \"{kind}\", crash_on = \"create\""), ""));
    }
    let cfg = config(&t, &backends);
    let mut d = Daemon::start(&t.join("state"), &["--config", &cfg]);
    let load = Load::start(&d.socket, 4);
    let mut crashes = [0u64; 3];
    for i in 0..1000 {
        let k = i % kinds.len();
        let v = d.call("volume", "create", json!({"name": format!("v{i}"), "size": 4096, "backend": kinds[k]}));
        assert_eq!(v["error"]["kind"], "driver_crashed", "{v}");
        crashes[k] += 1;
        // Straight back (no backoff, no circuit): a restart on request.
        let r = d.ok("volume", "restart", json!({"backend": kinds[k]}));
        assert!(r["worker_pid"].as_u64().is_some(), "{r}");
    }
    let (done, failures) = load.finish();
    assert_eq!(failures, 0, "{failures} of {done} requests on the healthy backend failed");
    let status = d.ok("", "status", json!({}));
    assert_eq!(status["services"][0]["backends"][0]["state"], "up");
    for (k, kind) in kinds.iter().enumerate() {
        assert_eq!(backend(&mut d, kind)["worker"]["crashes"], crashes[k], "{kind}");
    }
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn the_circuit_opens_after_five_quick_crashes_and_closes_on_restart() {
    let t = TempDir::new("iso-circuit");
    let cfg = config(&t, &isolated_faulty("f", "crash = \"exit\", crash_on = \"create\"", ""));
    let mut d = Daemon::start(&t.join("state"), &["--config", &cfg]);
    let mut crashed = None;
    for n in 1..=5 {
        // A worker that is not the one that just crashed (its death may not be noticed yet).
        let mut b = Value::Null;
        wait_for("a fresh worker", || {
            b = backend(&mut d, "f");
            b["worker"]["state"] == "running" && b["state"] == "up" && b["worker"]["pid"].as_u64() != crashed
        });
        crashed = b["worker"]["pid"].as_u64();
        let v = d.call("volume", "create", json!({"name": format!("c{n}"), "size": 1, "backend": "f"}));
        assert_eq!(v["error"]["kind"], "driver_crashed", "crash {n}: {v}");
    }
    let mut b = Value::Null;
    wait_for("the circuit to open", || {
        b = backend(&mut d, "f");
        b["worker"]["state"] == "circuit_open"
    });
    assert_eq!(b["state"], "down", "{b}");
    assert!(b["reason"].as_str().unwrap().contains("circuit open: 5 worker crashes within 60s"), "{b}");
    assert_eq!(b["worker"]["crashes"], 5);
    // It stays open: nothing restarts it by itself.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(backend(&mut d, "f")["worker"]["state"], "circuit_open");
    let r = d.ok("volume", "restart", json!({"backend": "f"}));
    assert_eq!(r["isolation"], "process");
    let b = backend(&mut d, "f");
    assert_eq!((b["state"].as_str(), b["worker"]["state"].as_str()), (Some("up"), Some("running")), "{b}");
    assert_eq!(d.err("volume", "get", json!({"name": "none", "backend": "f"})), "not_found");
}

/// The host's worker children.
fn workers(host: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid =
                stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(host) && cmd.contains("__worker")
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn two_hundred_swaps_of_an_isolated_backend_under_load() {
    let t = TempDir::new("iso-swaps");
    let cfg = t.join("plughost.toml");
    std::fs::write(&cfg, "[volume]\ndriver = \"fake-volume\"\nisolation = \"process\"\n[compute]\ndriver = \"none\"\n")
        .unwrap();
    let mut d = Daemon::start(&t.join("state"), &["--config", cfg.to_str().unwrap()]);
    let host = d.pid();
    let mapped_before = d.ok("", "status", json!({}))["libraries"]["mapped"].clone();
    let swap = |d: &mut Daemon, driver: &str| d.ok("volume", "swap", json!({"driver": driver}));
    // Warm up (allocator arenas, thread stacks) before the baseline.
    for i in 0..10 {
        swap(&mut d, if i % 2 == 0 { "faulty" } else { "fake-volume" });
    }
    let before = rss_kib(host);
    let stop = Arc::new(AtomicBool::new(false));
    let (failures, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (socket, stop, failures, done) = (d.socket.clone(), stop.clone(), failures.clone(), done.clone());
        std::thread::spawn(move || {
            let mut cl = Client::connect(&socket);
            while !stop.load(Ordering::Relaxed) {
                match cl.call("volume", "stats", json!({})) {
                    Some(v) if v["ok"] == true => {}
                    other => {
                        eprintln!("failed during swaps: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for i in 0..200 {
        let r = swap(&mut d, if i % 2 == 0 { "faulty" } else { "fake-volume" });
        assert_eq!(r["generation"], 11 + i, "{r}");
    }
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {}", done.load(Ordering::Relaxed));
    wait_for("old workers to exit", || workers(host).len() == 1);
    let after = rss_kib(host);
    assert!(after < before + 8 * 1024, "RSS grew from {before} KiB to {after} KiB over 200 swaps");
    let status = d.ok("", "status", json!({}));
    assert_eq!(status["libraries"]["mapped"], mapped_before, "isolated drivers add no mapped library to the host");
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    wait_for("the last worker to exit", || workers(host).is_empty());
}

#[test]
fn kill_9_of_the_host_leaves_no_worker_running() {
    let t = TempDir::new("iso-kill9");
    let d = Daemon::start(
        &t.join("state"),
        &[
            "--volume-driver",
            "fake-volume",
            "--compute-driver",
            "fake-compute",
            "--isolate",
            "volume",
            "--isolate",
            "compute",
        ],
    );
    let list = workers(d.pid());
    assert_eq!(list.len(), 2, "one worker per isolated backend");
    let procs: Vec<Proc> = list.iter().map(|p| Proc::of(*p)).collect();
    d.kill9();
    wait_for("the workers to die with the host", || procs.iter().all(|p| !p.alive()));
}

#[test]
fn a_driver_that_crashes_while_it_loads_is_a_clean_error_and_the_old_worker_serves() {
    let t = TempDir::new("iso-load-crash");
    // At start: the constructor segfaults in the worker; the host says so and exits 1.
    let r = plughost_tests::process::run(&[
        "run",
        "--state-dir",
        t.join("state").to_str().unwrap(),
        "--volume-driver",
        "faulty",
        "--volume-opt",
        "crash=segv",
        "--volume-opt",
        "crash_on=new",
        "--isolate",
        "volume",
        "--compute-driver",
        "none",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("was killed by signal 11 (SIGSEGV)"), "{}", r.stderr);
    // By reload: init segfaults in the new worker; the old one keeps serving.
    let cfg = t.join("plughost.toml");
    let write = |opts: &str| {
        std::fs::write(
            &cfg,
            format!("[trust]\nallow_swap_paths = true\n[volume]\ndriver = \"faulty\"\nisolation = \"process\"\noptions = {{ {opts} }}\n[compute]\ndriver = \"none\"\n"),
        )
        .unwrap()
    };
    write("");
    let mut d = Daemon::start(&t.join("state"), &["--config", cfg.to_str().unwrap()]);
    d.ok("volume", "create", json!({"name": "kept", "size": 4096}));
    let pid = backend(&mut d, "default")["worker"]["pid"].clone();
    write("crash = \"segv\", crash_on = \"init\"");
    let r = d.ok("", "reload", json!({}));
    assert_eq!(r[0]["outcome"], "failed", "{r}");
    assert!(r[0]["error"].as_str().unwrap().contains("SIGSEGV"), "{r}");
    let b = backend(&mut d, "default");
    assert_eq!((&b["worker"]["pid"], &b["driver"]["generation"]), (&pid, &json!(0)));
    assert_eq!(d.ok("volume", "get", json!({"name": "kept"}))["size"], 4096);
    // By swap to a file whose init segfaults (under its default options): swap_failed, the old worker
    // serves.
    let segv = plughost_tests::fixtures::built().faulty_segv_init.clone();
    let v = d.call("volume", "swap", json!({"driver": segv.to_str().unwrap()}));
    assert_eq!(v["error"]["kind"], "swap_failed", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("SIGSEGV"), "{v}");
    let b = backend(&mut d, "default");
    assert_eq!((&b["worker"]["pid"], &b["driver"]["generation"]), (&pid, &json!(0)));
    assert_eq!(d.ok("volume", "get", json!({"name": "kept"}))["size"], 4096);
    // A worker that dies while it loads is the load's error, not a crash to restart after: nothing
    // keeps starting workers of a refused driver behind the scenes.
    assert_eq!(b["worker"]["crashes"], 0, "{b}");
    assert_eq!(workers(d.pid()), vec![pid.as_u64().unwrap() as u32]);
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("restarting in"), "{stderr}");
}

#[test]
fn a_stalled_init_holds_up_nothing_and_a_stop_is_bounded() {
    let t = TempDir::new("iso-bounded");
    // An in-process backend whose init sleeps for a minute: the host serves the others meanwhile.
    let mut d = Daemon::start(
        &t.join("state"),
        &[
            "--volume-driver",
            "fake-volume",
            "--volume-backend",
            "slow=faulty",
            "--volume-opt",
            "slow:delay_ms=60000",
            "--volume-opt",
            "slow:delay_in=init",
            "--compute-driver",
            "fake-compute",
            "--shutdown-timeout-ms",
            "1000",
        ],
    );
    d.ok("volume", "create", json!({"name": "v", "size": 4096}));
    d.ok("compute", "spawn", json!({"name": "i", "command": "sleep"}));
    let slow = backend(&mut d, "slow");
    assert_eq!(slow["state"], "down", "{slow}");
    assert!(slow["reason"].as_str().unwrap().starts_with("starting: init running"), "{slow}");
    assert_eq!(d.err("volume", "stats", json!({"backend": "slow"})), "unavailable");
    // A graceful stop with a driver stuck in init ends (shutdown timeout 1 s + margin), not after it.
    d.signal(libc::SIGTERM);
    let (code, stderr) = d.wait();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_stop_asked_while_an_isolated_backend_is_still_starting_is_not_held_up() {
    let t = TempDir::new("iso-stop-starting");
    let state = t.join("state");
    let socket = t.join("plughost.sock");
    // The worker's first health check hangs for a minute (its call_timeout): the host is still starting.
    let child = plughost_tests::process::command(&[
        "run",
        "--state-dir",
        state.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--volume-driver",
        "faulty",
        "--volume-opt",
        "delay_ms=60000",
        "--volume-opt",
        "delay_in=health",
        "--isolate",
        "volume",
        "--compute-driver",
        "none",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    let children = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks
                    .flatten()
                    .any(|t| std::fs::read_to_string(t.path().join("children")).is_ok_and(|c| !c.trim().is_empty()))
            })
            .unwrap_or(false)
    };
    wait_for("the worker to start", children);
    std::thread::sleep(Duration::from_millis(300));
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err(), "not serving yet");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("received while starting: exiting now"), "{stderr}");
}

#[test]
fn a_call_right_after_a_crash_waits_for_the_new_worker_instead_of_failing() {
    let t = TempDir::new("iso-wait-restart");
    let mut d = Daemon::start(
        &t.join("state"),
        &[
            "--volume-driver",
            "faulty",
            "--volume-opt",
            "crash=exit",
            "--volume-opt",
            // Not stats: the host calls that on its own every periodic round, which would crash the
            // new worker under the test's feet.
            "crash_on=extend",
            "--isolate",
            "volume",
            "--compute-driver",
            "none",
        ],
    );
    for round in 0..3 {
        // The worker exits inside extend; the next call comes while it is dead or restarting.
        d.ok("volume", "create", json!({"name": format!("b{round}"), "size": 4096}));
        let grow = json!({"name": format!("b{round}"), "size": 8192});
        assert_eq!(d.err("volume", "extend", grow), "driver_crashed", "round {round}");
        let v = d.ok("volume", "create", json!({"name": format!("v{round}"), "size": 4096}));
        assert_eq!(v["status"], "available", "round {round}: {v}");
    }
    let b = backend(&mut d, "default");
    let worker = &b["worker"];
    assert_eq!((worker["crashes"].as_u64(), worker["state"].as_str()), (Some(3), Some("running")), "{b}");
}

#[test]
fn a_create_retried_after_its_worker_died_is_settled_at_once_not_refused_until_a_reconcile() {
    let t = TempDir::new("iso-settle");
    let mut d = Daemon::start_with(
        &t.join("state"),
        None,
        &[
            "--volume-driver",
            "faulty",
            "--volume-opt",
            "crash=exit",
            "--volume-opt",
            "crash_on=create",
            "--volume-opt",
            "crash_after=1",
            "--isolate",
            "volume",
            "--compute-driver",
            "none",
            // No periodic round (and so no reconcile) during the test: the retry alone must settle it.
            "--periodic-interval-ms",
            "600000",
        ],
        |_| {},
    );
    // Every second create kills its worker before the driver made anything: the outcome is unknown
    // and the intent stays (b and d).
    for (name, answer) in [("a", None), ("b", Some("driver_crashed")), ("c", None), ("d", Some("driver_crashed"))] {
        match answer {
            None => assert_eq!(d.ok("volume", "create", json!({"name": name, "size": 4096}))["status"], "available"),
            Some(kind) => assert_eq!(d.err("volume", "create", json!({"name": name, "size": 4096})), kind),
        }
    }
    // Asked for again: the driver is asked; it never made them, so the intent is dropped. A get answers
    // not_found; a create retried goes through.
    assert_eq!(d.err("volume", "get", json!({"name": "b"})), "not_found");
    let v = d.ok("volume", "create", json!({"name": "d", "size": 4096}));
    assert_eq!(v["status"], "available", "{v}");
}

#[test]
fn a_second_signal_exits_at_once() {
    let t = TempDir::new("iso-second-signal");
    let d = Daemon::start(
        &t.join("state"),
        &[
            "--volume-driver",
            "faulty",
            "--volume-opt",
            "delay_ms=60000",
            "--volume-opt",
            "delay_in=stats",
            "--compute-driver",
            "none",
            "--shutdown-timeout-ms",
            "60000",
        ],
    );
    // A request stuck in the driver for a minute; the stop would wait for it.
    let socket = d.socket.clone();
    let stuck = std::thread::spawn(move || Client::connect(&socket).call("volume", "stats", json!({})));
    std::thread::sleep(Duration::from_millis(300));
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    d.signal(libc::SIGINT);
    let (code, stderr) = d.wait();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("received again: exiting now"), "{stderr}");
    assert!(stuck.join().unwrap().is_none(), "the stuck request died with the host");
}

/// process-compute in a worker: instances are not lost with the worker. A crash (the worker is
/// killed) and a swap each bring a new worker, which re-adopts the running instances.
#[test]
fn instances_outlive_their_worker_and_are_readopted() {
    let t = TempDir::new("iso-compute");
    let mut d = Daemon::start(
        &t.join("state"),
        &["--volume-driver", "none", "--compute-driver", "process-compute", "--isolate", "compute"],
    );
    let compute = |d: &mut Daemon| {
        let status = d.ok("", "status", json!({}));
        status["services"][0]["backends"][0].clone()
    };
    let i = d.ok("compute", "spawn", json!({"name": "web", "command": "sh", "args": ["-c", "exec sleep 300"]}));
    let inst = Proc::of(i["pid"].as_u64().unwrap() as u32);
    let first = compute(&mut d)["worker"]["pid"].as_u64().unwrap() as u32;
    // The worker dies (as if it crashed): the instance runs on; the new worker finds it.
    // SAFETY: kill has no memory-safety preconditions; the pid is the test host's worker.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let mut b = Value::Null;
    wait_for("a new worker", || {
        b = compute(&mut d);
        b["worker"]["state"] == "running" && b["worker"]["pid"].as_u64() != Some(u64::from(first)) && b["state"] == "up"
    });
    assert!(inst.alive(), "the instance outlived its worker");
    let got = d.ok("compute", "get", json!({"name": "web"}));
    assert_eq!((got["status"].as_str(), got["pid"].as_u64()), (Some("running"), Some(u64::from(inst.pid))), "{got}");
    assert_eq!(got["details"]["adopted"], "true", "{got}");
    // A swap (the same driver, loaded again): a third worker, the same instance.
    d.ok("compute", "swap", json!({}));
    let got = d.ok("compute", "get", json!({"name": "web"}));
    assert_eq!((got["status"].as_str(), got["pid"].as_u64()), (Some("running"), Some(u64::from(inst.pid))), "{got}");
    d.ok("compute", "destroy", json!({"name": "web"}));
    assert!(!inst.alive());
}

#[test]
fn user_and_memory_limit_apply_or_are_refused_at_start() {
    let t = TempDir::new("iso-settings");
    let start = |extra: &str| {
        let cfg = t.join("plughost.toml");
        std::fs::write(
            &cfg,
            format!(
                "[volume]\ndriver = \"fake-volume\"\nisolation = \"process\"\n{extra}\n[compute]\ndriver = \"none\"\n"
            ),
        )
        .unwrap();
        plughost_tests::process::run(&[
            "run",
            "--state-dir",
            t.join("state").to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
    };
    for (extra, says) in [
        ("user = \"no-such-user-plughost\"", "user \"no-such-user-plughost\": no such user"),
        ("user = \"nobody\"\ngroup = \"no-such-group-plughost\"", "group \"no-such-group-plughost\""),
        ("memory_limit = \"1MiB\"", "memory_limit 1.0MiB is below the "),
    ] {
        let r = start(extra);
        assert_eq!(r.code, 1, "{extra}: {}", r.stderr);
        let line = r.stderr.lines().find(|l| l.contains(says)).unwrap_or_else(|| panic!("{extra}: {}", r.stderr));
        assert!(line.starts_with("plughost: volume backend \"default\": "), "{line}");
    }
    // Applied: the worker runs as nobody with its address space limited, and serves.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a worker as another user");
        return;
    }
    let cfg = t.join("applied.toml");
    std::fs::write(
        &cfg,
        "[volume]\ndriver = \"fake-volume\"\nisolation = \"process\"\nuser = \"nobody\"\nmemory_limit = \"1GiB\"\n[compute]\ndriver = \"none\"\n",
    )
    .unwrap();
    let mut d = Daemon::start_with(&t.join("state"), None, &["--config", cfg.to_str().unwrap()], |c| {
        c.env("PLUGHOST_TEST_SECRET", "hunter2").env("LANG", "C.UTF-8");
    });
    let pid = backend(&mut d, "default")["worker"]["pid"].as_u64().unwrap();
    // It does not inherit the host's environment beyond what running programs and logging need.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok()?.split('=').next().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .collect();
    assert!(names.contains(&"LANG".to_owned()) && !names.contains(&"PLUGHOST_TEST_SECRET".to_owned()), "{names:?}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(uid.split_whitespace().skip(1).collect::<Vec<_>>(), ["65534"; 4], "{uid}");
    assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let address = limits.lines().find(|l| l.starts_with("Max address space")).unwrap();
    assert!(address.contains(&(1u64 << 30).to_string()), "{address}");
    assert_eq!(d.ok("volume", "create", json!({"name": "v", "size": 4096}))["size"], 4096);
    // Another process of that user may signal the worker (a reason to use a dedicated user) but not
    // read its memory or its environment, which is the host's.
    for (program, arg, what) in [("head", "-c1", "environ"), ("ls", "-l", "fd")] {
        let mut peek = std::process::Command::new(program);
        peek.arg(arg).arg(format!("/proc/{pid}/{what}"));
        std::os::unix::process::CommandExt::uid(&mut peek, 65534);
        std::os::unix::process::CommandExt::gid(&mut peek, 65534);
        let out = peek.output().unwrap();
        assert!(!out.status.success(), "{what}: readable by nobody: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn a_worker_whose_driver_forked_is_noticed_dead_by_its_process_and_takes_its_group_along() {
    let t = TempDir::new("iso-fork");
    // call_timeout far above what the test waits: noticing the death must not wait for it.
    let cfg = config(&t, &isolated_faulty("f", "fork_child = true", "call_timeout = \"120s\""));
    let mut d = Daemon::start(&t.join("state"), &["--config", &cfg]);
    let b = wait_running(&mut d, "f");
    let worker = b["worker"]["pid"].as_u64().unwrap() as u32;
    // The driver's child holds every descriptor of the worker, its socket included.
    plughost_tests::procs::wait_for("the driver's child", || {
        std::fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).any(
            |pid| {
                pid != worker
                    && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|s| {
                            s.rsplit(')').next().map(|f| f.split_whitespace().nth(2) == Some(&worker.to_string()))
                        })
                        .unwrap_or(false)
            },
        )
    });
    let killed = plughost_tests::procs::Proc::of(worker);
    // SAFETY: kill with a plain pid and signal.
    unsafe {
        libc::kill(worker as i32, libc::SIGKILL);
    }
    // Noticed at once: a crash is counted, a new worker serves, and the old worker's group is gone.
    let mut b = Value::Null;
    plughost_tests::procs::wait_for("a new worker", || {
        b = backend(&mut d, "f");
        b["worker"]["state"] == "running" && b["worker"]["pid"].as_u64() != Some(u64::from(worker))
    });
    assert_eq!(b["worker"]["crashes"], 1, "{b}");
    assert!(b["worker"]["last_crash"]["reason"].as_str().unwrap().contains("SIGKILL"), "{b}");
    assert!(!killed.alive());
    plughost_tests::procs::wait_for("the driver's child to be gone", || !plughost_tests::procs::group_alive(worker));
    let v = d.call("volume", "create", json!({"name": "after", "size": 1, "backend": "f"}));
    assert_eq!(v["ok"], true, "{v}");
    // A stop takes the new worker's group along too.
    let new_worker = b["worker"]["pid"].as_u64().unwrap() as u32;
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    plughost_tests::procs::wait_for("the worker's group to be gone after the stop", || {
        !plughost_tests::procs::group_alive(new_worker)
    });
}

#[test]
fn an_isolated_driver_cannot_bloat_the_host_with_a_huge_answer() {
    let t = TempDir::new("iso-bloat");
    // A million made-up volumes in one page that ignores its limit: an answer of ~100 MB, over the
    // default 16 MiB frame limit.
    let cfg = config(&t, &isolated_faulty("f", "list_entries = 1000000, page_ignores_limit = true", ""));
    let mut d = Daemon::start(&t.join("state"), &["--config", &cfg, "--volume-driver", "fake-volume"]);
    let mut b = Value::Null;
    plughost_tests::procs::wait_for("the worker to be killed for its answer", || {
        b = backend(&mut d, "f");
        b["worker"]["crashes"].as_u64() >= Some(1)
    });
    let reason = b["worker"]["last_crash"]["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("killed by plughost: it sent a frame of") && reason.contains("(max_frame_bytes)"),
        "{reason}"
    );
    // The host stayed small and answered throughout; no made-up volume was recorded.
    let rss = rss_kib(d.pid());
    assert!(rss < 150 * 1024, "host RSS {rss} KiB");
    assert_eq!(d.ok("", "ping", json!({}))["pong"], true);
    assert_eq!(d.ok("volume", "list", json!({"backend": "f"})).as_array().unwrap().len(), 0);
}

#[test]
fn a_worker_flooding_its_stderr_cannot_fill_the_hosts_memory_or_log() {
    let t = TempDir::new("iso-stderr");
    let d = Daemon::start(
        &t.join("state"),
        &[
            "-v",
            "--volume-driver",
            "faulty",
            "--volume-opt",
            // Every health round: 4 MiB without a newline, then 200,000 short lines.
            "stderr_flood=4194304",
            "--isolate",
            "volume",
            "--compute-driver",
            "none",
        ],
    );
    let before = rss_kib(d.pid());
    let started = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(4));
    let after = rss_kib(d.pid());
    let (code, stderr) = d.stop();
    assert_eq!(code, 0);
    let worker_lines: Vec<&str> = stderr.lines().filter(|l| l.contains("volume backend \"default\" worker")).collect();
    // The span the worker's lines cover, by their own timestamps (the flood starts while the host is
    // still starting, and a busy machine reads it late), rounded up.
    let second = |l: &str| -> u64 {
        let t = &l[l.find('T').unwrap() + 1..];
        let hms: Vec<u64> = t[..8].split(':').map(|x| x.parse().unwrap()).collect();
        hms[0] * 3600 + hms[1] * 60 + hms[2]
    };
    let secs = match (worker_lines.first(), worker_lines.last()) {
        (Some(a), Some(b)) => second(b).saturating_sub(second(a)) + 2,
        _ => panic!("no worker lines at all:\n{stderr}"),
    };
    assert!(started.elapsed().as_secs() >= 4);
    assert!(worker_lines.iter().any(|l| l.contains("more bytes of this line cut")), "the long line is cut");
    assert!(worker_lines.iter().any(|l| l.contains("were not logged: too many too fast")), "the flood is summed up");
    // A burst of 200 lines, then 50 a second, and a summary at most once a second: nowhere near the
    // millions written.
    let others: Vec<&&str> = worker_lines.iter().filter(|l| !l.contains("faulty: line")).collect();
    assert!(
        worker_lines.len() as u64 <= 200 + 51 * secs + 5,
        "{} worker lines in the log ({secs}s): {others:#?}",
        worker_lines.len()
    );
    assert!(worker_lines.iter().all(|l| l.len() < 4096 + 200), "no line longer than the cap");
    assert!(after < before + 64 * 1024, "host RSS grew from {before} KiB to {after} KiB");
}

#[test]
fn a_huge_listing_is_reconciled_page_by_page_while_requests_are_served_up_to_max_records() {
    let t = TempDir::new("iso-pages");
    let cfg = config(&t, &isolated_faulty("f", "list_entries = 0", "max_records = 60000"));
    let mut d = Daemon::start(&t.join("state"), &["--config", &cfg, "--volume-driver", "fake-volume"]);
    d.ok("volume", "create", json!({"name": "mine", "size": 1, "backend": "f"}));
    let before = rss_kib(d.pid());
    // The driver now reports 100,000 made-up volumes besides its own: the reload swaps it in, and the
    // next periodic round reconciles the listing, a page at a time, while a client keeps asking.
    config(&t, &isolated_faulty("f", "list_entries = 100000", "max_records = 60000"));
    let socket = d.socket.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, slowest) = (stop.clone(), Arc::new(Mutex::new(std::time::Duration::ZERO)));
    let slowest2 = slowest.clone();
    let asker = std::thread::spawn(move || {
        let mut c = plughost_tests::process::Client::connect(&socket);
        let mut asked = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let started = std::time::Instant::now();
            let v = c.call("volume", "get", json!({"name": "mine"})).expect("the socket stays open");
            assert_eq!(v["ok"], true, "{v}");
            let took = started.elapsed();
            let mut s = slowest2.lock().unwrap();
            *s = (*s).max(took);
            asked += 1;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        asked
    });
    let r = d.ok("", "reload", json!({}));
    assert!(r.as_array().unwrap().iter().any(|e| e["backend"] == "f" && e["outcome"] == "swapped"), "{r}");
    let mut counts = Value::Null;
    plughost_tests::procs::wait_for("the paged reconcile to finish", || {
        let s = d.ok("", "status", json!({}));
        counts = s["services"][0]["last_reconcile"].clone();
        counts["adopted"].as_u64().unwrap_or(0) > 0
    });
    stop.store(true, Ordering::Relaxed);
    let asked = asker.join().unwrap();
    // Adopted up to max_records (its own volume counts), then refused and counted, and the walk stops a
    // page past max_records and every record (61,001): 62 pages, 2,001 refused, the backend's listing
    // not walked to its end (counted as skipped).
    let got = ["adopted", "refused", "skipped_backends"].map(|k| counts[k].as_u64().unwrap());
    assert_eq!(got, [59_999, 2_001, 1], "{counts}");
    let listed = d.ok("volume", "list", json!({"backend": "f"}));
    assert_eq!(listed.as_array().unwrap().len(), 60_000);
    // The socket answered throughout: a liveness bound, generous for a loaded machine, not a speed test.
    let slowest = *slowest.lock().unwrap();
    assert!(asked > 0 && slowest < std::time::Duration::from_secs(5), "{asked} asks, slowest {slowest:?}");
    let grown = rss_kib(d.pid()).saturating_sub(before);
    assert!(grown < 200 * 1024, "host RSS grew by {grown} KiB for 60,000 records");
    assert_eq!(backend(&mut d, "f")["worker"]["crashes"], 0, "no page was too large for a frame");
}
