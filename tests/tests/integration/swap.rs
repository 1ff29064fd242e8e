//! Live driver swaps on a real `plughost run`: under load, on failure, from rebuilt files, on SIGHUP.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plughost_tests::process::{run, Daemon};
use plughost_tests::{driver, fixtures, TempDir};
use serde_json::{json, Value};

fn digest_of(path: &Path) -> String {
    let r = run(&["inspect", "--json", path.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    v[0]["digest"].as_str().unwrap().to_owned()
}

fn backend_status(d: &mut Daemon, service: &str, backend: &str) -> Value {
    let s = d.ok("", "status", json!({}));
    let svc = s["services"].as_array().unwrap().iter().find(|x| x["name"] == service).unwrap().clone();
    svc["backends"].as_array().unwrap().iter().find(|b| b["name"] == backend).unwrap().clone()
}

#[test]
fn two_hundred_swaps_under_concurrent_load_lose_no_request() {
    let a = driver("file-volume");
    let b = fixtures::built().file_volume_b.clone();
    let (digest_a, digest_b) = (digest_of(&a), digest_of(&b));
    assert_ne!(digest_a, digest_b);
    let t = TempDir::new("swap-load");
    let mut d = Daemon::start(t.path(), &["--volume-driver", a.to_str().unwrap(), "--compute-driver", "none"]);
    let socket = d.socket.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let kept = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (socket, stop, requests, failures, kept) =
                (socket.clone(), stop.clone(), requests.clone(), failures.clone(), kept.clone());
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                let mut ask = |op: &str, args: Value| {
                    let req = json!({"id": 1, "service": "volume", "op": op, "args": args});
                    writeln!(w, "{req}").unwrap();
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    requests.fetch_add(1, Ordering::Relaxed);
                    let v: Value = serde_json::from_str(&line).unwrap();
                    if v["ok"] != true {
                        failures.lock().unwrap().push(format!("{op} {line}"));
                    }
                    v
                };
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("c{c}-{i}");
                    ask("create", json!({"name": name, "size": "64KiB"}));
                    ask("get", json!({"name": name}));
                    if i.is_multiple_of(2) {
                        ask("delete", json!({"name": name}));
                    } else {
                        kept.lock().unwrap().insert(name);
                    }
                    if i.is_multiple_of(8) {
                        ask("list", json!({}));
                    }
                    i += 1;
                }
            })
        })
        .collect();
    // Let the clients get going, then swap back and forth.
    while requests.load(Ordering::Relaxed) < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = requests.load(Ordering::Relaxed);
    // At least 200 swaps, and on until the clients made at least 200 requests meanwhile (bounded).
    let mut k = 0u64;
    while k < 200 || (requests.load(Ordering::Relaxed) - before < 200 && k < 5000) {
        let (path, digest) = if k.is_multiple_of(2) { (&b, &digest_b) } else { (&a, &digest_a) };
        let r = d.ok("volume", "swap", json!({"driver": path.to_str().unwrap()}));
        assert_eq!(r["generation"], k + 1, "{r}");
        assert_eq!(r["new"]["digest"], digest.as_str(), "{r}");
        if k % 50 == 49 {
            let st = backend_status(&mut d, "volume", "default");
            assert_eq!(st["driver"]["digest"], digest.as_str());
            assert_eq!(st["driver"]["generation"], k + 1);
        }
        k += 1;
    }
    let during = requests.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} failed requests, first: {:?}", failures.len(), failures.first());
    assert!(during >= 200, "clients made only {during} requests during the swaps");
    let listed: BTreeSet<String> = d
        .ok("volume", "list", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    let kept = kept.lock().unwrap();
    assert_eq!(&listed, &*kept, "every volume created and not deleted is still there");
    for name in kept.iter() {
        assert!(t.join(format!("volumes/default/{name}.vol")).exists(), "{name}");
    }
    let status = d.ok("", "status", json!({}));
    assert_eq!(status["libraries"]["retired"], 1, "{}", status["libraries"]);
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn failed_swaps_leave_the_old_driver_serving() {
    let t = TempDir::new("swap-fail");
    let text = t.join("libtext.so");
    std::fs::write(&text, "not a library").unwrap();
    let mut d = Daemon::start(
        t.path(),
        &[
            "--volume-driver",
            "file-volume",
            "--volume-opt",
            "max_volume_size=1GiB",
            "--volume-backend",
            "f=faulty",
            "--compute-driver",
            "none",
            // Fixtures live outside the driver directories.
            "--allow-swap-paths",
        ],
    );
    d.ok("volume", "create", json!({"name": "before", "size": "1MiB"}));
    let digest = backend_status(&mut d, "volume", "default")["driver"]["digest"].clone();
    let attempts: [(&str, String, &str); 6] = [
        ("default", fixtures::crash_on_load().display().to_string(), "killed a probe process"),
        ("default", text.display().to_string(), "not an ELF shared object"),
        ("default", t.join("libmissing.so").display().to_string(), "no such file"),
        ("default", driver("fake-compute").display().to_string(), "is a compute driver, expected a volume driver"),
        ("default", driver("fake-volume").display().to_string(), "option \"max_volume_size\": unknown option"),
        ("f", fixtures::built().faulty_panics.display().to_string(), "constructor panicked"),
    ];
    for (backend, path, why) in attempts {
        let v = d.call("volume", "swap", json!({"backend": backend, "driver": path}));
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["error"]["kind"], "swap_failed", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(why), "expected {why:?} in {msg:?}");
        assert!(!msg.contains('\n'));
        let st = backend_status(&mut d, "volume", backend);
        assert_eq!(st["driver"]["generation"], 0, "{st}");
        assert_eq!(st["state"], "up");
    }
    assert_eq!(backend_status(&mut d, "volume", "default")["driver"]["digest"], digest);
    assert_eq!(d.ok("volume", "get", json!({"name": "before"}))["size"], 1 << 20);
    d.ok("volume", "create", json!({"name": "after", "size": "1MiB"}));
    d.ok("volume", "create", json!({"name": "on-f", "size": 1, "backend": "f"}));
    // After all those failures, a plain reload of the same file and options works.
    let v = d.call("volume", "swap", json!({"backend": "f", "driver": driver("faulty").to_str().unwrap()}));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(backend_status(&mut d, "volume", "f")["driver"]["generation"], 1);
    let (code, _) = d.stop();
    assert_eq!(code, 0);
}

#[test]
fn rebuilt_file_at_the_configured_path_really_loads_and_overwriting_in_place_is_harmless() {
    let t = TempDir::new("swap-rebuild");
    let configured = t.join("libvol.so");
    std::fs::copy(driver("file-volume"), &configured).unwrap();
    let mut d = Daemon::start(t.path(), &["--volume-driver", configured.to_str().unwrap(), "--compute-driver", "none"]);
    d.ok("volume", "create", json!({"name": "v", "size": "1MiB"}));
    let old = backend_status(&mut d, "volume", "default");
    assert_eq!(old["driver"]["version"], "1.0.0");

    // "cargo build" replaces the file: a new inode at the same path.
    let staged = t.join("libvol.so.new");
    std::fs::copy(&fixtures::built().file_volume_b, &staged).unwrap();
    std::fs::rename(&staged, &configured).unwrap();
    let r = d.ok("volume", "swap", json!({}));
    assert_eq!(r["new"]["version"], "1.0.1-b", "new code runs: {r}");
    assert_ne!(r["new"]["digest"], old["driver"]["digest"]);
    assert_eq!(d.ok("volume", "get", json!({"name": "v"}))["size"], 1 << 20);

    // Overwrite the loaded file in place (same inode). The host runs a private copy: nothing crashes.
    std::fs::write(&configured, std::fs::read(driver("file-volume")).unwrap()).unwrap();
    for i in 0..20 {
        d.ok("volume", "create", json!({"name": format!("w{i}"), "size": 4096}));
    }
    let r = d.ok("volume", "swap", json!({}));
    assert_eq!(r["new"]["version"], "1.0.0");
    assert_eq!(r["new"]["digest"], old["driver"]["digest"]);
    assert_eq!(d.ok("volume", "list", json!({})).as_array().unwrap().len(), 21);
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

fn write_config(path: &Path, state: &Path, default_driver: &Path) {
    std::fs::write(
        path,
        format!(
            "state_dir = {:?}\n[volume]\ndriver = {:?}\n[[volume.backends]]\nname = \"mem\"\ndriver = \"fake-volume\"\n[compute]\ndriver = \"none\"\n",
            state.display().to_string(),
            default_driver.display().to_string()
        ),
    )
    .unwrap();
}

#[test]
fn sighup_swaps_changed_backends_only_and_ignores_an_invalid_config() {
    let t = TempDir::new("sighup");
    let state = t.join("state");
    let cfg = t.join("plughost.toml");
    let a = driver("file-volume");
    let b = fixtures::built().file_volume_b.clone();
    write_config(&cfg, &state, &a);
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    d.ok("volume", "create", json!({"name": "kept", "size": 4096}));
    d.ok("volume", "create", json!({"name": "mem-vol", "size": 4096, "backend": "mem"}));

    // Unchanged config: nothing is swapped.
    let r = d.ok("", "reload", json!({}));
    assert!(r.as_array().unwrap().iter().all(|o| o["outcome"] == "unchanged"), "{r}");

    // Changed driver for `default`, `mem` unchanged.
    write_config(&cfg, &state, &b);
    signal(d.pid(), libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend_status(&mut d, "volume", "default")["driver"]["generation"] != 1 {
        assert!(Instant::now() < deadline, "SIGHUP did not swap the changed backend");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(backend_status(&mut d, "volume", "default")["driver"]["version"], "1.0.1-b");
    assert_eq!(backend_status(&mut d, "volume", "mem")["driver"]["generation"], 0);
    assert_eq!(d.ok("volume", "get", json!({"name": "mem-vol", "backend": "mem"}))["backend"], "mem");
    assert_eq!(d.ok("volume", "get", json!({"name": "kept"}))["size"], 4096);

    // An invalid config changes nothing, and says why.
    std::fs::write(&cfg, "[volume\ndriver = 3\n").unwrap();
    signal(d.pid(), libc::SIGHUP);
    let v = d.call("", "reload", json!({}));
    assert_eq!(v["error"]["kind"], "invalid_config", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("line 1"), "{v}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(backend_status(&mut d, "volume", "default")["driver"]["generation"], 1);
    assert_eq!(backend_status(&mut d, "volume", "mem")["driver"]["generation"], 0);
    let (code, stderr) = d.stop();
    assert_eq!(code, 0);
    assert!(stderr.contains("reload: configuration rejected, nothing changed"), "{stderr}");
}

#[test]
fn a_new_driver_whose_init_fails_is_refused_and_the_old_keeps_serving() {
    let t = TempDir::new("swap-init");
    let state = t.join("state");
    let cfg = t.join("plughost.toml");
    let write = |fail_init: bool| {
        std::fs::write(
            &cfg,
            format!(
                "state_dir = {:?}\n[volume]\ndriver = \"faulty\"\noptions = {{ fail_init = {fail_init} }}\n[compute]\ndriver = \"none\"\n",
                state.display().to_string()
            ),
        )
        .unwrap()
    };
    write(false);
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    d.ok("volume", "create", json!({"name": "v", "size": 1}));
    write(true);
    let r = d.ok("", "reload", json!({}));
    assert_eq!(r[0]["outcome"], "failed", "{r}");
    assert!(r[0]["error"].as_str().unwrap().contains("init failed as asked"), "{r}");
    let st = backend_status(&mut d, "volume", "default");
    assert_eq!((st["driver"]["generation"].clone(), st["state"].clone()), (json!(0), json!("up")));
    assert_eq!(d.ok("volume", "get", json!({"name": "v"}))["name"], "v");
}

#[test]
fn a_swap_with_a_digest_loads_only_that_content_and_a_digest_alone_goes_back() {
    let a = driver("file-volume");
    let b = fixtures::built().file_volume_b.clone();
    let (digest_a, digest_b) = (digest_of(&a), digest_of(&b));
    let t = TempDir::new("swap-digest");
    let mut d = Daemon::start(t.path(), &["--volume-driver", a.to_str().unwrap(), "--compute-driver", "none"]);
    let (b_path, socket) = (b.to_str().unwrap(), d.socket.to_str().unwrap().to_owned());
    let mapped = |d: &mut Daemon| d.ok("", "status", json!({}))["libraries"]["mapped"].as_u64().unwrap();
    let before = mapped(&mut d);

    // Another content than the one named: refused before anything of it is loaded.
    let v = d.call("volume", "swap", json!({"driver": b_path, "digest": digest_a}));
    assert_eq!(v["error"]["kind"], "untrusted_driver", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&digest_a) && msg.contains(&digest_b) && msg.contains(b_path), "{msg}");
    assert_eq!(mapped(&mut d), before, "nothing of the refused file was loaded");
    assert_eq!(d.err("volume", "swap", json!({"driver": b_path, "digest": "blake3:xyz"})), "invalid_argument");

    // A dry run says what would load; nothing changes and nothing is audited.
    let r = run(&["ctl", "--socket", &socket, "swap", "volume", b_path, "--digest", &digest_b, "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains(&format!("would load {b_path}")) && r.stdout.contains(&digest_b), "{}", r.stdout);
    assert_eq!(backend_status(&mut d, "volume", "default")["driver"]["generation"], 0);
    assert_eq!(mapped(&mut d), before);

    // The content named: swapped, and the backend's pin is untouched.
    let r = run(&["ctl", "--socket", &socket, "swap", "volume", b_path, "--digest", &digest_b]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let st = backend_status(&mut d, "volume", "default");
    assert_eq!((st["driver"]["digest"].as_str(), &st["pinned"]), (Some(digest_b.as_str()), &Value::Null), "{st}");
    // A digest alone: back to the driver of that content the backend ran (configured by PATH).
    let r = d.ok("volume", "swap", json!({"digest": digest_a}));
    assert_eq!((r["new"]["digest"].as_str(), r["generation"].as_u64()), (Some(digest_a.as_str()), Some(2)), "{r}");
    let r = d.ok("volume", "swap", json!({"digest": digest_b, "rollout": "r-1"}));
    assert_eq!(r["new"]["digest"], digest_b.as_str(), "{r}");
    // A content the backend never ran, with no driver named: the configured file is checked and refused.
    let never = format!("blake3:{}", "0".repeat(64));
    assert_eq!(d.err("volume", "swap", json!({"digest": never})), "untrusted_driver");
    assert_eq!(backend_status(&mut d, "volume", "default")["driver"]["digest"], digest_b.as_str());
    let audit = d.ok("", "audit", json!({}));
    let swaps: Vec<&Value> = audit.as_array().unwrap().iter().filter(|e| e["op"] == "swap").collect();
    assert!(swaps.iter().all(|e| e["args"]["dry_run"].is_null()), "dry runs are not audited: {audit}");
    assert!(swaps.iter().any(|e| e["args"]["rollout"] == "r-1" && e["outcome"] == "ok"), "{audit}");
    drop(d);

    // A backend pinned by its configuration refuses a swap to another digest, whatever the request says.
    let pinned = format!("{}@{digest_a}", a.display());
    let mut d = Daemon::start(t.path(), &["--volume-driver", &pinned, "--compute-driver", "none"]);
    let v = d.call("volume", "swap", json!({"driver": b_path, "digest": digest_b}));
    assert_eq!(v["error"]["kind"], "untrusted_driver", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(&format!("pinned to {digest_a} by its configuration")),
        "{v}"
    );
    let v = d.call("volume", "swap", json!({"driver": b_path, "digest": digest_b, "dry_run": true}));
    assert_eq!(v["error"]["kind"], "untrusted_driver", "{v}");
}
