//! What survives a crash: acknowledged operations, never a half-made volume. Real `kill -9`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use plughost_tests::process::{Client, Daemon};
use plughost_tests::TempDir;
use serde_json::{json, Value};

// Volume files are not synced here: the record store is what is under test, and fsyncs would space out
// the record writes whose overlap this test is after.
const FILE_VOLUME: &[&str] =
    &["--volume-driver", "file-volume", "--volume-opt", "sync=false", "--compute-driver", "none"];

fn names_and_ids(d: &mut Daemon) -> BTreeMap<String, Value> {
    d.ok("volume", "list", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
        .collect()
}

#[test]
fn concurrent_acknowledged_creates_survive_kill_9_in_the_middle() {
    let t = TempDir::new("persist-race");
    let mut acked: Vec<(String, Value)> = Vec::new();
    for round in 0..6 {
        let d = Daemon::start(t.path(), FILE_VOLUME);
        let socket = d.socket.clone();
        let clients: Vec<_> = (0..8)
            .map(|c| {
                let socket = socket.clone();
                std::thread::spawn(move || {
                    let mut cl = Client::connect(&socket);
                    let mut acked = Vec::new();
                    for i in 0.. {
                        let name = format!("r{round}-c{c}-{i}");
                        match cl.call("volume", "create", json!({"name": name, "size": 4096})) {
                            Some(v) if v["ok"] == true => acked.push((name, v["result"]["id"].clone())),
                            Some(v) => panic!("{v}"),
                            None => return acked, // the host was killed
                        }
                    }
                    acked
                })
            })
            .collect();
        // Kill while creates (and their record writes) are in flight.
        std::thread::sleep(Duration::from_millis(150 + 97 * round));
        d.kill9();
        for c in clients {
            acked.extend(c.join().unwrap());
        }
        let mut d = Daemon::start(t.path(), FILE_VOLUME);
        let listed = names_and_ids(&mut d);
        for (name, id) in &acked {
            let v = listed.get(name).unwrap_or_else(|| panic!("round {round}: acknowledged {name} is missing"));
            assert_eq!(&v["id"], id, "round {round}: {name} kept its id");
            assert_eq!(v["status"], "available", "round {round}: {v}");
        }
        drop(d);
    }
    assert!(acked.len() > 100, "only {} creates were acknowledged", acked.len());
}

/// Fills `path` with a pattern that differs per MiB, so that a wrong copy shows.
fn fill(path: &Path, mib: u64) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for m in 0..mib {
        block.iter_mut().enumerate().for_each(|(i, b)| *b = (i as u64 ^ m) as u8);
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
}

fn sample(path: &Path, mib: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut out = Vec::new();
    for m in [0, mib / 2, mib - 1] {
        let mut b = [0u8; 64];
        f.seek(SeekFrom::Start(m << 20 | 4000)).unwrap();
        f.read_exact(&mut b).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

/// Starts `snapshot big snap` on its own connection and waits until the copy is under way on disk.
fn snapshot_under_way(d: &Daemon, root: &Path) -> std::thread::JoinHandle<Option<Value>> {
    let socket = d.socket.clone();
    let pending = std::thread::spawn(move || {
        Client::connect(&socket).call("volume", "snapshot", json!({"name": "big", "snapshot": "snap"}))
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copying = std::fs::read_dir(root).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with(".partial.snap")
                && e.metadata().map(|m| m.blocks() > 0).unwrap_or(false)
        });
        if copying {
            return pending;
        }
        assert!(!pending.is_finished(), "the snapshot finished before it could be interrupted");
        assert!(Instant::now() < deadline, "the snapshot copy never started");
        std::thread::sleep(Duration::from_millis(5));
    }
}

use std::os::unix::fs::MetadataExt;

#[test]
fn an_interrupted_snapshot_never_comes_back_available() {
    const MIB: u64 = 1024;
    let t = TempDir::new("snap-kill");
    let args = ["--volume-driver", "file-volume", "--volume-opt", "reflink=false", "--compute-driver", "none"];
    let mut d = Daemon::start(t.path(), &args);
    d.ok("volume", "create", json!({"name": "big", "size": "1GiB"}));
    let root = t.join("volumes/default");
    fill(&root.join("big.vol"), MIB);
    let before = sample(&root.join("big.vol"), MIB);

    // 1. kill -9 in the middle of the copy.
    let pending = snapshot_under_way(&d, &root);
    d.kill9();
    assert!(pending.join().unwrap().is_none(), "the connection died with the host");
    let mut d = Daemon::start(t.path(), &args);
    check_after_interruption(&mut d, &root, &before, MIB);

    // 2. A graceful stop that outlasts its shutdown timeout in the middle of the copy.
    drop(d);
    let mut slow = args.to_vec();
    slow.extend(["--shutdown-timeout-ms", "50"]);
    let d = Daemon::start(t.path(), &slow);
    let pending = snapshot_under_way(&d, &root);
    d.signal(libc::SIGTERM);
    let (code, stderr) = d.wait();
    assert_eq!(code, 0, "{stderr}");
    let _ = pending.join().unwrap();
    let mut d = Daemon::start(t.path(), &args);
    check_after_interruption(&mut d, &root, &before, MIB);
}

fn check_after_interruption(d: &mut Daemon, root: &Path, before: &[u8], mib: u64) {
    let listed = names_and_ids(d);
    if let Some(s) = listed.get("snap") {
        assert_ne!(s["status"], "available", "a half-made snapshot is served: {s}");
    }
    assert_eq!(listed["big"]["status"], "available");
    assert_eq!(listed["big"]["size"], 1u64 << 30);
    assert_eq!(sample(&root.join("big.vol"), mib), before, "the source is intact");
    assert!(!root.join("snap.vol").exists(), "no half-made snapshot file under its real name");
    // The name is free again: a complete snapshot can be taken now.
    let err = d.call("volume", "get", json!({"name": "snap"}));
    assert_eq!(err["ok"], false, "{err}");
}
