//! `process-compute`: each instance is a local process started in its own process group, with stdout
//! and stderr appended to `<log_dir>/<name>.stdout` / `.stderr`. Stop signals the whole group (SIGTERM,
//! then SIGKILL after `stop_timeout_ms`); state, RSS and CPU time come from `/proc`. Instances are
//! children of the host: `cleanup` (host stop) stops them all.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use plughost_api::{ComputeDriver, DriverError, Instance, InstanceSpec, InstanceState, OptionSpec, Options};

/// The options this driver takes. `${state_dir}` and `${backend}` are expanded by the host.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::path("log_dir", "directory for each instance's stdout/stderr logs and default working dir")
        .default("${state_dir}/instances/${backend}"),
    OptionSpec::integer("stop_timeout_ms", "how long stop waits after SIGTERM before SIGKILL").default("5000"),
    OptionSpec::integer("max_instances", "how many instances may exist at once").default("256"),
];

struct Proc {
    spec: InstanceSpec,
    child: Option<Child>,
    started: Option<Instant>,
    last_exit: Option<ExitStatus>,
}

/// The driver.
pub struct ProcessCompute {
    log_dir: PathBuf,
    stop_timeout: Duration,
    max_instances: usize,
    procs: Mutex<BTreeMap<String, Proc>>,
}

fn not_found(name: &str) -> DriverError {
    DriverError::not_found(format!("instance {name:?} not found"))
}

/// (state char, utime+stime in ticks) from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

fn rss_bytes(pid: u32) -> u64 {
    let pages = fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn signal_group(pid: u32, sig: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions; a negative pid addresses the process group
        // the child leads (it was started with process_group(0)).
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

impl ProcessCompute {
    /// Builds the driver from validated options. Touches nothing on disk until `init`.
    pub fn new(options: &Options) -> Result<ProcessCompute, DriverError> {
        let log_dir = options.path("log_dir")?;
        let ms = options.integer("stop_timeout_ms")?;
        let max = options.integer("max_instances")?;
        Ok(ProcessCompute {
            log_dir,
            stop_timeout: Duration::from_millis(u64::try_from(ms).map_err(|_| {
                DriverError::invalid_argument(format!("option \"stop_timeout_ms\": must not be negative, got {ms}"))
            })?),
            max_instances: usize::try_from(max).map_err(|_| {
                DriverError::invalid_argument(format!("option \"max_instances\": must not be negative, got {max}"))
            })?,
            procs: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, BTreeMap<String, Proc>>, DriverError> {
        self.procs.lock().map_err(|_| DriverError::internal("process-compute state lock poisoned"))
    }

    fn launch(&self, spec: &InstanceSpec) -> Result<Child, DriverError> {
        let name = &spec.name;
        let log = |ext: &str| -> Result<fs::File, DriverError> {
            let p = self.log_dir.join(format!("{name}.{ext}"));
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| DriverError::io(format!("instance {name:?}: opening log {}", p.display()), &e))
        };
        let workdir = match &spec.workdir {
            Some(w) => PathBuf::from(w),
            None => self.log_dir.clone(),
        };
        Command::new(&spec.command)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(log("stdout")?)
            .stderr(log("stderr")?)
            .process_group(0)
            .spawn()
            .map_err(|e| DriverError::io(format!("instance {name:?}: starting {:?}", spec.command), &e))
    }

    /// Reaps an exited child, recording its status.
    fn reap(p: &mut Proc) {
        if let Some(child) = p.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                p.last_exit = Some(status);
                p.child = None;
                p.started = None;
            }
        }
    }

    fn stop_proc(&self, p: &mut Proc) -> Result<(), DriverError> {
        let Some(mut child) = p.child.take() else { return Ok(()) };
        signal_group(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + self.stop_timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    signal_group(child.id(), libc::SIGKILL);
                    break child
                        .wait()
                        .map_err(|e| DriverError::io(format!("instance {:?}: wait", p.spec.name), &e))?;
                }
                Err(e) => return Err(DriverError::io(format!("instance {:?}: wait", p.spec.name), &e)),
            }
        };
        // Make sure nothing of the group survives the leader.
        signal_group(child.id(), libc::SIGKILL);
        p.last_exit = Some(status);
        p.started = None;
        Ok(())
    }

    fn info(name: &str, p: &Proc) -> Instance {
        let mut command = p.spec.command.clone();
        for a in &p.spec.args {
            command.push(' ');
            command.push_str(a);
        }
        let mut i = Instance { name: name.to_owned(), command, ..Instance::default() };
        match &p.child {
            Some(child) => {
                let pid = child.id();
                i.pid = Some(pid);
                let (st, ticks) = proc_stat(pid).unwrap_or(('R', 0));
                i.state = match st {
                    'T' | 't' => InstanceState::Paused,
                    'Z' | 'X' => InstanceState::Stopped,
                    _ => InstanceState::Running,
                };
                i.cpu_time_ms = ticks * 1000 / ticks_per_sec();
                i.rss_bytes = rss_bytes(pid);
                i.uptime_ms = p.started.map(|s| s.elapsed().as_millis() as u64).unwrap_or(0);
            }
            None => {
                i.state = InstanceState::Stopped;
                if let Some(s) = p.last_exit {
                    i.exit_code = s.code();
                    i.exit_signal = s.signal();
                }
            }
        }
        i
    }
}

impl ComputeDriver for ProcessCompute {
    fn init(&self) -> Result<(), DriverError> {
        fs::create_dir_all(&self.log_dir)
            .map_err(|e| DriverError::io(format!("creating log dir {}", self.log_dir.display()), &e))
    }

    fn cleanup(&self) -> Result<(), DriverError> {
        let mut procs = self.lock()?;
        for p in procs.values_mut() {
            self.stop_proc(p)?;
        }
        Ok(())
    }

    fn health(&self) -> Result<(), DriverError> {
        if !Path::new("/proc/self/stat").exists() {
            return Err(DriverError::internal("/proc is not mounted"));
        }
        if !self.log_dir.is_dir() {
            return Err(DriverError::internal(format!("log dir {} is missing", self.log_dir.display())));
        }
        Ok(())
    }

    fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, DriverError> {
        plughost_api::check_name("instance", &spec.name)?;
        if spec.command.is_empty() {
            return Err(DriverError::invalid_argument(format!("instance {:?}: empty command", spec.name)));
        }
        let mut procs = self.lock()?;
        if procs.contains_key(&spec.name) {
            return Err(DriverError::already_exists(format!("instance {:?} already exists", spec.name)));
        }
        if procs.len() >= self.max_instances {
            return Err(DriverError::no_capacity(format!("limit of {} instances reached", self.max_instances)));
        }
        let child = self.launch(spec)?;
        let p = Proc { spec: spec.clone(), child: Some(child), started: Some(Instant::now()), last_exit: None };
        let info = Self::info(&spec.name, &p);
        procs.insert(spec.name.clone(), p);
        Ok(info)
    }

    fn destroy(&self, name: &str) -> Result<(), DriverError> {
        let mut procs = self.lock()?;
        let p = procs.get_mut(name).ok_or_else(|| not_found(name))?;
        self.stop_proc(p)?;
        procs.remove(name);
        Ok(())
    }

    fn start(&self, name: &str) -> Result<Instance, DriverError> {
        let mut procs = self.lock()?;
        let p = procs.get_mut(name).ok_or_else(|| not_found(name))?;
        Self::reap(p);
        if p.child.is_some() {
            return Err(DriverError::busy(format!("instance {name:?} is already running")));
        }
        p.child = Some(self.launch(&p.spec)?);
        p.started = Some(Instant::now());
        Ok(Self::info(name, p))
    }

    fn stop(&self, name: &str) -> Result<Instance, DriverError> {
        let mut procs = self.lock()?;
        let p = procs.get_mut(name).ok_or_else(|| not_found(name))?;
        self.stop_proc(p)?;
        Ok(Self::info(name, p))
    }

    fn reboot(&self, name: &str) -> Result<Instance, DriverError> {
        let mut procs = self.lock()?;
        let p = procs.get_mut(name).ok_or_else(|| not_found(name))?;
        self.stop_proc(p)?;
        p.child = Some(self.launch(&p.spec)?);
        p.started = Some(Instant::now());
        Ok(Self::info(name, p))
    }

    fn list(&self) -> Result<Vec<Instance>, DriverError> {
        let mut procs = self.lock()?;
        Ok(procs
            .iter_mut()
            .map(|(n, p)| {
                Self::reap(p);
                Self::info(n, p)
            })
            .collect())
    }

    fn get(&self, name: &str) -> Result<Instance, DriverError> {
        let mut procs = self.lock()?;
        let p = procs.get_mut(name).ok_or_else(|| not_found(name))?;
        Self::reap(p);
        Ok(Self::info(name, p))
    }
}

plughost_api::export_driver! {
    kind: compute,
    driver: ProcessCompute,
    name: "process-compute",
    version: env!("CARGO_PKG_VERSION"),
    summary: "each instance a local process group with logs under the state dir; info from /proc",
    options: OPTIONS,
    new: ProcessCompute::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_live_and_die() {
        let dir = std::env::temp_dir().join(format!("process-compute-unit-{}", std::process::id()));
        let o = Options::for_schema(OPTIONS, [("log_dir", dir.to_str().unwrap()), ("stop_timeout_ms", "2000")]);
        let d = ProcessCompute::new(&o).unwrap();
        d.init().unwrap();
        let spec = InstanceSpec {
            name: "s".into(),
            command: "sh".into(),
            args: vec!["-c".into(), "echo hi; exec sleep 30".into()],
            ..Default::default()
        };
        let i = d.spawn(&spec).unwrap();
        let pid = i.pid.unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        let stopped = d.stop("s").unwrap();
        assert_eq!(stopped.state, InstanceState::Stopped);
        assert_eq!(stopped.exit_signal, Some(libc::SIGTERM));
        let quick = InstanceSpec {
            name: "q".into(),
            command: "sh".into(),
            args: vec!["-c".into(), "exit 3".into()],
            ..Default::default()
        };
        d.spawn(&quick).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.get("q").unwrap().state == InstanceState::Running && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(d.get("q").unwrap().exit_code, Some(3));
        d.cleanup().unwrap();
        let _ = fs::remove_dir_all(&dir);
    }
}
