//! Running the real `plughost` binary.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use crate::plughost;

/// What a finished `plughost` command did.
#[derive(Debug)]
pub struct Ran {
    /// Exit code; the test fails if the process died by a signal.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(o: Output) -> Ran {
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        let code = match (o.status.code(), o.status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => panic!("plughost died by signal {s}; stderr:\n{stderr}"),
            (None, None) => panic!("plughost ended without code or signal"),
        };
        Ran { code, stdout: String::from_utf8_lossy(&o.stdout).into_owned(), stderr }
    }
}

/// Runs `plughost ARGS...` to completion.
pub fn run(args: &[&str]) -> Ran {
    command(args).output().expect("plughost can be started").into()
}

/// A `plughost ARGS...` command, not yet started, with logging left at its default.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(plughost());
    c.args(args).env_remove("RUST_LOG").env_remove("PLUGHOST_DRIVER_DIR");
    c
}

/// A `plughost run` in the background, with its own state dir; killed if still running when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<std::process::Child>,
    /// The control socket.
    pub socket: std::path::PathBuf,
    /// The state directory.
    pub state_dir: std::path::PathBuf,
    conn: Option<(std::os::unix::net::UnixStream, std::io::BufReader<std::os::unix::net::UnixStream>)>,
    next_id: u64,
    /// Everything the server wrote to stderr so far, read continuously (a full pipe would block a
    /// server that logs a lot).
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// Whether a host answers `ping` at `socket`. A connection alone proves nothing: the socket file of a
/// host that was just killed still accepts while anything holds its listening socket (a child it was
/// starting, between fork and exec), and that connection is reset later.
fn answers_ping(socket: &std::path::Path) -> bool {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if s.write_all(b"{\"id\": 0, \"op\": \"ping\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).is_ok() && line.contains("\"pong\"")
}

impl Daemon {
    /// Starts `plughost run --state-dir STATE ARGS...` and waits until it answers `ping`.
    /// Panics with its stderr if it exits first.
    pub fn start(state_dir: &std::path::Path, args: &[&str]) -> Daemon {
        Daemon::start_with(state_dir, None, args, |_| {})
    }

    /// Like [`start`](Self::start), with the control socket at `socket` (default: in the state dir)
    /// and `prepare` applied to the command first (a umask, limits, ...).
    pub fn start_with(
        state_dir: &std::path::Path,
        socket: Option<&std::path::Path>,
        args: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Daemon {
        let socket = socket.map(ToOwned::to_owned).unwrap_or_else(|| state_dir.join("plughost.sock"));
        let mut all = vec!["run", "--state-dir", state_dir.to_str().unwrap()];
        // Periodic rounds every 200 ms, unless the test asks for its own spacing.
        if !args.contains(&"--periodic-interval-ms") {
            all.extend(["--periodic-interval-ms", "200"]);
        }
        all.extend(["--socket", socket.to_str().unwrap()]);
        all.extend_from_slice(args);
        let mut cmd = command(&all);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        prepare(&mut cmd);
        let mut child = cmd.spawn().expect("plughost run starts");
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        });
        let mut d = Daemon {
            child: Some(child),
            socket,
            state_dir: state_dir.to_owned(),
            conn: None,
            next_id: 1,
            stderr: Some(stderr),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                let err = d.stderr.take().unwrap().join().unwrap_or_default();
                panic!("plughost run exited with {status} before serving:\n{err}");
            }
            if answers_ping(&d.socket) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "plughost run did not open its socket in time");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        d
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a raw line on the persistent connection and returns the answer line.
    pub fn raw(&mut self, line: &str) -> String {
        use std::io::{BufRead, Write};
        if self.conn.is_none() {
            let s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
            let r = std::io::BufReader::new(s.try_clone().unwrap());
            self.conn = Some((s, r));
        }
        let (s, r) = self.conn.as_mut().unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        answer
    }

    /// Sends a request; returns the whole answer object (checks that the id is echoed).
    pub fn call(&mut self, service: &str, op: &str, args: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = serde_json::json!({"id": id, "op": op, "args": args});
        if !service.is_empty() {
            req["service"] = serde_json::json!(service);
        }
        let v: serde_json::Value = serde_json::from_str(&self.raw(&req.to_string())).unwrap();
        assert_eq!(v["id"], id, "{v}");
        v
    }

    /// Like [`call`](Self::call) but expects success and returns the result.
    pub fn ok(&mut self, service: &str, op: &str, args: serde_json::Value) -> serde_json::Value {
        let v = self.call(service, op, args);
        assert_eq!(v["ok"], true, "{service} {op}: {v}");
        v["result"].clone()
    }

    /// Like [`call`](Self::call) but expects an error and returns its kind.
    pub fn err(&mut self, service: &str, op: &str, args: serde_json::Value) -> String {
        let v = self.call(service, op, args);
        assert_eq!(v["ok"], false, "{service} {op}: {v}");
        v["error"]["kind"].as_str().unwrap().to_owned()
    }

    /// Sends SIGTERM and returns the exit code and stderr.
    pub fn stop(self) -> (i32, String) {
        self.signal(libc::SIGTERM);
        self.wait()
    }
}

impl Daemon {
    /// Kills the server with SIGKILL (no cleanup of any kind) and waits for it to be gone.
    pub fn kill9(mut self) {
        self.conn = None;
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends a signal to the server without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, sig) }, 0);
    }

    /// Waits for the server to exit (after a signal) and returns its exit code and stderr.
    pub fn wait(mut self) -> (i32, String) {
        self.conn = None;
        let status = self.child.take().unwrap().wait().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap_or_default();
        let code = match (status.code(), status.signal()) {
            (Some(c), _) => c,
            (None, Some(s)) => panic!("plughost died by signal {s}; stderr:\n{stderr}"),
            (None, None) => panic!("plughost ended without code or signal"),
        };
        (code, stderr)
    }
}

/// A client connection of its own (for tests with several concurrent clients).
#[derive(Debug)]
pub struct Client {
    w: std::os::unix::net::UnixStream,
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    next_id: u64,
}

impl Client {
    /// Connects to `socket`.
    pub fn connect(socket: &std::path::Path) -> Client {
        let w = std::os::unix::net::UnixStream::connect(socket).unwrap();
        let r = std::io::BufReader::new(w.try_clone().unwrap());
        Client { w, r, next_id: 1 }
    }

    /// Sends one request; returns the whole answer (`None` if the server closed the connection).
    pub fn call(&mut self, service: &str, op: &str, args: serde_json::Value) -> Option<serde_json::Value> {
        use std::io::{BufRead, Write};
        let id = self.next_id;
        self.next_id += 1;
        let mut req = serde_json::json!({"id": id, "op": op, "args": args});
        if !service.is_empty() {
            req["service"] = serde_json::json!(service);
        }
        if writeln!(self.w, "{req}").is_err() {
            return None;
        }
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["id"], id, "{v}");
                Some(v)
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
