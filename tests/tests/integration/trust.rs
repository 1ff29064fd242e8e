//! Trust: only intended code is loaded, state is private, and the socket knows who is asking. Tests
//! that need a second user run a child as `nobody` (uid 65534) and are skipped, saying so, when the
//! suite does not run as root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use plughost_tests::process::{command, run, Daemon};
use plughost_tests::{driver, fixtures, TempDir};
use serde_json::{json, Value};

const NOBODY: u32 = 65534;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root to act as a second user (uid {NOBODY})");
    }
    root
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn chown_nobody(p: &Path) {
    std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
}

fn mkdir(p: &Path, m: u32) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    chmod(p, m);
    p.to_owned()
}

/// `plughost ARGS...` as `nobody`.
fn as_nobody(args: &[&str]) -> std::process::Output {
    let mut c = command(args);
    c.uid(NOBODY).gid(NOBODY);
    c.output().unwrap()
}

const FAKE: &[&str] = &["--volume-driver", "fake-volume", "--compute-driver", "none"];

fn run_host(state: &Path, extra: &[&str]) -> plughost_tests::process::Ran {
    let mut args = vec!["run", "--state-dir", state.to_str().unwrap()];
    args.extend_from_slice(FAKE);
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn a_state_dir_someone_else_could_write_is_refused() {
    if !root() {
        return;
    }
    let t = TempDir::new("trust-state");
    let theirs = mkdir(&t.join("theirs"), 0o755);
    chown_nobody(&theirs);
    let r = run_host(&theirs, &[]);
    assert_eq!(r.code, 1);
    let want = format!(
        "plughost: state dir \"{}\" is not owned by plughost's user (owner uid {NOBODY}, mode 0755",
        theirs.display()
    );
    assert!(r.stderr.starts_with(&want), "{}", r.stderr);

    let open = mkdir(&t.join("open"), 0o777);
    let r = run_host(&open, &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is writable by group or others (owner uid 0, mode 0777"), "{}", r.stderr);

    // Our own directory inside one that nobody owns: nobody could swap it for theirs.
    let under = mkdir(&t.join("nobodys/state"), 0o700);
    chown_nobody(&t.join("nobodys"));
    let r = run_host(&under, &[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("directory owned by another user (owner uid 65534"), "{}", r.stderr);
}

#[test]
fn files_are_private_whatever_the_umask() {
    let t = TempDir::new("trust-umask");
    let state = t.join("state");
    let mut d = Daemon::start_with(
        &state,
        None,
        &["--volume-driver", "file-volume", "--compute-driver", "process-compute"],
        // SAFETY: umask in the child before exec: no memory involved.
        |c| unsafe {
            c.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        },
    );
    d.ok("volume", "create", json!({"name": "v", "size": 4096}));
    d.ok("compute", "spawn", json!({"name": "talk", "command": "sh", "args": ["-c", "echo password=hunter2"]}));
    plughost_tests::procs::wait_for("the instance to write its log", || {
        std::fs::read_to_string(state.join("instances/default/talk.stdout")).is_ok_and(|s| s.contains("hunter2"))
    });
    let dirs = ["", "volumes", "volumes/default", "instances", "instances/default"];
    for dir in dirs {
        assert_eq!(mode(&state.join(dir)), 0o700, "{dir}/");
    }
    let files = [
        "state.db",
        "plughost.lock",
        "audit.log",
        "volumes/default/v.vol",
        "volumes/default/.file-volume",
        "instances/default/talk.stdout",
        "instances/default/.process-compute.json",
    ];
    for f in files {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&state.join("plughost.sock")) & 0o077, 0, "socket");
    d.ok("compute", "destroy", json!({"name": "talk"}));
}

/// Copies the fake-volume driver to `path` with `m`.
fn driver_copy(path: &Path, m: u32) -> PathBuf {
    std::fs::copy(driver("fake-volume"), path).unwrap();
    chmod(path, m);
    path.to_owned()
}

fn inspect_json(path: &Path) -> Value {
    let r = run(&["inspect", "--json", path.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", r.stdout, r.stderr));
    v[0].clone()
}

#[test]
fn driver_files_others_could_write_are_refused_and_load_with_strict_off() {
    let t = TempDir::new("trust-files");
    let mut cases: Vec<(&str, PathBuf, PathBuf)> = Vec::new();
    let d1 = mkdir(&t.join("d1"), 0o755);
    let f = driver_copy(&d1.join("libw.so"), 0o666);
    cases.push(("world-writable file", f.clone(), f));
    let open = mkdir(&t.join("open"), 0o777);
    let f = driver_copy(&open.join("libo.so"), 0o644);
    cases.push(("file in a 0777 directory", f, open.clone()));
    let links = mkdir(&t.join("links"), 0o755);
    std::os::unix::fs::symlink(open.join("libo.so"), links.join("libl.so")).unwrap();
    cases.push(("symlink into a 0777 directory", links.join("libl.so"), open.clone()));
    if root() {
        let f = driver_copy(&d1.join("libn.so"), 0o644);
        chown_nobody(&f);
        cases.push(("file owned by nobody", f.clone(), f));
        let theirs = mkdir(&t.join("theirs"), 0o755);
        let f = driver_copy(&theirs.join("libt.so"), 0o644);
        chown_nobody(&theirs);
        cases.push(("file in a directory owned by nobody", f, theirs));
    }
    for (what, path, offender) in &cases {
        let v = inspect_json(path);
        assert_eq!(v["error"]["kind"], "untrusted_driver", "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(&format!("untrusted: {}: ", offender.display())), "{what}: {msg}");
        // The host refuses it at start...
        let state = TempDir::new("trust-files-state");
        let r = run(&[
            "run",
            "--state-dir",
            state.path().to_str().unwrap(),
            "--volume-driver",
            path.to_str().unwrap(),
            "--compute-driver",
            "none",
        ]);
        assert_eq!(r.code, 1, "{what}");
        assert!(r.stderr.contains("untrusted: "), "{what}: {}", r.stderr);
        // ...and loads it with the policy relaxed, saying so in status.
        let mut d = Daemon::start(
            state.path(),
            &["--volume-driver", path.to_str().unwrap(), "--compute-driver", "none", "--allow-untrusted-drivers"],
        );
        let status = d.ok("", "status", json!({}));
        assert_eq!(status["services"][0]["backends"][0]["state"], "up", "{what}");
        assert!(status["trust"]["warning"].as_str().unwrap().contains("trust.strict is off"), "{status}");
    }
    // What only root or we own, in a private directory under the sticky temp dir: fine.
    let private = std::env::temp_dir().join(format!("plughost-trust-{}", std::process::id()));
    mkdir(&private, 0o700);
    let f = driver_copy(&private.join("libfine.so"), 0o644);
    let v = inspect_json(&f);
    std::fs::remove_dir_all(&private).unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

fn digest_of(lib: &Path) -> String {
    inspect_json(lib)["digest"].as_str().unwrap().to_owned()
}

#[test]
fn pins_and_the_allow_list_are_enforced_at_start_swap_and_reload() {
    let t = TempDir::new("trust-pins");
    let fake = digest_of(&driver("fake-volume"));
    let wrong = format!("blake3:{}", "0".repeat(64));
    let pinned = format!("fake-volume@{wrong}");
    let state = t.join("state");
    let r =
        run(&["run", "--state-dir", state.to_str().unwrap(), "--volume-driver", &pinned, "--compute-driver", "none"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("content {fake} differs from the pinned digest {wrong}")), "{}", r.stderr);

    let cfg = t.join("plughost.toml");
    let config = |digest: &str, extra: &str| {
        format!("{extra}[volume]\ndriver = \"fake-volume\"\ndigest = \"{digest}\"\n[compute]\ndriver = \"none\"\n")
    };
    std::fs::write(&cfg, config(&fake, "")).unwrap();
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    let backend = |d: &mut Daemon| d.ok("", "status", json!({}))["services"][0]["backends"][0].clone();
    assert_eq!(backend(&mut d)["pinned"], fake);
    // Swap to other content: refused, the pinned driver keeps serving.
    let v = d.call("volume", "swap", json!({"driver": "faulty"}));
    assert_eq!(v["error"]["kind"], "untrusted_driver", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("differs from the pinned digest"), "{v}");
    assert_eq!(backend(&mut d)["driver"]["generation"], 0);
    // A reload with a pin the file does not match: failed, nothing changed.
    std::fs::write(&cfg, config(&wrong, "")).unwrap();
    let r = d.ok("", "reload", json!({}));
    assert_eq!(r[0]["outcome"], "failed", "{r}");
    assert_eq!(
        (backend(&mut d)["driver"]["generation"].clone(), backend(&mut d)["pinned"].clone()),
        (json!(0), json!(fake))
    );
    drop(d);

    // An allow list holding fake-volume only: it starts; a swap to anything else is refused.
    let list = t.join("allowlist");
    std::fs::write(&list, format!("# the volume driver\n{fake}  # fake-volume\n\n")).unwrap();
    let allow = format!("[trust]\nallowlist = \"{}\"\n", list.display());
    std::fs::write(&cfg, format!("{allow}[volume]\ndriver = \"fake-volume\"\n[compute]\ndriver = \"none\"\n")).unwrap();
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    let v = d.call("volume", "swap", json!({"driver": "faulty"}));
    assert_eq!(v["error"]["kind"], "untrusted_driver", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("is not in the allow list"), "{v}");
    drop(d);

    // require_pins: a backend without a pin is refused at start.
    std::fs::write(
        &cfg,
        "[trust]\nrequire_pins = true\n[volume]\ndriver = \"fake-volume\"\n[compute]\ndriver = \"none\"\n",
    )
    .unwrap();
    let r = run(&["run", "--state-dir", state.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("trust.require_pins is set but these backends pin no digest: volume backend \"default\""),
        "{}",
        r.stderr
    );
}

#[test]
fn inspect_runs_library_code_only_in_an_unprivileged_child() {
    let lib = fixtures::marker_on_load();
    let marker = fixtures::marker_path();
    let _ = std::fs::remove_file(&marker);
    let child = command(&["inspect", lib.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let inspecting = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "the fixture is not a valid driver");
    // Its initializer ran (the marker's directory is open to all), in a child, not as root.
    let text = std::fs::read_to_string(&marker).expect("the initializer ran somewhere");
    let (pid, uid) = text.split_once(' ').unwrap();
    assert_ne!(pid.parse::<u32>().unwrap(), inspecting, "inspect ran library code in its own process");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(uid.parse::<u32>().unwrap(), NOBODY, "the child ran library code as root");
    }
}

/// Every library copy the host holds (a sealed memfd named after its digest) hashes to that digest.
fn loaded_copies_match_their_digests(pid: u32) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let target = target.to_string_lossy().into_owned();
        let Some(prefix) =
            target.strip_prefix("/memfd:plughost-driver:").map(|r| r.split(' ').next().unwrap().to_owned())
        else {
            continue;
        };
        let bytes = std::fs::read(e.path()).unwrap();
        let digest = blake3::hash(&bytes).to_hex().to_string();
        assert!(digest.starts_with(&prefix), "copy {target} holds content {digest}");
        n += 1;
    }
    n
}

#[test]
fn the_bytes_loaded_are_the_bytes_hashed_while_the_file_is_rewritten() {
    let t = TempDir::new("trust-race");
    let drivers = mkdir(&t.join("drivers"), 0o755);
    let a = std::fs::read(driver("fake-volume")).unwrap();
    let mut b = a.clone();
    b.extend_from_slice(b"plughost race: a second content");
    let path = drivers.join("librace.so");
    std::fs::write(&path, &a).unwrap();
    let mut d = Daemon::start(
        t.path(),
        &["--driver-dir", drivers.to_str().unwrap(), "--volume-driver", "race", "--compute-driver", "none"],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // In place, so that a load may read a mix of both.
                let bytes = if i.is_multiple_of(2) { &b } else { &a };
                let _ = std::fs::OpenOptions::new().write(true).truncate(true).open(&path).and_then(|mut f| {
                    use std::io::Write;
                    f.write_all(bytes)
                });
                // Complete for a while sometimes, so that some loads see one whole content.
                std::thread::sleep(std::time::Duration::from_millis(20 + i % 5 * 10));
                i += 1;
            }
        })
    };
    let mut swapped = Vec::new();
    let mut refused = Vec::new();
    // Until a few swaps went through (the others met a file being rewritten), at most 400 tries.
    for i in 0..400 {
        if swapped.len() >= 5 && i >= 40 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(i % 4 * 5));
        let v = d.call("volume", "swap", json!({}));
        if v["ok"] == true {
            swapped.push(v["result"]["new"]["digest"].as_str().unwrap().to_owned());
        } else {
            refused.push(v["error"]["message"].as_str().unwrap().to_owned());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let copies = loaded_copies_match_their_digests(d.pid());
    assert!(copies >= 1 && !swapped.is_empty(), "{copies} copies, {} swaps; refused: {refused:?}", swapped.len());
    let active = d.ok("", "status", json!({}))["services"][0]["backends"][0]["driver"]["digest"].clone();
    assert!(swapped.contains(&active.as_str().unwrap().to_owned()) || swapped.is_empty());
}

#[test]
fn the_socket_knows_who_is_asking() {
    if !root() {
        return;
    }
    let t = TempDir::new("trust-socket");
    let sockets = mkdir(&t.join("run"), 0o755);
    let socket = sockets.join("p.sock");
    let s = socket.to_str().unwrap();
    let d = Daemon::start_with(&t.join("state"), Some(&socket), FAKE, |_| {});
    let out = as_nobody(&["ctl", "--socket", s, "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"), "{out:?}");
    drop(d);

    let mut args = FAKE.to_vec();
    args.extend(["--socket-group", "65534"]);
    let mut d = Daemon::start_with(&t.join("state"), Some(&socket), &args, |_| {});
    assert_eq!(mode(&socket), 0o660);
    assert_eq!(std::fs::metadata(&socket).unwrap().gid(), NOBODY);
    for read in [&["ctl", "--socket", s, "status"][..], &["ctl", "--socket", s, "volume", "list"]] {
        let out = as_nobody(read);
        assert_eq!(out.status.code(), Some(0), "{read:?}: {out:?}");
    }
    for write in [
        &["ctl", "--socket", s, "volume", "create", "x", "--size", "1MiB"][..],
        &["ctl", "--socket", s, "swap", "volume"],
        &["ctl", "--socket", s, "reload"],
        &["ctl", "--socket", s, "audit"],
    ] {
        let out = as_nobody(write);
        assert_eq!(out.status.code(), Some(1), "{write:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("permission_denied: ") && err.contains("uid 65534 may only read"), "{out:?}");
    }
    d.ok("volume", "create", json!({"name": "mine", "size": 4096}));
    let audit = d.ok("", "audit", json!({}));
    let seen: Vec<(u64, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["uid"].as_u64().unwrap(),
                e["op"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let nobody = u64::from(NOBODY);
    for (uid, op, outcome) in [
        (nobody, "create", "permission_denied"),
        (nobody, "swap", "permission_denied"),
        (nobody, "reload", "permission_denied"),
        (0, "create", "ok"),
    ] {
        assert!(seen.contains(&(uid, op.to_owned(), outcome.to_owned())), "{op} by {uid}: {seen:?}");
    }
    let text = run(&["ctl", "--socket", s, "audit", "--since", "1h"]);
    assert!(text.stdout.contains("uid 65534") && text.stdout.contains("volume create"), "{}", text.stdout);
}

#[test]
fn socket_and_oversized_files_are_handled_without_harm() {
    let t = TempDir::new("trust-misc");
    let precious = t.join("precious");
    std::fs::write(&precious, "data").unwrap();
    let r = run_host(&t.join("state"), &["--socket", precious.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("something that is not a socket is there; refusing to replace it"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "data");

    // A 2 GiB file that is not ELF: refused at once (over the size cap), and with a cap raised above it,
    // refused after its header, without being read whole (the host runs with 1 GiB of address space).
    let big = t.join("libbig.so");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(2 << 30).unwrap();
    std::fs::write(t.join("head"), b"not an ELF file at all").unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.write_all(b"not an ELF file at all").unwrap();
    }
    let v = inspect_json(&big);
    assert_eq!(v["error"]["kind"], "too_large", "{v}");
    let state = t.join("state2");
    let mut c = Command::new(plughost_tests::plughost());
    c.args(["run", "--state-dir", state.to_str().unwrap(), "--volume-driver", big.to_str().unwrap()]).args([
        "--compute-driver",
        "none",
        "--max-driver-bytes",
        "3221225472",
    ]);
    // SAFETY: setrlimit in the child before exec: no memory of ours involved.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 1 << 30, rlim_max: 1 << 30 };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an ELF"), "{err}");
}

#[test]
fn a_child_that_crashes_leaves_nothing_behind() {
    let child = command(&["inspect", fixtures::crash_on_load().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("killed a probe process"), "{out:?}");
    let prefix = format!("plughost-child-{pid}-");
    let left: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Writes `text` to `path` as `nobody` (a real second user), as an attacker would.
fn write_as_nobody(path: &Path, text: &str) -> std::process::Output {
    let mut c = Command::new("sh");
    c.args(["-c", "cat > \"$0\"", path.to_str().unwrap()]).uid(NOBODY).gid(NOBODY);
    c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_config_file_is_a_trust_root() {
    if !root() {
        return;
    }
    let t = TempDir::new("trust-config");
    let etc = mkdir(&t.join("etc"), 0o755);
    let cfg = etc.join("plughost.toml");
    let good = "[volume]\ndriver = \"fake-volume\"\n[compute]\ndriver = \"none\"\n";
    std::fs::write(&cfg, good).unwrap();
    chmod(&cfg, 0o644);
    let state = t.join("state");
    let start = |cfg: &Path| run(&["run", "--state-dir", state.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);

    // A driver of nobody's, and the config nobody would like the host to read.
    let theirs = mkdir(&t.join("theirs"), 0o755);
    let lib = driver_copy(&theirs.join("libtheirs.so"), 0o644);
    chown_nobody(&lib);
    chown_nobody(&theirs);
    let evil = format!(
        "[trust]\nstrict = false\nallow_swap_paths = true\n[volume]\ndriver = \"{}\"\n[compute]\ndriver = \"none\"\n",
        lib.display()
    );

    // At start: a config others can write, or in a directory another user owns, is refused, naming it.
    chmod(&cfg, 0o666);
    let r = start(&cfg);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let want = format!(
        "plughost: config \"{}\": untrusted: writable by group or others (owner uid 0, mode 0666)\n",
        cfg.display()
    );
    assert_eq!(r.stderr, want);
    chmod(&cfg, 0o644);
    let nobodys = mkdir(&t.join("nobodys"), 0o755);
    let cfg2 = nobodys.join("plughost.toml");
    std::fs::write(&cfg2, good).unwrap();
    chown_nobody(&nobodys);
    let r = start(&cfg2);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let want = format!(
        "plughost: config \"{}\": untrusted: {}: directory owned by another user (owner uid {NOBODY}",
        cfg2.display(),
        nobodys.display()
    );
    assert!(r.stderr.starts_with(&want), "{}", r.stderr);

    // While serving: the file is made writable by others (a careless chmod), nobody rewrites it to relax
    // the policy and name their library, root reloads: refused, nothing of nobody's is loaded.
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    let backend = |d: &mut Daemon| d.ok("", "status", json!({}))["services"][0]["backends"][0].clone();
    let before = backend(&mut d)["driver"].clone();
    chmod(&cfg, 0o666);
    let w = write_as_nobody(&cfg, &evil);
    assert!(w.status.success(), "nobody could not write the file: {}", String::from_utf8_lossy(&w.stderr));
    assert_eq!(std::fs::metadata(&cfg).unwrap().uid(), 0, "still root's file, nobody's content");
    let v = d.call("", "reload", json!({}));
    assert_eq!(v["error"]["kind"], "invalid_config", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("config \"{}\": untrusted: writable by group or others", cfg.display())), "{msg}");
    assert_eq!(backend(&mut d)["driver"], before, "nothing changed");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", d.pid())).unwrap();
    assert!(!maps.contains("libtheirs"), "nobody's library is mapped in the host");

    // The same content in a file only root can write: a reload still cannot relax [trust].
    std::fs::remove_file(&cfg).unwrap();
    std::fs::write(&cfg, &evil).unwrap();
    chmod(&cfg, 0o644);
    let v = d.call("", "reload", json!({}));
    assert_eq!(v["error"]["kind"], "invalid_config", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "a reload cannot relax the trust policy (trust.strict true -> false, trust.allow_swap_paths false -> true)"
        ),
        "{msg}"
    );
    assert_eq!(backend(&mut d)["driver"], before, "nothing changed");
    // Tightening is fine.
    std::fs::write(&cfg, format!("[trust]\nrequire_pins = false\n{good}")).unwrap();
    let r = d.ok("", "reload", json!({}));
    assert_eq!(r[0]["outcome"], "unchanged", "{r}");
    drop(d);

    // A file the config names (the allow list) is held to the same rule, at start and at reload.
    let list = etc.join("allowlist");
    std::fs::write(&list, format!("{}\n", digest_of(&driver("fake-volume")))).unwrap();
    chmod(&list, 0o666);
    std::fs::write(&cfg, format!("[trust]\nallowlist = \"{}\"\n{good}", list.display())).unwrap();
    let r = start(&cfg);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let want = format!(
        "trust.allowlist \"{}\": untrusted: writable by group or others (owner uid 0, mode 0666)",
        list.display()
    );
    assert!(r.stderr.contains(&want), "{}", r.stderr);
    chmod(&list, 0o644);
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    chmod(&list, 0o666);
    let v = d.call("", "reload", json!({}));
    assert_eq!(v["error"]["kind"], "invalid_config", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&want), "{v}");
    // Removing the allow list is relaxing it.
    chmod(&list, 0o644);
    std::fs::write(&cfg, good).unwrap();
    let v = d.call("", "reload", json!({}));
    assert!(v["error"]["message"].as_str().unwrap().contains("trust.allowlist removed"), "{v}");
}

#[test]
fn another_user_cannot_block_the_sandbox_by_taking_its_directory_names() {
    if !root() {
        return;
    }
    let t = TempDir::new("trust-sandbox-names");
    let mut d = Daemon::start(
        &t.join("state"),
        &["--volume-driver", "file-volume", "--compute-driver", "none", "--allow-swap-paths"],
    );
    // nobody takes every name the sandbox used to give its children (`plughost-child-<pid>-<n>`).
    let taken: Vec<PathBuf> =
        (0..64).map(|n| std::env::temp_dir().join(format!("plughost-child-{}-{n}", d.pid()))).collect();
    let script = taken.iter().map(|p| format!("mkdir -m 0755 {}", p.display())).collect::<Vec<_>>().join("; ");
    let out = Command::new("sh").args(["-c", &script]).uid(NOBODY).gid(NOBODY).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // New content is probed in a sandboxed child with a directory of its own: the swap goes through.
    let b = fixtures::built().file_volume_b.display().to_string();
    let v = d.call("volume", "swap", json!({"driver": b}));
    for p in &taken {
        let _ = std::fs::remove_dir(p);
    }
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn removing_the_lock_file_does_not_let_a_second_host_onto_the_state_dir() {
    let t = TempDir::new("trust-split-brain");
    let state = t.join("state");
    let d = Daemon::start(&state, &["--volume-driver", "fake-volume", "--compute-driver", "none"]);
    std::fs::remove_file(state.join("plughost.lock")).unwrap();
    let second = t.join("second.sock");
    let r = run_host(&state, &["--socket", second.to_str().unwrap()]);
    assert_eq!(r.code, 1, "a second host started on a state dir in use: {}", r.stderr);
    assert!(r.stderr.contains("is in use by another plughost"), "{}", r.stderr);
    // The running host writes its lock file again at its next periodic round.
    plughost_tests::procs::wait_for("the lock file to be written again", || {
        std::fs::read_to_string(state.join("plughost.lock")).is_ok_and(|p| p.trim() == d.pid().to_string())
    });
}
