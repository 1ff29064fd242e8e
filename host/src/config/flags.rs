//! The flags of `plughost run` and the environment variables clap reads for them; the per-service
//! groups come from the service table.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::services::kinds::KINDS;

/// What the command line (and environment) said about one service.
#[derive(Debug, Default, Clone)]
pub struct ServiceFlags {
    /// `--volume-driver`.
    pub driver: Option<String>,
    /// `--volume-backend NAME=DRIVER`, repeatable.
    pub backends: Vec<String>,
    /// `--volume-opt [BACKEND:]KEY=VALUE`, repeatable.
    pub opts: Vec<String>,
    /// `--default-volume-backend`.
    pub default_backend: Option<String>,
}

/// The per-service flags of `plughost run`, one group per entry of the service table.
#[derive(Debug, Default, Clone)]
pub struct ServiceFlagSet(pub BTreeMap<&'static str, ServiceFlags>);

fn flag_ids(service: &str) -> [String; 4] {
    [
        format!("{service}_driver"),
        format!("{service}_backends"),
        format!("{service}_opts"),
        format!("default_{service}_backend"),
    ]
}

impl clap::FromArgMatches for ServiceFlagSet {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut set = ServiceFlagSet::default();
        set.update_from_arg_matches(m)?;
        Ok(set)
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for k in KINDS {
            let [driver, backends, opts, default] = flag_ids(k.name);
            let many = |id: &str| m.get_many::<String>(id).map(|v| v.cloned().collect()).unwrap_or_default();
            self.0.insert(
                k.name,
                ServiceFlags {
                    driver: m.get_one::<String>(&driver).cloned(),
                    backends: many(&backends),
                    opts: many(&opts),
                    default_backend: m.get_one::<String>(&default).cloned(),
                },
            );
        }
        Ok(())
    }
}

impl clap::Args for ServiceFlagSet {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction};
        for k in KINDS {
            let [driver, backends, opts, default] = flag_ids(k.name);
            let n = k.name;
            cmd = cmd
                .arg(
                    Arg::new(driver)
                        .long(format!("{n}-driver"))
                        .env(format!("PLUGHOST_{}_DRIVER", n.to_uppercase()))
                        .value_name("PATH|NAME")
                        .help(if k.on_by_default {
                            format!(
                                "Driver of the default {n} backend (PATH or NAME, or `none`; DRIVER@blake3:HEX pins its digest) [default: {}]",
                                k.default_driver
                            )
                        } else {
                            format!(
                                "Driver of the default {n} backend (PATH or NAME; DRIVER@blake3:HEX pins its digest); the {n} service is off unless this, a [{n}] section or a --{n}-backend names one [default with a [{n}] section: {}]",
                                k.default_driver
                            )
                        }),
                )
                .arg(
                    Arg::new(backends)
                        .long(format!("{n}-backend"))
                        .value_name("NAME=DRIVER")
                        .action(ArgAction::Append)
                        .help(format!(
                            "Another {n} backend, NAME=PATH|DRIVER, optionally pinned: NAME=DRIVER@blake3:HEX (repeatable)"
                        )),
                )
                .arg(
                    Arg::new(opts)
                        .long(format!("{n}-opt"))
                        .value_name("KEY=VALUE")
                        .action(ArgAction::Append)
                        .help(format!(
                            "{n} driver option KEY=VALUE (first backend) or BACKEND:KEY=VALUE (repeatable); VALUE @FILE reads a file (a secret stays off the command line), @env:NAME a variable, @@… is a literal @"
                        )),
                )
                .arg(
                    Arg::new(default)
                        .long(format!("default-{n}-backend"))
                        .value_name("NAME")
                        .help(format!("{n} backend used when a request names none")),
                );
        }
        cmd
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// The flags of `plughost run` (and the environment variables clap reads for them).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunFlags {
    /// TOML config file
    #[arg(long, env = "PLUGHOST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory to search for driver NAMEs (repeatable)
    #[arg(long = "driver-dir", value_name = "DIR")]
    pub driver_dirs: Vec<PathBuf>,
    /// State directory [default: $XDG_STATE_HOME/plughost or ~/.local/state/plughost]
    #[arg(long, env = "PLUGHOST_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Control socket [default: STATE_DIR/plughost.sock]
    #[arg(long, env = "PLUGHOST_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// How long a graceful stop waits for in-flight requests, in milliseconds [default: 10000]
    #[arg(long, value_name = "MS")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Spacing of periodic tasks (stats refresh, instance sync, health), in milliseconds [default: 10000]
    #[arg(long, value_name = "MS")]
    pub periodic_interval_ms: Option<u64>,
    /// Largest request line accepted on the control socket, in bytes [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub max_request_bytes: Option<u64>,
    /// Connections served at once for admins; readers (socket_group) get a quarter of it. Past it a
    /// connection is answered busy and closed [default: 512]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u64>,
    /// Load driver files even if others could have written them (trust.strict = false); logged as a
    /// warning and shown in status
    #[arg(long)]
    pub allow_untrusted_drivers: bool,
    /// Largest driver file accepted, in bytes; larger ones are refused before they are read [default:
    /// 268435456]
    #[arg(long, value_name = "BYTES")]
    pub max_driver_bytes: Option<u64>,
    /// Let `swap` name a driver file outside the driver directories (trust.allow_swap_paths = true)
    #[arg(long)]
    pub allow_swap_paths: bool,
    /// Start although state.db holds no records where it held some before (every resource the drivers
    /// report is then adopted with a new id)
    #[arg(long, env = "PLUGHOST_ACCEPT_EMPTY_STATE")]
    pub accept_empty_state: bool,
    /// Members of GROUP may read through the control socket (status, get, list, stats); mutations,
    /// swap and reload stay with root and plughost's user
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Run the drivers of SERVICE (every backend) or SERVICE/BACKEND in worker processes (isolation =
    /// "process"): no fault of theirs can take plughost down (repeatable)
    #[arg(long, value_name = "SERVICE[/BACKEND]")]
    pub isolate: Vec<String>,
    /// Stop the instances of SERVICE (every backend) or SERVICE/BACKEND when plughost stops; by default
    /// they keep running and a restarted plughost re-adopts them (repeatable)
    #[arg(long, value_name = "SERVICE[/BACKEND]")]
    pub stop_instances_on_exit: Vec<String>,
    /// Serve GET /metrics (OpenMetrics) and GET /healthz over HTTP on ADDR, e.g. 127.0.0.1:9464; nothing
    /// listens on TCP unless this (or metrics_listen) is given
    #[arg(long, env = "PLUGHOST_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Join a fleet: the NATS server URL (repeatable, or comma-separated for a cluster); off unless given
    #[arg(long = "fleet-url", env = "PLUGHOST_FLEET_URL", value_name = "URL", value_delimiter = ',')]
    pub fleet_urls: Vec<String>,
    /// The fleet's name (subjects and the services table are named after it) [default: default]
    #[arg(long, env = "PLUGHOST_FLEET_NAME", value_name = "NAME")]
    pub fleet_name: Option<String>,
    /// This host's name in the fleet [default: the hostname with dots turned into -]
    #[arg(long, env = "PLUGHOST_HOST_NAME", value_name = "NAME")]
    pub host_name: Option<String>,
    /// The broker credentials file (user:password, an nkey seed or a .creds file; owner and mode checked
    /// like a driver file's)
    #[arg(long, env = "PLUGHOST_FLEET_CREDENTIALS", value_name = "FILE")]
    pub fleet_credentials: Option<PathBuf>,
    /// How often this host reports to the services table (ms, or 10s) [default: 10s]
    #[arg(long, env = "PLUGHOST_FLEET_REPORT_INTERVAL", value_name = "DURATION")]
    pub fleet_report_interval: Option<String>,
    /// A host whose last report is older is down (ms, or 60s; more than twice the report interval)
    /// [default: 60s]
    #[arg(long, env = "PLUGHOST_FLEET_SERVICE_DOWN_TIME", value_name = "DURATION")]
    pub fleet_service_down_time: Option<String>,
    /// A label of this host for placement, KEY=VALUE (repeatable; over the config's [fleet.labels])
    #[arg(long = "fleet-label", value_name = "KEY=VALUE")]
    pub fleet_labels: Vec<String>,
    /// Per-service flags.
    #[command(flatten)]
    pub services: ServiceFlagSet,
}
