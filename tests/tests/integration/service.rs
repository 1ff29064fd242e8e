//! `plughost run` as a real process: real files, real processes, the real socket.

use std::path::Path;
use std::time::{Duration, Instant};

use plughost_tests::process::{run, Daemon};
use plughost_tests::{driver, TempDir};
use serde_json::json;

fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn volume_is_a_sparse_file_of_the_right_size_and_survives_a_restart() {
    let t = TempDir::new("vol");
    let mut d = Daemon::start(t.path(), &["--volume-driver", "file-volume", "--compute-driver", "none"]);
    let v = d.ok("volume", "create", json!({"name": "v1", "size": "10MiB"}));
    assert_eq!(v["size"], 10 << 20);
    assert_eq!(v["status"], "available");
    let file = t.join("volumes/default/v1.vol");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 10 << 20);
    assert_eq!(d.ok("volume", "extend", json!({"name": "v1", "size": "12MiB"}))["size"], 12 << 20);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 12 << 20);
    let s = d.ok("volume", "snapshot", json!({"name": "v1", "snapshot": "v1-snap"}));
    assert_eq!(s["source"], "v1");
    assert!(t.join("volumes/default/v1-snap.vol").exists());
    let id = v["id"].clone();
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    assert!(!t.join("plughost.sock").exists(), "socket removed on SIGTERM");

    let mut d = Daemon::start(t.path(), &["--volume-driver", "file-volume", "--compute-driver", "none"]);
    let list = d.ok("volume", "list", json!({}));
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["v1", "v1-snap"]);
    assert_eq!(d.ok("volume", "get", json!({"name": "v1"}))["id"], id, "records survive a restart");
    d.ok("volume", "delete", json!({"name": "v1"}));
    assert!(!file.exists());
    assert_eq!(d.err("volume", "get", json!({"name": "v1"})), "not_found");
}

#[test]
fn spawned_instance_has_a_live_pid_that_is_gone_after_destroy() {
    let t = TempDir::new("compute");
    let mut d = Daemon::start(t.path(), &["--volume-driver", "none", "--compute-driver", "process-compute"]);
    let i = d.ok(
        "compute",
        "spawn",
        json!({"name": "sleeper", "command": "sh", "args": ["-c", "echo hello $GREETING; exec sleep 60"], "env": {"GREETING": "world"}}),
    );
    let pid = i["pid"].as_u64().unwrap();
    assert!(alive(pid), "instance pid {pid} is alive");
    assert_eq!(d.ok("compute", "get", json!({"name": "sleeper"}))["status"], "running");
    // The output reaches the log before the stop below (which could otherwise come before the echo).
    let log_path = t.join("instances/default/sleeper.stdout");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("hello world") {
        assert!(Instant::now() < deadline, "the instance never wrote its greeting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopped = d.ok("compute", "stop", json!({"name": "sleeper"}));
    assert_eq!(stopped["status"], "stopped");
    assert!(!alive(pid));
    let again = d.ok("compute", "start", json!({"name": "sleeper"}));
    let pid2 = again["pid"].as_u64().unwrap();
    assert!(alive(pid2) && pid2 != pid);
    d.ok("compute", "destroy", json!({"name": "sleeper"}));
    assert!(!alive(pid2), "destroy ended the process group");
    assert_eq!(d.err("compute", "get", json!({"name": "sleeper"})), "not_found");

    // An instance that exits on its own is reported stopped with its exit status by the periodic sync.
    d.ok("compute", "spawn", json!({"name": "quick", "command": "sh", "args": ["-c", "exit 7"]}));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let i = d.ok("compute", "list", json!({}))[0].clone();
        if i["status"] == "stopped" {
            assert_eq!(i["exit_code"], 7);
            break;
        }
        assert!(Instant::now() < deadline, "{i}");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.ok("compute", "destroy", json!({"name": "quick"}));
    let (code, _) = d.stop();
    assert_eq!(code, 0);
}

#[test]
fn documented_errors_and_a_connection_that_survives_them() {
    let t = TempDir::new("errors");
    let mut d = Daemon::start(t.path(), &["--volume-driver", "fake-volume", "--compute-driver", "fake-compute"]);
    let bad: serde_json::Value = serde_json::from_str(&d.raw("this is not json")).unwrap();
    assert_eq!(bad["ok"], false);
    assert_eq!(bad["error"]["kind"], "invalid_request");
    assert_eq!(d.err("volume", "create", json!({"name": "../etc", "size": "1MiB"})), "invalid_argument");
    assert_eq!(d.err("volume", "create", json!({"name": "v", "size": "lots"})), "invalid_argument");
    assert_eq!(d.err("volume", "create", json!({"name": "v", "size": "1MiB", "backend": "nope"})), "not_found");
    assert_eq!(d.err("volume", "frobnicate", json!({})), "invalid_request");
    assert_eq!(d.err("storage", "list", json!({})), "unknown_service");
    d.ok("volume", "create", json!({"name": "v", "size": 1024}));
    assert_eq!(d.err("volume", "create", json!({"name": "v", "size": 1024})), "already_exists");
    // Still the same connection, still usable.
    assert_eq!(d.ok("", "ping", json!({}))["pong"], true);
}

#[test]
fn many_clients_at_once() {
    let t = TempDir::new("clients");
    let d = Daemon::start(t.path(), &["--volume-driver", "fake-volume", "--compute-driver", "none"]);
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..8)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                for i in 0..25 {
                    let req = json!({"id": i, "service": "volume", "op": "create", "args": {"name": format!("c{c}-{i}"), "size": 1}});
                    writeln!(w, "{req}").unwrap();
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    assert_eq!((v["id"].as_u64(), v["ok"].as_bool()), (Some(i), Some(true)), "{v}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut d = d;
    assert_eq!(d.ok("volume", "list", json!({})).as_array().unwrap().len(), 200);
}

#[test]
fn two_backends_of_one_kind_serve_at_once() {
    let t = TempDir::new("backends");
    let mut d = Daemon::start(
        t.path(),
        &[
            "--volume-driver",
            "file-volume",
            "--volume-backend",
            "mem=fake-volume",
            "--volume-opt",
            "mem:capacity=1MiB",
            "--compute-driver",
            "none",
        ],
    );
    d.ok("volume", "create", json!({"name": "on-disk", "size": "1MiB"}));
    d.ok("volume", "create", json!({"name": "in-mem", "size": "512KiB", "backend": "mem"}));
    assert_eq!(d.err("volume", "create", json!({"name": "too-big", "size": "2MiB", "backend": "mem"})), "no_capacity");
    assert!(t.join("volumes/default/on-disk.vol").exists());
    assert!(!t.join("volumes/default/in-mem.vol").exists());
    let list = d.ok("volume", "list", json!({"backend": "mem"}));
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["backend"], "mem");
    let status = d.ok("", "status", json!({}));
    let backends = status["services"][0]["backends"].as_array().unwrap().clone();
    let names: Vec<&str> = backends.iter().map(|b| b["driver"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["file-volume", "fake-volume"]);
    assert!(backends[0]["driver"]["digest"].as_str().unwrap().starts_with("blake3:"));
    assert_eq!(backends[1]["options"]["capacity"], "1048576");
    assert!(backends[0]["calls"]["create"]["count"].as_u64().unwrap() >= 1);
}

#[test]
fn a_driver_that_fails_init_makes_its_service_down_while_the_other_serves() {
    let t = TempDir::new("down");
    let mut d = Daemon::start(
        t.path(),
        &[
            "--volume-driver",
            driver("faulty").to_str().unwrap(),
            "--volume-opt",
            "fail_init=true",
            "--volume-opt",
            "password=hunter2",
            "--compute-driver",
            "fake-compute",
        ],
    );
    let status = d.ok("", "status", json!({}));
    let text = status.to_string();
    assert!(!text.contains("hunter2"), "secret shown in status: {text}");
    let svc = |name: &str| status["services"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
    assert_eq!(svc("volume")["state"], "down", "{status}");
    assert!(svc("volume")["reason"].as_str().unwrap().contains("init failed"));
    assert_eq!(svc("compute")["state"], "up");
    assert_eq!(d.err("volume", "create", json!({"name": "v", "size": 1})), "unavailable");
    d.ok("compute", "spawn", json!({"name": "i", "command": "true"}));
    let r = run(&["ctl", "--socket", d.socket.to_str().unwrap(), "status"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("service volume: down"), "{}", r.stdout);
}

#[test]
fn unhealthy_driver_is_reported_down_by_the_periodic_check() {
    let t = TempDir::new("unhealthy");
    let mut d = Daemon::start(
        t.path(),
        &["--volume-driver", "faulty", "--volume-opt", "unhealthy=true", "--compute-driver", "none"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.ok("", "status", json!({}))["services"][0]["state"] != "down" {
        assert!(Instant::now() < deadline, "service never reported down");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn start_errors_are_all_reported_and_nothing_is_served() {
    let t = TempDir::new("starterr");
    let r = run(&[
        "run",
        "--state-dir",
        t.path().to_str().unwrap(),
        "--volume-driver",
        "faulty",
        "--volume-opt",
        "bogus=1",
        "--volume-opt",
        "delay_ms=soon",
        "--compute-driver",
        driver("fake-volume").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("driver \"faulty\": 2 invalid options"), "{}", r.stderr);
    assert!(r.stderr.contains("option \"bogus\": unknown option"), "{}", r.stderr);
    assert!(r.stderr.contains("option \"delay_ms\": expected an integer"), "{}", r.stderr);
    assert!(r.stderr.contains("is a volume driver, expected a compute driver"), "{}", r.stderr);
    assert!(!t.join("plughost.sock").exists());

    let r = run(&[
        "run",
        "--state-dir",
        t.path().to_str().unwrap(),
        "--volume-driver",
        "faulty",
        "--volume-opt",
        "panic_new=true",
        "--compute-driver",
        "none",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("constructor panicked"), "{}", r.stderr);

    let crash = plughost_tests::fixtures::crash_on_load();
    let r = run(&["run", "--state-dir", t.path().to_str().unwrap(), "--volume-driver", crash.to_str().unwrap()]);
    assert_eq!(r.code, 1, "a library that would crash the host is refused: {r:?}");
    assert!(r.stderr.contains("killed a probe process"), "{}", r.stderr);

    let r = run(&["run", "--state-dir", t.path().to_str().unwrap(), "--volume-driver", "no-such-driver"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("driver \"no-such-driver\" not found: no libno_such_driver.so in"), "{}", r.stderr);
}

#[test]
fn config_file_with_backends_and_errors_with_line_and_column() {
    let t = TempDir::new("config");
    let cfg = t.join("plughost.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[volume]\ndriver = \"fake-volume\"\ndefault_backend = \"b\"\n[[volume.backends]]\nname = \"b\"\ndriver = \"faulty\"\noptions = {{ delay_ms = 1 }}\n[compute]\ndriver = \"none\"\n",
            t.join("state").display().to_string()
        ),
    )
    .unwrap();
    let d = Daemon::start(&t.join("state"), &["--config", cfg.to_str().unwrap()]);
    let mut d = d;
    let v = d.ok("volume", "create", json!({"name": "x", "size": 1}));
    assert_eq!(v["backend"], "b");
    let status = d.ok("", "status", json!({}));
    assert_eq!(status["services"][0]["backends"][1]["options"]["delay_ms"], "1");
    drop(d);

    std::fs::write(&cfg, "[volume]\ndriver = \"fake-volume\"\n\nbogus_key = 3\n").unwrap();
    let r = run(&["run", "--config", cfg.to_str().unwrap(), "--state-dir", t.path().to_str().unwrap()]);
    assert_eq!(r.code, 1);
    let expected = format!("plughost: config \"{}\": line 4, column 1: unknown field", cfg.display());
    assert!(r.stderr.starts_with(&expected), "{}", r.stderr);
}

#[test]
fn ctl_mirrors_the_protocol() {
    let t = TempDir::new("ctl");
    let d = Daemon::start(t.path(), &["--volume-driver", "file-volume", "--compute-driver", "process-compute"]);
    let sock = d.socket.to_str().unwrap().to_owned();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", sock.as_str()];
        all.extend_from_slice(args);
        run(&all)
    };
    let r = ctl(&["volume", "create", "v1", "--size", "4MiB"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::metadata(t.join("volumes/default/v1.vol")).unwrap().len(), 4 << 20);
    let r = ctl(&["volume", "list"]);
    assert!(r.stdout.lines().any(|l| l.starts_with("v1 ") && l.contains("4.0MiB")), "{}", r.stdout);
    let r = ctl(&["--json", "volume", "get", "v1"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["result"]["size"], 4 << 20);
    let r = ctl(&["volume", "get", "missing"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("plughost: not_found: volume \"missing\" not found"), "{}", r.stderr);
    let r = ctl(&["compute", "spawn", "s", "--env", "X=1", "--", "sleep", "30"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = ctl(&["--json", "compute", "get", "s"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(alive(v["result"]["pid"].as_u64().unwrap()));
    assert_eq!(ctl(&["compute", "destroy", "s"]).code, 0);
    let gone = run(&["ctl", "--socket", t.join("nope.sock").to_str().unwrap(), "status"]);
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.starts_with("plughost: cannot connect to"), "{}", gone.stderr);
    let (code, _) = d.stop();
    assert_eq!(code, 0);
    assert!(!Path::new(&sock).exists());
}

#[test]
fn config_sample_covers_every_option() {
    let r = run(&["config", "sample", "faulty"]);
    assert_eq!(r.code, 0, "{r:?}");
    for o in ["fail_new", "panic_in", "delay_ms", "password"] {
        assert!(r.stdout.contains(&format!("{o} = ")), "{o} missing:\n{}", r.stdout);
    }
    assert!(r.stdout.contains("secret: never logged or shown"));
}

#[test]
fn revert_restores_a_volume_file_to_its_snapshot() {
    use std::os::unix::fs::FileExt;
    let t = TempDir::new("revert");
    let d = Daemon::start(t.path(), &["--volume-driver", "file-volume", "--compute-driver", "none"]);
    let sock = d.socket.to_str().unwrap().to_owned();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", sock.as_str()];
        all.extend_from_slice(args);
        run(&all)
    };
    assert_eq!(ctl(&["volume", "create", "db", "--size", "4MiB"]).code, 0);
    let file = t.join("volumes/default/db.vol");
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(b"before", 1 << 20).unwrap();
    assert_eq!(ctl(&["volume", "snapshot", "db", "db-snap"]).code, 0);
    f.write_all_at(b"after!", 1 << 20).unwrap();
    assert_eq!(ctl(&["volume", "extend", "db", "--size", "8MiB"]).code, 0);
    let r = ctl(&["--json", "volume", "revert", "db", "db-snap"]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!((v["result"]["size"].clone(), v["result"]["status"].clone()), (json!(4 << 20), json!("available")));
    let mut back = [0u8; 6];
    std::fs::File::open(&file).unwrap().read_exact_at(&mut back, 1 << 20).unwrap();
    assert_eq!(&back, b"before");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 4 << 20);
    let r = ctl(&["volume", "revert", "db-snap", "db"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("invalid_argument: volume \"db\" is not a snapshot of \"db-snap\""), "{}", r.stderr);
}
