//! The compatibility promise, from real builds of real history: every plughost-api release listed in
//! `plugin-api/RELEASES` is checked out from git, its host and its reference fake-volume are built, and
//! every host runs every driver (today's build counts as the current version). What happens must be what
//! the table in the crate documentation says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use plughost_tests::process::Client;
use plughost_tests::{cargo, driver, plughost, target_dir, workspace_root, TempDir};
use serde_json::json;

/// `VERSION COMMIT` lines of plugin-api/RELEASES.
fn releases() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("plugin-api/RELEASES")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (v, c) = l.split_once(' ').expect("VERSION COMMIT");
            (v.to_owned(), c.trim().to_owned())
        })
        .collect()
}

/// The table in plugin-api's crate docs: (driver version, host version) -> outcome.
fn documented() -> BTreeMap<(String, String), String> {
    let lib = std::fs::read_to_string(workspace_root().join("plugin-api/src/lib.rs")).unwrap();
    let mut lines = lib.lines().skip_while(|l| !l.contains("<!-- compat-table -->")).skip(1);
    let header: Vec<String> =
        lines.next().unwrap().split('|').map(|c| c.trim().trim_start_matches("//!").trim().to_owned()).collect();
    let hosts: Vec<String> = header.iter().filter_map(|h| h.strip_prefix("host ").map(str::to_owned)).collect();
    let mut out = BTreeMap::new();
    for row in lines.skip(1).take_while(|l| l.trim_start_matches("//!").trim().starts_with('|')) {
        let cells: Vec<&str> =
            row.trim_start_matches("//!").split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        for (host, cell) in hosts.iter().zip(&cells[1..]) {
            out.insert((cells[0].to_owned(), host.clone()), (*cell).to_owned());
        }
    }
    out
}

/// A release's host binary and fake-volume, built from its commit (cached under target/compat).
struct Build {
    plughost: PathBuf,
    fake_volume: PathBuf,
}

fn build_release(version: &str, commit: &str) -> Build {
    let root = target_dir().join("compat").join(version);
    let src = root.join("src");
    let out = root.join("target");
    let done = root.join("src.ok");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).unwrap();
        let known = Command::new("git")
            .current_dir(workspace_root())
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .status();
        assert!(
            known.map(|s| s.success()).unwrap_or(false),
            "plughost-api {version} was released from commit {commit}, which this checkout does not have: the \
             compatibility tests need the repository's history (a full clone)"
        );
        let archive = Command::new("git")
            .current_dir(workspace_root())
            .args(["archive", "--format=tar", commit])
            .output()
            .unwrap();
        assert!(archive.status.success(), "git archive {commit} failed");
        let mut tar =
            Command::new("tar").arg("-x").arg("-C").arg(&src).stdin(std::process::Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &archive.stdout).unwrap();
        assert!(tar.wait().unwrap().success());
        std::fs::write(&done, commit).unwrap();
    }
    let status = cargo()
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &out)
        .args(["build", "--quiet", "--offline", "-p", "host", "-p", "fake-volume"])
        .status()
        .unwrap();
    assert!(status.success(), "building host and fake-volume of plughost-api {version} from {commit} failed");
    Build { plughost: out.join("debug/plughost"), fake_volume: out.join("debug/libfake_volume.so") }
}

/// Starts `host` (`plughost run` in `t`, with `volume` and `compute` drivers) and waits for its socket;
/// how it refused to start (exit status and first line), if it did.
fn start_host(t: &TempDir, host: &Path, volume: &Path, compute: &str) -> Result<std::process::Child, String> {
    let mut child = Command::new(host)
        .args(["run", "--state-dir", t.path().to_str().unwrap(), "--periodic-interval-ms", "200"])
        .args(["--volume-driver", volume.to_str().unwrap(), "--compute-driver", compute])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(t.join("plughost.sock")).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return Err(format!("{status}: {}", err.lines().next().unwrap_or_default()));
        }
        assert!(std::time::Instant::now() < deadline, "{} did not start", host.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(child)
}

/// Runs `host` serving `lib` and tries the operations of the table; the outcome as the table words it.
fn outcome(host: &Path, lib: &Path) -> String {
    let t = TempDir::new("compat");
    let mut child = match start_host(&t, host, lib, "none") {
        Ok(child) => child,
        Err(why) => return format!("refused ({why})"),
    };
    let mut c = Client::connect(&t.join("plughost.sock"));
    let mut ask = |op: &str, args: serde_json::Value| c.call("volume", op, args).unwrap();
    let created = ask("create", json!({"name": "v", "size": "1MiB"}));
    assert_eq!(created["ok"], true, "{created}");
    assert_eq!(ask("snapshot", json!({"name": "v", "snapshot": "s"}))["ok"], true);
    let reverted = ask("revert", json!({"name": "v", "snapshot": "s"}));
    let _ = child.kill();
    let _ = child.wait();
    match (reverted["ok"].as_bool(), reverted["error"]["kind"].as_str()) {
        (Some(true), _) => "loads, revert works".to_owned(),
        (_, Some("unsupported")) => "loads, revert answers unsupported".to_owned(),
        (_, Some("invalid_request")) => {
            // A host that predates the operation.
            let msg = reverted["error"]["message"].as_str().unwrap();
            assert!(msg.contains("unknown volume operation \"revert\""), "{reverted}");
            "loads, revert not offered by this host".to_owned()
        }
        _ => format!("unexpected answer to revert: {reverted}"),
    }
}

#[test]
fn every_released_host_and_driver_work_together_as_documented() {
    let table = documented();
    let current = plughost_api::API_VERSION.to_owned();
    let mut hosts: Vec<(String, PathBuf)> = vec![(current.clone(), plughost())];
    let mut drivers: Vec<(String, PathBuf)> = vec![(current.clone(), driver("fake-volume"))];
    let earlier: Vec<(String, String)> = releases().into_iter().filter(|(v, _)| *v != current).collect();
    assert!(!earlier.is_empty() || current == "1.0.0", "no release before {current} in plugin-api/RELEASES");
    for (version, commit) in &earlier {
        let b = build_release(version, commit);
        hosts.push((version.clone(), b.plughost));
        drivers.push((version.clone(), b.fake_volume));
    }
    let mut checked = 0;
    for (dv, lib) in &drivers {
        for (hv, host) in &hosts {
            let want = table.get(&(dv.clone(), hv.clone())).unwrap_or_else(|| {
                panic!("the table in plugin-api's docs has no cell for a {dv} driver in a {hv} host: {table:?}")
            });
            let got = outcome(host, lib);
            assert_eq!(&got, want, "a driver built against {dv} in a host built against {hv}");
            checked += 1;
        }
    }
    assert_eq!(checked, table.len(), "every cell of the documented table was checked: {table:?}");
}

/// The first line a host prints when it refuses to start with `lib` as its volume driver.
fn refusal(host: &Path, lib: &Path) -> String {
    let t = TempDir::new("compat-kind");
    let out = Command::new(host)
        .args(["run", "--state-dir", t.path().to_str().unwrap()])
        .args(["--volume-driver", lib.to_str().unwrap(), "--compute-driver", "none"])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{} started with {}", host.display(), lib.display());
    String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default().to_owned()
}

#[test]
fn hosts_from_before_the_network_kind_refuse_a_network_driver_by_its_kind() {
    let fake_network = driver("fake-network");
    for (version, commit) in releases().into_iter().filter(|(v, _)| *v != plughost_api::API_VERSION) {
        let b = build_release(&version, &commit);
        let line = refusal(&b.plughost, &fake_network);
        assert!(
            line.contains("driver of an unknown kind (kind number 3)"),
            "a {version} host given a network driver: {line}"
        );
    }
    // Today's host knows the kind, and says it is not a volume driver.
    let line = refusal(&plughost(), &fake_network);
    assert!(line.contains("network") && line.contains("volume"), "{line}");
}

#[test]
fn hosts_from_before_spawn_in_run_todays_compute_drivers() {
    // Today's compute drivers carry 1.2's `compute.spawn_in` extension (process-compute implements it,
    // fake-compute answers with its default): a 1.0 or 1.1 host never asks for it and runs them.
    for (version, commit) in releases().into_iter().filter(|(v, _)| *v != plughost_api::API_VERSION) {
        let b = build_release(&version, &commit);
        for compute in ["process-compute", "fake-compute"] {
            let t = TempDir::new("compat-compute");
            let mut child = start_host(&t, &b.plughost, &b.fake_volume, driver(compute).to_str().unwrap())
                .unwrap_or_else(|why| panic!("a {version} host refused today's {compute}: {why}"));
            let mut c = Client::connect(&t.join("plughost.sock"));
            let spawned = c.call("compute", "spawn", json!({"name": "i", "command": "sleep", "args": ["30"]})).unwrap();
            assert_eq!(spawned["ok"], true, "a {version} host spawning with today's {compute}: {spawned}");
            let destroyed = c.call("compute", "destroy", json!({"name": "i"})).unwrap();
            assert_eq!(destroyed["ok"], true, "{destroyed}");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn every_listed_release_is_its_version_at_its_commit() {
    for (version, commit) in releases() {
        let out = Command::new("git")
            .current_dir(workspace_root())
            .args(["show", &format!("{commit}:plugin-api/Cargo.toml")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "plugin-api/RELEASES: {version} at {commit}: no plugin-api there (a full clone?)"
        );
        let manifest = String::from_utf8_lossy(&out.stdout);
        assert!(
            manifest.lines().any(|l| l.trim() == format!("version = \"{version}\"")),
            "plugin-api/RELEASES: {version} at {commit}, whose plugin-api is another version"
        );
    }
}
