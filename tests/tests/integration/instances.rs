//! Instances outlive the host and are never orphaned: real processes, real `kill -9`, real cgroups.

use plughost_tests::process::{Client, Daemon};
use plughost_tests::procs::{group_alive, wait_for, Proc};
use plughost_tests::TempDir;
use serde_json::{json, Value};

const COMPUTE: &[&str] = &["--volume-driver", "none", "--compute-driver", "process-compute"];

fn sleeper(d: &mut Daemon, name: &str) -> (Proc, u32) {
    let i = d.ok("compute", "spawn", json!({"name": name, "command": "sh", "args": ["-c", "exec sleep 300"]}));
    let pid = i["pid"].as_u64().unwrap() as u32;
    let pgid = i["details"]["pgid"].as_str().unwrap().parse().unwrap();
    (Proc::of(pid), pgid)
}

fn get(d: &mut Daemon, name: &str) -> Value {
    d.ok("compute", "get", json!({"name": name}))
}

/// Each listed instance: (name, status, pid).
fn listed(d: &mut Daemon) -> Vec<(String, String, Option<u64>)> {
    d.ok("compute", "list", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_owned(), i["status"].as_str().unwrap().to_owned(), i["pid"].as_u64()))
        .collect()
}

#[test]
fn five_instances_survive_a_graceful_stop_and_a_kill_9_with_their_pids() {
    let t = TempDir::new("outlive");
    let mut d = Daemon::start(t.path(), COMPUTE);
    let spawned: Vec<(String, Proc, u32)> = (0..5)
        .map(|n| {
            let name = format!("i{n}");
            let (p, pgid) = sleeper(&mut d, &name);
            (name, p, pgid)
        })
        .collect();
    let expect: Vec<(String, String, Option<u64>)> =
        spawned.iter().map(|(n, p, _)| (n.clone(), "running".to_owned(), Some(u64::from(p.pid)))).collect();

    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(spawned.iter().all(|(_, p, _)| p.alive()), "a graceful stop leaves instances running");
    let mut d = Daemon::start(t.path(), COMPUTE);
    assert_eq!(listed(&mut d), expect, "re-adopted after a graceful stop");
    let status = d.ok("", "status", json!({}));
    let reconcile = &status["services"][0]["last_reconcile"];
    assert_eq!((reconcile["records"].as_u64(), reconcile["missing"].as_u64()), (Some(5), Some(0)), "{reconcile}");

    d.kill9();
    assert!(spawned.iter().all(|(_, p, _)| p.alive()), "kill -9 of the host leaves instances running");
    let mut d = Daemon::start(t.path(), COMPUTE);
    assert_eq!(listed(&mut d), expect, "re-adopted after kill -9");
    for (name, p, _) in &spawned {
        let i = get(&mut d, name);
        assert_eq!((i["status"].as_str(), i["pid"].as_u64()), (Some("running"), Some(u64::from(p.pid))), "{i}");
        assert_eq!(i["details"]["adopted"], "true", "{i}");
    }

    // An adopted instance is not the restarted host's child: its exit is noticed, its status unknown.
    let (_, first, _) = &spawned[0];
    // SAFETY: kill has no memory-safety preconditions; the pid is the test's own instance.
    unsafe { libc::kill(first.pid as i32, libc::SIGKILL) };
    wait_for("the exit to be noticed", || get(&mut d, "i0")["status"] == "stopped");
    let i = get(&mut d, "i0");
    assert_eq!(
        (i["exit_unknown"].as_bool(), &i["exit_code"], &i["exit_signal"]),
        (Some(true), &json!(null), &json!(null)),
        "{i}"
    );

    // Stop of an adopted instance, and destroy, end each process group.
    let stopped = d.ok("compute", "stop", json!({"name": "i1"}));
    assert_eq!(stopped["status"], "stopped");
    assert!(!spawned[1].1.alive());
    for (name, p, pgid) in &spawned {
        d.ok("compute", "destroy", json!({"name": name}));
        assert!(!p.alive() && !group_alive(*pgid), "{name}: destroy left processes behind");
    }
    assert!(listed(&mut d).is_empty());
}

/// Spawns an instance whose first process starts a background child and a `setsid` grandchild, writes
/// their pids to `pids`, then exits (`leader_exits`) or stays.
fn family(d: &mut Daemon, t: &TempDir, name: &str, leader_exits: bool) -> (Vec<Proc>, u32) {
    let pids = t.join(format!("{name}.pids"));
    let tail = if leader_exits { "sleep 0.1; exit 0" } else { "exec sleep 300" };
    let script = format!(
        "sleep 300 & echo $! >> {p}; setsid sh -c 'echo $$ >> {p}; exec sleep 300' & {tail}",
        p = pids.display()
    );
    let i = d.ok("compute", "spawn", json!({"name": name, "command": "sh", "args": ["-c", script]}));
    let leader = Proc::of(i["pid"].as_u64().unwrap() as u32);
    let pgid = i["details"]["pgid"].as_str().unwrap().parse().unwrap();
    wait_for("the children's pids", || std::fs::read_to_string(&pids).map(|s| s.lines().count() == 2).unwrap_or(false));
    let mut procs: Vec<Proc> =
        std::fs::read_to_string(&pids).unwrap().lines().map(|l| Proc::of(l.trim().parse().unwrap())).collect();
    if leader_exits {
        wait_for("the leader to exit", || get(d, name)["status"] == "stopped");
    } else {
        procs.push(leader);
    }
    assert!(procs.iter().all(Proc::alive), "{name}: the family runs");
    (procs, pgid)
}

fn cgroups_in_use(d: &mut Daemon, name: &str) -> bool {
    get(d, name)["details"]["containment"] == "cgroup"
}

#[test]
fn destroy_stop_at_exit_and_kill_9_leave_no_process_behind() {
    let t = TempDir::new("contain");
    let mut d = Daemon::start(t.path(), COMPUTE);

    // 1. destroy, the first process having exited already.
    let (procs, pgid) = family(&mut d, &t, "a", true);
    assert!(cgroups_in_use(&mut d, "a"), "cgroup v2 is available on these machines");
    assert_eq!(get(&mut d, "a")["details"]["leftover_processes"], "2");
    d.ok("compute", "destroy", json!({"name": "a"}));
    assert!(procs.iter().all(|p| !p.alive()) && !group_alive(pgid), "destroy left processes behind");

    // 2. host stop with stop_instances_on_exit.
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    let mut args = COMPUTE.to_vec();
    args.extend(["--stop-instances-on-exit", "compute"]);
    let mut d = Daemon::start(t.path(), &args);
    let (first, _) = family(&mut d, &t, "b", true);
    let (second, _) = family(&mut d, &t, "c", false);
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(first.iter().chain(&second).all(|p| !p.alive()), "stop_instances_on_exit left processes behind");
    let mut d = Daemon::start(t.path(), COMPUTE);
    assert!(listed(&mut d).iter().all(|(_, status, _)| status == "stopped"), "{:?}", listed(&mut d));
    d.ok("compute", "destroy", json!({"name": "b"}));
    d.ok("compute", "destroy", json!({"name": "c"}));

    // 3. kill -9 of the host, restart, destroy.
    let (procs, pgid) = family(&mut d, &t, "e", false);
    d.kill9();
    assert!(procs.iter().all(Proc::alive));
    let mut d = Daemon::start(t.path(), COMPUTE);
    d.ok("compute", "destroy", json!({"name": "e"}));
    assert!(procs.iter().all(|p| !p.alive()) && !group_alive(pgid), "destroy after a restart left processes");
}

#[test]
fn a_slow_stop_holds_up_no_other_instance() {
    let t = TempDir::new("slow-stop");
    let mut args = COMPUTE.to_vec();
    args.extend(["--compute-opt", "stop_timeout_ms=600000"]);
    let mut d = Daemon::start(t.path(), &args);
    let stubborn = d.ok(
        "compute",
        "spawn",
        json!({"name": "stubborn", "command": "sh", "args": ["-c", "trap '' TERM; exec sleep 300"]}),
    );
    let stubborn = Proc::of(stubborn["pid"].as_u64().unwrap() as u32);
    sleeper(&mut d, "other");
    let socket = d.socket.clone();
    let stopping =
        std::thread::spawn(move || Client::connect(&socket).call("compute", "stop", json!({"name": "stubborn"})));
    wait_for("the stop to begin", || {
        listed(&mut d).iter().any(|(n, status, _)| n == "stubborn" && status == "stopping")
    });
    // The other instance answers while the stop waits (it ignores SIGTERM and has 10 minutes).
    assert_eq!(get(&mut d, "other")["status"], "running");
    let spawned = d.ok("compute", "spawn", json!({"name": "third", "command": "sleep", "args": ["300"]}));
    assert_eq!(spawned["status"], "running");
    assert!(!stopping.is_finished(), "the slow stop is still waiting");
    assert!(stubborn.alive());
    // Let it end: the stop then answers with how it ended.
    // SAFETY: kill has no memory-safety preconditions; the pid is the test's own instance.
    unsafe { libc::kill(stubborn.pid as i32, libc::SIGKILL) };
    let answer = stopping.join().unwrap().unwrap();
    assert_eq!(answer["result"]["status"], "stopped", "{answer}");
    assert_eq!(answer["result"]["exit_signal"], libc::SIGKILL, "{answer}");
    for name in ["stubborn", "other", "third"] {
        d.ok("compute", "destroy", json!({"name": name}));
    }
}

/// A swapped-in driver (here the same library, reloaded) re-adopts the running instances; they are
/// still this host's children, so their exit status is known.
#[test]
fn a_swapped_driver_readopts_running_instances() {
    let t = TempDir::new("swap-adopt");
    let mut d = Daemon::start(t.path(), COMPUTE);
    let (p, pgid) = sleeper(&mut d, "kept");
    let swapped = d.ok("compute", "swap", json!({}));
    assert_eq!(swapped["generation"], 1, "{swapped}");
    let i = get(&mut d, "kept");
    assert_eq!((i["status"].as_str(), i["pid"].as_u64()), (Some("running"), Some(u64::from(p.pid))), "{i}");
    assert!(p.alive(), "the old driver's cleanup left it running");
    let stopped = d.ok("compute", "stop", json!({"name": "kept"}));
    assert_eq!(
        (stopped["exit_signal"].as_i64(), stopped["exit_unknown"].as_bool()),
        (Some(15), Some(false)),
        "{stopped}"
    );
    assert!(!p.alive() && !group_alive(pgid));
    d.ok("compute", "destroy", json!({"name": "kept"}));
}
