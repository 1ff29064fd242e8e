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

/// What a fake systemd received on its notify socket.
struct Systemd {
    socket: std::os::unix::net::UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Systemd {
    fn new(path: &std::path::Path) -> Systemd {
        let socket = std::os::unix::net::UnixDatagram::bind(path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Systemd { socket, seen: Vec::new() }
    }
    /// Reads every datagram that arrives until `until` holds for what was seen (or 30 s).
    fn until(&mut self, what: &str, until: impl Fn(&[(Instant, String)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while !until(&self.seen) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; seen {:?}", self.texts());
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
    }
    fn texts(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, t)| t.as_str()).collect()
    }
}

fn count(seen: &[(Instant, String)], what: &str) -> usize {
    seen.iter().filter(|(_, t)| t.lines().any(|l| l == what)).count()
}

#[test]
fn systemd_hears_ready_status_reloading_watchdog_and_stopping_and_children_do_not_see_its_socket() {
    let t = TempDir::new("notify");
    let mut systemd = Systemd::new(&t.join("notify.sock"));
    let cfg = t.join("plughost.toml");
    let write_cfg = |delay: &str| {
        std::fs::write(
            &cfg,
            format!("[volume]\ndriver = \"faulty\"\noptions = {{ delay_ms = {delay}, delay_in = \"stats\" }}\n[compute]\ndriver = \"process-compute\"\n"),
        )
        .unwrap()
    };
    write_cfg("0");
    let notify = t.join("notify.sock");
    let d = Daemon::start_with(&t.join("state"), None, &["--config", cfg.to_str().unwrap()], |c| {
        c.env("NOTIFY_SOCKET", &notify).env("WATCHDOG_USEC", "400000").env("LISTEN_FDS", "3");
    });
    systemd.until("READY", |s| count(s, "READY=1") == 1);
    let ready = systemd.seen.iter().find(|(_, t)| t.contains("READY=1")).unwrap().1.clone();
    assert!(ready.contains("STATUS=serving: 2 of 2 backends up"), "{ready}");
    // The watchdog: every 200 ms (half of WATCHDOG_USEC) while all is well.
    systemd.until("five watchdog pings", |s| count(s, "WATCHDOG=1") >= 5);

    // An instance's environment holds none of systemd's variables.
    let mut c = plughost_tests::process::Client::connect(&d.socket);
    let env_file = t.join("env.txt");
    let spawn = json!({"name": "e", "command": "sh", "args": ["-c", format!("env > {}", env_file.display())]});
    assert_eq!(c.call("compute", "spawn", spawn).unwrap()["ok"], true);
    wait_for("the instance to write its environment", || std::fs::metadata(&env_file).is_ok_and(|m| m.len() > 0));
    std::thread::sleep(Duration::from_millis(100));
    let env = std::fs::read_to_string(&env_file).unwrap();
    for k in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"] {
        assert!(!env.contains(k), "{k} leaked into an instance:\n{env}");
    }

    // A reload is announced and closed with READY. The new options stall every periodic stats call for
    // 4 s: the watchdog goes quiet while the round is stuck.
    write_cfg("4000");
    let r = run(&["ctl", "--socket", d.socket.to_str().unwrap(), "reload"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    systemd.until("RELOADING then READY", |s| {
        let texts: Vec<&str> = s.iter().map(|(_, t)| t.as_str()).collect();
        let reloading = texts.iter().position(|t| t.starts_with("RELOADING=1\nMONOTONIC_USEC="));
        reloading.is_some_and(|i| texts[i..].iter().any(|t| t.contains("READY=1")))
    });
    let before = count(&systemd.seen, "WATCHDOG=1");
    // A gap of well over the 200 ms rhythm while the round hangs, then pings again once it returns.
    systemd.until("a silence, then the watchdog again", |s| {
        let pings: Vec<Instant> = s.iter().filter(|(_, t)| t == "WATCHDOG=1").map(|(at, _)| *at).collect();
        pings.len() > before + 1 && pings[before..].windows(2).any(|w| w[1] - w[0] > Duration::from_millis(1500))
    });
    write_cfg("0");
    assert_eq!(run(&["ctl", "--socket", d.socket.to_str().unwrap(), "reload"]).code, 0);

    // STOPPING on SIGTERM.
    d.signal(libc::SIGTERM);
    systemd.until("STOPPING", |s| count(s, "STOPPING=1") == 1);
    let (code, _) = d.wait();
    assert_eq!(code, 0);
}

#[test]
fn under_systemd_state_socket_and_config_come_from_its_directories() {
    let t = TempDir::new("sysdirs");
    let (state, runtime, conf) = (t.join("lib"), t.join("run"), t.join("etc"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("plughost.toml"), "[volume]\ndriver = \"fake-volume\"\n[compute]\ndriver = \"none\"\n")
        .unwrap();
    let mut child = plughost_tests::process::command(&["run", "--periodic-interval-ms", "200"])
        .env("STATE_DIRECTORY", &state)
        .env("RUNTIME_DIRECTORY", &runtime)
        .env("CONFIGURATION_DIRECTORY", &conf)
        .env_remove("PLUGHOST_STATE_DIR")
        .env_remove("PLUGHOST_SOCKET")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = runtime.join("plughost.sock");
    wait_for("the socket in RUNTIME_DIRECTORY", || std::os::unix::net::UnixStream::connect(&socket).is_ok());
    assert!(state.join("state.db").exists(), "state.db in STATE_DIRECTORY");
    // The config file of CONFIGURATION_DIRECTORY was read: fake-volume serves, compute is off.
    let r = run(&["ctl", "--socket", socket.to_str().unwrap(), "--json", "status"]);
    let st: Value = serde_json::from_str(&r.stdout).unwrap();
    let services = st["result"]["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{st}");
    assert_eq!(services[0]["backends"][0]["driver"]["name"], "fake-volume", "{st}");
    // ctl finds the socket the same way.
    let r = plughost_tests::process::command(&["ctl", "ping"])
        .env("RUNTIME_DIRECTORY", &runtime)
        .env_remove("PLUGHOST_STATE_DIR")
        .env_remove("PLUGHOST_SOCKET")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn completions_parse_and_man_pages_render_with_exit_status_and_files() {
    let r = run(&["completions", "bash"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let t = TempDir::new("completions");
    std::fs::write(t.join("plughost.bash"), &r.stdout).unwrap();
    let check = std::process::Command::new("bash").arg("-n").arg(t.join("plughost.bash")).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(r.stdout.contains("fleet") && r.stdout.contains("--fleet-url"), "completions cover every command");
    for shell in ["zsh", "fish"] {
        let r = run(&["completions", shell]);
        assert!(r.code == 0 && r.stdout.contains("plughost"), "{shell}: {}", r.stderr);
    }
    let r = run(&["man", t.join("man8").to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for page in ["plughost.8", "plughost-run.8", "plughost-ctl.8", "plughost-place.8"] {
        let path = t.join("man8").join(page);
        let out = std::process::Command::new("man")
            .arg("-l")
            .arg(&path)
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .output();
        let text = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            // Without man(1), the page is checked as roff text.
            _ => std::fs::read_to_string(&path).unwrap(),
        };
        assert!(
            text.contains("EXIT STATUS") && text.contains("FILES") && text.contains("plughost-api"),
            "{page}:\n{text}"
        );
    }
    let v = run(&["--version"]);
    assert!(
        v.stdout.starts_with("plughost 0.") && v.stdout.contains("commit ") && v.stdout.contains("plughost-api 1."),
        "{}",
        v.stdout
    );
}

#[test]
fn config_check_says_whether_run_would_start_without_starting_and_show_masks_secrets() {
    let t = TempDir::new("config-check");
    let cfg = t.join("plughost.toml");
    let state = t.join("state");
    let check = |extra: &[&str]| {
        let mut args =
            vec!["config", "check", "--config", cfg.to_str().unwrap(), "--state-dir", state.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&args)
    };
    // A good config: every driver described, nothing created, no lock taken.
    std::fs::write(&cfg, "[volume]\ndriver = \"fake-volume\"\n[compute]\ndriver = \"none\"\n").unwrap();
    let r = check(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("ok: volume backend \"default\": fake-volume 1.0.0 from"), "{}", r.stdout);
    assert!(r.stdout.ends_with("config ok\n"), "{}", r.stdout);
    assert!(!state.exists(), "config check created the state dir");
    // A misspelt key, with its line and column.
    std::fs::write(&cfg, "[volume]\ndriver = \"fake-volume\"\ncapacty = \"1GiB\"\n").unwrap();
    let r = check(&[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("line 3, column 1: unknown field `capacty`"), "{}", r.stderr);
    // An unknown driver, an unknown option, and a required option left out.
    std::fs::write(&cfg, "[volume]\ndriver = \"no-such-driver\"\n[compute]\ndriver = \"none\"\n").unwrap();
    let r = check(&[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("volume backend \"default\": driver \"no-such-driver\" not found"), "{}", r.stderr);
    std::fs::write(
        &cfg,
        "[volume]\ndriver = \"fake-volume\"\noptions = { speed = \"fast\" }\n[compute]\ndriver = \"none\"\n",
    )
    .unwrap();
    let r = check(&[]);
    assert!(r.stderr.contains("unknown option(s) speed for driver fake-volume"), "{}", r.stderr);
    // A state dir another user owns.
    std::fs::write(&cfg, "[volume]\ndriver = \"fake-volume\"\n[compute]\ndriver = \"none\"\n").unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let r = check(&[]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("state dir") && r.stderr.contains("not owned by plughost's user"), "{}", r.stderr);
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    // A check while a host runs on the state dir: no lock is taken, the host is untouched.
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(check(&[]).code, 0);
    d.ok("", "ping", json!({}));

    // show: the merged settings, a secret option masked by the driver's schema.
    let r = run(&[
        "config",
        "show",
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--volume-driver",
        "faulty",
        "--volume-opt",
        "password=hunter2",
        "--volume-opt",
        "delay_ms=5",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("hunter2"), "{}", r.stdout);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let options = &v["services"][0]["backends"][0]["options"];
    assert_eq!((options["password"].clone(), options["delay_ms"].clone()), (json!("(secret)"), json!("5")), "{v}");
}

#[test]
fn under_journald_log_lines_carry_their_priority_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let t = TempDir::new("journal");
    let log = t.join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let state = t.join("state");
    let args = [
        "-v",
        "run",
        "--state-dir",
        state.to_str().unwrap(),
        "--allow-untrusted-drivers",
        "--volume-driver",
        "no-such",
    ];
    let status = plughost_tests::process::command(&args)
        .args(["--compute-driver", "none"])
        .env("JOURNAL_STREAM", &stream)
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    let warn = text.lines().find(|l| l.contains("trust.strict is off")).unwrap_or_else(|| panic!("{text}"));
    assert!(warn.starts_with("<4>trust.strict is off"), "{text}");
    // Start-up lines too, at info, without -v.
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let state = t.join("state-ok");
    let mut child = plughost_tests::process::command(&["run", "--state-dir", state.to_str().unwrap()])
        .args(["--volume-driver", "fake-volume", "--compute-driver", "none"])
        .env("JOURNAL_STREAM", &stream)
        .env("RUST_LOG", "plughost::audit=info")
        .stderr(file)
        .spawn()
        .unwrap();
    wait_for("the serving line", || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("serving on")));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().any(|l| l.starts_with("<6>serving on ")), "{text}");
    // Audit lines carry their fields.
    let socket = state.join("plughost.sock");
    let r = run(&["ctl", "--socket", socket.to_str().unwrap(), "volume", "create", "v", "--size", "1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_for("the audit line", || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("<6>audit ")));
    let text = std::fs::read_to_string(&log).unwrap();
    let audit = text.lines().find(|l| l.starts_with("<6>audit ")).unwrap();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    assert_eq!(audit, format!("<6>audit service=volume op=create name=v peer=uid:{me} outcome=ok"), "{text}");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // Elsewhere (stderr not the journal's stream, though the variable is inherited): the usual format.
    let r = plughost_tests::process::command(&args)
        .args(["--compute-driver", "none"])
        .env("JOURNAL_STREAM", &stream)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&r.stderr);
    let warn = text.lines().find(|l| l.contains("trust.strict is off")).unwrap_or_else(|| panic!("{text}"));
    assert!(warn.starts_with('[') && warn.contains("WARN"), "{text}");
}

#[test]
fn a_sample_of_several_drivers_of_one_kind_is_valid_and_would_start() {
    let t = TempDir::new("sample-several");
    let r = run(&["config", "sample", "fake-volume", "file-volume", "fake-compute"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cfg = t.join("plughost.toml");
    std::fs::write(&cfg, &r.stdout).unwrap();
    assert!(r.stdout.contains("[[volume.backends]]\nname = \"file-volume\""), "{}", r.stdout);
    let state = t.join("state");
    let c = run(&["config", "check", "--config", cfg.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    assert_eq!(c.code, 0, "{}\n{}", c.stdout, c.stderr);
    assert!(c.stdout.contains("volume backend \"file-volume\": file-volume"), "{}", c.stdout);
    let mut d = Daemon::start(&state, &["--config", cfg.to_str().unwrap()]);
    let backends = d.ok("", "status", json!({}))["services"][0]["backends"].as_array().unwrap().len();
    assert_eq!(backends, 2);
}

#[test]
fn a_secret_option_comes_from_a_file_or_the_environment_and_never_shows_on_the_command_line() {
    use std::os::unix::fs::PermissionsExt;
    let t = TempDir::new("secret-file");
    let secret = t.join("password");
    std::fs::write(&secret, "hunter2\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let opt = format!("password=@{}", secret.display());
    let mut d = Daemon::start_with(
        &t.join("state"),
        None,
        &[
            "--volume-driver",
            "faulty",
            "--volume-opt",
            &opt,
            "--volume-opt",
            "delay_ms=@env:DELAY_FOR_TEST",
            "--compute-driver",
            "none",
        ],
        |c| {
            c.env("DELAY_FOR_TEST", "3");
        },
    );
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", d.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("hunter2"));
    let st = d.ok("", "status", json!({}));
    let options = &st["services"][0]["backends"][0]["options"];
    assert_eq!(options["password"], "(secret)", "{st}");
    assert_eq!(options["delay_ms"], "3", "{st}");
    drop(d);
    // The file must be the host's and not readable by others.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let state = t.join("state2");
    let check = |opt: &str| {
        run(&[
            "config",
            "check",
            "--state-dir",
            state.to_str().unwrap(),
            "--volume-driver",
            "faulty",
            "--volume-opt",
            opt,
        ])
    };
    let r = check(&opt);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("readable by others") && r.stderr.contains("\"password\""), "{}", r.stderr);
    let r = check("password=@env:NOT_SET_ANYWHERE");
    assert!(r.stderr.contains("environment variable \"NOT_SET_ANYWHERE\" is not set"), "{}", r.stderr);
}

/// The samples of an OpenMetrics text: `name{labels}` → value (and the text ends with `# EOF`).
fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    assert!(text.ends_with("# EOF\n"), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            (k.to_owned(), v.parse::<f64>().unwrap_or_else(|_| panic!("{l}")))
        })
        .collect()
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).unwrap().parse().unwrap();
    (code, out.split_once("\r\n\r\n").unwrap().1.to_owned())
}

#[test]
fn metrics_count_calls_errors_and_records_on_the_socket_and_over_opt_in_http() {
    let t = TempDir::new("metrics");
    let port = plughost_tests::nats::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut d = Daemon::start(
        &t.join("state"),
        &[
            "--volume-driver",
            "faulty",
            "--volume-opt",
            "fail_in=extend",
            "--volume-backend",
            "sick=faulty",
            "--volume-opt",
            "sick:unhealthy=true",
            "--compute-driver",
            "none",
            "--metrics-listen",
            &addr,
        ],
    );
    let socket = d.socket.clone();
    let metrics = || {
        let r = run(&["ctl", "--socket", socket.to_str().unwrap(), "metrics"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        samples(&r.stdout)
    };
    let before = metrics();
    let calls = |m: &std::collections::BTreeMap<String, f64>, method: &str| {
        m.get(&format!("plughost_driver_calls_total{{service=\"volume\",backend=\"default\",method=\"{method}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    d.ok("volume", "create", json!({"name": "a", "size": 1}));
    d.ok("volume", "create", json!({"name": "b", "size": 1}));
    assert_eq!(d.err("volume", "extend", json!({"name": "a", "size": 2})), "internal");
    let after = metrics();
    assert_eq!(calls(&after, "create") - calls(&before, "create"), 2.0);
    let err =
        "plughost_driver_call_errors_total{service=\"volume\",backend=\"default\",method=\"extend\",kind=\"internal\"}";
    assert_eq!(after.get(err), Some(&1.0), "{after:?}");
    assert_eq!(after.get("plughost_records{service=\"volume\",backend=\"default\",status=\"available\"}"), Some(&2.0));
    let info = after.keys().find(|k| k.starts_with("plughost_build_info{")).unwrap();
    assert!(info.contains("plugin_api=\"1.2.0\""), "{info}");
    // Every timed create is in the histogram, and its +Inf bucket counts them all.
    let count =
        after["plughost_driver_call_duration_seconds_count{service=\"volume\",backend=\"default\",method=\"create\"}"];
    let inf = after["plughost_driver_call_duration_seconds_bucket{le=\"+Inf\",service=\"volume\",backend=\"default\",method=\"create\"}"];
    assert!(count >= 1.0 && inf == count, "{count} {inf}");

    // Over HTTP, only because it was asked for: the same text, and health that says what is down.
    let (code, text) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert!(samples(&text).contains_key(err));
    wait_for("the sick backend to be down", || http_get(&addr, "/healthz").0 == 503);
    let (_, body) = http_get(&addr, "/healthz");
    assert!(body.contains("volume backend \"sick\" down: driver unhealthy"), "{body}");
    assert_eq!(
        metrics()
            .get("plughost_backend_up{service=\"volume\",backend=\"sick\",driver=\"faulty\",isolation=\"in-process\"}"),
        Some(&0.0)
    );
    assert_eq!(http_get(&addr, "/nope").0, 404);
    drop(d);
    // Without the flag nothing listens.
    let d = Daemon::start(&t.join("state2"), &["--volume-driver", "fake-volume", "--compute-driver", "none"]);
    assert!(std::net::TcpStream::connect(&addr).is_err());
    drop(d);
}

#[test]
fn the_control_socket_can_come_from_systemd_socket_activation() {
    use std::os::unix::fs::PermissionsExt;
    let Ok(activate) = which("systemd-socket-activate") else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI has systemd-socket-activate");
        println!("skipped: no systemd-socket-activate");
        return;
    };
    let t = TempDir::new("socket-activation");
    let (state, socket) = (t.join("state"), t.join("run/plughost.sock"));
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let start = |sock_flag: &std::path::Path| {
        std::process::Command::new(&activate)
            .arg("--listen")
            .arg(&socket)
            .arg(plughost_tests::plughost())
            .args([
                "run",
                "--volume-driver",
                "fake-volume",
                "--compute-driver",
                "none",
                "--periodic-interval-ms",
                "200",
            ])
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(sock_flag)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut host = start(&socket);
    // The socket exists before the host: the first connection starts it and is answered.
    wait_for("the activation socket", || socket.exists());
    let sock = socket.to_str().unwrap();
    let r = run(&["ctl", "--socket", sock, "ping"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The host took the socket it was given, gave it its own mode, and serves on it.
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    let r = run(&["ctl", "--socket", sock, "--json", "status"]);
    assert_eq!(serde_json::from_str::<Value>(&r.stdout).unwrap()["result"]["socket"], sock);
    // A stop leaves systemd's socket where it is.
    send_signal(host.id(), libc::SIGTERM);
    let status = host.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(socket.exists(), "the passed socket's file stays for its owner");
    std::fs::remove_file(&socket).unwrap();

    // A socket that is not the one the host is configured for is refused, naming both.
    let host = start(&t.join("elsewhere.sock"));
    wait_for("the activation socket", || socket.exists());
    let _ = std::os::unix::net::UnixStream::connect(&socket);
    let out = host.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("socket activation: the socket passed is") && stderr.contains("elsewhere.sock"),
        "{stderr}"
    );
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
        .ok_or(())
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child's pid we hold (not yet reaped).
    unsafe { libc::kill(pid as i32, sig) };
}
