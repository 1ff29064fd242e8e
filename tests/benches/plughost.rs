//! plughost benchmarks. Run them with `scripts/bench.sh`; never part of the test suite.
//!
//! The machine is shared and noisy, so every ratio compares two things measured side by side in this
//! one run: variants are sampled round-robin and each reports the median of its samples.
//!
//! `--quick` (as `.ci/run` runs it) runs every group with small counts: its numbers mean nothing, but a
//! group that no longer runs (a refused swap, a changed protocol) fails CI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_volume::FakeVolume;
use host::backend::{Backend, BuildContext, Configured};
use host::Loader;
use plughost_api::{Options, VolumeClient, VolumeDriver};
use plughost_api::{VolumeInterface, VolumeMethod};
use plughost_tests::{fixtures, release_dir, target_dir, TempDir};
use serde_json::{json, Value};

static QUICK: AtomicBool = AtomicBool::new(false);

/// `full`, or `quick` in quick mode.
fn q<T>(full: T, quick: T) -> T {
    if QUICK.load(Ordering::Relaxed) {
        quick
    } else {
        full
    }
}

/// One line of the results.
struct Metric {
    name: String,
    value: f64,
    unit: &'static str,
    baseline: Option<(String, f64)>,
    goal: &'static str,
}

fn metric(name: &str, value: f64, unit: &'static str, baseline: Option<(&str, f64)>, goal: &'static str) -> Metric {
    Metric { name: name.to_owned(), value, unit, baseline: baseline.map(|(n, v)| (n.to_owned(), v)), goal }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Round-robin samples of several variants; the median ns per iteration of each.
fn side_by_side(samples: usize, iters: u64, variants: &mut [&mut dyn FnMut(u64)]) -> Vec<f64> {
    for v in variants.iter_mut() {
        v(iters / 4 + 1);
    }
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..samples {
        for (i, v) in variants.iter_mut().enumerate() {
            let t = Instant::now();
            v(iters);
            per[i].push(t.elapsed().as_nanos() as f64 / iters as f64);
        }
    }
    per.iter_mut().map(|s| median(s)).collect()
}

fn call_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    let lib_path = release_dir().join("libfake_volume.so");
    let loader = Loader::new();
    let lib = loader.load(&lib_path).unwrap();
    // The stable-ABI client of the loaded library, which implements the author trait.
    let client: VolumeClient = lib.construct::<VolumeInterface>(&lib.validate_options(&[]).unwrap()).unwrap().driver;
    let ctx = BuildContext { loader: &loader, state_dir: work, driver_dirs: &[], exe: None };
    let backend: Backend<VolumeInterface> = Backend::build(
        ctx,
        "volume",
        "bench",
        Configured { driver: lib_path.display().to_string(), options: Vec::new(), settings: Default::default() },
    )
    .unwrap();
    backend.init_now();
    let native: Box<dyn VolumeDriver> =
        Box::new(FakeVolume::new(&Options::for_schema(fake_volume::OPTIONS, [] as [(&str, &str); 0])).unwrap());
    let raw_lib_path = fixtures::noop_cdylib_release();
    // SAFETY: a fixture library of ours whose only code is the no-op function looked up below.
    let raw_lib = unsafe { libloading::Library::new(&raw_lib_path) }.unwrap();
    // SAFETY: the fixture defines `plughost_bench_noop` with exactly this signature.
    let raw: extern "C" fn(u64) -> u64 = unsafe { *raw_lib.get(b"plughost_bench_noop\0").unwrap() };

    let stats = host::backend::stats::CallStats::new(1);
    let n = q(2_000_000, 2_000);
    let r = side_by_side(
        q(15, 3),
        n,
        &mut [
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(black_box(&native).health());
                }
            },
            &mut |n| {
                for i in 0..n {
                    black_box(raw(black_box(i)));
                }
            },
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(black_box(&client).health());
                }
            },
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(backend.call(VolumeMethod::health, |d| d.health()));
                }
            },
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(backend.with_active(|a| a.driver.object().health()));
                }
            },
            &mut |n| {
                for _ in 0..n {
                    let p = stats.begin(0);
                    stats.end(p, black_box(None));
                }
            },
        ],
    );
    let (native_ns, raw_ns, client_ns, backend_ns) = (r[0], r[1], r[2], r[3]);
    out.push(metric(
        "call_noop.breakdown.rcu_read_plus_call",
        r[4],
        "ns",
        Some(("call_noop.native_box_dyn", native_ns)),
        "",
    ));
    out.push(metric("call_noop.breakdown.stats_only", r[5], "ns", None, ""));
    out.push(metric("call_noop.native_box_dyn", native_ns, "ns", None, ""));
    out.push(metric("call_noop.raw_extern_c", raw_ns, "ns", Some(("call_noop.native_box_dyn", native_ns)), ""));
    out.push(metric("call_noop.plugin_abi", client_ns, "ns", Some(("call_noop.native_box_dyn", native_ns)), "<= 1.3x"));
    out.push(metric(
        "call_noop.manager_path",
        backend_ns,
        "ns",
        Some(("call_noop.native_box_dyn", native_ns)),
        "<= 1.3x",
    ));

    let buf = vec![7u8; 4096];
    native.create("b", 1 << 20).unwrap();
    client.create("b", 1 << 20).unwrap();
    backend.call(VolumeMethod::create, |d| d.create("b", 1 << 20)).unwrap();
    let r = side_by_side(
        q(15, 3),
        q(200_000, 200),
        &mut [
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(black_box(&native).write_at("b", 0, black_box(&buf)));
                }
            },
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(black_box(&client).write_at("b", 0, black_box(&buf)));
                }
            },
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(backend.call(VolumeMethod::write_at, |d| d.write_at("b", 0, black_box(&buf))));
                }
            },
        ],
    );
    let big = vec![7u8; 64 << 10];
    let r64 = side_by_side(
        11,
        50_000,
        &mut [
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(black_box(&native).write_at("b", 0, black_box(&big)));
                }
            },
            &mut |n| {
                for _ in 0..n {
                    let _ = black_box(black_box(&client).write_at("b", 0, black_box(&big)));
                }
            },
        ],
    );
    out.push(metric("call_buf_4k.native_box_dyn", r[0], "ns", None, ""));
    out.push(metric(
        "call_buf_4k.plugin_abi",
        r[1],
        "ns",
        Some(("call_buf_4k.native_box_dyn", r[0])),
        "zero-copy (~1x)",
    ));
    out.push(metric("call_buf_4k.manager_path", r[2], "ns", Some(("call_buf_4k.native_box_dyn", r[0])), ""));
    // A copy would grow with the buffer; a constant per-call cost does not.
    out.push(metric("call_buf_64k.native_box_dyn", r64[0], "ns", None, ""));
    out.push(metric(
        "call_buf_64k.plugin_abi",
        r64[1],
        "ns",
        Some(("call_buf_64k.native_box_dyn", r64[0])),
        "zero-copy (~1x)",
    ));
    out.push(metric("call_buf.plugin_extra_4k", r[1] - r[0], "ns", None, ""));
    out.push(metric(
        "call_buf.plugin_extra_64k",
        r64[1] - r64[0],
        "ns",
        Some(("call_buf.plugin_extra_4k", r[1] - r[0])),
        "~1x (constant)",
    ));
}

fn load_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    let src = std::fs::read(release_dir().join("libfake_volume.so")).unwrap();
    let files = work.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut counter = 0u64;
    // A copy at a fresh path; `unique` appends bytes after the ELF image, which changes the content
    // (and digest) but not the code.
    let mut copy = |unique: bool| -> PathBuf {
        counter += 1;
        let p = files.join(format!("libcopy-{counter}.so"));
        let mut bytes = src.clone();
        if unique {
            bytes.extend_from_slice(format!("plughost-bench-{counter}").as_bytes());
        }
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let loader = Loader::new();
    let probing = Loader::new().with_probe(release_dir().join("plughost"));
    let mut probed = Vec::new();
    let known = copy(false);
    loader.load(&known).unwrap();
    let (mut raw, mut cold, mut same_content, mut same_path) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let per_sample = 4;
    for _ in 0..q(11, 2) {
        let paths: Vec<PathBuf> = (0..per_sample).map(|_| copy(false)).collect();
        let t = Instant::now();
        for p in &paths {
            // SAFETY: a copy of one of our drivers; loading it runs only its ELF initializers.
            let l = unsafe { libloading::Library::new(p) }.unwrap();
            std::mem::forget(l);
        }
        raw.push(t.elapsed().as_secs_f64() * 1e6 / per_sample as f64);

        let paths: Vec<PathBuf> = (0..per_sample).map(|_| copy(true)).collect();
        let t = Instant::now();
        for p in &paths {
            black_box(loader.load(p).unwrap());
        }
        cold.push(t.elapsed().as_secs_f64() * 1e6 / per_sample as f64);

        let paths: Vec<PathBuf> = (0..per_sample).map(|_| copy(true)).collect();
        let t = Instant::now();
        for p in &paths {
            black_box(probing.load(p).unwrap());
        }
        probed.push(t.elapsed().as_secs_f64() * 1e6 / per_sample as f64);

        let paths: Vec<PathBuf> = (0..per_sample).map(|_| copy(false)).collect();
        let t = Instant::now();
        for p in &paths {
            black_box(loader.load(p).unwrap());
        }
        same_content.push(t.elapsed().as_secs_f64() * 1e6 / per_sample as f64);

        let t = Instant::now();
        for _ in 0..per_sample {
            black_box(loader.load(&known).unwrap());
        }
        same_path.push(t.elapsed().as_secs_f64() * 1e6 / per_sample as f64);
    }
    let raw = median(&mut raw);
    out.push(metric("load_one.raw_dlopen", raw, "us", None, ""));
    out.push(metric("load_one.new_content", median(&mut cold), "us", Some(("load_one.raw_dlopen", raw)), "<= 1.5x"));
    out.push(metric(
        "load_one.new_content_probed",
        median(&mut probed),
        "us",
        Some(("load_one.raw_dlopen", raw)),
        "(as run/inspect load)",
    ));
    out.push(metric(
        "load_one.known_content_new_path",
        median(&mut same_content),
        "us",
        Some(("load_one.raw_dlopen", raw)),
        "<= 1.5x",
    ));
    out.push(metric(
        "load_one.unchanged_path",
        median(&mut same_path),
        "us",
        Some(("load_one.raw_dlopen", raw)),
        "<= 1.5x",
    ));

    let raw_paths: Vec<PathBuf> = (0..q(100, 4)).map(|_| copy(false)).collect();
    let new_paths: Vec<PathBuf> = (0..q(100, 4)).map(|_| copy(true)).collect();
    let t = Instant::now();
    for p in &raw_paths {
        // SAFETY: as above.
        std::mem::forget(unsafe { libloading::Library::new(p) }.unwrap());
    }
    let raw100 = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for p in &new_paths {
        black_box(loader.load(p).unwrap());
    }
    let ours100 = t.elapsed().as_secs_f64() * 1e3;
    out.push(metric("load_100.raw_dlopen", raw100, "ms", None, ""));
    out.push(metric("load_100.new_content", ours100, "ms", Some(("load_100.raw_dlopen", raw100)), "<= 1.5x"));
}

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(state: &Path, args: &[&str]) -> Server {
        let socket = state.join("plughost.sock");
        let mut all = vec!["-q", "run", "--state-dir", state.to_str().unwrap()];
        all.extend_from_slice(args);
        let child = std::process::Command::new(release_dir().join("plughost"))
            .args(&all)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "plughost did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Server { child, socket }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
    line: String,
}

impl Conn {
    fn new(socket: &Path) -> Conn {
        let w = UnixStream::connect(socket).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Conn { w, r, line: String::new() }
    }
    /// Sends a request line, waits for the answer; whether it was ok.
    fn ask(&mut self, req: &str) -> bool {
        self.w.write_all(req.as_bytes()).unwrap();
        self.line.clear();
        self.r.read_line(&mut self.line).unwrap();
        self.line.contains("\"ok\":true")
    }
    fn json(&mut self, req: &Value) -> Value {
        self.ask(&format!("{req}\n"));
        serde_json::from_str(&self.line).unwrap()
    }
}

fn ctl_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    let server = Server::start(&work.join("ctl"), &["--volume-driver", "fake-volume", "--compute-driver", "none"]);
    let mut c = Conn::new(&server.socket);
    assert_eq!(
        c.json(&json!({"id": 0, "service": "volume", "op": "create", "args": {"name": "bench", "size": 4096}}))["ok"],
        true
    );
    let get = "{\"id\":1,\"service\":\"volume\",\"op\":\"get\",\"args\":{\"name\":\"bench\"}}\n";
    let ping = "{\"id\":1,\"op\":\"ping\"}\n";
    for _ in 0..q(2000, 20) {
        c.ask(get);
        c.ask(ping);
    }
    let (mut get_lat, mut ping_lat) = (Vec::new(), Vec::new());
    let mut get_time = Duration::ZERO;
    let rounds = q(500, 20);
    for _ in 0..q(20, 2) {
        let t = Instant::now();
        for _ in 0..rounds {
            let s = Instant::now();
            assert!(c.ask(get));
            get_lat.push(s.elapsed().as_secs_f64() * 1e6);
        }
        get_time += t.elapsed();
        for _ in 0..rounds {
            let s = Instant::now();
            assert!(c.ask(ping));
            ping_lat.push(s.elapsed().as_secs_f64() * 1e6);
        }
    }
    let ping_p50 = percentile(&mut ping_lat, 0.5);
    let ping_p99 = percentile(&mut ping_lat, 0.99);
    out.push(metric("ctl_roundtrip.1_client.ping_p50", ping_p50, "us", None, ""));
    out.push(metric("ctl_roundtrip.1_client.ping_p99", ping_p99, "us", None, ""));
    out.push(metric(
        "ctl_roundtrip.1_client.get_p50",
        percentile(&mut get_lat, 0.5),
        "us",
        Some(("ctl_roundtrip.1_client.ping_p50", ping_p50)),
        "",
    ));
    out.push(metric(
        "ctl_roundtrip.1_client.get_p99",
        percentile(&mut get_lat, 0.99),
        "us",
        Some(("ctl_roundtrip.1_client.ping_p99", ping_p99)),
        "",
    ));
    out.push(metric(
        "ctl_roundtrip.1_client.get_throughput",
        get_lat.len() as f64 / get_time.as_secs_f64(),
        "req/s",
        None,
        "",
    ));

    for (label, req) in [("ping", ping), ("get", get)] {
        let per_client = q(5000, 50);
        let socket = server.socket.clone();
        let t = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let socket = socket.clone();
                std::thread::spawn(move || {
                    let mut c = Conn::new(&socket);
                    let mut lat = Vec::with_capacity(per_client);
                    for _ in 0..per_client {
                        let s = Instant::now();
                        assert!(c.ask(req));
                        lat.push(s.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                })
            })
            .collect();
        let mut lat: Vec<f64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let secs = t.elapsed().as_secs_f64();
        out.push(metric(&format!("ctl_roundtrip.4_clients.{label}_p50"), percentile(&mut lat, 0.5), "us", None, ""));
        out.push(metric(&format!("ctl_roundtrip.4_clients.{label}_p99"), percentile(&mut lat, 0.99), "us", None, ""));
        out.push(metric(
            &format!("ctl_roundtrip.4_clients.{label}_throughput"),
            lat.len() as f64 / secs,
            "req/s",
            None,
            "",
        ));
    }
    drop(server);
}

fn swap_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    // Both builds in driver directories: swapping to any other path is refused by the trust policy.
    let a = release_dir().join("libfile_volume.so");
    let drivers = work.join("swap-drivers");
    std::fs::create_dir_all(&drivers).unwrap();
    let b = drivers.join("libfile_volume_b.so");
    let mut bytes = std::fs::read(&a).unwrap();
    bytes.extend_from_slice(b"plughost-bench-second-build");
    std::fs::write(&b, bytes).unwrap();
    let server = Server::start(
        &work.join("swap"),
        &[
            "--volume-driver",
            a.to_str().unwrap(),
            "--compute-driver",
            "none",
            "--periodic-interval-ms",
            "1000",
            "--driver-dir",
            drivers.to_str().unwrap(),
        ],
    );
    let mut c = Conn::new(&server.socket);
    assert_eq!(
        c.json(&json!({"id": 0, "service": "volume", "op": "create", "args": {"name": "bench", "size": 4096}}))["ok"],
        true
    );
    let get = "{\"id\":1,\"service\":\"volume\",\"op\":\"get\",\"args\":{\"name\":\"bench\"}}\n";
    // Load both builds once, so that swaps measure the swap itself.
    for p in [&b, &a] {
        assert_eq!(
            c.json(&json!({"id": 1, "service": "volume", "op": "swap", "args": {"driver": p.to_str().unwrap()}}))["ok"],
            true
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let socket = server.socket.clone();
    let stop2 = stop.clone();
    let origin = Instant::now();
    let client = std::thread::spawn(move || {
        let mut c = Conn::new(&socket);
        let mut samples: Vec<(f64, f64, bool)> = Vec::new(); // (start s, latency us, ok)
        while !stop2.load(Ordering::Relaxed) {
            let s = Instant::now();
            let ok = c.ask(get);
            samples.push(((s - origin).as_secs_f64(), s.elapsed().as_secs_f64() * 1e6, ok));
        }
        samples
    });
    std::thread::sleep(Duration::from_millis(q(1500, 100)));
    let swaps_start = (Instant::now() - origin).as_secs_f64();
    let mut swap_lat = Vec::new();
    let mut swap_failures = 0;
    for k in 0..q(1000, 10) {
        let p = if k % 2 == 0 { &b } else { &a };
        let s = Instant::now();
        let v = c.json(&json!({"id": 1, "service": "volume", "op": "swap", "args": {"driver": p.to_str().unwrap()}}));
        swap_lat.push(s.elapsed().as_secs_f64() * 1e6);
        if v["ok"] != true {
            swap_failures += 1;
        }
    }
    let swaps_end = (Instant::now() - origin).as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let samples = client.join().unwrap();
    let mut steady: Vec<f64> = samples.iter().filter(|s| s.0 < swaps_start).map(|s| s.1).collect();
    let during: Vec<&(f64, f64, bool)> = samples.iter().filter(|s| s.0 >= swaps_start && s.0 <= swaps_end).collect();
    let worst = during.iter().map(|s| s.1).fold(0.0, f64::max);
    let failed = samples.iter().filter(|s| !s.2).count() + swap_failures;
    if QUICK.load(Ordering::Relaxed) {
        assert_eq!(failed, 0, "requests or swaps failed while swapping");
    }
    let steady_p99 = percentile(&mut steady, 0.99);
    out.push(metric("swap_stall.steady_p99", steady_p99, "us", None, ""));
    out.push(metric(
        "swap_stall.worst_during_swaps",
        worst,
        "us",
        Some(("swap_stall.steady_p99", steady_p99)),
        "<= 1000 us",
    ));
    out.push(metric("swap_stall.requests_during_swaps", during.len() as f64, "count", None, ""));
    out.push(metric("swap_stall.failed_requests", failed as f64, "count", None, "0"));
    out.push(metric("swap_stall.swap_p50", percentile(&mut swap_lat, 0.5), "us", None, ""));
    drop(server);
}

/// Seconds from spawning `plughost run` to its socket answering, and the server.
fn timed_start(state: &Path, args: &[&str]) -> (f64, Server) {
    let t = Instant::now();
    let server = Server::start(state, args);
    let mut c = Conn::new(&server.socket);
    assert!(c.ask("{\"id\":0,\"op\":\"ping\"}\n"));
    (t.elapsed().as_secs_f64(), server)
}

/// Start-up with 100k volumes: the first start adopts 100k volume files found without records; a
/// restart reconciles 100k records with 100k files. Side by side with a start on an empty state dir.
fn startup_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    let n = q(100_000, 500);
    let state = work.join("startup-100k");
    let root = state.join("volumes/default");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..n {
        std::fs::File::create(root.join(format!("v{i:06}.vol"))).unwrap().set_len(1 << 20).unwrap();
    }
    let args = ["--volume-driver", "file-volume", "--compute-driver", "none"];
    let (first, server) = timed_start(&state, &args);
    let mut c = Conn::new(&server.socket);
    let status = c.json(&json!({"id": 1, "op": "status"}));
    assert_eq!(status["result"]["services"][0]["records"], n, "{status}");
    drop(server);
    let empty = work.join("startup-empty");
    let (mut restarts, mut empties) = (Vec::new(), Vec::new());
    for _ in 0..q(5, 1) {
        let (t, server) = timed_start(&state, &args);
        restarts.push(t * 1e3);
        drop(server);
        let _ = std::fs::remove_dir_all(&empty);
        let (t, server) = timed_start(&empty, &args);
        empties.push(t * 1e3);
        drop(server);
    }
    let empty_ms = median(&mut empties);
    out.push(metric("startup_100k.empty_state", empty_ms, "ms", None, ""));
    out.push(metric(
        "startup_100k.first_start_adopting",
        first * 1e3,
        "ms",
        Some(("startup_100k.empty_state", empty_ms)),
        "",
    ));
    out.push(metric(
        "startup_100k.restart",
        median(&mut restarts),
        "ms",
        Some(("startup_100k.empty_state", empty_ms)),
        "<= 2000 ms",
    ));
}

/// Create + delete with 100k records, side by side with the same on an empty host; the host's share is
/// the round trip minus the driver's own time (from status).
fn mutation_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    let n = q(100_000, 500);
    let big = work.join("mutation-100k");
    let root = big.join("volumes/default");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..n {
        std::fs::File::create(root.join(format!("v{i:06}.vol"))).unwrap().set_len(1 << 20).unwrap();
    }
    let args = ["--volume-driver", "file-volume", "--compute-driver", "none"];
    let with_100k = Server::start(&big, &args);
    let empty = Server::start(&work.join("mutation-empty"), &args);
    let mut conns = [Conn::new(&with_100k.socket), Conn::new(&empty.socket)];
    let mut lat: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let warmup = q(50, 2);
    for round in 0..q(400, 6) {
        for (i, c) in conns.iter_mut().enumerate() {
            let name = format!("m{round}");
            let t = Instant::now();
            assert!(c.ask(&format!(
                "{{\"id\":1,\"service\":\"volume\",\"op\":\"create\",\"args\":{{\"name\":\"{name}\",\"size\":4096}}}}\n"
            )));
            assert!(c.ask(&format!(
                "{{\"id\":2,\"service\":\"volume\",\"op\":\"delete\",\"args\":{{\"name\":\"{name}\"}}}}\n"
            )));
            if round >= warmup {
                lat[i].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let driver_ms = |c: &mut Conn| {
        let s = c.json(&json!({"id": 3, "op": "status"}));
        let calls = &s["result"]["services"][0]["backends"][0]["calls"];
        (calls["create"]["mean_us"].as_f64().unwrap() + calls["delete"]["mean_us"].as_f64().unwrap()) / 1e3
    };
    let driver_big = driver_ms(&mut conns[0]);
    let driver_empty = driver_ms(&mut conns[1]);
    let [big_lat, empty_lat] = &mut lat;
    let (p_big, p_empty) = (median(big_lat), median(empty_lat));
    out.push(metric("mutation_with_100k.empty.create_delete_p50", p_empty, "ms", None, ""));
    out.push(metric(
        "mutation_with_100k.create_delete_p50",
        p_big,
        "ms",
        Some(("mutation_with_100k.empty.create_delete_p50", p_empty)),
        "~1x",
    ));
    out.push(metric("mutation_with_100k.empty.host_overhead", p_empty - driver_empty, "ms", None, ""));
    out.push(metric("mutation_with_100k.host_overhead", p_big - driver_big, "ms", None, "<= 2 ms per create+delete"));
}

/// A no-op call (`health`) through an isolated backend (a worker process over a socketpair), against
/// the floor: a ping-pong of frames of the same sizes between two threads over a socketpair; and
/// against the same call in-process.
fn call_isolated_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    use host::config::{BackendSettings, Isolation};
    use plughost_api::VolumeCall;
    let lib_path = release_dir().join("libfake_volume.so");
    let exe = release_dir().join("plughost");
    let loader = Loader::new();
    let ctx = BuildContext { loader: &loader, state_dir: work, driver_dirs: &[], exe: Some(&exe) };
    let build = |isolation| {
        let settings = BackendSettings { isolation, ..BackendSettings::default() };
        let configured = Configured { driver: lib_path.display().to_string(), options: Vec::new(), settings };
        let b: Backend<VolumeInterface> = Backend::build(ctx, "volume", "bench", configured).unwrap();
        b.init_now();
        b
    };
    let isolated = build(Isolation::Process);
    let in_process = build(Isolation::InProcess);
    // The frames of one health call and its answer (as the worker wire has them: 4 + 8 + payload).
    let request = postcard::to_stdvec(&VolumeCall::health).unwrap().len() + 12;
    let reply = postcard::to_stdvec(&plughost_api::VolumeReply::health(Ok(()))).unwrap().len() + 12;
    let (mut a, b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        use std::io::Read;
        let mut b = b;
        let mut inbuf = vec![0u8; request];
        let outbuf = vec![1u8; reply];
        while b.read_exact(&mut inbuf).is_ok() {
            if b.write_all(&outbuf).is_err() {
                break;
            }
        }
    });
    let (req_buf, mut rep_buf) = (vec![2u8; request], vec![0u8; reply]);
    let r = side_by_side(
        q(11, 3),
        q(20_000, 100),
        &mut [
            &mut |n| {
                use std::io::Read;
                for _ in 0..n {
                    a.write_all(&req_buf).unwrap();
                    a.read_exact(&mut rep_buf).unwrap();
                }
            },
            &mut |n| {
                for _ in 0..n {
                    black_box(isolated.call(VolumeMethod::health, |d| d.health())).unwrap();
                }
            },
            &mut |n| {
                for _ in 0..n {
                    black_box(in_process.call(VolumeMethod::health, |d| d.health())).unwrap();
                }
            },
        ],
    );
    drop(a);
    let _ = echo.join();
    let floor_us = r[0] / 1000.0;
    out.push(metric("call_isolated.socketpair_pingpong_floor", floor_us, "us", None, ""));
    out.push(metric(
        "call_isolated.noop",
        r[1] / 1000.0,
        "us",
        Some(("call_isolated.socketpair_pingpong_floor", floor_us)),
        "<= 2x",
    ));
    out.push(metric("call_isolated.in_process", r[2], "ns", None, ""));
    host::backend::BackendControl::cleanup(&isolated);
}

/// A synthetic report of host `name` for the placement benchmark.
fn synthetic_report(name: &str, free: u64) -> plughost_fleet::report::Report {
    use plughost_fleet::report::{BackendReport, HostState, Report, ServiceReport};
    Report {
        host: name.to_owned(),
        fleet: "bench".to_owned(),
        version: "0.1.0".to_owned(),
        api: 1,
        plugin_api: "1.2.0".to_owned(),
        started_at: 0,
        state: HostState::Up,
        service_down_time_ms: 3_600_000,
        labels: [("rack".to_owned(), format!("r{}", free % 10))].into(),
        services: vec![ServiceReport {
            name: "volume".to_owned(),
            default_backend: "default".to_owned(),
            backends: vec![BackendReport {
                name: "default".to_owned(),
                up: true,
                reason: None,
                driver: "file-volume".to_owned(),
                driver_version: "1.0.0".to_owned(),
                digest: format!("blake3:{}", "0".repeat(64)),
                extensions: vec!["volume.revert".to_owned()],
                total_bytes: Some(1 << 40),
                free_bytes: Some(free),
                records: free % 1000,
                failures: 0,
            }],
        }],
    }
}

/// Remote requests through a host against a raw NATS request-reply to a trivial responder (the floor)
/// and the local socket, side by side; placement over 1,000 reports.
fn fleet_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    use plughost_fleet::{Client, Echo};
    let Some(nats) = plughost_tests::nats::Nats::start("bench") else {
        println!("fleet: skipped (no nats-server; scripts/test.sh installs one)");
        return;
    };
    let url = nats.url.clone();
    let server = Server::start(
        &work.join("fleet"),
        &[
            "--volume-driver",
            "fake-volume",
            "--compute-driver",
            "none",
            "--fleet-url",
            &url,
            "--fleet-name",
            "bench",
            "--host-name",
            "b1",
        ],
    );
    let _echo = Echo::start(&url, "bench.echo").unwrap();
    let timeout = Duration::from_secs(10);
    let ping = br#"{"id":1,"op":"ping"}"#;
    let subject = "ph.bench.rpc.b1.host._.read";
    let client = Client::connect(std::slice::from_ref(&url), "bench", None, timeout).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.request("b1", subject, ping, 1, timeout).is_err() {
        assert!(Instant::now() < deadline, "the host did not join the fleet");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut local = Conn::new(&server.socket);
    let (mut remote, mut floor, mut sock) = (Vec::new(), Vec::new(), Vec::new());
    let rounds = q(200, 10);
    for _ in 0..q(20, 2) {
        for _ in 0..rounds {
            let t = Instant::now();
            let a = client.request("b1", subject, ping, 1, timeout).unwrap();
            remote.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(a.windows(11).any(|w| w == b"\"pong\":true"));
            let t = Instant::now();
            client.request("echo", "bench.echo", ping, 1, timeout).unwrap();
            floor.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            assert!(local.ask("{\"id\":1,\"op\":\"ping\"}\n"));
            sock.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let floor_p50 = percentile(&mut floor, 0.5);
    out.push(metric("fleet.1_requester.raw_nats_p50", floor_p50, "us", None, ""));
    out.push(metric("fleet.1_requester.local_socket_ping_p50", percentile(&mut sock, 0.5), "us", None, ""));
    out.push(metric(
        "fleet.1_requester.remote_ping_p50",
        percentile(&mut remote, 0.5),
        "us",
        Some(("fleet.1_requester.raw_nats_p50", floor_p50)),
        "<= 1.5x",
    ));
    out.push(metric("fleet.1_requester.remote_ping_p99", percentile(&mut remote, 0.99), "us", None, ""));
    // A request to a host that is down (nobody serves its subjects): the error comes back at once.
    let mut down = Vec::new();
    for _ in 0..q(200, 5) {
        let t = Instant::now();
        let e = client.request("gone", "ph.bench.rpc.gone.host._.read", ping, 1, timeout);
        assert!(matches!(e, Err(plughost_fleet::ClientError::NoResponders { .. })), "{e:?}");
        down.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.push(metric("fleet.down_host.error_p50", percentile(&mut down, 0.5), "us", None, "< 10 ms"));
    out.push(metric("fleet.down_host.error_p99", percentile(&mut down, 0.99), "us", None, "< 10 ms"));

    // 8 requesters, each with its own connection: the host's throughput, and the floor's.
    let per = q(3000, 20);
    let run8 = |host: &'static str, subject: &'static str| {
        let barrier = Arc::new(std::sync::Barrier::new(9));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let c = Client::connect(&[url], "bench", None, Duration::from_secs(10)).unwrap();
                    barrier.wait();
                    for _ in 0..per {
                        c.request(host, subject, br#"{"id":1,"op":"ping"}"#, 1, Duration::from_secs(10)).unwrap();
                    }
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        for th in threads {
            th.join().unwrap();
        }
        (8 * per) as f64 / t.elapsed().as_secs_f64()
    };
    let mut remote8 = Vec::new();
    let mut floor8 = Vec::new();
    for _ in 0..q(3, 1) {
        remote8.push(run8("b1", "ph.bench.rpc.b1.host._.read"));
        floor8.push(run8("echo", "bench.echo"));
    }
    let floor8 = median(&mut floor8);
    out.push(metric("fleet.8_requesters.raw_nats_throughput", floor8, "req/s", None, ""));
    out.push(metric(
        "fleet.8_requesters.remote_ping_throughput",
        median(&mut remote8),
        "req/s",
        Some(("fleet.8_requesters.raw_nats_throughput", floor8)),
        ">= 15k req/s",
    ));
    drop(server);

    // Placement over 1,000 synthetic host reports in the bucket.
    let n = q(1000, 20);
    for i in 0..n {
        client.put_report(&synthetic_report(&format!("s{i:04}"), (i as u64 + 1) << 30)).unwrap();
    }
    let ask = plughost_fleet::place::Ask {
        service: "volume".to_owned(),
        backend: None,
        size: Some(1 << 30),
        labels: vec![("rack".to_owned(), "r4".to_owned())],
        extensions: vec!["volume.revert".to_owned()],
        min_api: 1,
        weighers: vec![],
        host_subset_size: 1,
        service_down_time: Duration::from_secs(3600),
    };
    let (mut inproc, mut cli) = (Vec::new(), Vec::new());
    for _ in 0..q(5, 1) {
        let t = Instant::now();
        let hosts = client.hosts().unwrap();
        assert_eq!(hosts.len(), n + 1);
        let p = plughost_fleet::place::place(&hosts, &ask).unwrap();
        assert!(!p.ranked.is_empty());
        inproc.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let o = std::process::Command::new(release_dir().join("plughost"))
            .args([
                "place",
                "volume",
                "--size",
                "1GiB",
                "--label",
                "rack=r4",
                "--fleet-url",
                &url,
                "--fleet-name",
                "bench",
            ])
            .args(["--service-down-time", "1h"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        cli.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out.push(metric(&format!("fleet.place_{n}_hosts.read_and_place"), median(&mut inproc), "ms", None, "<= 200 ms"));
    out.push(metric(
        &format!("fleet.place_{n}_hosts.plughost_place_command"),
        median(&mut cli),
        "ms",
        None,
        "<= 200 ms",
    ));
}

/// A raw rtnetlink connection: the network benchmark's baseline, what any tool talking netlink pays.
struct RawRtnl {
    socket: netlink_sys::Socket,
    seq: u32,
}

impl RawRtnl {
    fn open() -> RawRtnl {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).unwrap();
        socket.bind_auto().unwrap();
        socket.connect(&netlink_sys::SocketAddr::new(0, 0)).unwrap();
        RawRtnl { socket, seq: 0 }
    }

    /// A connection in the network namespace bound at `path` (a socket stays in the namespace it was
    /// made in).
    fn open_in(path: &Path) -> RawRtnl {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(path).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns for this short-lived thread only, on a namespace file held open.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            RawRtnl::open()
        })
        .join()
        .unwrap()
    }

    /// The index of link `name`.
    fn index_of(&mut self, name: &str) -> u32 {
        use netlink_packet_core::NetlinkPayload;
        use netlink_packet_route::link::{LinkAttribute, LinkMessage};
        use netlink_packet_route::RouteNetlinkMessage as M;
        let mut l = LinkMessage::default();
        l.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        match self.request(M::GetLink(l), 0) {
            NetlinkPayload::InnerMessage(M::NewLink(l)) => l.header.index,
            other => panic!("netlink: no link {name}: {other:?}"),
        }
    }

    /// Sends one request and returns the first answer to it.
    fn request(
        &mut self,
        msg: netlink_packet_route::RouteNetlinkMessage,
        flags: u16,
    ) -> netlink_packet_core::NetlinkPayload<netlink_packet_route::RouteNetlinkMessage> {
        use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut buf = vec![0u8; m.buffer_len()];
        m.serialize(&mut buf);
        self.socket.send(&buf, 0).unwrap();
        loop {
            let (data, _) = self.socket.recv_from_full().unwrap();
            let answer = NetlinkMessage::<netlink_packet_route::RouteNetlinkMessage>::deserialize(&data).unwrap();
            if answer.header.sequence_number == self.seq {
                return answer.payload;
            }
        }
    }

    /// What attaching a port takes at least, by hand: a veth pair with its peer made in `ns`, the host
    /// end on `bridge` and up, the peer given `addr`/16 and up (through `inside`, a connection in `ns`).
    fn port_by_hand(
        &mut self,
        inside: &mut RawRtnl,
        name: &str,
        peer: &str,
        ns: &std::fs::File,
        bridge: u32,
        addr: [u8; 4],
    ) {
        use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
        use netlink_packet_route::address::{AddressAttribute, AddressMessage};
        use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
        use netlink_packet_route::{AddressFamily, RouteNetlinkMessage as M};
        self.veth(name, peer, ns);
        let host = self.index_of(name);
        let mut m = LinkMessage::default();
        m.header.index = host;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes = vec![LinkAttribute::Controller(bridge)];
        self.ack(M::SetLink(m), 0);
        let p = inside.index_of(peer);
        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        a.header.prefix_len = 16;
        a.header.index = p;
        let ip = std::net::IpAddr::V4(addr.into());
        a.attributes = vec![AddressAttribute::Local(ip), AddressAttribute::Address(ip)];
        inside.ack(M::NewAddress(a), NLM_F_CREATE | NLM_F_EXCL);
        let mut up = LinkMessage::default();
        up.header.index = p;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        inside.ack(M::SetLink(up), 0);
    }

    /// Deletes link `name`.
    fn delete(&mut self, name: &str) {
        use netlink_packet_route::link::{LinkAttribute, LinkMessage};
        let mut d = LinkMessage::default();
        d.attributes = vec![LinkAttribute::IfName(name.to_owned())];
        self.ack(netlink_packet_route::RouteNetlinkMessage::DelLink(d), 0);
    }

    /// Sends one request with an ack and waits for it.
    fn ack(&mut self, msg: netlink_packet_route::RouteNetlinkMessage, flags: u16) {
        use netlink_packet_core::{NetlinkPayload, NLM_F_ACK};
        match self.request(msg, NLM_F_ACK | flags) {
            NetlinkPayload::Error(e) => assert!(e.code.is_none(), "netlink: {e:?}"),
            other => panic!("netlink: unexpected answer {other:?}"),
        }
    }

    /// Creates veth pair `name` / `peer` (the peer in the namespace `ns`, as a port's), then deletes it
    /// (by name): two kernel round trips.
    fn veth_create_delete(&mut self, name: &str, peer: &str, ns: &std::fs::File) {
        self.veth(name, peer, ns);
        self.delete(name);
    }

    /// Creates veth pair `name` / `peer`, the peer in `ns`.
    fn veth(&mut self, name: &str, peer: &str, ns: &std::fs::File) {
        use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
        use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage};
        use netlink_packet_route::RouteNetlinkMessage as M;
        use std::os::fd::AsRawFd;
        let mut p = LinkMessage::default();
        p.attributes = vec![LinkAttribute::IfName(peer.to_owned()), LinkAttribute::NetNsFd(ns.as_raw_fd())];
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
            ]),
        ];
        self.ack(M::NewLink(m), NLM_F_CREATE | NLM_F_EXCL);
    }
}

/// The network group, run inside a network and mount namespace of its own (the benchmark runs itself
/// again under `unshare`): nothing it makes is seen outside, and nothing is left.
fn network_benchmarks(out: &mut Vec<Metric>, work: &Path) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--net", "--mount", "--propagation", "private", "--"]).arg(&exe);
    if QUICK.load(Ordering::Relaxed) {
        cmd.arg("--quick");
    }
    let ran = cmd.env("PLUGHOST_BENCH_NETWORK_INNER", work).stderr(Stdio::inherit()).output().unwrap();
    if !ran.status.success() {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        assert!(!ci, "the network benchmark failed in its namespace ({})", ran.status);
        println!("network: skipped (cannot make a namespace here: it needs root)");
        return;
    }
    let text = String::from_utf8_lossy(&ran.stdout);
    let lines: Vec<Value> = serde_json::from_str(text.lines().last().unwrap_or("[]")).unwrap();
    for l in lines {
        let baseline = l["baseline"].as_str().map(|n| (n.to_owned(), l["baseline_value"].as_f64().unwrap()));
        let goal: &'static str = match l["goal"].as_str().unwrap_or("") {
            "<= 2x" => "<= 2x",
            "<= 1.2x" => "<= 1.2x",
            _ => "",
        };
        out.push(Metric {
            name: l["name"].as_str().unwrap().to_owned(),
            value: l["value"].as_f64().unwrap(),
            unit: "ms",
            baseline,
            goal,
        });
    }
}

/// Makes a network namespace bound at `path` (a thread unshares and bind-mounts its own), as the host
/// does for an instance.
fn make_netns(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(path, b"").unwrap();
    let target = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    std::thread::spawn(move || {
        // SAFETY: unshare affects this short-lived thread only; mount gets NUL-terminated paths.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNET), 0, "unshare");
            let src = c"/proc/thread-self/ns/net";
            let rc = libc::mount(src.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null());
            assert_eq!(rc, 0, "bind mount");
        }
    })
    .join()
    .unwrap();
}

/// Inside the namespace: a host with bridge-network; a port's attach + detach through the socket
/// against a raw netlink veth create + delete, sampled round-robin; then a port's attach with 10 ports
/// on the bridge against the same with 1,000 (each phase with its own raw samples, for the drift).
fn network_inner(work: &Path) -> Vec<Value> {
    let server = Server::start(
        &work.join("network"),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--network-driver", "bridge-network"],
    );
    let mut c = Conn::new(&server.socket);
    let mut ask = |op: &str, args: Value| {
        let v = c.json(&json!({"id": 1, "service": "network", "op": op, "args": args}));
        assert_eq!(v["ok"], true, "{op}: {v}");
        v
    };
    let net = ask("create", json!({"name": "bench", "cidr": "10.99.0.0/16"}));
    let (n, full) = (q(300, 5), q(1000, 20));
    // Every port in a namespace of its own, as an instance's is (with all of them in one namespace, the
    // kernel's cost of one more address on a subnet grows with the addresses there: not our case).
    let ns_dir = work.join("netns");
    std::fs::create_dir_all(&ns_dir).unwrap();
    let fill = |ask: &mut dyn FnMut(&str, Value) -> Value, to: usize, from: usize| {
        for i in from..to {
            let ns = ns_dir.join(format!("f{i}"));
            make_netns(&ns);
            ask("attach", json!({"network": "bench", "id": format!("f{i}"), "netns": ns.to_str().unwrap()}));
        }
    };
    let probe = ns_dir.join("probe");
    make_netns(&probe);
    let probe_file = std::fs::File::open(&probe).unwrap();
    let mut inside = RawRtnl::open_in(&probe);
    let probe = probe.to_str().unwrap().to_owned();
    let mut nl = RawRtnl::open();
    let bridge = nl.index_of(net["result"]["interface"].as_str().unwrap());
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    // One phase, sampled round-robin: (raw veth create + delete, a port by hand, our attach, our
    // attach + detach).
    let mut phase = |ask: &mut dyn FnMut(&str, Value) -> Value, tag: &str| {
        let mut samples: [Vec<f64>; 4] = Default::default();
        for i in 0..n {
            let t = Instant::now();
            nl.veth_create_delete(&format!("bnv{i}"), &format!("bnp{i}"), &probe_file);
            samples[0].push(ms(t));
            let t = Instant::now();
            nl.port_by_hand(&mut inside, &format!("bhv{i}"), &format!("bhp{i}"), &probe_file, bridge, [10, 99, 250, 1]);
            samples[1].push(ms(t));
            nl.delete(&format!("bhv{i}"));
            let t = Instant::now();
            ask("attach", json!({"network": "bench", "id": format!("{tag}{i}"), "netns": probe}));
            samples[2].push(ms(t));
            ask("detach", json!({"id": format!("{tag}{i}")}));
            samples[3].push(ms(t));
        }
        samples.map(|mut v| median(&mut v))
    };
    fill(&mut ask, 10, 0);
    let [raw, hand10, attach10, ours] = phase(&mut ask, "m");
    fill(&mut ask, full, 10);
    let [raw_full, hand_full, attach_full, _] = phase(&mut ask, "k");
    let line = |name: &str, v: f64, base: Option<(&str, f64)>, goal: &str| json!({"name": name, "value": v, "baseline": base.map(|b| b.0), "baseline_value": base.map(|b| b.1), "goal": goal});
    vec![
        line("network.raw_veth_create_delete", raw, None, ""),
        line("network.port_attach_detach", ours, Some(("network.raw_veth_create_delete", raw)), "<= 2x"),
        line("network.attach_with_10_ports", attach10, None, ""),
        line(
            &format!("network.attach_with_{full}_ports"),
            attach_full,
            Some(("network.attach_with_10_ports", attach10)),
            "<= 1.2x",
        ),
        // The kernel's own share, side by side: the same port made by hand with 10 and with `full` ports
        // on the bridge (its cost grows with the bridge too), and the raw veth in both phases (drift).
        line("network.port_by_hand_with_10_ports", hand10, None, ""),
        line(
            &format!("network.port_by_hand_with_{full}_ports"),
            hand_full,
            Some(("network.port_by_hand_with_10_ports", hand10)),
            "",
        ),
        line(
            &format!("network.raw_veth_create_delete_{full}"),
            raw_full,
            Some(("network.raw_veth_create_delete", raw)),
            "",
        ),
    ]
}

fn main() {
    if let Some(work) = std::env::var_os("PLUGHOST_BENCH_NETWORK_INNER") {
        // The network group's inner run, in its own namespaces: its metrics, as one JSON line.
        QUICK.store(std::env::args().any(|a| a == "--quick"), Ordering::Relaxed);
        let lines = network_inner(Path::new(&work));
        println!("{}", Value::Array(lines));
        return;
    }
    // `cargo bench` passes `--bench`; a filter argument selects groups by prefix.
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    QUICK.store(std::env::args().any(|a| a == "--quick"), Ordering::Relaxed);
    let wanted = |g: &str| filter.is_empty() || filter.iter().any(|f| g.starts_with(f.as_str()));
    plughost_tests::build_release();
    let work = TempDir::new("bench");
    let mut out = Vec::new();
    if wanted("call") {
        call_benchmarks(&mut out, work.path());
    }
    if wanted("load") {
        load_benchmarks(&mut out, work.path());
    }
    if wanted("ctl") {
        ctl_benchmarks(&mut out, work.path());
    }
    if wanted("swap") {
        swap_benchmarks(&mut out, work.path());
    }
    if wanted("call_isolated") {
        call_isolated_benchmarks(&mut out, work.path());
    }
    if wanted("startup") {
        startup_benchmarks(&mut out, work.path());
    }
    if wanted("mutation") {
        mutation_benchmarks(&mut out, work.path());
    }
    if wanted("fleet") {
        fleet_benchmarks(&mut out, work.path());
    }
    if wanted("network") {
        network_benchmarks(&mut out, work.path());
    }

    println!("{:<44} {:>12} {:<6} {:>9}  goal", "metric", "value", "unit", "ratio");
    let mut summary = serde_json::Map::new();
    for m in &out {
        let ratio = m.baseline.as_ref().map(|(_, b)| m.value / b);
        println!(
            "{:<44} {:>12.2} {:<6} {:>9}  {}{}",
            m.name,
            m.value,
            m.unit,
            ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
            m.goal,
            m.baseline.as_ref().map(|(n, _)| format!("  (vs {n})")).unwrap_or_default()
        );
        summary.insert(
            m.name.clone(),
            json!({
                "value": m.value,
                "unit": m.unit,
                "baseline": m.baseline.as_ref().map(|(n, v)| json!({"metric": n, "value": v})),
                "ratio": ratio,
                "goal": if m.goal.is_empty() { Value::Null } else { json!(m.goal) },
            }),
        );
    }
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(q("summary.json", "summary.quick.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(summary)).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}
