//! The compute driver interface (after nova's `ComputeDriver`): instances identified by name.

use std::fmt;

use abi_stable::std_types::{ROption, RResult, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;

use crate::panic::guard;
use crate::DriverError;

/// What to run for a new instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceSpec {
    /// The instance's name, unique within the driver.
    pub name: String,
    /// The program to run.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory; the driver chooses one when absent.
    pub workdir: Option<String>,
}

/// The power state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InstanceState {
    /// Running.
    Running,
    /// Not running: stopped on request, or exited (see [`Instance::exit_code`]).
    #[default]
    Stopped,
    /// Suspended but resident.
    Paused,
    /// The driver cannot tell.
    Unknown,
}

impl InstanceState {
    /// The lowercase name used on the control socket.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Running => "running",
            InstanceState::Stopped => "stopped",
            InstanceState::Paused => "paused",
            InstanceState::Unknown => "unknown",
        }
    }
    fn to_raw(self) -> u8 {
        match self {
            InstanceState::Running => 1,
            InstanceState::Stopped => 2,
            InstanceState::Paused => 3,
            InstanceState::Unknown => 0,
        }
    }
    fn from_raw(raw: u8) -> InstanceState {
        match raw {
            1 => InstanceState::Running,
            2 => InstanceState::Stopped,
            3 => InstanceState::Paused,
            _ => InstanceState::Unknown,
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Instance {
    /// The instance's name.
    pub name: String,
    /// Power state.
    pub state: InstanceState,
    /// Process id (or the hypervisor's id) while running.
    pub pid: Option<u32>,
    /// Exit code of the last run, once it exited normally.
    pub exit_code: Option<i32>,
    /// Signal that ended the last run, if one did.
    pub exit_signal: Option<i32>,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
    /// CPU time consumed, in milliseconds.
    pub cpu_time_ms: u64,
    /// Time since the current run started, in milliseconds (0 when not running).
    pub uptime_ms: u64,
    /// The command line, for display.
    pub command: String,
}

/// What a compute driver implements. Every method may be called from several threads at once.
pub trait ComputeDriver: Send + Sync + 'static {
    /// Called once after construction, before any other call. An error makes the service report down.
    fn init(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Called once when the host stops or retires the driver, after the last call.
    fn cleanup(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Called periodically; an error means the backend is unhealthy and says why.
    fn health(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Creates and starts an instance.
    fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, DriverError>;
    /// Stops (if needed) and removes an instance.
    fn destroy(&self, name: &str) -> Result<(), DriverError>;
    /// Starts a stopped instance.
    fn start(&self, name: &str) -> Result<Instance, DriverError>;
    /// Stops a running instance.
    fn stop(&self, name: &str) -> Result<Instance, DriverError>;
    /// Stops and starts an instance.
    fn reboot(&self, name: &str) -> Result<Instance, DriverError>;
    /// Every instance.
    fn list(&self) -> Result<Vec<Instance>, DriverError>;
    /// One instance.
    fn get(&self, name: &str) -> Result<Instance, DriverError>;
}

#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiInstanceSpec {
    name: RString,
    command: RString,
    args: RVec<RString>,
    env: RVec<Tuple2<RString, RString>>,
    workdir: ROption<RString>,
}

impl From<&InstanceSpec> for FfiInstanceSpec {
    fn from(s: &InstanceSpec) -> FfiInstanceSpec {
        FfiInstanceSpec {
            name: s.name.as_str().into(),
            command: s.command.as_str().into(),
            args: s.args.iter().map(|a| RString::from(a.as_str())).collect(),
            env: s.env.iter().map(|(k, v)| Tuple2(k.as_str().into(), v.as_str().into())).collect(),
            workdir: s.workdir.as_deref().map(RString::from).into(),
        }
    }
}

impl From<&FfiInstanceSpec> for InstanceSpec {
    fn from(s: &FfiInstanceSpec) -> InstanceSpec {
        InstanceSpec {
            name: s.name.to_string(),
            command: s.command.to_string(),
            args: s.args.iter().map(|a| a.to_string()).collect(),
            env: s.env.iter().map(|Tuple2(k, v)| (k.to_string(), v.to_string())).collect(),
            workdir: s.workdir.as_ref().into_option().map(|w| w.to_string()),
        }
    }
}

#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiInstance {
    name: RString,
    state: u8,
    pid: ROption<u32>,
    exit_code: ROption<i32>,
    exit_signal: ROption<i32>,
    rss_bytes: u64,
    cpu_time_ms: u64,
    uptime_ms: u64,
    command: RString,
}

impl From<Instance> for FfiInstance {
    fn from(i: Instance) -> FfiInstance {
        FfiInstance {
            name: i.name.into(),
            state: i.state.to_raw(),
            pid: i.pid.into(),
            exit_code: i.exit_code.into(),
            exit_signal: i.exit_signal.into(),
            rss_bytes: i.rss_bytes,
            cpu_time_ms: i.cpu_time_ms,
            uptime_ms: i.uptime_ms,
            command: i.command.into(),
        }
    }
}

impl From<FfiInstance> for Instance {
    fn from(i: FfiInstance) -> Instance {
        Instance {
            name: i.name.into(),
            state: InstanceState::from_raw(i.state),
            pid: i.pid.into_option(),
            exit_code: i.exit_code.into_option(),
            exit_signal: i.exit_signal.into_option(),
            rss_bytes: i.rss_bytes,
            cpu_time_ms: i.cpu_time_ms,
            uptime_ms: i.uptime_ms,
            command: i.command.into(),
        }
    }
}

#[allow(non_local_definitions, missing_docs, clippy::undocumented_unsafe_blocks)]
pub(crate) mod ffi {
    use super::*;

    /// The stable-ABI trait object behind [`ComputeDriver`]; append-only like the volume one.
    #[abi_stable::sabi_trait]
    pub trait ComputeDriverFfi: Send + Sync {
        fn init(&self) -> RResult<(), DriverError>;
        fn cleanup(&self) -> RResult<(), DriverError>;
        fn health(&self) -> RResult<(), DriverError>;
        fn spawn(&self, spec: &FfiInstanceSpec) -> RResult<FfiInstance, DriverError>;
        fn destroy(&self, name: RStr<'_>) -> RResult<(), DriverError>;
        fn start(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError>;
        fn stop(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError>;
        fn reboot(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError>;
        fn list(&self) -> RResult<RVec<FfiInstance>, DriverError>;
        #[sabi(last_prefix_field)]
        fn get(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError>;
    }
}

pub(crate) use ffi::ComputeDriverFfi;
/// The boxed stable-ABI compute driver object that crosses the library boundary.
#[doc(hidden)]
pub type ComputeDriverBox = ffi::ComputeDriverFfi_TO<'static, abi_stable::std_types::RBox<()>>;

pub(crate) struct ComputeAdapter<D>(pub(crate) D);

impl<D: ComputeDriver> ComputeDriverFfi for ComputeAdapter<D> {
    fn init(&self) -> RResult<(), DriverError> {
        guard(|| self.0.init())
    }
    fn cleanup(&self) -> RResult<(), DriverError> {
        guard(|| self.0.cleanup())
    }
    fn health(&self) -> RResult<(), DriverError> {
        guard(|| self.0.health())
    }
    fn spawn(&self, spec: &FfiInstanceSpec) -> RResult<FfiInstance, DriverError> {
        guard(|| self.0.spawn(&InstanceSpec::from(spec)).map(Into::into))
    }
    fn destroy(&self, name: RStr<'_>) -> RResult<(), DriverError> {
        guard(|| self.0.destroy(name.as_str()))
    }
    fn start(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError> {
        guard(|| self.0.start(name.as_str()).map(Into::into))
    }
    fn stop(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError> {
        guard(|| self.0.stop(name.as_str()).map(Into::into))
    }
    fn reboot(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError> {
        guard(|| self.0.reboot(name.as_str()).map(Into::into))
    }
    fn list(&self) -> RResult<RVec<FfiInstance>, DriverError> {
        guard(|| self.0.list().map(|v| v.into_iter().map(Into::into).collect()))
    }
    fn get(&self, name: RStr<'_>) -> RResult<FfiInstance, DriverError> {
        guard(|| self.0.get(name.as_str()).map(Into::into))
    }
}

/// Host side: a constructed compute driver from a loaded library, with the author's std-typed API.
pub struct ComputeClient {
    inner: ComputeDriverBox,
}

impl std::fmt::Debug for ComputeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ComputeClient")
    }
}

impl ComputeClient {
    pub(crate) fn new(inner: ComputeDriverBox) -> ComputeClient {
        ComputeClient { inner }
    }
    /// Wraps a driver compiled into this process (tests, benchmarks, statically linked drivers).
    pub fn in_process<D: ComputeDriver>(driver: D) -> ComputeClient {
        ComputeClient::new(ffi::ComputeDriverFfi_TO::from_value(
            ComputeAdapter(driver),
            abi_stable::sabi_trait::TD_Opaque,
        ))
    }
    /// See [`ComputeDriver::init`].
    pub fn init(&self) -> Result<(), DriverError> {
        self.inner.init().into_result()
    }
    /// See [`ComputeDriver::cleanup`].
    pub fn cleanup(&self) -> Result<(), DriverError> {
        self.inner.cleanup().into_result()
    }
    /// See [`ComputeDriver::health`].
    pub fn health(&self) -> Result<(), DriverError> {
        self.inner.health().into_result()
    }
    /// See [`ComputeDriver::spawn`].
    pub fn spawn(&self, spec: &InstanceSpec) -> Result<Instance, DriverError> {
        self.inner.spawn(&FfiInstanceSpec::from(spec)).into_result().map(Into::into)
    }
    /// See [`ComputeDriver::destroy`].
    pub fn destroy(&self, name: &str) -> Result<(), DriverError> {
        self.inner.destroy(name.into()).into_result()
    }
    /// See [`ComputeDriver::start`].
    pub fn start(&self, name: &str) -> Result<Instance, DriverError> {
        self.inner.start(name.into()).into_result().map(Into::into)
    }
    /// See [`ComputeDriver::stop`].
    pub fn stop(&self, name: &str) -> Result<Instance, DriverError> {
        self.inner.stop(name.into()).into_result().map(Into::into)
    }
    /// See [`ComputeDriver::reboot`].
    pub fn reboot(&self, name: &str) -> Result<Instance, DriverError> {
        self.inner.reboot(name.into()).into_result().map(Into::into)
    }
    /// See [`ComputeDriver::list`].
    pub fn list(&self) -> Result<Vec<Instance>, DriverError> {
        self.inner.list().into_result().map(|v| v.into_iter().map(Into::into).collect())
    }
    /// See [`ComputeDriver::get`].
    pub fn get(&self, name: &str) -> Result<Instance, DriverError> {
        self.inner.get(name.into()).into_result().map(Into::into)
    }
}
