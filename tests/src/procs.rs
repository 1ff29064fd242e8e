//! Processes by identity: a pid together with its start time, so that a test never mistakes a new
//! process that reused a pid (pid_max is 32768 on these machines, and a parallel build cycles through
//! pids quickly) for the one it watched.

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.get(s.rfind(')')? + 2..)?;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// One process: its pid and its start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    /// The pid.
    pub pid: u32,
    start: u64,
}

impl Proc {
    /// The process running now as `pid`; panics if there is none.
    pub fn of(pid: u32) -> Proc {
        let f = stat_fields(pid).unwrap_or_else(|| panic!("no process {pid}"));
        Proc { pid, start: f[19].parse().expect("start time") }
    }

    /// Whether this very process still runs (a zombie does not count).
    pub fn alive(&self) -> bool {
        stat_fields(self.pid).is_some_and(|f| f[19].parse() == Ok(self.start) && !matches!(f[0].as_str(), "Z" | "X"))
    }
}

/// Whether any process of process group `pgid` still runs (zombies do not count).
pub fn group_alive(pgid: u32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(stat_fields)
            .is_some_and(|f| f[2].parse() == Ok(pgid) && !matches!(f[0].as_str(), "Z" | "X"))
    })
}

/// Waits up to 30 s for `f`, polling; panics naming `what` if it never holds.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
