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
    }
}

fn inspect(a: InspectArgs) -> ExitCode {
    let loader = match Loader::temporary() {
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
    let loader = match Loader::temporary() {
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
