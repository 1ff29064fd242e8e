//! An operator's day one: health checks with exit codes a monitoring system can use.

use std::time::{Duration, Instant};

use plughost_tests::process::{run, Daemon};
use plughost_tests::TempDir;
use serde_json::{json, Value};

fn health(socket: &std::path::Path) -> (i32, String) {
    let r = run(&["ctl", "--socket", socket.to_str().unwrap(), "health"]);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    (r.code, r.stdout)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ctl_health_exits_0_up_1_degraded_2_down_or_unreachable() {
    let t = TempDir::new("health");
    // No host: down.
    let (code, out) = health(&t.join("nobody-here.sock"));
    assert_eq!(code, 2);
    assert!(out.starts_with("DOWN - cannot connect to"), "{out}");

    // Every backend up.
    let root = t.join("volumes");
    let root_opt = format!("root={}", root.display());
    let mut d = Daemon::start(
        &t.join("state"),
        &[
            "--volume-driver",
            "file-volume",
            "--volume-opt",
            &root_opt,
            "--volume-backend",
            "spare=fake-volume",
            "--compute-driver",
            "none",
        ],
    );
    let (code, out) = health(&d.socket);
    assert_eq!((code, out.as_str()), (0, "OK - 2 of 2 backend(s) up in 1 service(s)\n"));

    // The file-volume root moved away: that backend is down, the service is degraded.
    std::fs::rename(&root, t.join("moved")).unwrap();
    wait_for("the health check to notice", || health(&d.socket).0 == 1);
    let (_, out) = health(&d.socket);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "DEGRADED - 1 of 2 backend(s) up in 1 service(s); 1 problem(s)", "{out}");
    assert!(lines[1].starts_with("volume backend \"default\" down: "), "{out}");
    let r = run(&["ctl", "--socket", d.socket.to_str().unwrap(), "health", "--json"]);
    assert_eq!(r.code, 1);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["state"], "degraded", "{v}");
    assert_eq!(v["problems"].as_array().unwrap().len(), 1, "{v}");
    d.ok("volume", "create", json!({"name": "still", "size": 1, "backend": "spare"}));
    drop(d);

    // A service with no backend up: down.
    let d = Daemon::start(
        &t.join("state2"),
        &["--volume-driver", "faulty", "--volume-opt", "unhealthy=true", "--compute-driver", "none"],
    );
    wait_for("the backend to be down", || health(&d.socket).0 == 2);
    let (_, out) = health(&d.socket);
    assert!(out.starts_with("DOWN - 0 of 1 backend(s) up"), "{out}");
    assert!(out.contains("volume backend \"default\" down: driver unhealthy"), "{out}");
}
