//! The network service on a real host with the in-memory fake-network driver: off unless configured,
//! networks with IPAM (lowest free address, reserved ones skipped, no early reuse, full subnets,
//! overlaps), ports attached and detached through the socket and `ctl`, records kept across a restart;
//! and bridge-network, only ever inside network and mount namespaces the test makes itself: its
//! conformance suite, two namespaces on one bridge talking TCP (checked from inside them), 200 ports,
//! a full bridge, kill -9 mid-attach; and compute instances with networks (process-compute spawning
//! into a namespace of the host's): two instances talking TCP, destroy, restarts (a private mount
//! namespace's too), a reboot (a host on a machine of its own, made again from its records), a replaced
//! namespace, kill -9 mid-spawn, drivers without `spawn_in`, a relative socket path, a FIFO where a
//! namespace should be.

use plughost_tests::process::{run, Daemon};
use plughost_tests::TempDir;
use serde_json::{json, Value};

fn start(t: &TempDir) -> Daemon {
    Daemon::start(
        t.path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--network-driver", "fake-network"],
    )
}

fn addresses(d: &mut Daemon) -> Vec<String> {
    let ports = d.ok("network", "ports", json!({}));
    let mut a: Vec<String> =
        ports["ports"].as_array().unwrap().iter().map(|p| p["address"].as_str().unwrap().to_owned()).collect();
    a.sort();
    a
}

#[test]
fn the_network_service_is_off_unless_configured() {
    let t = TempDir::new("net-off");
    let mut d = Daemon::start(t.path(), &["--volume-driver", "fake-volume", "--compute-driver", "none"]);
    let v = d.call("network", "list", json!({}));
    assert_eq!(v["error"]["message"], "the network service is not enabled", "{v}");
    let s = d.ok("", "status", json!({}));
    assert!(s["services"].as_array().unwrap().iter().all(|s| s["name"] != "network"), "{s}");
}

#[test]
fn networks_give_ports_the_lowest_free_address_and_keep_them_until_their_records_go() {
    let t = TempDir::new("net-ipam");
    let mut d = start(&t);
    let sock = d.socket.to_str().unwrap().to_owned();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--socket", sock.as_str(), "network"];
        all.extend_from_slice(args);
        run(&all)
    };
    let r = ctl(&["create", "lan", "--cidr", "10.7.0.0/29"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("cidr: 10.7.0.0/29") && r.stdout.contains("gateway: 10.7.0.1"), "{}", r.stdout);
    // Refused, each naming why: an overlap, host bits, a prefix too long, a gateway outside.
    for (args, want) in [
        (vec!["create", "lan2", "--cidr", "10.7.0.4/30"], "10.7.0.4/30 overlaps network \"lan\" (10.7.0.0/29)"),
        (vec!["create", "x", "--cidr", "10.8.0.1/24"], "host bits are set; the network is 10.8.0.0/24"),
        (vec!["create", "x", "--cidr", "10.8.0.0/31"], "prefix length 31: from 8 to 30"),
        (vec!["create", "x", "--cidr", "10.8.0.0/24", "--gateway", "10.9.0.1"], "not a host address of 10.8.0.0/24"),
    ] {
        let r = ctl(&args);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(
            r.stderr.starts_with("plughost: invalid_argument: ") && r.stderr.contains(want),
            "{args:?}: {}",
            r.stderr
        );
    }
    // Five host addresses besides the gateway: .2 to .6, lowest first; then no_capacity.
    for i in 0..5 {
        let p = d.ok("network", "attach", json!({"network": "lan", "id": format!("p{i}")}));
        assert_eq!(p["port"]["address"], format!("10.7.0.{}/29", i + 2), "{p}");
        assert!(p["port"]["mac"].as_str().unwrap().starts_with("02:"), "{p}");
    }
    let v = d.call("network", "attach", json!({"network": "lan"}));
    assert_eq!(v["error"]["kind"], "no_capacity", "{v}");
    // A network with ports is busy; a detached port's address is free again and taken lowest first.
    let r = ctl(&["delete", "lan"]);
    assert!(r.stderr.contains("busy: network \"lan\" has 5 port(s)"), "{}", r.stderr);
    let r = ctl(&["detach", "p1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let p = d.ok("network", "attach", json!({"network": "lan", "id": "again"}));
    assert_eq!(p["port"]["address"], "10.7.0.3/29", "{p}");
    // An id too long for interface names, a relative namespace path: refused before anything is kept.
    assert_eq!(d.err("network", "attach", json!({"network": "lan", "id": "x234567890123"})), "invalid_argument");
    assert_eq!(d.err("network", "attach", json!({"network": "lan", "netns": "run/ns"})), "invalid_argument");
    assert_eq!(d.err("network", "attach", json!({"network": "nope"})), "not_found");

    // Ports in namespaces: one that will be there after a restart (the host's own), one that will not.
    for id in ["p0", "p2"] {
        d.ok("network", "detach", json!({"id": id}));
    }
    d.ok("network", "attach", json!({"network": "lan", "id": "here", "netns": "/proc/self/ns/net"}));
    d.ok("network", "attach", json!({"network": "lan", "id": "gone", "netns": "/nonexistent/ns"}));

    // The records outlive the host.
    let before = addresses(&mut d);
    drop(d);
    let mut d = start(&t);
    assert_eq!(addresses(&mut d), before);
    let r = run(&["ctl", "--socket", d.socket.to_str().unwrap(), "network", "list"]);
    assert!(r.stdout.lines().any(|l| l.starts_with("lan ") && l.contains("10.7.0.0/29")), "{}", r.stdout);
    let listed: Value = d.ok("network", "list", json!({}));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    // fake-network forgets everything with its host, as a reboot does: the network is made again, and
    // the ports attached again as recorded, but for the one whose namespace is not there: missing (its
    // address kept) until it is detached.
    assert_eq!((listed[0]["status"].as_str(), listed[0]["reason"].as_str()), (Some("available"), None), "{listed}");
    let ports = d.ok("network", "ports", json!({}));
    let mut states: Vec<(String, String)> = ports["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["status"].as_str().unwrap().to_owned()))
        .collect();
    states.sort();
    let want = [("again", "attached"), ("gone", "error"), ("here", "attached"), ("p3", "attached"), ("p4", "attached")];
    assert_eq!(states, want.map(|(a, b)| (a.to_owned(), b.to_owned())), "{ports}");
}

/// Runs test `inner` of this binary again inside a network and mount namespace of its own (`unshare
/// --net --mount --propagation private`): every bridge, veth and namespace it makes goes with it, even
/// if it panics, and no packet can leave. Without the privilege it says it is skipped (in CI it must run).
fn in_own_namespaces(inner: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(&exe)
        .args(["--exact", inner, "--ignored", "--nocapture", "--test-threads", "1"])
        .env("PLUGHOST_IN_OWN_NAMESPACES", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let denied = stderr.contains("Operation not permitted") || stderr.contains("Permission denied");
    if !out.status.success() && denied && !matches!(std::env::var("CI").as_deref(), Ok("true")) {
        println!("skipped {inner}: cannot make namespaces here (needs root): {}", stderr.lines().next().unwrap_or(""));
        return;
    }
    assert!(out.status.success() && stdout.contains("1 passed"), "{inner} in its own namespaces:\n{stdout}\n{stderr}");
}

fn inside() -> bool {
    std::env::var("PLUGHOST_IN_OWN_NAMESPACES").as_deref() == Ok("1")
}

/// Makes a persistent network namespace bound to `path` (inside the test's mount namespace).
fn netns(path: &std::path::Path) {
    std::fs::write(path, b"").unwrap();
    let ok =
        std::process::Command::new("unshare").arg(format!("--net={}", path.display())).arg("true").status().unwrap();
    assert!(ok.success(), "unshare --net={}", path.display());
}

/// Runs `f` in a thread that entered the network namespace at `path`.
fn in_netns<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file held open, for this thread only.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
        f()
    })
}

/// The links of the calling thread's network namespace (`/proc/thread-self/net/dev`; /sys shows the
/// namespace of whoever mounted it).
fn links() -> Vec<String> {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(|n| n.trim().to_owned()).collect()
}

#[test]
fn bridge_network_passes_the_conformance_suite_in_its_own_namespace() {
    in_own_namespaces("network::inner_bridge_network_conformance");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_bridge_network_conformance() {
    if !inside() {
        return;
    }
    let r = run(&["check", plughost_tests::driver("bridge-network").to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("10 checks, 10 passed, 0 failed"), "{}", r.stdout);
    assert!(links().iter().all(|l| !l.starts_with("ph")), "left behind: {:?}", links());
}

#[test]
fn two_namespaces_on_one_bridge_talk_and_detaching_leaves_nothing() {
    in_own_namespaces("network::inner_two_namespaces_on_one_bridge");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_two_namespaces_on_one_bridge() {
    if !inside() {
        return;
    }
    use std::io::{Read, Write};
    let t = TempDir::new("net-bridge");
    let (a, b) = (t.join("ns-a"), t.join("ns-b"));
    netns(&a);
    netns(&b);
    let mut d = Daemon::start(
        t.join("state").as_path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--network-driver", "bridge-network"],
    );
    d.ok("network", "create", json!({"name": "lan", "cidr": "10.50.0.0/24"}));
    let pa = d.ok("network", "attach", json!({"network": "lan", "id": "a", "netns": a.to_str().unwrap()}));
    let pb = d.ok("network", "attach", json!({"network": "lan", "id": "b", "netns": b.to_str().unwrap()}));
    assert_eq!(
        (pa["port"]["address"].as_str(), pb["port"]["address"].as_str()),
        (Some("10.50.0.2/24"), Some("10.50.0.3/24"))
    );
    assert_eq!(pa["port"]["host_interface"], "phva", "{pa}");
    // A FIFO where a namespace should be is refused at once (not waited on for a writer), leaving nothing.
    let fifo = t.join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let e = d.call("network", "attach", json!({"network": "lan", "id": "f", "netns": fifo.to_str().unwrap()}));
    assert_eq!(e["ok"], false, "{e}");
    assert_eq!(e["error"]["kind"], "invalid_argument", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().ends_with("fifo\": not a network namespace"), "{e}");
    assert!(
        !links().contains(&"phvf".to_owned())
            && d.call("network", "ports", json!({}))["result"]["ports"].as_array().unwrap().len() == 2
    );
    // A listener in a's namespace, a client in b's: the bridge carries it; nothing goes elsewhere.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_netns(&a, move || {
        let l = std::net::TcpListener::bind("10.50.0.2:7000").unwrap();
        tx.send(()).unwrap();
        let (mut s, peer) = l.accept().unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"pong!").unwrap();
        (got, peer.ip().to_string())
    });
    rx.recv().unwrap();
    let client = in_netns(&b, || {
        let mut s = std::net::TcpStream::connect_timeout(
            &"10.50.0.2:7000".parse().unwrap(),
            std::time::Duration::from_secs(10),
        )
        .unwrap();
        s.write_all(b"ping!").unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        got
    });
    assert_eq!(&client.join().unwrap(), b"pong!");
    let (got, peer) = server.join().unwrap();
    assert_eq!((&got, peer.as_str()), (b"ping!", "10.50.0.3"));
    // The host ends are here, on the bridge; the other ends are in the instances' namespaces only.
    let here = links();
    assert!(here.contains(&"phva".to_owned()) && here.contains(&"phvb".to_owned()), "{here:?}");
    assert!(!here.contains(&"eth0".to_owned()), "the other ends are not here: {here:?}");
    let there = in_netns(&a, links).join().unwrap();
    assert!(there.contains(&"eth0".to_owned()) && !there.iter().any(|l| l.starts_with("ph")), "{there:?}");
    // Detach and delete: no veth, no bridge left.
    d.ok("network", "detach", json!({"id": "a"}));
    d.ok("network", "detach", json!({"id": "b"}));
    d.ok("network", "delete", json!({"name": "lan"}));
    assert!(links().iter().all(|l| !l.starts_with("ph")), "left behind: {:?}", links());
    assert!(!in_netns(&a, links).join().unwrap().contains(&"eth0".to_owned()), "the other end went with the pair");
}

#[test]
fn two_hundred_ports_on_one_bridge_come_and_go_without_a_trace() {
    in_own_namespaces("network::inner_two_hundred_ports");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_two_hundred_ports() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-200");
    let mut d = Daemon::start(
        t.join("state").as_path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--network-driver", "bridge-network"],
    );
    d.ok("network", "create", json!({"name": "big", "cidr": "10.60.0.0/24"}));
    for i in 0..200 {
        let p = d.ok("network", "attach", json!({"network": "big", "id": format!("q{i}")}));
        assert_eq!(p["port"]["address"], format!("10.60.0.{}/24", i + 2), "{p}");
    }
    let ours = |ls: &[String]| ls.iter().filter(|l| l.starts_with("phv") || l.starts_with("php")).count();
    assert_eq!(ours(&links()), 400, "a veth pair per port");
    assert_eq!(d.ok("network", "ports", json!({"network": "big"}))["ports"].as_array().unwrap().len(), 200);
    for i in 0..200 {
        d.ok("network", "detach", json!({"id": format!("q{i}")}));
    }
    d.ok("network", "delete", json!({"name": "big"}));
    assert!(links().iter().all(|l| !l.starts_with("ph")), "left behind: {:?}", links());
}

#[test]
fn kill_9_while_attaching_leaks_no_veth_and_gives_no_address_twice() {
    in_own_namespaces("network::inner_kill_9_while_attaching");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_kill_9_while_attaching() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-kill");
    let state = t.join("state");
    let args = ["--volume-driver", "fake-volume", "--compute-driver", "none", "--network-driver", "bridge-network"];
    for round in 0..3 {
        let mut d = Daemon::start(&state, &args);
        if round == 0 {
            d.ok("network", "create", json!({"name": "lan", "cidr": "10.70.0.0/24"}));
        }
        // A client attaching as fast as it can; the host killed after a few of them, mid-attach.
        let socket = d.socket.clone();
        let attacher = std::thread::spawn(move || {
            let mut c = plughost_tests::process::Client::connect(&socket);
            for i in 0.. {
                if c.call("network", "attach", json!({"network": "lan", "id": format!("r{round}p{i}")})).is_none() {
                    return i;
                }
            }
            unreachable!()
        });
        std::thread::sleep(std::time::Duration::from_millis(150 + 70 * round));
        d.kill9();
        attacher.join().unwrap();
    }
    // After a restart and its reconcile: every veth of ours has a record, every record its veth, and
    // no address is held twice.
    let mut d = Daemon::start(&state, &args);
    let ports = d.ok("network", "ports", json!({"network": "lan"}));
    let ports = ports["ports"].as_array().unwrap().clone();
    assert!(!ports.is_empty());
    assert!(ports.iter().all(|p| p["status"] == "attached"), "{ports:?}");
    let mut addresses: Vec<&str> = ports.iter().map(|p| p["address"].as_str().unwrap()).collect();
    let n = addresses.len();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), n, "an address given twice: {ports:?}");
    let mut recorded: Vec<String> = ports.iter().map(|p| p["host_interface"].as_str().unwrap().to_owned()).collect();
    recorded.sort();
    let mut veths: Vec<String> = links().into_iter().filter(|l| l.starts_with("phv")).collect();
    veths.sort();
    assert_eq!(veths, recorded, "veths on the machine against the port records");
    // And they all go cleanly.
    for p in &ports {
        d.ok("network", "detach", json!({"id": p["name"]}));
    }
    d.ok("network", "delete", json!({"name": "lan"}));
    assert!(links().iter().all(|l| !l.starts_with("ph")), "left behind: {:?}", links());
}

#[test]
fn a_link_left_unnamed_by_a_dead_host_is_removed_and_a_foreign_one_is_left_alone() {
    in_own_namespaces("network::inner_half_made_links");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_half_made_links() {
    if !inside() {
        return;
    }
    // As a host killed between making a veth and naming it leaves it: in bridge-network's link group
    // (0x706c) with no alias. And one of someone else's with a name that looks like ours. (The test
    // uses `ip` to make them; the driver never runs it.)
    let ip =
        |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["link", "add", "name", "phvhalf", "group", "28780", "type", "veth", "peer", "name", "phphalf"]);
    ip(&["link", "add", "name", "phvother", "type", "veth", "peer", "name", "phpother"]);
    let t = TempDir::new("net-half");
    let mut d = Daemon::start(
        t.join("state").as_path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--network-driver", "bridge-network"],
    );
    assert_eq!(d.ok("", "ping", json!({}))["pong"], true);
    let now = links();
    assert!(!now.iter().any(|l| l == "phvhalf" || l == "phphalf"), "the half-made pair is gone: {now:?}");
    assert!(
        now.iter().any(|l| l == "phvother") && now.iter().any(|l| l == "phpother"),
        "the foreign pair stays: {now:?}"
    );
    assert_eq!(d.ok("network", "ports", json!({}))["ports"].as_array().unwrap().len(), 0, "and is not adopted");
}

#[test]
fn an_option_this_kernel_cannot_serve_is_refused_in_one_line() {
    // No 802.1Q in this machine's kernel: the constructor says so before anything is made.
    let t = TempDir::new("net-vlan");
    let r = run(&[
        "run",
        "--state-dir",
        t.path().to_str().unwrap(),
        "--volume-driver",
        "fake-volume",
        "--compute-driver",
        "none",
        "--network-driver",
        "bridge-network",
        "--network-opt",
        "vlan=10",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("option \"vlan\" = 10: this kernel has no 802.1Q support")
            || r.stderr.contains("option \"vlan\" = 10: VLAN uplinks are not implemented yet"),
        "{}",
        r.stderr
    );
}

/// An instance's program for the end-to-end tests (this test binary, run again by process-compute in
/// the instance's namespace): `PLUGHOST_TCP=serve=ADDR` accepts one connection on ADDR and answers
/// `ping!` with `pong!`; `connect=ADDR` (retrying while nothing listens) sends `ping!` and expects
/// `pong!`. It passes (exit 0) only if the exchange did.
#[test]
#[ignore = "an instance's program in the end-to-end tests (see instances_on_one_network_talk)"]
fn tool_tcp() {
    use std::io::{Read, Write};
    let Ok(what) = std::env::var("PLUGHOST_TCP") else { return };
    match what.split_once('=').unwrap() {
        ("serve", addr) => {
            let l = std::net::TcpListener::bind(addr).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let mut got = [0u8; 5];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping!");
            s.write_all(b"pong!").unwrap();
        }
        ("connect", addr) => {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let mut s = loop {
                match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) => assert!(std::time::Instant::now() < deadline, "connect {addr}: {e}"),
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            s.write_all(b"ping!").unwrap();
            let mut got = [0u8; 5];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"pong!");
        }
        other => panic!("PLUGHOST_TCP={other:?}"),
    }
}

/// The spawn arguments of an instance running [`tool_tcp`] with `PLUGHOST_TCP=what`.
fn tcp_instance(name: &str, networks: &[&str], what: &str) -> Value {
    let exe = std::env::current_exe().unwrap();
    json!({
        "name": name,
        "command": exe.to_str().unwrap(),
        "args": ["--exact", "network::tool_tcp", "--ignored", "--nocapture", "--test-threads", "1"],
        "env": {"PLUGHOST_TCP": what},
        "networks": networks,
    })
}

/// Waits until instance `name` is stopped; its record.
fn stopped(d: &mut Daemon, name: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let i = d.ok("compute", "get", json!({"name": name}));
        if i["status"] != "running" {
            return i;
        }
        assert!(std::time::Instant::now() < deadline, "instance {name} still running: {i}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Destroys `instances`, deletes `networks`, and checks that nothing of theirs is left: no namespace
/// under the runtime dir (`t/run`), no port, no `ph*` link.
fn tear_down(d: &mut Daemon, t: &TempDir, instances: &[&str], networks: &[&str]) {
    for name in instances {
        d.ok("compute", "destroy", json!({"name": name}));
    }
    assert_eq!(std::fs::read_dir(t.join("run/netns")).unwrap().count(), 0, "a namespace left");
    assert!(d.ok("network", "ports", json!({}))["ports"].as_array().unwrap().is_empty(), "a port left");
    for name in networks {
        d.ok("network", "delete", json!({"name": name}));
    }
    assert!(links().iter().all(|l| !l.starts_with("ph")), "left behind: {:?}", links());
}

fn inode(path: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

fn e2e_args() -> [&'static str; 6] {
    ["--volume-driver", "fake-volume", "--compute-driver", "process-compute", "--network-driver", "bridge-network"]
}

#[test]
fn instances_on_one_network_talk_and_destroy_leaves_nothing() {
    in_own_namespaces("network::inner_instances_on_one_network");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_instances_on_one_network() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-e2e");
    let (state, socket) = (t.join("state"), t.join("run/plughost.sock"));
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), |_| {});
    d.ok("network", "create", json!({"name": "lan", "cidr": "10.80.0.0/24"}));
    let srv = d.ok("compute", "spawn", tcp_instance("srv", &["lan"], "serve=10.80.0.2:7000"));
    // Its namespace: bound under the runtime dir, made for it, the process in it, not ours.
    let ns = srv["netns"].as_str().unwrap().to_owned();
    assert_eq!(std::path::Path::new(&ns).parent(), Some(t.join("run/netns").as_path()), "{srv}");
    assert_eq!(srv["netns_inode"].as_u64(), Some(inode(&ns)), "{srv}");
    let pid = srv["pid"].as_u64().unwrap();
    assert_eq!(inode(&format!("/proc/{pid}/ns/net")), inode(&ns), "the process is in its namespace");
    assert_ne!(inode(&ns), inode("/proc/self/ns/net"));
    // Private to the host's user: nobody else may list the namespaces or open one to enter it.
    let meta = std::fs::metadata(t.join("run/netns")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o700);
    let mut peek = std::process::Command::new("nsenter");
    peek.arg(format!("--net={ns}")).arg("true").stderr(std::process::Stdio::null());
    std::os::unix::process::CommandExt::uid(&mut peek, 65534);
    std::os::unix::process::CommandExt::gid(&mut peek, 65534);
    assert!(!peek.status().unwrap().success(), "nobody entered {ns}");
    let port = &srv["ports"][0];
    assert_eq!(
        (port["network"].as_str(), port["address"].as_str(), port["ifname"].as_str()),
        (Some("lan"), Some("10.80.0.2/24"), Some("eth0")),
        "{srv}"
    );
    assert!(port["mac"].as_str().unwrap().starts_with("02:"), "{srv}");
    assert_eq!(srv["status"], "running", "{srv}");
    // The other one connects to it over the bridge and exits 0; so does the server, once served.
    let cli = d.ok("compute", "spawn", tcp_instance("cli", &["lan"], "connect=10.80.0.2:7000"));
    assert_eq!(cli["ports"][0]["address"], "10.80.0.3/24", "{cli}");
    let cli = stopped(&mut d, "cli");
    assert_eq!(cli["exit_code"], 0, "{cli}");
    let srv = stopped(&mut d, "srv");
    assert_eq!(srv["exit_code"], 0, "{srv}");
    // The network service shows both ports, in their namespaces.
    let ports = d.ok("network", "ports", json!({"network": "lan"}));
    assert_eq!(ports["ports"].as_array().unwrap().len(), 2, "{ports}");
    // An instance's port goes with its instance, not by hand.
    let id = srv["ports"][0]["id"].as_str().unwrap();
    let e = d.call("network", "detach", json!({"id": id}));
    assert_eq!(e["error"]["kind"], "busy", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("destroy the instance"), "{e}");
    // A network that does not exist: refused, nothing left behind.
    let e = d.call("compute", "spawn", tcp_instance("lost", &["nope"], "serve=10.80.0.9:7000"));
    assert_eq!(e["error"]["kind"], "not_found", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("network \"nope\""), "{e}");
    assert_eq!(std::fs::read_dir(t.join("run/netns")).unwrap().count(), 2, "no namespace left by the refusal");
    // Destroy: the namespace is gone, the port detached and its address free again.
    d.ok("compute", "destroy", json!({"name": "srv"}));
    assert!(!std::path::Path::new(&ns).exists(), "{ns} left behind");
    let ports = d.ok("network", "ports", json!({"network": "lan"}));
    assert_eq!(ports["ports"].as_array().unwrap().len(), 1, "{ports}");
    // (By `ctl`, as people do.)
    let exe = std::env::current_exe().unwrap();
    let sock = socket.to_str().unwrap();
    let spawned = run(&[
        "ctl",
        "--socket",
        sock,
        "--json",
        "compute",
        "spawn",
        "again",
        "--network",
        "lan",
        "--env",
        "PLUGHOST_TCP=serve=10.80.0.2:7001",
        "--",
        exe.to_str().unwrap(),
        "--exact",
        "network::tool_tcp",
        "--ignored",
    ]);
    assert_eq!(spawned.code, 0, "{}{}", spawned.stdout, spawned.stderr);
    let again: Value = serde_json::from_str(&spawned.stdout).unwrap();
    assert_eq!(again["result"]["ports"][0]["address"], "10.80.0.2/24", "the address was released: {again}");
    // On two networks: eth0 on the first, eth1 on the second, both in its namespace.
    d.ok("network", "create", json!({"name": "lan2", "cidr": "10.79.0.0/24"}));
    let two = d.ok(
        "compute",
        "spawn",
        json!({"name": "two", "command": "sleep", "args": ["60"], "networks": ["lan", "lan2"]}),
    );
    let ports: Vec<(&str, &str)> = two["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["network"].as_str().unwrap(), p["ifname"].as_str().unwrap()))
        .collect();
    assert_eq!(ports, [("lan", "eth0"), ("lan2", "eth1")], "{two}");
    assert_eq!(two["ports"][1]["address"], "10.79.0.2/24", "{two}");
    let inside_two = in_netns(std::path::Path::new(two["netns"].as_str().unwrap()), links).join().unwrap();
    assert!(inside_two.contains(&"eth0".to_owned()) && inside_two.contains(&"eth1".to_owned()), "{inside_two:?}");
    // `ctl compute list` shows an instance's addresses, eth0's first; `-` for one without networks.
    d.ok("compute", "spawn", json!({"name": "alone", "command": "sleep", "args": ["60"]}));
    let listed = run(&["ctl", "--socket", sock, "compute", "list"]);
    let line = |name: &str| listed.stdout.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap().to_owned();
    let bare = |p: &Value| p["address"].as_str().unwrap().split('/').next().unwrap().to_owned();
    let want = format!(" {},{} ", bare(&two["ports"][0]), bare(&two["ports"][1]));
    assert!(listed.stdout.starts_with("NAME ") && line("two").contains(&want), "{want}:\n{}", listed.stdout);
    assert!(line("alone").contains(" - "), "{}", listed.stdout);
    tear_down(&mut d, &t, &["cli", "again", "two", "alone"], &["lan2", "lan"]);
}

#[test]
fn instances_keep_their_network_across_a_restart_and_a_replaced_namespace_is_an_error() {
    in_own_namespaces("network::inner_instances_across_a_restart");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_instances_across_a_restart() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-restart");
    let (state, socket) = (t.join("state"), t.join("run/plughost.sock"));
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), |_| {});
    d.ok("network", "create", json!({"name": "lan", "cidr": "10.81.0.0/24"}));
    let srv = d.ok("compute", "spawn", tcp_instance("srv", &["lan"], "serve=10.81.0.2:7000"));
    let sleepy =
        d.ok("compute", "spawn", json!({"name": "sleepy", "command": "sleep", "args": ["120"], "networks": ["lan"]}));
    let (code, _) = d.stop();
    assert_eq!(code, 0);
    // Re-adopted after the restart: the same process, in the namespace made for it, with its port.
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), |_| {});
    let after = d.ok("compute", "get", json!({"name": "srv"}));
    for field in ["pid", "netns", "netns_inode", "ports"] {
        assert_eq!(after[field], srv[field], "{field}: {after}");
    }
    assert_eq!(after["status"], "running", "{after}");
    // And it still serves: an instance spawned by the new host reaches it.
    d.ok("compute", "spawn", tcp_instance("cli", &["lan"], "connect=10.81.0.2:7000"));
    assert_eq!(stopped(&mut d, "cli")["exit_code"], 0);
    // (An adopted process is not the new host's child: how it ended cannot be known.)
    assert_eq!(stopped(&mut d, "srv")["exit_unknown"], true);
    // Someone binds another namespace where sleepy's was: the record says so (the process is not in
    // the namespace the file now names).
    let ns = sleepy["netns"].as_str().unwrap();
    assert!(std::process::Command::new("umount").arg(ns).status().unwrap().success());
    netns(std::path::Path::new(ns));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let replaced = loop {
        let i = d.ok("compute", "get", json!({"name": "sleepy"}));
        if i["status"] == "error" {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "never noticed: {i}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        replaced["reason"].as_str().unwrap().contains(&format!("network namespace {ns} was replaced")),
        "{replaced}"
    );
    tear_down(&mut d, &t, &["srv", "cli", "sleepy"], &["lan"]);
}

#[test]
fn kill_9_while_spawning_with_networks_leaks_nothing_and_gives_no_address_twice() {
    in_own_namespaces("network::inner_kill_9_while_spawning");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_kill_9_while_spawning() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-kill-spawn");
    let (state, socket) = (t.join("state"), t.join("run/plughost.sock"));
    for round in 0..3u64 {
        let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), |_| {});
        if round == 0 {
            d.ok("network", "create", json!({"name": "a", "cidr": "10.82.0.0/24"}));
            d.ok("network", "create", json!({"name": "b", "cidr": "10.83.0.0/24"}));
        }
        // A client spawning instances on two networks as fast as it can; the host killed mid-spawn.
        let sock = d.socket.clone();
        let spawner = std::thread::spawn(move || {
            let mut c = plughost_tests::process::Client::connect(&sock);
            for i in 0.. {
                let args = json!({"name": format!("r{round}i{i}"), "command": "sleep", "args": ["60"], "networks": ["a", "b"]});
                if c.call("compute", "spawn", args).is_none() {
                    return;
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(200 + 90 * round));
        d.kill9();
        spawner.join().unwrap();
    }
    // After a restart (its reconcile and sweep): every port belongs to an instance and says so, every
    // namespace file too, every veth has its port, and no address is held twice.
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), |_| {});
    let instances = d.ok("compute", "list", json!({}));
    let instances = instances.as_array().unwrap().clone();
    assert!(!instances.is_empty());
    let ports = d.ok("network", "ports", json!({}));
    let ports = ports["ports"].as_array().unwrap().clone();
    let mut claimed: Vec<(String, String)> = Vec::new();
    for i in &instances {
        assert_eq!(i["status"], "running", "{i}");
        let pid = i["pid"].as_u64().unwrap();
        assert_eq!(inode(&format!("/proc/{pid}/ns/net")), i["netns_inode"].as_u64().unwrap(), "{i}");
        for p in i["ports"].as_array().unwrap() {
            claimed.push((p["id"].as_str().unwrap().to_owned(), p["address"].as_str().unwrap().to_owned()));
        }
    }
    let mut recorded: Vec<(String, String)> = ports
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["address"].as_str().unwrap().to_owned()))
        .collect();
    claimed.sort();
    recorded.sort();
    assert_eq!(claimed, recorded, "the instances' ports against the network's");
    let mut addresses: Vec<&str> = recorded.iter().map(|(_, a)| a.as_str()).collect();
    let n = addresses.len();
    addresses.dedup();
    assert_eq!(addresses.len(), n, "an address given twice: {recorded:?}");
    assert_eq!(std::fs::read_dir(t.join("run/netns")).unwrap().count(), instances.len(), "a namespace per instance");
    let veths = links().into_iter().filter(|l| l.starts_with("phv")).count();
    assert_eq!(veths, ports.len(), "veths on the machine against the port records");
    let names: Vec<&str> = instances.iter().map(|i| i["name"].as_str().unwrap()).collect();
    tear_down(&mut d, &t, &names, &["a", "b"]);
}

#[test]
fn an_instance_with_networks_needs_the_network_service() {
    let t = TempDir::new("net-needed");
    let mut d = Daemon::start(t.path(), &["--volume-driver", "fake-volume", "--compute-driver", "fake-compute"]);
    let e = d.call("compute", "spawn", json!({"name": "i", "command": "sleep", "networks": ["lan"]}));
    assert_eq!(e["error"]["kind"], "unknown_service", "{e}");
    assert_eq!(
        e["error"]["message"],
        "instance \"i\": networks need the network service, which is not enabled (name a network driver: --network-driver bridge-network)"
    );
    let e = d.call("compute", "spawn", json!({"name": "i", "command": "sleep", "networks": ["a", "a"]}));
    assert_eq!(e["error"]["message"], "instance \"i\": network \"a\" named twice", "{e}");
    assert!(d.ok("compute", "list", json!({})).as_array().unwrap().is_empty());
}

#[test]
fn a_compute_driver_without_spawn_in_refuses_networks_and_the_plumbing_is_undone() {
    in_own_namespaces("network::inner_no_spawn_in");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_no_spawn_in() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-no-spawn-in");
    let (state, socket) = (t.join("state"), t.join("run/plughost.sock"));
    let args =
        ["--volume-driver", "fake-volume", "--compute-driver", "fake-compute", "--network-driver", "bridge-network"];
    let mut d = Daemon::start_with(&state, Some(&socket), &args, |_| {});
    d.ok("network", "create", json!({"name": "lan", "cidr": "10.84.0.0/24"}));
    let e = d.call("compute", "spawn", json!({"name": "i", "command": "sleep", "networks": ["lan"]}));
    assert_eq!(e["error"]["kind"], "unsupported", "{e}");
    assert_eq!(e["error"]["message"], "instance \"i\": this driver cannot run instances in a network namespace");
    assert!(d.ok("compute", "list", json!({})).as_array().unwrap().is_empty());
    assert!(d.ok("network", "ports", json!({}))["ports"].as_array().unwrap().is_empty(), "the port was detached");
    assert_eq!(std::fs::read_dir(t.join("run/netns")).unwrap().count(), 0, "the namespace was removed");
    assert!(links().iter().all(|l| !l.starts_with("phv")), "left behind: {:?}", links());
    // Without networks it spawns as before.
    d.ok("compute", "spawn", json!({"name": "i", "command": "sleep"}));
}

#[test]
fn a_host_given_a_relative_socket_path_gives_drivers_an_absolute_namespace_path() {
    in_own_namespaces("network::inner_relative_socket");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_relative_socket() {
    if !inside() {
        return;
    }
    // `--socket run/plughost.sock`, as a person types it: the runtime dir is relative to the host's cwd,
    // and process-compute refuses a relative namespace path (it once did, on every spawn with networks).
    // This process is this test alone (see in_own_namespaces), so changing its cwd touches no other test.
    let t = TempDir::new("net-relative");
    std::env::set_current_dir(t.path()).unwrap();
    let socket = std::path::Path::new("run/plughost.sock");
    let mut d = Daemon::start_with(&t.join("state"), Some(socket), &e2e_args(), |_| {});
    d.ok("network", "create", json!({"name": "lan", "cidr": "10.85.0.0/24"}));
    let i = d.ok("compute", "spawn", json!({"name": "i", "command": "sleep", "args": ["60"], "networks": ["lan"]}));
    let ns = i["netns"].as_str().unwrap();
    assert_eq!(std::path::Path::new(ns).parent(), Some(t.join("run/netns").as_path()), "{i}");
    let pid = i["pid"].as_u64().unwrap();
    assert_eq!(inode(&format!("/proc/{pid}/ns/net")), inode(ns), "the process is in its namespace");
    tear_down(&mut d, &t, &["i"], &["lan"]);
}

#[test]
fn a_full_bridge_answers_no_capacity_naming_the_limit() {
    in_own_namespaces("network::inner_full_bridge");
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_full_bridge() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-full");
    let mut d = Daemon::start(
        t.join("state").as_path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--network-driver", "bridge-network"],
    );
    // A subnet with room for 4,093 ports; the kernel's bridge takes 1,023.
    d.ok("network", "create", json!({"name": "big", "cidr": "10.40.0.0/20"}));
    for i in 0..1023 {
        d.ok("network", "attach", json!({"network": "big", "id": format!("x{i}")}));
    }
    let e = d.call("network", "attach", json!({"network": "big", "id": "one-more"}));
    assert_eq!(e["error"]["kind"], "no_capacity", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().ends_with("a Linux bridge holds at most 1023 ports"), "{e}");
    assert!(!links().contains(&"phvone-more".to_owned()), "the refused port's veth is gone");
    let ports = d.ok("network", "ports", json!({"network": "big"}));
    assert_eq!(ports["ports"].as_array().unwrap().len(), 1023, "no record for the refused one");
    // Its address was not kept: the next port after a detach gets the one freed.
    d.ok("network", "detach", json!({"id": "x5"}));
    let p = d.ok("network", "attach", json!({"network": "big", "id": "again"}));
    assert_eq!(p["port"]["address"], "10.40.0.7/20", "{p}");
    // (The namespace goes with the test, and its links with it.)
}

#[test]
fn a_host_in_a_private_mount_namespace_finds_its_instances_namespaces_again() {
    in_own_namespaces("network::inner_private_mounts");
}

/// Runs the host in a mount namespace of its own, as systemd runs it (`ProtectSystem`, `PrivateTmp`):
/// its bind mounts are not seen outside and go when it stops.
fn private_mounts(cmd: &mut std::process::Command) {
    unshare_before_exec(cmd, libc::CLONE_NEWNS, libc::MS_SLAVE);
}

/// Has the command's process unshare `namespaces` (a mount namespace among them) and set every mount's
/// propagation to `propagation` before it runs.
fn unshare_before_exec(cmd: &mut std::process::Command, namespaces: libc::c_int, propagation: libc::c_ulong) {
    // SAFETY: unshare and mount between fork and exec, on static strings.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::unshare(namespaces) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | propagation,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_private_mounts() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-private");
    let (state, socket) = (t.join("state"), t.join("run/plughost.sock"));
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), private_mounts);
    d.ok("network", "create", json!({"name": "lan", "cidr": "10.85.0.0/24"}));
    let sleeper = |name: &str| json!({"name": name, "command": "sleep", "args": ["120"], "networks": ["lan"]});
    let busy = d.ok("compute", "spawn", sleeper("busy"));
    let idle = d.ok("compute", "spawn", sleeper("idle"));
    d.ok("compute", "stop", json!({"name": "idle"}));
    let (busy_ns, idle_ns) = (busy["netns"].as_str().unwrap().to_owned(), idle["netns"].as_str().unwrap().to_owned());
    assert_ne!(inode(&busy_ns), busy["netns_inode"].as_u64().unwrap(), "the bind mount is the host's only");
    let (code, _) = d.stop();
    assert_eq!(code, 0);
    // A new host, in a new mount namespace: the running instance's namespace is bound again from its
    // process, the stopped one's from the old mount namespace (alive in the running instance).
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), private_mounts);
    let b = d.ok("compute", "get", json!({"name": "busy"}));
    assert_eq!((b["status"].as_str(), b["reason"].as_str()), (Some("running"), None), "{b}");
    assert_eq!(b["netns_inode"], busy["netns_inode"]);
    let i = d.ok("compute", "get", json!({"name": "idle"}));
    assert_eq!((i["status"].as_str(), i["reason"].as_str()), (Some("stopped"), None), "{i}");
    let started = d.ok("compute", "start", json!({"name": "idle"}));
    let pid = started["pid"].as_u64().unwrap();
    assert_eq!(inode(&format!("/proc/{pid}/ns/net")), idle["netns_inode"].as_u64().unwrap(), "{started}");
    assert_eq!(started["netns"].as_str(), Some(idle_ns.as_str()));
    tear_down(&mut d, &t, &["busy", "idle"], &["lan"]);
}

#[test]
fn after_a_reboot_networks_namespaces_and_ports_are_made_again_and_instances_start_as_before() {
    in_own_namespaces("network::inner_reboot");
}

/// Runs the host as if on a machine of its own: a network and a mount namespace of its own, which
/// end with the last process in them (a reboot, for what the host made there).
fn own_machine(cmd: &mut std::process::Command) {
    unshare_before_exec(cmd, libc::CLONE_NEWNET | libc::CLONE_NEWNS, libc::MS_PRIVATE);
}

#[test]
#[ignore = "runs only inside its own namespaces (see in_own_namespaces)"]
fn inner_reboot() {
    if !inside() {
        return;
    }
    let t = TempDir::new("net-reboot");
    let (state, socket) = (t.join("state"), t.join("run/plughost.sock"));
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), own_machine);
    let net = d.ok("network", "create", json!({"name": "lan", "cidr": "10.86.0.0/24"}));
    // One instance stopped at the reboot, one running.
    let srv = d.ok("compute", "spawn", tcp_instance("srv", &["lan"], "serve=10.86.0.2:7000"));
    d.ok("compute", "stop", json!({"name": "srv"}));
    let run =
        d.ok("compute", "spawn", json!({"name": "run", "command": "sleep", "args": ["600"], "networks": ["lan"]}));
    let pid = run["pid"].as_u64().unwrap();
    let (code, _) = d.stop();
    assert_eq!(code, 0);
    // The reboot: the last process of the old machine ends, and its namespaces with it: the bridge,
    // the veths, the instances' namespaces and their bind mounts.
    // SAFETY: a plain kill of a pid this test's host started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    plughost_tests::procs::wait_for("the running instance to end", || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
    });
    // And the runtime dir is gone, as /run is after a reboot (the host makes it again at start).
    std::fs::remove_dir_all(t.join("run")).unwrap();
    // A new machine: the host makes again what its records describe.
    let mut d = Daemon::start_with(&state, Some(&socket), &e2e_args(), own_machine);
    let host_ns = std::path::PathBuf::from(format!("/proc/{}/ns/net", d.pid()));
    let lan = d.ok("network", "get", json!({"name": "lan"}));
    assert_eq!((lan["status"].as_str(), &lan["interface"]), (Some("available"), &net["interface"]), "{lan}");
    let ports = d.ok("network", "ports", json!({}));
    let mut seen: Vec<(String, String, String)> = ports["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["status"], "attached", "{p}");
            let s = |k: &str| p[k].as_str().unwrap().to_owned();
            (s("name"), s("address"), s("mac"))
        })
        .collect();
    seen.sort();
    let mut want: Vec<(String, String, String)> = [&srv, &run]
        .iter()
        .map(|i| {
            let s = |k: &str| i["ports"][0][k].as_str().unwrap().to_owned();
            (s("id"), s("address"), s("mac"))
        })
        .collect();
    want.sort();
    assert_eq!(seen, want, "the same ports, addresses and MACs");
    let host_links = in_netns(&host_ns, links).join().unwrap();
    let bridge = net["interface"].as_str().unwrap().to_owned();
    assert!(host_links.contains(&bridge), "{host_links:?}");
    assert_eq!(host_links.iter().filter(|l| l.starts_with("phv")).count(), 2, "{host_links:?}");
    for (before, status) in [(&srv, "stopped"), (&run, "stopped")] {
        let name = before["name"].as_str().unwrap();
        let now = d.ok("compute", "get", json!({"name": name}));
        assert_eq!((now["status"].as_str(), now["reason"].as_str()), (Some(status), None), "{now}");
        assert_eq!((&now["netns"], &now["ports"]), (&before["netns"], &before["ports"]), "{now}");
        // A namespace is bound where it was, in the host's mount namespace, and recorded. (Its inode
        // may be the old one's: the kernel gives a freed namespace's inode number out again.)
        let seen_by_host = format!("/proc/{}/root{}", d.pid(), now["netns"].as_str().unwrap());
        assert_eq!(now["netns_inode"].as_u64(), Some(inode(&seen_by_host)), "{now}");
        let started = d.ok("compute", "start", json!({"name": name}));
        let pid = started["pid"].as_u64().unwrap();
        assert_eq!(started["netns_inode"].as_u64(), Some(inode(&format!("/proc/{pid}/ns/net"))), "{started}");
    }
    // And the network works as before: a new instance reaches the restarted server at its address.
    d.ok("compute", "spawn", tcp_instance("cli", &["lan"], "connect=10.86.0.2:7000"));
    assert_eq!(stopped(&mut d, "cli")["exit_code"], 0);
    assert_eq!(stopped(&mut d, "srv")["exit_code"], 0);
    tear_down(&mut d, &t, &["srv", "run", "cli"], &["lan"]);
    let host_links = in_netns(&host_ns, links).join().unwrap();
    assert!(host_links.iter().all(|l| !l.starts_with("ph")), "left behind: {host_links:?}");
}
