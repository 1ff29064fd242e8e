//! docs/protocol.md is the contract: every example there parses into the protocol's types and
//! serializes back to the same JSON, and a real host answers the documented requests as documented.

use std::collections::BTreeSet;

use host::control::protocol::{
    ApiError, AuditEntry, ErrorKind, HostStatus, Pong, ReloadEntry, RestartReport, SwapReport,
};
use host::control::request::{parse_request, Answer, Body};
use plughost_tests::process::Daemon;
use plughost_tests::{workspace_root, TempDir};
use serde_json::{json, Value};

/// The `> request` / `< answer` pairs of every `jsonl` block, in order.
pub(crate) fn examples() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/protocol.md")).unwrap();
    let mut out = Vec::new();
    let mut inside = false;
    let mut pending: Option<String> = None;
    for line in doc.lines() {
        if line.starts_with("```") {
            inside = line == "```jsonl";
            continue;
        }
        if !inside {
            continue;
        }
        if let Some(req) = line.strip_prefix("> ") {
            assert!(pending.is_none(), "two requests in a row: {line}");
            pending = Some(req.to_owned());
        } else if let Some(ans) = line.strip_prefix("< ") {
            out.push((pending.take().expect("an answer follows a request"), ans.to_owned()));
        }
    }
    assert!(out.len() >= 15, "only {} examples found", out.len());
    out
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(result: &Value) -> Value {
    let typed: T = serde_json::from_value(result.clone()).unwrap_or_else(|e| panic!("{e}: {result}"));
    serde_json::to_value(typed).unwrap()
}

/// Re-serializes a request's `args` and an answer's result through the protocol types: top-level
/// operations here, service operations through their kind in the service table (so that a new kind's
/// examples are checked with no change here). `None` for a request the protocol refuses.
fn reencode(req: &str, result: Option<&Value>) -> Option<(Value, Option<Value>)> {
    let kind = |name: &str| {
        host::services::kinds::kind(name)
            .map(|k| k.parse)
            .ok_or_else(|| ApiError::new(ErrorKind::UnknownService, format!("unknown service {name:?}")))
    };
    let parsed = parse_request(req, &kind).ok()?;
    let result_text = result.map(|r| r.to_string());
    let (request, result) = match parsed.body {
        Body::Ping => (json!({"op": "ping"}), result.map(round_trip::<Pong>)),
        Body::Status => (json!({"op": "status"}), result.map(round_trip::<HostStatus>)),
        Body::Metrics => (json!({"op": "metrics"}), result.map(round_trip::<host::control::protocol::MetricsText>)),
        Body::Reload => (json!({"op": "reload"}), result.map(round_trip::<Vec<ReloadEntry>>)),
        Body::Audit(args) => (
            json!({"op": "audit", "args": serde_json::to_value(args).unwrap()}),
            result.map(round_trip::<Vec<AuditEntry>>),
        ),
        Body::Swap { service, args } => (
            json!({"service": service, "op": "swap", "args": serde_json::to_value(&args).unwrap()}),
            if args.dry_run {
                result.map(round_trip::<host::control::protocol::SwapCheck>)
            } else {
                result.map(round_trip::<SwapReport>)
            },
        ),
        Body::Restart { service, args } => (
            json!({"service": service, "op": "restart", "args": serde_json::to_value(args).unwrap()}),
            result.map(round_trip::<RestartReport>),
        ),
        Body::Service { service, op, .. } => {
            let kind = host::services::kinds::kind(&service)
                .unwrap_or_else(|| panic!("example for unknown service {service}"));
            let args: Value = serde_json::from_str(op.args_json().unwrap().get()).unwrap();
            let result = match result_text {
                Some(r) => Some(serde_json::from_str(&(kind.reencode)(&r).ok()?).unwrap()),
                None => None,
            };
            (json!({"service": service, "op": op.name(), "args": args}), result)
        }
    };
    Some((request, result))
}

#[test]
fn documented_examples_parse_into_the_protocol_types_and_back() {
    for (req, ans) in examples() {
        let answer: Answer = serde_json::from_str(&ans).unwrap_or_else(|e| panic!("{e}: {ans}"));
        let ans_value: Value = serde_json::from_str(&ans).unwrap();
        let result = answer.ok.then(|| ans_value["result"].clone());
        match (serde_json::from_str::<Value>(&req), reencode(&req, result.as_ref())) {
            (Ok(req_value), Some((typed_req, typed_result))) => {
                let mut expected = json!({"op": req_value["op"]});
                if let Some(s) = req_value.get("service") {
                    expected["service"] = s.clone();
                    expected["args"] = req_value.get("args").cloned().unwrap_or_else(|| json!({}));
                } else if let Some(a) = req_value.get("args") {
                    expected["args"] = a.clone();
                }
                assert_eq!(typed_req, expected, "request {req}");
                assert_eq!(typed_result, result, "answer {ans}");
            }
            // A request the protocol refuses must be documented with an error answer.
            (_, None) => assert!(!answer.ok, "{req} is refused but documented as succeeding"),
            (Err(_), Some(_)) => panic!("{req} is not JSON yet parses"),
        }
        if !answer.ok {
            let e: ApiError = serde_json::from_value(ans_value["error"].clone()).unwrap();
            assert_eq!(serde_json::to_value(&e).unwrap(), ans_value["error"], "answer {ans}");
        }
    }
}

pub(crate) fn keys(v: &Value) -> BTreeSet<String> {
    match v {
        Value::Object(m) => m.keys().cloned().collect(),
        Value::Array(a) => a.first().map(keys).unwrap_or_default(),
        _ => BTreeSet::new(),
    }
}

#[test]
fn a_real_host_answers_as_documented() {
    let t = TempDir::new("protocol-doc");
    let mut d = Daemon::start(
        t.path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "fake-compute", "--network-driver", "fake-network"],
    );
    for (req, ans) in examples() {
        let got: Value = serde_json::from_str(&d.raw(&req)).unwrap();
        let want: Value = serde_json::from_str(&ans).unwrap();
        assert_eq!(got["id"], want["id"], "{req}");
        assert_eq!(got["ok"], want["ok"], "{req}\ngot {got}");
        if want["ok"] == false {
            assert_eq!(got["error"], want["error"], "{req}");
        } else {
            assert_eq!(keys(&got["result"]), keys(&want["result"]), "{req}\ngot {got}");
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn an_oversized_line_is_refused_without_being_buffered_and_the_host_goes_on() {
    use std::io::{BufRead, BufReader, Write};
    let t = TempDir::new("protocol-cap");
    let mut d = Daemon::start(t.path(), &["--volume-driver", "fake-volume", "--compute-driver", "none"]);
    d.ok("", "ping", json!({}));
    let before = rss_kib(d.pid());
    for _ in 0..4 {
        let s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let writer = std::thread::spawn(move || {
            let mut s = s;
            let chunk = vec![b'x'; 1 << 20];
            // 64 MiB without a newline; the host stops reading after its 1 MiB limit.
            for _ in 0..64 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["error"]["kind"], "invalid_request", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("longer than 1048576 bytes"), "{v}");
        line.clear();
        // Closed: end of file, or a reset (the host closed with our unread bytes still queued).
        match r.read_line(&mut line) {
            Ok(n) => assert_eq!(n, 0, "the connection is closed after an oversized line: {line}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        writer.join().unwrap();
    }
    let after = rss_kib(d.pid());
    assert!(after < before + 32 * 1024, "RSS grew from {before} KiB to {after} KiB");
    assert_eq!(d.ok("", "ping", json!({}))["pong"], true);

    // The limit is configurable.
    drop(d);
    let mut d = Daemon::start(
        t.path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--max-request-bytes", "100"],
    );
    let long = format!("{{\"op\":\"ping\",\"id\":\"{}\"}}\n", "y".repeat(200));
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let _ = s.write_all(long.as_bytes()); // the host may close before it has read it all
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("longer than 100 bytes"), "{line}");
    assert_eq!(d.ok("", "ping", json!({}))["pong"], true);
}

#[test]
fn a_line_that_is_not_utf8_is_answered_and_the_connection_stays() {
    use std::io::{BufRead, BufReader, Write};
    let t = TempDir::new("protocol-utf8");
    let d = Daemon::start(t.path(), &["--volume-driver", "fake-volume", "--compute-driver", "none"]);
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(b"{\"id\":1,\"op\":\"\xff\xfe\"}\n{\"id\":2,\"op\":\"ping\"}\n").unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!((v["ok"].clone(), v["error"]["kind"].clone()), (json!(false), json!("invalid_request")), "{v}");
    line.clear();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!((v["id"].clone(), v["ok"].clone()), (json!(2), json!(true)), "{v}");
}

#[test]
fn a_backend_whose_health_check_fails_refuses_and_get_answers_driver_errors() {
    let t = TempDir::new("protocol-down");
    let mut d = Daemon::start(
        t.path(),
        &[
            "--volume-driver",
            "faulty",
            "--volume-opt",
            "fail_in=get",
            "--volume-backend",
            "sick=faulty",
            "--volume-opt",
            "sick:unhealthy=true",
            "--compute-driver",
            "none",
        ],
    );
    d.ok("volume", "create", json!({"name": "v", "size": 1}));
    let e = d.call("volume", "get", json!({"name": "v"}));
    assert_eq!(e["error"]["kind"], "internal", "a driver error is the answer, not the stale record: {e}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let st = d.ok("", "status", json!({}));
        if st["services"][0]["backends"][1]["state"] == "down" {
            assert_eq!(st["services"][0]["state"], "degraded", "{st}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the health check never ran");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let e = d.call("volume", "create", json!({"name": "w", "size": 1, "backend": "sick"}));
    assert_eq!(e["error"]["kind"], "unavailable", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("volume backend \"sick\" is down: driver unhealthy"),
        "{e}"
    );
    assert_eq!(d.ok("volume", "list", json!({})).as_array().unwrap().len(), 1, "records are still answered");
    d.ok("volume", "create", json!({"name": "w", "size": 1}));
}

#[test]
fn hostile_inputs_are_refused_in_one_short_line_before_anything_is_written() {
    let t = TempDir::new("protocol-hostile");
    let mut d = Daemon::start(t.path(), &["--volume-driver", "fake-volume", "--compute-driver", "fake-compute"]);
    // A size the records cannot hold: invalid_argument, and no record (not an intent left behind).
    let v = d.call("volume", "create", json!({"name": "big", "size": 1u64 << 63}));
    assert_eq!(v["error"]["kind"], "invalid_argument", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("is too large (at most 9223372036854775807 bytes)"),
        "{v}"
    );
    assert_eq!(d.call("volume", "get", json!({"name": "big"}))["error"]["kind"], "not_found");
    let v = d.call("volume", "create", json!({"name": "v", "size": 1}));
    assert_eq!(v["ok"], true, "{v}");
    let v = d.call("volume", "extend", json!({"name": "v", "size": u64::MAX}));
    assert_eq!(v["error"]["kind"], "invalid_argument", "{v}");
    // Environment names a process cannot carry.
    for env in [json!({"A=B": "1"}), json!({"": "1"}), json!({"a\nb": "1"})] {
        let v = d.call("compute", "spawn", json!({"name": "e", "command": "true", "env": env}));
        assert_eq!(v["error"]["kind"], "invalid_argument", "{env}: {v}");
    }
    assert_eq!(d.call("compute", "get", json!({"name": "e"}))["error"]["kind"], "not_found");
    // What a client sent comes back escaped, on one line, and short.
    let key = "a\nb\u{1b}[2J";
    let v = d.call("volume", "get", json!({"name": "v", key: 1}));
    let m = v["error"]["message"].as_str().unwrap();
    assert!(!m.contains('\n') && !m.contains('\u{1b}'), "{m:?}");
    let long = "x".repeat(100_000);
    for (service, op, args) in [
        ("volume", "get", json!({"name": long})),
        ("volume", long.as_str(), json!({})),
        (long.as_str(), "get", json!({})),
        ("volume", "get", json!({"name": "v", "backend": long})),
    ] {
        let answer = d.raw(&json!({"service": service, "op": op, "args": args}).to_string());
        assert!(answer.len() < 1024, "a {}-byte answer", answer.len());
    }
    let v = d.call("", "ping", json!({"deep": [[[[1]]]]}));
    assert_eq!(v["error"]["kind"], "invalid_argument", "{v}");
}

#[test]
fn ctl_says_that_the_connection_closed_when_the_host_goes_away() {
    let t = TempDir::new("protocol-closed");
    let socket = t.join("closing.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let closer = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).unwrap();
        drop(s); // as a host killed between the request and its answer
    });
    let r = plughost_tests::process::run(&["ctl", "--socket", socket.to_str().unwrap(), "status"]);
    closer.join().unwrap();
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("the connection closed before an answer (did the host stop?)"), "{}", r.stderr);
}

#[test]
fn past_max_connections_a_client_is_answered_busy_not_left_hanging() {
    use std::io::{BufRead, BufReader, Write};
    let t = TempDir::new("protocol-maxconn");
    let d = Daemon::start(
        t.path(),
        &["--volume-driver", "fake-volume", "--compute-driver", "none", "--max-connections", "3"],
    );
    let ping = |s: &mut std::os::unix::net::UnixStream| -> Value {
        if s.write_all(b"{\"op\":\"ping\"}\n").is_err() {
            return Value::Null;
        }
        let mut line = String::new();
        let _ = BufReader::new(s.try_clone().unwrap()).read_line(&mut line);
        serde_json::from_str(&line).unwrap_or(Value::Null)
    };
    // Three connections served (a place is given back once the host saw its connection close: the
    // daemon's readiness probe may still hold one for a moment).
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut served = None;
        plughost_tests::procs::wait_for("a connection to be served", || {
            let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
            let ok = ping(&mut s)["ok"] == true;
            served = ok.then_some(s);
            ok
        });
        open.push(served.unwrap());
    }
    let extra = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    extra.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(&extra).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["error"]["kind"], "busy", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("too many connections (3 for admins"), "{v}");
    // A place given back is a place taken again.
    drop(open.pop());
    plughost_tests::procs::wait_for("a connection to be served again", || {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        ping(&mut s)["ok"] == true
    });
}
