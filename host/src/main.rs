//! The `plughost` command. Exit codes: 0 ok, 1 failure, 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use host::drivers;
use host::Loader;

#[derive(Parser, Debug)]
#[command(name = "plughost", version, about = "Host for compiled driver plugins (volume and compute drivers)")]
#[command(
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage error.\nLogging: -v/-vv/-q, or RUST_LOG (e.g. RUST_LOG=host=debug)."
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only log errors
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load and verify driver libraries without constructing anything; print their metadata
    #[command(
        after_help = "Example:\n  plughost inspect target/release/libfile_volume.so\n  plughost inspect --json target/release/*.so"
    )]
    Inspect(InspectArgs),
    /// List the drivers found in the driver directories
    #[command(
        after_help = "Example:\n  plughost list --driver-dir /opt/drivers\n\nSearched, in order: each --driver-dir, each directory in $PLUGHOST_DRIVER_DIR (:-separated),\nthe directory of the plughost executable, /usr/local/lib/plughost/drivers, /usr/lib/plughost/drivers."
    )]
    List(ListArgs),
    /// Run the services in the foreground until SIGTERM/SIGINT
    #[command(
        after_help = "Example:\n  plughost run --state-dir ./state --volume-driver file-volume --compute-driver process-compute\n  plughost run --config plughost.toml --volume-backend fast=fake-volume --volume-opt fast:capacity=1GiB\n\nPrecedence: command line > environment (PLUGHOST_*) > config file > built-in defaults.\nA driver is a PATH (contains / or ends in .so) or a NAME looked up as lib<NAME>.so in the driver\ndirectories. Option values may use ${state_dir} and ${backend}. Use `none` to disable a service."
    )]
    Run(Box<RunArgs>),
    /// Talk to a running plughost over its control socket
    #[command(
        after_help = "Examples:\n  plughost ctl status\n  plughost ctl volume create v1 --size 10MiB\n  plughost ctl compute spawn web --env PORT=8080 -- python3 -m http.server 8080\n\nExit codes: 0 ok, 1 the server answered with an error or could not be reached, 2 usage."
    )]
    Ctl(CtlArgs),
    /// Configuration helpers
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Internal: load one file in this (throw-away) process and say whether it survived
    #[command(name = "__probe", hide = true)]
    Probe {
        /// The file
        path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print a commented sample config generated from the drivers' option schemas
    #[command(after_help = "Example:\n  plughost config sample file-volume process-compute > plughost.toml")]
    Sample {
        /// Extra directory to search for NAMEs (repeatable)
        #[arg(long = "driver-dir", value_name = "DIR")]
        driver_dirs: Vec<PathBuf>,
        /// Drivers (PATH or NAME); default: file-volume process-compute
        drivers: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// TOML config file
    #[arg(long, env = "PLUGHOST_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Driver of the default volume backend (PATH or NAME, or `none`)
    #[arg(long, env = "PLUGHOST_VOLUME_DRIVER", value_name = "PATH|NAME")]
    volume_driver: Option<String>,
    /// Driver of the default compute backend (PATH or NAME, or `none`)
    #[arg(long, env = "PLUGHOST_COMPUTE_DRIVER", value_name = "PATH|NAME")]
    compute_driver: Option<String>,
    /// Another volume backend, NAME=PATH|DRIVER (repeatable)
    #[arg(long = "volume-backend", value_name = "NAME=DRIVER")]
    volume_backends: Vec<String>,
    /// Another compute backend, NAME=PATH|DRIVER (repeatable)
    #[arg(long = "compute-backend", value_name = "NAME=DRIVER")]
    compute_backends: Vec<String>,
    /// Volume driver option KEY=VALUE (first backend) or BACKEND:KEY=VALUE (repeatable)
    #[arg(long = "volume-opt", value_name = "KEY=VALUE")]
    volume_opts: Vec<String>,
    /// Compute driver option KEY=VALUE (first backend) or BACKEND:KEY=VALUE (repeatable)
    #[arg(long = "compute-opt", value_name = "KEY=VALUE")]
    compute_opts: Vec<String>,
    /// Volume backend used when a request names none
    #[arg(long, value_name = "NAME")]
    default_volume_backend: Option<String>,
    /// Compute backend used when a request names none
    #[arg(long, value_name = "NAME")]
    default_compute_backend: Option<String>,
    /// Directory to search for driver NAMEs (repeatable)
    #[arg(long = "driver-dir", value_name = "DIR")]
    driver_dirs: Vec<PathBuf>,
    /// State directory [default: $XDG_STATE_HOME/plughost or ~/.local/state/plughost]
    #[arg(long, env = "PLUGHOST_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Control socket [default: STATE_DIR/plughost.sock]
    #[arg(long, env = "PLUGHOST_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// How long a graceful stop waits for in-flight requests, in milliseconds [default: 10000]
    #[arg(long, value_name = "MS")]
    shutdown_timeout_ms: Option<u64>,
    /// Spacing of periodic tasks (stats refresh, instance sync, health), in milliseconds [default: 10000]
    #[arg(long, value_name = "MS")]
    periodic_interval_ms: Option<u64>,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// Control socket [default: $PLUGHOST_SOCKET, else $PLUGHOST_STATE_DIR/plughost.sock, else the default state dir's]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the server's JSON answer
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Services, backends, drivers, health, call statistics
    Status,
    /// Volume operations
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Compute operations
    #[command(subcommand)]
    Compute(ComputeCmd),
    /// Replace a backend's driver while serving: SERVICE[/BACKEND] [PATH|NAME]
    #[command(
        after_help = "Examples:\n  plughost ctl swap volume target/release/libfile_volume.so\n  plughost ctl swap volume/fast          # reload the configured file (a rebuilt library really loads)\n\nThe new driver is loaded, verified, constructed with the backend's options and initialised before it\nreplaces the old one; calls in flight finish on the old driver. On any error the old one keeps serving."
    )]
    Swap {
        /// volume, compute, volume/BACKEND or compute/BACKEND
        target: String,
        /// New driver; default: the configured PATH or NAME, loaded again
        driver: Option<String>,
    },
    /// Re-read the configuration and swap every backend whose driver or options changed (as SIGHUP)
    Reload,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a volume
    Create {
        /// Volume name
        name: String,
        /// Size, e.g. 10MiB
        #[arg(long)]
        size: String,
        /// Backend (default: the service's default backend)
        #[arg(long)]
        backend: Option<String>,
    },
    /// List volumes
    List {
        /// Only this backend
        #[arg(long)]
        backend: Option<String>,
    },
    /// Show one volume
    Get {
        /// Volume name
        name: String,
    },
    /// Grow a volume
    Extend {
        /// Volume name
        name: String,
        /// New size, e.g. 20MiB
        #[arg(long)]
        size: String,
    },
    /// Snapshot a volume into a new one
    Snapshot {
        /// Source volume
        name: String,
        /// Snapshot name
        snapshot: String,
    },
    /// Delete a volume
    Delete {
        /// Volume name
        name: String,
    },
    /// Capacity of a backend
    Stats {
        /// Backend
        #[arg(long)]
        backend: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum ComputeCmd {
    /// Start a new instance running CMD ARGS...
    Spawn {
        /// Instance name
        name: String,
        /// Environment variable K=V (repeatable)
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Working directory
        #[arg(long)]
        workdir: Option<String>,
        /// Backend
        #[arg(long)]
        backend: Option<String>,
        /// Command and arguments, after --
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// List instances
    List {
        /// Only this backend
        #[arg(long)]
        backend: Option<String>,
    },
    /// Show one instance
    Get {
        /// Instance name
        name: String,
    },
    /// Stop an instance
    Stop {
        /// Instance name
        name: String,
    },
    /// Start a stopped instance
    Start {
        /// Instance name
        name: String,
    },
    /// Stop and start an instance
    Reboot {
        /// Instance name
        name: String,
    },
    /// Stop and remove an instance
    Destroy {
        /// Instance name
        name: String,
    },
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// Print a JSON array instead of text
    #[arg(long)]
    json: bool,
    /// Driver library files
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Extra directory to search (repeatable); searched before the defaults
    #[arg(long = "driver-dir", value_name = "DIR")]
    driver_dirs: Vec<PathBuf>,
    /// Print a JSON array instead of text
    #[arg(long)]
    json: bool,
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => log::LevelFilter::Error,
        (false, 0) => log::LevelFilter::Warn,
        (false, 1) => log::LevelFilter::Info,
        (false, 2) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut b = env_logger::Builder::new();
    b.filter_level(level).format_target(false);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.init();
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("plughost: {message}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose, cli.quiet);
    match cli.command {
        Command::Inspect(a) => inspect(a),
        Command::List(a) => list(a),
        Command::Run(a) => run(*a),
        Command::Ctl(a) => ctl(a),
        Command::Config(ConfigCommand::Sample { driver_dirs, drivers }) => sample(driver_dirs, drivers),
        Command::Probe { path } => probe(&path),
    }
}

/// The child side of the loader's probe: survive loading `path` and say so. A rejection is an answer
/// too; only dying, exiting otherwise or hanging counts against the file.
fn probe(path: &std::path::Path) -> ExitCode {
    match Loader::temporary() {
        Ok(loader) => {
            let verdict = match loader.load(path) {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.kind.to_string(),
            };
            println!("probe: {verdict}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.report()),
    }
}

/// A loader for this process that probes new content in a child first (see `Loader::with_probe`).
fn isolating(loader: Loader) -> Loader {
    match std::env::current_exe() {
        Ok(exe) => loader.with_probe(exe),
        Err(e) => {
            log::warn!("cannot find the plughost executable to probe drivers in a child process: {e}");
            loader
        }
    }
}

fn inspect(a: InspectArgs) -> ExitCode {
    let loader = match Loader::temporary().map(isolating) {
        Ok(l) => l,
        Err(e) => return fail(e.report()),
    };
    let results = drivers::load_all(&loader, &a.paths);
    let all_ok = results.iter().all(|(_, r)| r.is_ok());
    if a.json {
        let v: Vec<_> = results.iter().map(|(p, r)| drivers::describe_json(p, r)).collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        let mut first = true;
        for (_, r) in &results {
            match r {
                Ok(lib) => {
                    if !first {
                        println!();
                    }
                    first = false;
                    print!("{}", drivers::describe_text(lib));
                }
                Err(e) => eprintln!("plughost: {}", e.report()),
            }
        }
    }
    ExitCode::from(if all_ok { 0 } else { 1 })
}

fn list(a: ListArgs) -> ExitCode {
    let loader = match Loader::temporary().map(isolating) {
        Ok(l) => l,
        Err(e) => return fail(e.report()),
    };
    let dirs = drivers::driver_dirs(&a.driver_dirs);
    let results = drivers::load_all(&loader, &drivers::scan(&dirs));
    if a.json {
        let v: Vec<_> = results.iter().map(|(p, r)| drivers::describe_json(p, r)).collect();
        println!("{}", serde_json::Value::Array(v));
        return ExitCode::SUCCESS;
    }
    let rows: Vec<[String; 4]> = results
        .iter()
        .map(|(p, r)| match r {
            Ok(l) => [l.name().to_owned(), l.kind().to_string(), l.version().to_owned(), p.display().to_string()],
            Err(e) => ["-".to_owned(), "rejected".to_owned(), "-".to_owned(), format!("{}: {}", p.display(), e.reason)],
        })
        .collect();
    if rows.is_empty() {
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        eprintln!("plughost: no driver libraries (*.so) in {}", searched.join(", "));
        return ExitCode::SUCCESS;
    }
    let header = ["NAME", "KIND", "VERSION", "PATH"].map(String::from);
    print!("{}", drivers::table(std::iter::once(&header).chain(rows.iter()), ""));
    ExitCode::SUCCESS
}

type Specs = (Option<host::config::ServiceSpec>, Option<host::config::ServiceSpec>);

/// Service specs from the config file (if any) and the flags; every error found.
fn specs(
    file: &host::config::FileConfig,
    volume_flags: &host::config::ServiceFlags,
    compute_flags: &host::config::ServiceFlags,
) -> Result<Specs, Vec<String>> {
    use host::config;
    let mut errors = Vec::new();
    let volume = config::service_spec("volume", "file-volume", file.volume.as_ref(), volume_flags)
        .map_err(|e| errors.push(e.to_string()))
        .ok()
        .flatten();
    let compute = config::service_spec("compute", "process-compute", file.compute.as_ref(), compute_flags)
        .map_err(|e| errors.push(e.to_string()))
        .ok()
        .flatten();
    if errors.is_empty() {
        Ok((volume, compute))
    } else {
        Err(errors)
    }
}

fn run(a: RunArgs) -> ExitCode {
    use host::config::{self, ServiceFlags};
    let file = match &a.config {
        Some(p) => match config::read_file(p) {
            Ok(f) => f,
            Err(e) => return fail(e),
        },
        None => config::FileConfig::default(),
    };
    let volume_flags = ServiceFlags {
        driver: a.volume_driver.clone(),
        backends: a.volume_backends.clone(),
        opts: a.volume_opts.clone(),
        default_backend: a.default_volume_backend.clone(),
    };
    let compute_flags = ServiceFlags {
        driver: a.compute_driver.clone(),
        backends: a.compute_backends.clone(),
        opts: a.compute_opts.clone(),
        default_backend: a.default_compute_backend.clone(),
    };
    let (volume, compute) = match specs(&file, &volume_flags, &compute_flags) {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                eprintln!("plughost: {e}");
            }
            return ExitCode::from(1);
        }
    };
    let state_dir = a.state_dir.or(file.state_dir).unwrap_or_else(config::default_state_dir);
    let state_dir = std::path::absolute(&state_dir).unwrap_or(state_dir);
    let socket = a.socket.or(file.socket).unwrap_or_else(|| state_dir.join("plughost.sock"));
    let mut dir_flags = a.driver_dirs.clone();
    dir_flags.extend(file.driver_dirs.iter().cloned());
    let settings = host::runtime::Settings {
        driver_dirs: drivers::driver_dirs(&dir_flags),
        state_dir,
        socket,
        volume,
        compute,
        shutdown_timeout: std::time::Duration::from_millis(
            a.shutdown_timeout_ms.or(file.shutdown_timeout_ms).unwrap_or(10_000),
        ),
        probe: std::env::current_exe().ok(),
        periodic_interval: std::time::Duration::from_millis(
            a.periodic_interval_ms.or(file.periodic_interval_ms).unwrap_or(10_000).max(10),
        ),
    };
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot install signal handlers: {e}")),
    };
    let host = match host::runtime::Host::start(&settings) {
        Ok(h) => h,
        Err(errors) => {
            for e in errors {
                eprintln!("plughost: {e}");
            }
            return ExitCode::from(1);
        }
    };
    let config_path = a.config.clone();
    host.set_reloader(Box::new(move || {
        let file = match &config_path {
            Some(p) => config::read_file(p).map_err(|e| e.to_string())?,
            None => config::FileConfig::default(),
        };
        specs(&file, &volume_flags, &compute_flags).map_err(|e| e.join("; "))
    }));
    let running = match host::runtime::Running::serve(host, &settings) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let status = running.host().status();
    for svc in status["services"].as_array().into_iter().flatten() {
        for b in svc["backends"].as_array().into_iter().flatten() {
            eprintln!(
                "plughost: {} backend {:?}: {} {} ({})",
                svc["name"].as_str().unwrap_or("?"),
                b["name"].as_str().unwrap_or("?"),
                b["driver"]["name"].as_str().unwrap_or("?"),
                b["driver"]["version"].as_str().unwrap_or("?"),
                b["state"].as_str().unwrap_or("?"),
            );
        }
    }
    eprintln!("plughost: serving on {} (state dir {})", settings.socket.display(), settings.state_dir.display());
    eprintln!("plughost: try: plughost ctl --socket {} status", settings.socket.display());
    let mut signals = signals;
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            log::info!("SIGHUP received: reloading the configuration");
            if let Err(e) = running.host().reload_from_config() {
                log::error!("reload failed: {}", e.message);
            }
            continue;
        }
        log::info!("signal {sig} received: stopping gracefully");
        break;
    }
    running.stop();
    ExitCode::SUCCESS
}

fn ctl_socket(flag: Option<PathBuf>) -> PathBuf {
    if let Some(s) = flag {
        return s;
    }
    if let Some(s) = std::env::var_os("PLUGHOST_SOCKET").filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    let state = std::env::var_os("PLUGHOST_STATE_DIR")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(host::config::default_state_dir);
    state.join("plughost.sock")
}

fn ctl(a: CtlArgs) -> ExitCode {
    use serde_json::json;
    let (service, op, args) = match a.command {
        CtlCommand::Status => ("", "status", json!({})),
        CtlCommand::Reload => ("", "reload", json!({})),
        CtlCommand::Swap { target, driver } => {
            let (svc, backend) = match target.split_once('/') {
                Some((s, b)) => (s.to_owned(), Some(b.to_owned())),
                None => (target.clone(), None),
            };
            let svc: &'static str = match svc.as_str() {
                "volume" => "volume",
                "compute" => "compute",
                other => {
                    eprintln!("plughost: swap target {other:?}: expected volume[/BACKEND] or compute[/BACKEND]");
                    return ExitCode::from(2);
                }
            };
            (svc, "swap", json!({"backend": backend, "driver": driver}))
        }
        CtlCommand::Volume(v) => match v {
            VolumeCmd::Create { name, size, backend } => {
                ("volume", "create", json!({"name": name, "size": size, "backend": backend}))
            }
            VolumeCmd::List { backend } => ("volume", "list", json!({"backend": backend})),
            VolumeCmd::Get { name } => ("volume", "get", json!({"name": name})),
            VolumeCmd::Extend { name, size } => ("volume", "extend", json!({"name": name, "size": size})),
            VolumeCmd::Snapshot { name, snapshot } => {
                ("volume", "snapshot", json!({"name": name, "snapshot": snapshot}))
            }
            VolumeCmd::Delete { name } => ("volume", "delete", json!({"name": name})),
            VolumeCmd::Stats { backend } => ("volume", "stats", json!({"backend": backend})),
        },
        CtlCommand::Compute(c) => match c {
            ComputeCmd::Spawn { name, env, workdir, backend, command } => {
                let mut envs = serde_json::Map::new();
                for kv in env {
                    match kv.split_once('=') {
                        Some((k, v)) if !k.is_empty() => {
                            envs.insert(k.to_owned(), json!(v));
                        }
                        _ => {
                            eprintln!("plughost: --env {kv:?}: expected K=V");
                            return ExitCode::from(2);
                        }
                    }
                }
                let (cmd, rest) = command.split_first().map(|(c, r)| (c.clone(), r.to_vec())).unwrap_or_default();
                (
                    "compute",
                    "spawn",
                    json!({"name": name, "command": cmd, "args": rest, "env": envs, "workdir": workdir, "backend": backend}),
                )
            }
            ComputeCmd::List { backend } => ("compute", "list", json!({"backend": backend})),
            ComputeCmd::Get { name } => ("compute", "get", json!({"name": name})),
            ComputeCmd::Stop { name } => ("compute", "stop", json!({"name": name})),
            ComputeCmd::Start { name } => ("compute", "start", json!({"name": name})),
            ComputeCmd::Reboot { name } => ("compute", "reboot", json!({"name": name})),
            ComputeCmd::Destroy { name } => ("compute", "destroy", json!({"name": name})),
        },
    };
    let mut req = json!({"id": 1, "op": op, "args": args});
    if !service.is_empty() {
        req["service"] = json!(service);
    }
    let socket = ctl_socket(a.socket);
    let answer = match host::ctl::request(&socket, &req) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if a.json {
        println!("{answer}");
        return ExitCode::from(if answer["ok"] == true { 0 } else { 1 });
    }
    if answer["ok"] == true {
        print!("{}", host::ctl::format_human(service, op, &answer["result"]));
        ExitCode::SUCCESS
    } else {
        fail(format!(
            "{}: {}",
            answer["error"]["kind"].as_str().unwrap_or("error"),
            answer["error"]["message"].as_str().unwrap_or("unknown error")
        ))
    }
}

fn sample(driver_dirs: Vec<PathBuf>, drivers: Vec<String>) -> ExitCode {
    let drivers =
        if drivers.is_empty() { vec!["file-volume".to_owned(), "process-compute".to_owned()] } else { drivers };
    let dirs = drivers::driver_dirs(&driver_dirs);
    let loader = match Loader::temporary() {
        Ok(l) => l,
        Err(e) => return fail(e.report()),
    };
    let mut out = String::from("# plughost sample configuration, generated from the drivers' option schemas.\n# Precedence: command line > environment (PLUGHOST_*) > this file > defaults.\n\n# state_dir = \"/var/lib/plughost\"\n# socket = \"/var/lib/plughost/plughost.sock\"\n# driver_dirs = [\"/usr/lib/plughost/drivers\"]\n# shutdown_timeout_ms = 10000\n# periodic_interval_ms = 10000\n");
    let mut failed = false;
    for d in &drivers {
        let lib = match drivers::resolve(d, &dirs)
            .map_err(|e| e.to_string())
            .and_then(|p| loader.load(&p).map_err(|e| e.report()))
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("plughost: {e}");
                failed = true;
                continue;
            }
        };
        out.push_str(&format!(
            "\n# {} {}: {}\n[{}]\ndriver = {:?}\n[{}.options]\n",
            lib.name(),
            lib.version(),
            lib.summary(),
            lib.kind(),
            lib.name(),
            lib.kind()
        ));
        for o in lib.options() {
            let mut flags = vec![o.ty().as_str().to_owned()];
            if o.is_required() {
                flags.push("required".to_owned());
            }
            if o.is_secret() {
                flags.push("secret: never logged or shown".to_owned());
            }
            out.push_str(&format!("# {} ({})\n", o.help(), flags.join(", ")));
            match (o.is_required(), o.default_value()) {
                (true, _) => out.push_str(&format!("{} = \"\"\n", o.name())),
                (false, Some(v)) => out.push_str(&format!("# {} = {:?}\n", o.name(), v)),
                (false, None) => out.push_str(&format!("# {} = \"\"\n", o.name())),
            }
        }
    }
    print!("{out}");
    ExitCode::from(if failed { 1 } else { 0 })
}
