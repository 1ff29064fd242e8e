//! What survives a crash: acknowledged operations, never a half-made volume. Real `kill -9`.

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

/// A tiny deterministic generator (xorshift), so that a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What a client knows about one of its volumes.
#[derive(Debug, Clone, Default)]
struct Known {
    /// Acknowledged as existing (created, extended, snapshotted into) rather than deleted.
    exists: bool,
    size: u64,
    id: Option<Value>,
    /// An operation on it was in flight when the host died: either outcome is acceptable.
    in_doubt: bool,
}

/// One client's burst of random creates, extends, snapshots and deletes on its own names, until the
/// host dies. Returns what was acknowledged.
fn burst(socket: &Path, prefix: &str, seed: u64) -> BTreeMap<String, Known> {
    let mut cl = Client::connect(socket);
    let mut rng = Rng(seed | 1);
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    for n in 0.. {
        let existing: Vec<String> = known.iter().filter(|(_, k)| k.exists).map(|(n, _)| n.clone()).collect();
        let pick = |rng: &mut Rng| existing[rng.below(existing.len() as u64) as usize].clone();
        let (name, op, args) = match rng.below(10) {
            _ if existing.len() < 3 => {
                let name = format!("{prefix}-{n}");
                (name.clone(), "create", json!({"name": name, "size": 4096 * (1 + rng.below(16))}))
            }
            0..=3 => {
                let name = format!("{prefix}-{n}");
                (name.clone(), "create", json!({"name": name, "size": 4096 * (1 + rng.below(16))}))
            }
            4..=5 => {
                let name = pick(&mut rng);
                let size = known[&name].size + 4096;
                (name.clone(), "extend", json!({"name": name, "size": size}))
            }
            6..=7 => {
                let source = pick(&mut rng);
                let name = format!("{prefix}-{n}");
                (name.clone(), "snapshot", json!({"name": source, "snapshot": name}))
            }
            _ => {
                let name = pick(&mut rng);
                (name.clone(), "delete", json!({"name": name}))
            }
        };
        let k = known.entry(name.clone()).or_default();
        k.in_doubt = true;
        let Some(answer) = cl.call("volume", op, args) else { return known };
        assert_eq!(answer["ok"], true, "{op} {name}: {answer}");
        let r = &answer["result"];
        *k = match op {
            "delete" => Known::default(),
            _ => Known { exists: true, size: r["size"].as_u64().unwrap(), id: Some(r["id"].clone()), in_doubt: false },
        };
    }
    known
}

/// After a restart: records and files agree, and every acknowledged operation stands.
fn check_consistent(round: usize, d: &mut Daemon, root: &Path, known: &BTreeMap<String, Known>) {
    let list = d.ok("volume", "list", json!({}));
    let records = list.as_array().unwrap();
    let mut by_name = BTreeMap::new();
    for r in records {
        let name = r["name"].as_str().unwrap().to_owned();
        assert!(by_name.insert(name.clone(), r.clone()).is_none(), "round {round}: {name} listed twice");
        let status = r["status"].as_str().unwrap();
        assert!(matches!(status, "available" | "error"), "round {round}: unfinished after reconcile: {r}");
        if status == "available" {
            let meta = std::fs::metadata(root.join(format!("{name}.vol")))
                .unwrap_or_else(|e| panic!("round {round}: {name} is available without its file: {e}"));
            assert_eq!(meta.len(), r["size"].as_u64().unwrap(), "round {round}: {r}");
        }
    }
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".vol") {
            assert!(by_name.contains_key(name), "round {round}: {file} has no record");
        }
    }
    for (name, k) in known.iter().filter(|(_, k)| !k.in_doubt) {
        match (k.exists, by_name.get(name)) {
            (true, Some(r)) => {
                assert_eq!(r["status"], "available", "round {round}: {r}");
                assert_eq!((r["size"].as_u64(), Some(&r["id"])), (Some(k.size), k.id.as_ref()), "round {round}: {r}");
            }
            (true, None) => panic!("round {round}: acknowledged {name} is missing"),
            (false, Some(r)) => panic!("round {round}: acknowledged delete of {name} is back: {r}"),
            (false, None) => {}
        }
    }
}

#[test]
fn random_bursts_cut_by_kill_9_keep_records_and_files_in_step() {
    let t = TempDir::new("bursts");
    let root = t.join("volumes/default");
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut seed = 0x5eed_u64;
    let mut acknowledged = 0;
    for round in 0..30 {
        let d = Daemon::start(t.path(), FILE_VOLUME);
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let socket = d.socket.clone();
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let s = seed;
                std::thread::spawn(move || burst(&socket, &format!("r{round}c{c}"), s))
            })
            .collect();
        let mut rng = Rng(seed);
        std::thread::sleep(Duration::from_millis(20 + rng.below(300)));
        d.kill9();
        for c in clients {
            let k = c.join().unwrap();
            acknowledged += k.values().filter(|k| !k.in_doubt).count();
            known.extend(k);
        }
        let mut d = Daemon::start(t.path(), FILE_VOLUME);
        check_consistent(round, &mut d, &root, &known);
        // What was in doubt is settled now: take the host's word for it for the next rounds.
        for (name, k) in known.iter_mut().filter(|(_, k)| k.in_doubt) {
            *k = match d.call("volume", "get", json!({"name": name})) {
                v if v["ok"] == true && v["result"]["status"] == "available" => Known {
                    exists: true,
                    size: v["result"]["size"].as_u64().unwrap(),
                    id: Some(v["result"]["id"].clone()),
                    in_doubt: false,
                },
                v if v["ok"] == false => Known::default(),
                v => {
                    // An interrupted snapshot or create kept as error: delete it to settle it.
                    assert_eq!(v["result"]["status"], "error", "{v}");
                    d.ok("volume", "delete", json!({"name": name}));
                    Known::default()
                }
            };
        }
        drop(d);
    }
    assert!(acknowledged > 200, "only {acknowledged} operations were acknowledged");
}

#[test]
fn a_changed_driver_option_removes_nothing_silently() {
    let t = TempDir::new("changed-option");
    let mut d = Daemon::start(t.path(), FILE_VOLUME);
    let ids: Vec<Value> =
        ["a", "b"].iter().map(|n| d.ok("volume", "create", json!({"name": n, "size": 4096}))["id"].clone()).collect();
    drop(d);
    // Another root: the volumes are not there. They are shown as errors, not dropped.
    let elsewhere = t.join("elsewhere");
    let mut args = FILE_VOLUME.to_vec();
    let opt = format!("root={}", elsewhere.display());
    args.extend(["--volume-opt", &opt]);
    let mut d = Daemon::start(t.path(), &args);
    let listed = names_and_ids(&mut d);
    for (n, id) in ["a", "b"].iter().zip(&ids) {
        assert_eq!(
            (&listed[*n]["id"], &listed[*n]["status"], &listed[*n]["reason"]),
            (id, &json!("error"), &json!("missing from backend"))
        );
    }
    let status = d.ok("", "status", json!({}));
    assert_eq!(status["services"][0]["last_reconcile"]["missing"], 2, "{status}");
    drop(d);
    // Back to the old root: available again, same ids.
    let mut d = Daemon::start(t.path(), FILE_VOLUME);
    let listed = names_and_ids(&mut d);
    for (n, id) in ["a", "b"].iter().zip(&ids) {
        assert_eq!((&listed[*n]["id"], &listed[*n]["status"]), (id, &json!("available")));
    }
}

#[test]
fn a_missing_volume_root_keeps_the_backend_down_and_its_records() {
    let t = TempDir::new("root-moved");
    let root = t.join("volumes/default");
    let mut d = Daemon::start(t.path(), FILE_VOLUME);
    let id = d.ok("volume", "create", json!({"name": "v", "size": 8192}))["id"].clone();
    drop(d);
    std::fs::rename(&root, t.join("moved")).unwrap();
    let mut d = Daemon::start(t.path(), FILE_VOLUME);
    let backend = d.ok("", "status", json!({}))["services"][0]["backends"][0].clone();
    assert_eq!(backend["state"], "down", "{backend}");
    assert!(backend["reason"].as_str().unwrap().contains("is missing"), "{backend}");
    assert!(!root.exists(), "the root is not recreated empty");
    assert_eq!(names_and_ids(&mut d)["v"]["id"], id, "the record is kept");
    assert_eq!(d.err("volume", "get", json!({"name": "v"})), "unavailable");
    // Put back while running: the next health check brings the backend up, with the same volume.
    std::fs::rename(t.join("moved"), &root).unwrap();
    wait_up(&mut d);
    assert_eq!(d.ok("volume", "get", json!({"name": "v"}))["id"], id);
    drop(d);
    let mut d = Daemon::start(t.path(), FILE_VOLUME);
    let v = d.ok("volume", "get", json!({"name": "v"}));
    assert_eq!((&v["id"], &v["status"]), (&id, &json!("available")));
}

fn wait_up(d: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.ok("", "status", json!({}))["services"][0]["backends"][0]["state"] != "up" {
        assert!(Instant::now() < deadline, "the backend never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn volumes_json_of_the_previous_version_is_imported_with_its_ids() {
    let t = TempDir::new("import");
    let root = t.join("volumes/default");
    std::fs::create_dir_all(&root).unwrap();
    // The state plughost 0.1 left: volumes.json and the volume files (no root marker yet).
    std::fs::File::create(root.join("old.vol")).unwrap().set_len(1 << 20).unwrap();
    std::fs::File::create(root.join("snap.vol")).unwrap().set_len(1 << 20).unwrap();
    std::fs::write(root.join(".source.snap"), "old").unwrap();
    let legacy = json!({
        "old": {"id": "1f2e3d4c5b6a7980", "name": "old", "backend": "default", "status": "available",
                "size": 1048576, "allocated": 0, "location": root.join("old.vol"), "source": null,
                "created_at": 1_700_000_000, "updated_at": 1_700_000_001},
        "snap": {"id": "0a0b0c0d0e0f1011", "name": "snap", "backend": "default", "status": "available",
                 "size": 1048576, "allocated": 0, "location": root.join("snap.vol"), "source": "old",
                 "created_at": 1_700_000_002, "updated_at": 1_700_000_003, "reason": null}
    });
    std::fs::write(t.join("volumes.json"), serde_json::to_vec_pretty(&legacy).unwrap()).unwrap();
    let mut d = Daemon::start(t.path(), FILE_VOLUME);
    let listed = names_and_ids(&mut d);
    assert_eq!((&listed["old"]["id"], &listed["old"]["status"]), (&json!("1f2e3d4c5b6a7980"), &json!("available")));
    assert_eq!((&listed["snap"]["id"], &listed["snap"]["source"]), (&json!("0a0b0c0d0e0f1011"), &json!("old")));
    assert!(!t.join("volumes.json").exists() && t.join("volumes.json.imported").exists());
    assert!(t.join("state.db").exists());
    drop(d);
    let mut d = Daemon::start(t.path(), FILE_VOLUME);
    assert_eq!(names_and_ids(&mut d)["old"]["id"], "1f2e3d4c5b6a7980", "imported once, kept");
}

#[test]
fn an_emptied_state_database_is_refused_rather_than_every_volume_reidentified() {
    let t = TempDir::new("persist-emptied");
    let state = t.path();
    let mut d = Daemon::start(state, FILE_VOLUME);
    d.ok("volume", "create", json!({"name": "keep", "size": 4096}));
    let id = d.ok("volume", "get", json!({"name": "keep"}))["id"].clone();
    let (code, stderr) = d.stop();
    assert_eq!(code, 0, "{stderr}");
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let mut args = vec!["run", "--state-dir", state.to_str().unwrap()];
    args.extend_from_slice(FILE_VOLUME);
    let r = plughost_tests::process::run(&args);
    assert_eq!(r.code, 1, "started on an emptied state database: {}", r.stderr);
    assert!(
        r.stderr.contains("holds no records, but held some before") && r.stderr.contains("--accept-empty-state"),
        "{}",
        r.stderr
    );
    // Accepted explicitly: the volume is adopted (with a new id, as the flag says).
    let mut with_flag = FILE_VOLUME.to_vec();
    with_flag.push("--accept-empty-state");
    let mut d = Daemon::start(state, &with_flag);
    let v = d.ok("volume", "get", json!({"name": "keep"}));
    assert_eq!(v["adopted"], true, "{v}");
    assert_ne!(v["id"], id);
}
