//! The compute driver interface (after nova's `ComputeDriver`): instances identified by name.

use std::fmt;

use abi_stable::std_types::{ROption, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;

use crate::interface::{driver_interface, record_conversions};

/// What to run for a new instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
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
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "host", serde(rename_all = "lowercase"))]
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
#[cfg_attr(feature = "host", derive(serde::Serialize, serde::Deserialize))]
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
    /// When the current (or last) run started, in milliseconds since the Unix epoch.
    pub started_at_ms: Option<u64>,
    /// The instance ended but how cannot be known (for instance, it was adopted after a restart and was
    /// not this process's child): `exit_code` and `exit_signal` are then both `None`. Never invent one.
    pub exit_unknown: bool,
    /// Driver-specific facts shown with the instance (`pgid`, `cgroup`, ...), as name/value pairs.
    pub details: Vec<(String, String)>,
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

impl From<InstanceSpec> for FfiInstanceSpec {
    fn from(s: InstanceSpec) -> FfiInstanceSpec {
        FfiInstanceSpec {
            name: s.name.into(),
            command: s.command.into(),
            args: s.args.into_iter().map(RString::from).collect(),
            env: s.env.into_iter().map(|(k, v)| Tuple2(k.into(), v.into())).collect(),
            workdir: s.workdir.map(RString::from).into(),
        }
    }
}

impl From<FfiInstanceSpec> for InstanceSpec {
    fn from(s: FfiInstanceSpec) -> InstanceSpec {
        InstanceSpec {
            name: s.name.into(),
            command: s.command.into(),
            args: s.args.into_iter().map(String::from).collect(),
            env: s.env.into_iter().map(|Tuple2(k, v)| (k.into(), v.into())).collect(),
            workdir: s.workdir.into_option().map(String::from),
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
    started_at_ms: ROption<u64>,
    exit_unknown: bool,
    details: RVec<Tuple2<RString, RString>>,
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
            started_at_ms: i.started_at_ms.into(),
            exit_unknown: i.exit_unknown,
            details: i.details.into_iter().map(|(k, v)| Tuple2(k.into(), v.into())).collect(),
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
            started_at_ms: i.started_at_ms.into_option(),
            exit_unknown: i.exit_unknown,
            details: i.details.into_iter().map(|Tuple2(k, v)| (k.into(), v.into())).collect(),
        }
    }
}

record_conversions!(InstanceSpec => FfiInstanceSpec);
record_conversions!(Instance => FfiInstance);

driver_interface! {
    /// What a compute driver implements. Every method may be called from several threads at once.
    ///
    /// Errors name the instance (`instance "web" not found`) and use the kinds the contract requires:
    /// `not_found` for an instance that does not exist, `already_exists` for a name in use, `busy` for
    /// starting a running instance.
    ///
    /// Instances outlive the driver: `cleanup` must not stop them (the host stops them first when it is
    /// told to), and a new driver object on the same state (after a restart of the host, a swap or a
    /// reload) should find them again, reporting an exit it could not observe with
    /// [`Instance::exit_unknown`] rather than an invented status. `stop` and `destroy` end everything
    /// the instance started. A slow `stop` of one instance must not hold up calls on the others.
    kind compute = 2, "compute": ComputeDriver, ComputeClient, ComputeAdapter, ComputeDriverFfi, ComputeDriverFfi_TO;
    host ComputeInterface, ComputeCall, ComputeReply, RemoteCompute, ComputeMethod;
    methods {
        /// Creates and starts an instance.
        fn spawn(spec: &InstanceSpec => FfiInstanceSpec, InstanceSpec) -> Instance => FfiInstance;
        /// Stops (if needed) and removes an instance, with everything it started.
        fn destroy(name: &str => RStr<'_>, String) -> () => ();
        /// Starts a stopped instance.
        fn start(name: &str => RStr<'_>, String) -> Instance => FfiInstance;
        /// Stops a running instance.
        fn stop(name: &str => RStr<'_>, String) -> Instance => FfiInstance;
        /// Stops and starts an instance.
        fn reboot(name: &str => RStr<'_>, String) -> Instance => FfiInstance;
        /// Every instance.
        fn list() -> Vec<Instance> => RVec<FfiInstance>;
        /// One instance.
        fn get(name: &str => RStr<'_>, String) -> Instance => FfiInstance;
    }
    extensions {
        /// Added in 1.2.0: an instance in a network namespace the host made.
        "compute.spawn_in" => ComputeSpawnInFfi, ComputeSpawnInFfi_TO, spawn_in {
            /// Like [`spawn`](ComputeDriver::spawn), but the instance's processes run in the network
            /// namespace bound at `netns` (a path such as `/run/plughost/netns/ID`, which the host made
            /// and plumbed: its ports are attached before the call), and so does every later `start`
            /// and `reboot` of it. A path that is not a network namespace is `invalid_argument`.
            /// Optional (added in 1.2.0): a driver without it, or built against 1.0 or 1.1, answers
            /// `unsupported`, and the host refuses instances with networks on its backend.
            fn spawn_in(spec: &InstanceSpec => FfiInstanceSpec, InstanceSpec, netns: &str => RStr<'_>, String) -> Instance => FfiInstance, default {
                let _ = netns;
                Err(crate::DriverError::unsupported(format!(
                    "instance {:?}: this driver cannot run instances in a network namespace",
                    spec.name
                )))
            };
        }
    }
}
