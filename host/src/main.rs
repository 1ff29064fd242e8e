//! The `plughost` command: clap definitions and dispatch. Exit codes: 0 ok, 1 failure, 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use host::config::{ConfigSource, RunFlags};
use host::control::ctl::{CtlCommand, CtlError, CtlOutput, Target};
use host::loading::drivers;
use host::Loader;

/// `plughost --version`: the release, the commit, and the driver API it loads.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("PLUGHOST_COMMIT"),
    ", plughost-api ",
    env!("PLUGHOST_API_VERSION"),
    ")"
);

#[derive(Parser, Debug)]
#[command(name = "plughost", version = VERSION, about = "Host for compiled driver plugins (volume and compute drivers)")]
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
    Inspect {
        /// Print a JSON array instead of text
        #[arg(long)]
        json: bool,
        /// Driver library files
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// List the drivers found in the driver directories
    #[command(
        after_help = "Example:\n  plughost list --driver-dir /opt/drivers\n\nSearched, in order: each --driver-dir, each directory in $PLUGHOST_DRIVER_DIR (:-separated),\nthe directory of the plughost executable, /usr/local/lib/plughost/drivers, /usr/lib/plughost/drivers."
    )]
    List {
        /// Extra directory to search (repeatable); searched before the defaults
        #[arg(long = "driver-dir", value_name = "DIR")]
        driver_dirs: Vec<PathBuf>,
        /// Print a JSON array instead of text
        #[arg(long)]
        json: bool,
    },
    /// Run the services in the foreground until SIGTERM/SIGINT
    #[command(
        after_help = "Example:\n  plughost run --state-dir ./state --volume-driver file-volume --compute-driver process-compute\n  plughost run --config plughost.toml --volume-backend fast=fake-volume --volume-opt fast:capacity=1GiB\n\nPrecedence: command line > environment (PLUGHOST_*) > config file > built-in defaults.\nA driver is a PATH (contains / or ends in .so) or a NAME looked up as lib<NAME>.so in the driver\ndirectories. Option values may use ${state_dir} and ${backend}; a value @FILE is read from FILE (0600, the
host's) and @env:NAME from the environment, so that secrets stay off the command line. Use `none` to
disable a service."
    )]
    Run(Box<RunFlags>),
    /// Talk to a running plughost over its control socket
    #[command(
        after_help = "Examples:\n  plughost ctl status\n  plughost ctl volume create v1 --size 10MiB\n  plughost ctl compute spawn web --env PORT=8080 -- python3 -m http.server 8080\n\nExit codes: 0 ok, 1 the server answered with an error or could not be reached, 2 usage."
    )]
    Ctl(CtlArgs),
    /// The fleet: every host's report in the services table
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Choose a host for a new volume or instance (filters, then weighers), and with --create make it there
    #[command(
        after_help = "Examples:\n  plughost place volume --size 10GiB --fleet-url nats://127.0.0.1:4222\n  plughost place volume --size 10GiB --label disk=ssd --weigher free=-1 --explain\n  plughost place compute --create web -- python3 -m http.server 8080\n\nFilters: up, service, backend_up, api, extensions, capacity, labels. Weighers (normalised over the\nhosts that pass, times their multiplier): free (1), records (0), failures (-1).\nExit codes: 0 placed (and created), 1 no host passes or the create failed, 2 usage."
    )]
    Place(Box<host::control::fleet::PlaceArgs>),
    /// Run the driver conformance suite on a library, through the real loader, in a child process
    #[command(
        after_help = "Example:\n  plughost check target/debug/libmy_driver.so\n  plughost check --json target/release/libfile_volume.so --opt sync=false\n\nOption values may use ${state_dir} (a private temporary directory) and ${backend} (\"check\").\nExit codes: 0 every check passed, 1 a check failed or the library could not be checked, 2 usage."
    )]
    Check {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
        /// Driver option KEY=VALUE (repeatable)
        #[arg(long = "opt", value_name = "KEY=VALUE")]
        opts: Vec<String>,
        /// The driver library
        path: PathBuf,
    },
    /// Create a new driver crate that builds and passes `cargo test` and `plughost check` as it is
    #[command(
        after_help = "Example:\n  plughost new my-volume --kind volume\n  cd my-volume && cargo test && cargo build && plughost check target/debug/libmy_volume.so"
    )]
    New {
        /// Driver (and crate) name: a-z 0-9 - _
        name: String,
        /// What kind of driver
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(host::authoring::scaffold::template_kinds()))]
        kind: String,
        /// Where to create the NAME directory
        #[arg(long, value_name = "DIR", default_value = ".")]
        path: PathBuf,
    },
    /// Write the exact plughost-api source this plughost was built with into DIR (absent or empty), to
    /// patch in as a driver's dependency until the package is on crates.io
    ApiSource {
        /// Where to write the package
        dir: PathBuf,
    },
    /// Configuration helpers
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print shell completions (generated from these very flags)
    #[command(after_help = "Example:\n  plughost completions bash > /usr/share/bash-completion/completions/plughost")]
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (section 8): plughost.8 and one per command, into DIR
    #[command(after_help = "Example:\n  plughost man /usr/share/man/man8 && man plughost")]
    Man {
        /// Where to write them
        dir: PathBuf,
    },
    /// Internal: serve one isolated backend's driver for the host (socket on fd 3, library on fd 4)
    #[command(name = "__worker", hide = true)]
    Worker {
        /// The host's pid
        #[arg(long)]
        parent: u32,
        /// Run as this uid
        #[arg(long)]
        uid: Option<u32>,
        /// Run as this gid
        #[arg(long)]
        gid: Option<u32>,
    },
    /// Internal: in a sandbox, load the library passed on fd 3 and say what it is (or why it is refused)
    #[command(name = "__describe", hide = true)]
    Describe {
        /// The private working directory the parent made
        #[arg(long)]
        dir: PathBuf,
    },
    /// Internal: the child side of `check`
    #[command(name = "__check", hide = true)]
    CheckChild {
        /// Private state directory
        #[arg(long)]
        state_dir: PathBuf,
        /// Driver options
        #[arg(long = "opt")]
        opts: Vec<String>,
        /// The driver library
        path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Check what `plughost run` with these flags would start with: parse and merge the config, check the
    /// state dir, resolve every driver, run the trust checks and pins, describe each driver in the
    /// sandbox child; no lock taken, nothing bound, nothing loaded here
    #[command(
        after_help = "Example:\n  plughost config check --config /etc/plughost/plughost.toml\n\nExit codes: 0 it would start, 1 it would not (one line per problem), 2 usage."
    )]
    Check(Box<RunFlags>),
    /// Print the effective settings (flags > environment > file > defaults) as JSON, secrets masked
    Show(Box<RunFlags>),
    /// Print a commented sample config generated from the drivers' option schemas
    #[command(after_help = "Example:\n  plughost config sample file-volume process-compute > plughost.toml")]
    Sample {
        /// Extra directory to search for NAMEs (repeatable)
        #[arg(long = "driver-dir", value_name = "DIR")]
        driver_dirs: Vec<PathBuf>,
        /// Drivers (PATH or NAME); default: each service's default driver
        drivers: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCommand {
    /// The services table: each host, its state (down when its last report is older than its
    /// service_down_time), the age of its last report, its protocol version and its backends
    #[command(after_help = "Example:\n  plughost fleet status --fleet-url nats://127.0.0.1:4222")]
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connect: host::control::fleet::Connect,
    },
    /// Roll a driver through the fleet live: a canary batch, then batches, each watched for a health
    /// window; any failure swaps every host already swapped back
    #[command(after_help = ROLLOUT_HELP)]
    Swap(Box<host::control::rollout::SwapArgs>),
    /// Rollouts: status, resume or abort one whose command was interrupted
    #[command(subcommand)]
    Rollout(RolloutCommand),
}

const ROLLOUT_HELP: &str = "Examples:\n  plughost fleet swap volume fast-volume --digest blake3:9f2c... --fleet-url nats://127.0.0.1:4222\n  plughost fleet swap volume/ssd fast-volume --digest blake3:9f2c... --label zone=a --canary 1 --batch 25% --health-window 2m\n  plughost fleet swap volume fast-volume --digest blake3:9f2c... --dry-run\n\nEach host resolves DRIVER in its own driver directories and checks its file against --digest before\nloading anything; a host whose file differs, lacks it, is down or is too old is left out and named\n(or, with --all-or-nothing, the rollout is refused). The rollout is kept in the bucket\nph_<fleet>_rollouts: `plughost fleet rollout status|resume|abort ID` from any machine.\nExit codes: 0 every host serves the new driver (or already did; a dry run), 1 stopped and rolled back,\nrefused or failed, 2 usage.";

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// Every rollout, or one with each host's state
    Status(host::control::rollout::RolloutArgs),
    /// Finish an interrupted rollout (or its rollback)
    Resume(host::control::rollout::RolloutArgs),
    /// Swap back every host a rollout swapped
    Abort(host::control::rollout::RolloutArgs),
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// Control socket [default: $PLUGHOST_SOCKET, else $PLUGHOST_STATE_DIR/plughost.sock, else the default state dir's]
    #[arg(long, value_name = "PATH", conflicts_with = "host")]
    socket: Option<PathBuf>,
    /// Send the command to host NAME of the fleet, through the broker (--fleet-url)
    #[arg(long = "host", value_name = "NAME")]
    host: Option<String>,
    #[command(flatten)]
    connect: host::control::fleet::Connect,
    /// Print the server's JSON answer (before or after the command)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
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
    if stderr_is_journal() {
        // Start-up lines are worth a line in the journal at the default level.
        if !quiet {
            b.filter_module("plughost::startup", log::LevelFilter::Info);
        }
        // journald stamps each line itself and reads its priority from a `<N>` prefix (sd-daemon(3)).
        b.format(|f, record| {
            use std::io::Write;
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            write!(f, "<{priority}>{}", record.args())?;
            // Key-value fields (service, backend, op, name, peer, outcome) after the message.
            struct Fields<'a, 'b>(&'a mut env_logger::fmt::Formatter, std::marker::PhantomData<&'b ()>);
            impl<'kvs> log::kv::VisitSource<'kvs> for Fields<'_, '_> {
                fn visit_pair(&mut self, k: log::kv::Key<'kvs>, v: log::kv::Value<'kvs>) -> Result<(), log::kv::Error> {
                    write!(self.0, " {k}={v}").map_err(log::kv::Error::boxed)
                }
            }
            let _ = record.key_values().visit(&mut Fields(f, std::marker::PhantomData));
            writeln!(f)
        });
    }
    b.init();
}

/// Whether stderr is the journal's stream (`JOURNAL_STREAM` names its device and inode; a child whose
/// stderr was redirected elsewhere inherits the variable but not the stream).
fn stderr_is_journal() -> bool {
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    rustix::fs::fstat(rustix::stdio::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

fn fail<T: std::fmt::Display>(lines: impl IntoIterator<Item = T>) -> ExitCode {
    for l in lines {
        eprintln!("plughost: {l}");
    }
    ExitCode::from(1)
}

/// A loader for this process that loads driver code only in sandboxed children.
fn probing_loader() -> Loader {
    match std::env::current_exe() {
        Ok(exe) => Loader::new().with_probe(exe),
        Err(e) => {
            log::warn!("cannot find the plughost executable to probe drivers in a child process: {e}");
            Loader::new()
        }
    }
}

fn report(r: drivers::Report) -> ExitCode {
    print!("{}", r.stdout);
    for line in &r.stderr {
        eprintln!("plughost: {line}");
    }
    ExitCode::from(if r.ok { 0 } else { 1 })
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
    // Commands that only print may be piped into `head`: a closed pipe ends them quietly, as it ends
    // cat. (Everything that talks over a socket keeps SIGPIPE ignored and gets EPIPE instead.)
    if matches!(
        cli.command,
        Command::Inspect { .. }
            | Command::List { .. }
            | Command::Config(_)
            | Command::Completions { .. }
            | Command::Man { .. }
    ) {
        // SAFETY: restoring the default disposition of SIGPIPE, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli.command {
        Command::Inspect { json, paths } => report(drivers::inspect(&probing_loader(), &paths, json)),
        Command::List { driver_dirs, json } => report(drivers::list(&probing_loader(), &driver_dirs, json)),
        Command::Run(flags) => {
            // Start-up lines: for a person at a terminal as they always were; under journald through the
            // logger, at info priority.
            let journal = stderr_is_journal();
            let ready = |lines: &[String]| {
                for l in lines {
                    if journal {
                        log::info!(target: "plughost::startup", "{l}");
                    } else {
                        eprintln!("plughost: {l}");
                    }
                }
            };
            match host::runtime::run(ConfigSource { flags: *flags }, ready) {
                Ok(()) => ExitCode::SUCCESS,
                Err(errors) => fail(errors),
            }
        }
        Command::Ctl(a) => {
            let target = match a.host {
                Some(host) => Target::Fleet(host::control::fleet::Remote { connect: a.connect, host }),
                None => Target::Socket(a.socket),
            };
            ctl_exit(host::control::ctl::run_on(&target, a.json, &a.command))
        }
        Command::Fleet(FleetCommand::Status { json, connect }) => {
            ctl_exit(host::control::fleet::status(&connect, json).map(CtlOutput::ok))
        }
        Command::Fleet(FleetCommand::Swap(args)) => ctl_exit(host::control::rollout::swap(&args)),
        Command::Fleet(FleetCommand::Rollout(RolloutCommand::Status(args))) => {
            ctl_exit(host::control::rollout::status(&args))
        }
        Command::Fleet(FleetCommand::Rollout(RolloutCommand::Resume(args))) => {
            ctl_exit(host::control::rollout::resume(&args))
        }
        Command::Fleet(FleetCommand::Rollout(RolloutCommand::Abort(args))) => {
            ctl_exit(host::control::rollout::abort(&args))
        }
        Command::Place(args) => {
            let r = host::control::fleet::place(&args).map(|out| {
                for n in &out.notes {
                    eprintln!("plughost: {n}");
                }
                CtlOutput::ok(out.stdout)
            });
            ctl_exit(r)
        }
        Command::Config(ConfigCommand::Sample { driver_dirs, drivers }) => sample(&driver_dirs, drivers),
        Command::Config(ConfigCommand::Check(flags)) => {
            let c = host::config::check::check(*flags);
            for l in &c.lines {
                println!("ok: {l}");
            }
            if c.problems.is_empty() {
                println!("config ok");
                ExitCode::SUCCESS
            } else {
                fail(&c.problems)
            }
        }
        Command::Config(ConfigCommand::Show(flags)) => {
            let c = host::config::check::check(*flags);
            match host::config::check::show(&c) {
                Some(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).expect("settings always serialize"));
                    for p in &c.problems {
                        eprintln!("plughost: warning: {p}");
                    }
                    ExitCode::SUCCESS
                }
                None => fail(&c.problems),
            }
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "plughost", &mut script);
            // A closed pipe (`| head`) is not an error worth a message.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => fail([format!("cannot write the completions: {e}")]),
            }
        }
        Command::Man { dir } => match man_pages(&dir) {
            Ok(n) => {
                println!("wrote {n} man pages to {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail([e]),
        },

        Command::Check { json, opts, path } => {
            let exe = match std::env::current_exe() {
                Ok(e) => e,
                Err(e) => return fail([format!("cannot find the plughost executable: {e}")]),
            };
            let report = host::authoring::check::check(&exe, &path, &opts);
            if json {
                println!("{}", serde_json::to_string(&report).expect("a check report always serializes"));
            } else {
                print!("{}", report.text());
            }
            ExitCode::from(if report.passed { 0 } else { 1 })
        }
        Command::New { name, kind, path } => match host::authoring::scaffold::new_driver(&name, &kind, &path) {
            Ok(dir) => {
                println!("created {} ({kind} driver {name:?})", dir.display());
                println!(
                    "next: cd {} && cargo test && cargo build && plughost check target/debug/lib{}.so",
                    dir.display(),
                    name.replace('-', "_")
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail([e]),
        },
        Command::ApiSource { dir } => match host::authoring::scaffold::api_source(&dir) {
            Ok(()) => {
                println!("wrote plughost-api {} to {}", plughost_api::API_VERSION, dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail([e]),
        },
        Command::CheckChild { state_dir, opts, path } => match host::authoring::check::EventWriter::take_stdout() {
            Ok(mut events) => {
                host::authoring::check::child(&path, &state_dir, &opts, &mut events);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("plughost: cannot set up the check's report: {e}");
                ExitCode::from(1)
            }
        },
        Command::Worker { parent, uid, gid } => {
            let args = host::worker::WorkerArgs { parent, uid, gid };
            let why = host::worker::child_main(&args, |kind, stream, setup| match host::services::kinds::kind(kind) {
                Some(k) => (k.serve_worker)(stream, setup),
                None => format!("unknown driver kind {kind:?}"),
            });
            eprintln!("worker: {why}");
            ExitCode::from(1)
        }
        Command::Describe { dir } => {
            // Limits, an unprivileged uid, a private directory: before anything of the library runs.
            if let Err(e) = host::loading::sandbox::enter(&dir) {
                return fail([e]);
            }
            let answer = host::loading::loader::child_answer();
            println!("{}", serde_json::to_string(&answer).expect("a child answer always serializes"));
            ExitCode::SUCCESS
        }
    }
}

/// The EXIT STATUS and FILES sections every page carries.
const MAN_TAIL: &str = r#".SH "EXIT STATUS"
0 success; 1 failure (the error is one line on stderr, prefixed plughost:); 2 usage error.
.B plughost ctl health
exits 0 when every backend is up, 1 degraded, 2 down or unreachable.
.SH FILES
.TP
.I /etc/plughost/plughost.toml
the config file (held to the driver files' owner and mode rule: root or plughost's user, not writable by others)
.TP
.I STATE_DIR/state.db
records (SQLite); STATE_DIR is /var/lib/plughost for root or under systemd, else $XDG_STATE_HOME/plughost
.TP
.I STATE_DIR/audit.log
who changed what, one JSON object per line
.TP
.I STATE_DIR/plughost.sock
the control socket (mode 0600, or 0660 with socket_group)
.TP
.I /usr/lib/plughost/drivers
driver libraries found by NAME (also /usr/local/lib/plughost/drivers, the executable's directory, --driver-dir)
"#;

/// Writes plughost.8 and plughost-COMMAND.8 for every visible command; how many.
fn man_pages(dir: &std::path::Path) -> Result<usize, String> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).map_err(|e| format!("man page directory \"{}\": {e}", dir.display()))?;
    let top = Cli::command();
    let mut pages = vec![("plughost".to_owned(), top.clone())];
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("plughost-{}", sub.get_name());
        let page = sub.clone().name(name.clone()).bin_name(format!("plughost {}", sub.get_name())).version(VERSION);
        pages.push((name, page));
    }
    for (name, cmd) in &pages {
        let man = clap_mangen::Man::new(cmd.clone()).section("8").manual("plughost manual");
        let mut page = Vec::new();
        let render = |page: &mut Vec<u8>| -> std::io::Result<()> {
            man.render_title(page)?;
            man.render_name_section(page)?;
            man.render_synopsis_section(page)?;
            man.render_description_section(page)?;
            man.render_options_section(page)?;
            if cmd.get_subcommands().next().is_some() {
                man.render_subcommands_section(page)?;
            }
            if cmd.get_after_help().is_some() || cmd.get_after_long_help().is_some() {
                man.render_extra_section(page)?;
            }
            page.extend_from_slice(MAN_TAIL.as_bytes());
            man.render_version_section(page)
        };
        render(&mut page).map_err(|e| format!("man page {name}: {e}"))?;
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, page).map_err(|e| format!("man page \"{}\": {e}", path.display()))?;
    }
    Ok(pages.len())
}

fn ctl_exit(r: Result<CtlOutput, CtlError>) -> ExitCode {
    match r {
        Ok(out) => {
            print!("{}", out.stdout);
            ExitCode::from(out.code)
        }
        Err(CtlError::Usage(e)) => {
            eprintln!("plughost: {e}");
            ExitCode::from(2)
        }
        Err(CtlError::Failed(e)) => fail([e]),
    }
}

fn sample(driver_dirs: &[PathBuf], drivers: Vec<String>) -> ExitCode {
    let drivers = if drivers.is_empty() {
        host::services::kinds::KINDS.iter().map(|k| k.default_driver.to_owned()).collect()
    } else {
        drivers
    };
    let dirs = drivers::driver_dirs(driver_dirs);
    let loader = probing_loader();
    let mut libs = Vec::new();
    let mut errors = Vec::new();
    for d in &drivers {
        match drivers::resolve(d, &dirs)
            .map_err(|e| e.to_string())
            .and_then(|p| loader.describe(&p).map_err(|e| e.report()))
        {
            Ok(l) => libs.push(l.meta),
            Err(e) => errors.push(e),
        }
    }
    print!("{}", host::config::sample::sample(&libs));
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        fail(errors)
    }
}
