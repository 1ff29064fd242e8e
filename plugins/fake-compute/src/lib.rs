//! `fake-compute`: instances that exist only in memory, with made-up pids. Complete (every method works
//! on its own state), for tests and as an example of a compute driver.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use plughost_api::{ComputeDriver, DriverError, Instance, InstanceSpec, InstanceState, OptionSpec, Options};

/// The options this driver takes.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::integer("max_instances", "how many instances may exist at once").default("1000"),
    OptionSpec::size("memory_per_instance", "resident memory reported for each running instance").default("64MiB"),
];

struct Inst {
    spec: InstanceSpec,
    pid: Option<u32>,
    started: Option<Instant>,
}

struct State {
    next_pid: u32,
    instances: BTreeMap<String, Inst>,
}

/// The driver.
pub struct FakeCompute {
    max_instances: usize,
    rss: u64,
    state: Mutex<State>,
}

impl FakeCompute {
    /// Builds the driver from validated options.
    pub fn new(options: &Options) -> Result<FakeCompute, DriverError> {
        let max = options.integer("max_instances")?;
        let max_instances = usize::try_from(max).map_err(|_| {
            DriverError::invalid_argument(format!("option \"max_instances\": must not be negative, got {max}"))
        })?;
        Ok(FakeCompute {
            max_instances,
            rss: options.size("memory_per_instance")?,
            state: Mutex::new(State { next_pid: 10_000, instances: BTreeMap::new() }),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, DriverError> {
        self.state.lock().map_err(|_| DriverError::internal("fake-compute state lock poisoned by an earlier panic"))
    }

    fn info(&self, name: &str, i: &Inst) -> Instance {
        let running = i.pid.is_some();
        let mut command = i.spec.command.clone();
        for a in &i.spec.args {
            command.push(' ');
            command.push_str(a);
        }
        Instance {
            name: name.to_owned(),
            state: if running { InstanceState::Running } else { InstanceState::Stopped },
            pid: i.pid,
            exit_code: if running { None } else { Some(0) },
            exit_signal: None,
            rss_bytes: if running { self.rss } else { 0 },
            cpu_time_ms: 0,
            uptime_ms: i.started.map(|s| s.elapsed().as_millis() as u64).unwrap_or(0),
            command,
            ..Instance::default()
        }
    }
}

fn not_found(name: &str) -> DriverError {
    DriverError::not_found(format!("instance {name:?} not found"))
}

impl State {
    fn boot(&mut self, name: &str) -> Result<(), DriverError> {
        let pid = self.next_pid;
        let inst = self.instances.get_mut(name).ok_or_else(|| not_found(name))?;
        inst.pid = Some(pid);
        inst.started = Some(Instant::now());
        self.next_pid = self.next_pid.wrapping_add(1).max(10_000);
        Ok(())
    }
}

impl ComputeDriver for FakeCompute {
    fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, DriverError> {
        if spec.command.is_empty() {
            return Err(DriverError::invalid_argument(format!("instance {:?}: empty command", spec.name)));
        }
        let mut st = self.lock()?;
        if st.instances.contains_key(&spec.name) {
            return Err(DriverError::already_exists(format!("instance {:?} already exists", spec.name)));
        }
        if st.instances.len() >= self.max_instances {
            return Err(DriverError::no_capacity(format!(
                "fake-compute: limit of {} instances reached",
                self.max_instances
            )));
        }
        st.instances.insert(spec.name.clone(), Inst { spec: spec.clone(), pid: None, started: None });
        st.boot(&spec.name)?;
        let i = st.instances.get(&spec.name).ok_or_else(|| not_found(&spec.name))?;
        Ok(self.info(&spec.name, i))
    }

    fn destroy(&self, name: &str) -> Result<(), DriverError> {
        self.lock()?.instances.remove(name).map(drop).ok_or_else(|| not_found(name))
    }

    fn start(&self, name: &str) -> Result<Instance, DriverError> {
        let mut st = self.lock()?;
        let running = st.instances.get(name).ok_or_else(|| not_found(name))?.pid.is_some();
        if running {
            return Err(DriverError::busy(format!("instance {name:?} is already running")));
        }
        st.boot(name)?;
        let i = st.instances.get(name).ok_or_else(|| not_found(name))?;
        Ok(self.info(name, i))
    }

    fn stop(&self, name: &str) -> Result<Instance, DriverError> {
        let mut st = self.lock()?;
        let i = st.instances.get_mut(name).ok_or_else(|| not_found(name))?;
        i.pid = None;
        i.started = None;
        Ok(self.info(name, i))
    }

    fn reboot(&self, name: &str) -> Result<Instance, DriverError> {
        let mut st = self.lock()?;
        st.boot(name)?;
        let i = st.instances.get(name).ok_or_else(|| not_found(name))?;
        Ok(self.info(name, i))
    }

    fn list(&self) -> Result<Vec<Instance>, DriverError> {
        let st = self.lock()?;
        Ok(st.instances.iter().map(|(n, i)| self.info(n, i)).collect())
    }

    fn get(&self, name: &str) -> Result<Instance, DriverError> {
        let st = self.lock()?;
        st.instances.get(name).map(|i| self.info(name, i)).ok_or_else(|| not_found(name))
    }
}

plughost_api::export_driver! {
    kind: compute,
    driver: FakeCompute,
    name: "fake-compute",
    version: env!("CARGO_PKG_VERSION"),
    summary: "instances kept in memory with made-up pids (for tests)",
    options: OPTIONS,
    new: FakeCompute::new,
}

#[cfg(test)]
mod tests {
    use super::*;
    use plughost_api::ErrorKind;

    #[test]
    fn lifecycle() {
        let o = plughost_api::testing::TestHost::new().options(OPTIONS, &[("max_instances", "1")]).expect("valid");
        let d = FakeCompute::new(&o).expect("constructs");
        let spec =
            InstanceSpec { name: "i1".into(), command: "sleep".into(), args: vec!["5".into()], ..Default::default() };
        let i = d.spawn(&spec).expect("spawn");
        assert_eq!(i.state, InstanceState::Running);
        let pid = i.pid.expect("pid");
        assert_eq!(
            d.spawn(&InstanceSpec { name: "i2".into(), ..spec.clone() }).unwrap_err().kind(),
            ErrorKind::NO_CAPACITY
        );
        assert_eq!(d.stop("i1").expect("stop").state, InstanceState::Stopped);
        assert_eq!(d.start("i1").expect("start").state, InstanceState::Running);
        assert_ne!(d.reboot("i1").expect("reboot").pid, Some(pid));
        assert_eq!(d.list().expect("list").len(), 1);
        d.destroy("i1").expect("destroy");
        assert_eq!(d.get("i1").unwrap_err().kind(), ErrorKind::NOT_FOUND);
    }
}
