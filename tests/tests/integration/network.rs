//! The network service on a real host with the in-memory fake-network driver: off unless configured,
//! networks with IPAM (lowest free address, reserved ones skipped, no early reuse, full subnets,
//! overlaps), ports attached and detached through the socket and `ctl`, records kept across a restart.
//! (bridge-network, namespaces and compute integration are tested in their own namespaces.)

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

    // The records outlive the host.
    let before = addresses(&mut d);
    drop(d);
    let mut d = start(&t);
    assert_eq!(addresses(&mut d), before);
    let r = run(&["ctl", "--socket", d.socket.to_str().unwrap(), "network", "list"]);
    assert!(r.stdout.lines().any(|l| l.starts_with("lan ") && l.contains("10.7.0.0/29")), "{}", r.stdout);
    let listed: Value = d.ok("network", "list", json!({}));
    assert_eq!(listed.as_array().unwrap().len(), 1);
}
