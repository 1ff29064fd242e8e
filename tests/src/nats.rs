//! A real `nats-server` for the fleet tests: from `NATS_SERVER`, else `PATH` (and `/usr/sbin`, where
//! Debian puts it). `scripts/test.sh` installs one on a fresh machine. Without one, a fleet test prints
//! one `skipped: no nats-server` line and returns, except under `CI=true`, where it fails.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// The nats-server binary, if there is one.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/bin")))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A port nobody listens on now (bound and released: another process could take it in between, which
/// on a test machine does not happen in practice).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running nats-server with JetStream, on loopback, with its own store; killed when dropped.
#[derive(Debug)]
pub struct Nats {
    child: Option<Child>,
    /// Its client port.
    pub port: u16,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    args: Vec<String>,
    /// Its store and logs.
    pub dir: TempDir,
}

impl Nats {
    /// The flags of a host in fleet `fleet` on this server, named `name`, reporting every `every` and
    /// down after `down`.
    pub fn host_flags(&self, fleet: &str, name: &str, every: &str, down: &str) -> Vec<String> {
        [
            "--fleet-url",
            &self.url,
            "--fleet-name",
            fleet,
            "--host-name",
            name,
            "--fleet-report-interval",
            every,
            "--fleet-service-down-time",
            down,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Starts a server, or says the test is skipped (`None`); under `CI=true` a missing server fails.
    pub fn start(tag: &str) -> Option<Nats> {
        Nats::start_with(tag, &[])
    }

    /// [`start`](Self::start) with more arguments (`-c CONFIG`, `--cluster ...`).
    pub fn start_with(tag: &str, extra: &[&str]) -> Option<Nats> {
        Nats::start_on(tag, free_port(), extra)
    }

    /// [`start_with`](Self::start_with) on a given port.
    pub fn start_on(tag: &str, port: u16, extra: &[&str]) -> Option<Nats> {
        if binary().is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "no nats-server (set NATS_SERVER or run scripts/test.sh, which installs one)"
            );
            println!("skipped: no nats-server");
            return None;
        }
        let dir = TempDir::new(&format!("nats-{tag}"));
        let store = dir.join("js");
        let mut args: Vec<String> = ["-a", "127.0.0.1", "-p", &port.to_string()].map(String::from).to_vec();
        // A config file brings its own JetStream settings.
        if !extra.contains(&"-c") {
            args.extend(["-js", "-sd", store.to_str().unwrap()].map(String::from));
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut n = Nats { child: None, port, url: format!("nats://127.0.0.1:{port}"), args, dir };
        n.restart();
        Some(n)
    }

    /// Starts it again after [`kill`](Self::kill), on the same port with the same store.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server is running already");
        let log = std::fs::File::create(self.dir.join(format!("log-{}", self.port))).unwrap();
        let child = Command::new(binary().unwrap())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(self.dir.join(format!("log-{}", self.port))).unwrap_or_default();
                panic!("nats-server exited with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "nats-server did not listen on {} in time", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills it (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}
