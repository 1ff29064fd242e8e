//! Services as a table. Each driver kind has one service (the policy and bookkeeping of its domain: a
//! nova/cinder *manager*) in its own file; [`kinds::KINDS`] registers them, and the configuration, the `run`
//! flags, `ctl` and the socket derive their per-kind parts from it.
//!
//! A service implements `Service` with typed operations; [`DynService`] is the same service seen
//! through the JSON edge, which is how the host holds it.

pub(crate) mod compute;
pub(crate) mod core;
pub mod ipam;
pub mod kinds;
pub(crate) mod meta;
pub(crate) mod network;
pub(crate) mod records;
pub(crate) mod volume;

use std::path::Path;
use std::sync::Arc;

use plughost_api::host::Interface;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;

pub use self::core::{check_name, BackendTable, STARTUP_WAIT};
pub(crate) use self::core::{Backends, Core, PerBackend};
use crate::backend::{BackendControl, BackendSpec, BuildContext};
use crate::control::protocol::{ApiError, Capacity};
use crate::control::request::{op_args, parse_op, to_json, KindOp, OpParser};
pub use records::ReconcileCounts;
use records::{Record, Records};

/// Builds a service from its configuration; every error found.
pub type BuildFn = fn(&ServiceContext<'_>) -> Result<Arc<dyn DynService>, Vec<String>>;

/// One kind of service, as registered in [`kinds::KINDS`].
pub struct ServiceKind {
    /// The service's name: `volume`. Also its config section, its flag prefix (`--volume-driver`), its
    /// environment prefix (`PLUGHOST_VOLUME_`) and the `service` of its requests.
    pub name: &'static str,
    /// One line for help texts.
    pub about: &'static str,
    /// The driver of the `default` backend when the configuration names none.
    pub default_driver: &'static str,
    /// Whether the service runs when the configuration does not mention it. Only the kinds an existing
    /// installation already runs (volume, compute) do: a kind added later is off until a driver is
    /// named for it (`--network-driver`, a `[network]` section), so that no upgrade makes a working
    /// configuration fail to start.
    pub on_by_default: bool,
    /// The host-level backend settings it takes ([`crate::config::BackendSettings`]) besides the
    /// driver's options.
    pub settings: &'static [&'static str],
    /// Builds the service from its configuration (every error found).
    pub build: BuildFn,
    /// Adds the `plughost ctl SERVICE ...` subcommands (a derived `clap::Subcommand`'s
    /// `augment_subcommands`).
    pub ctl: fn(clap::Command) -> clap::Command,
    /// Parses one of its operations from a request: what makes a request typed from the socket in.
    pub parse: OpParser,
    /// Its records' table in the state database.
    pub table: &'static str,
    /// That table's columns, as its records have them.
    pub columns: &'static [crate::state::Column],
    /// That table's migrations (the kind's own: no shared list to forget).
    pub migrations: &'static [&'static str],
    /// Turns parsed `ctl` arguments into the typed operation to send.
    pub ctl_op: fn(&clap::ArgMatches) -> Result<Box<dyn KindOp>, String>,
    /// Formats a successful answer for people, from the kind's typed reply.
    pub format: fn(result: &str) -> Result<String, String>,
    /// Parses an answer's result into this kind's reply type and serializes it back: how the protocol
    /// document's examples are checked ([`reencode`]).
    pub reencode: fn(&str) -> Result<String, ApiError>,
    /// Serves a driver of this kind in a worker process (`plughost __worker`).
    pub serve_worker: fn(std::os::unix::net::UnixStream, crate::worker::Setup) -> !,
}

impl ServiceKind {
    /// The table entry of service `S`: everything but its name, help line, default driver and settings
    /// comes from its types.
    pub(crate) const fn of<S: Service>(
        name: &'static str,
        about: &'static str,
        default_driver: &'static str,
        on_by_default: bool,
        settings: &'static [&'static str],
    ) -> ServiceKind {
        ServiceKind {
            name,
            about,
            default_driver,
            on_by_default,
            settings,
            build: build_service::<S>,
            ctl: <S::Op as clap::Subcommand>::augment_subcommands,
            parse: parse_kind_op::<S::Op>,
            table: <S::Record as Record>::TABLE,
            columns: <S::Record as Record>::COLUMNS,
            migrations: <S::Record as Record>::MIGRATIONS,
            ctl_op: ctl_op::<S::Op>,
            format: format::<S>,
            reencode: reencode::<Reply<S::Record, S::Other>>,
            serve_worker: crate::worker::serve::<S::Interface>,
        }
    }
}

/// A record as `ctl SERVICE list` shows it, one row per record: name, backend and status, then the
/// kind's own columns; the last one shows why a record is in error, when it is.
pub(crate) trait Listed: Record {
    /// The titles of the kind's own columns.
    const HEADINGS: &'static [&'static str];
    /// The kind's own cells.
    fn cells(&self) -> Vec<String>;
}

/// Formats a successful answer for people: several records as a table, anything else as `key: value`.
fn format<S: Service>(result: &str) -> Result<String, String> {
    let reply: Reply<S::Record, S::Other> = parse_result(result)?;
    if let Reply::Many(list) = &reply {
        let titles = ["NAME", "BACKEND", "STATUS"].iter().chain(<S::Record as Listed>::HEADINGS);
        let mut rows = vec![titles.map(|c| (*c).to_owned()).collect::<Vec<_>>()];
        rows.extend(list.iter().map(|r| {
            let mut row = vec![r.name().to_owned(), r.backend().to_owned(), r.status().to_string()];
            row.extend(r.cells());
            if let (Some(reason), Some(last)) = (r.reason(), row.last_mut()) {
                *last = reason.to_owned();
            }
            row
        }));
        return Ok(crate::util::fmt::table_rows(&rows, ""));
    }
    if let Reply::Other(other) = &reply {
        if let Some(text) = S::format_other(other) {
            return Ok(text);
        }
    }
    let text = serde_json::to_string(&reply).map_err(|e| format!("cannot show the answer: {e}"))?;
    crate::util::fmt::key_values(&text)
}

/// Parses a result as `R` and serializes it back (see [`ServiceKind::reencode`]).
pub fn reencode<R: DeserializeOwned + Serialize>(result: &str) -> Result<String, ApiError> {
    let typed: R = serde_json::from_str(result).map_err(|e| ApiError::internal(format!("result: {e}")))?;
    to_json(&typed)
}

/// `ServiceKind::parse`.
fn parse_kind_op<O: DeserializeOwned + KindOp>(
    service: &str,
    op: &str,
    args: Option<&RawValue>,
) -> Result<Box<dyn KindOp>, ApiError> {
    Ok(Box::new(parse_op::<O>(service, op, args)?))
}

/// A kind's operation enum: its names come from serde (`rename_all = "snake_case"`, checked against
/// strum's in a test), [`reads`](Operation::reads) says which only read.
pub(crate) trait Operation: Serialize + std::fmt::Debug + Send + 'static {
    /// Whether it only reads (open to `socket_group` readers); every other one changes something and
    /// needs an admin.
    fn reads(&self) -> bool;
    /// Its name on the wire.
    fn name(&self) -> &'static str;
}

impl<O: Operation> KindOp for O {
    fn name(&self) -> &'static str {
        Operation::name(self)
    }
    fn reads(&self) -> bool {
        Operation::reads(self)
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
    fn args_json(&self) -> Result<Box<RawValue>, String> {
        op_args(self)
    }
}

impl std::fmt::Debug for ServiceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceKind").field("name", &self.name).finish_non_exhaustive()
    }
}

/// What building a service needs.
#[derive(Debug, Clone, Copy)]
pub struct ServiceContext<'a> {
    /// For loading drivers.
    pub build: BuildContext<'a>,
    /// The service's name.
    pub service: &'static str,
    /// The service's backends, in order.
    pub backends: &'a [BackendSpec],
    /// The backend used when a request names none.
    pub default_backend: &'a str,
    /// Where it keeps its records.
    pub state_dir: &'a Path,
    /// The state database.
    pub db: &'a Arc<crate::state::StateDb>,
}

/// A service with typed operations.
pub(crate) trait Service: Send + Sync + Sized + 'static {
    /// Its operations with their arguments: an externally tagged enum, which is also its `ctl`
    /// subcommand.
    type Op: DeserializeOwned + Operation + clap::Subcommand + clap::FromArgMatches;
    /// What its operations answer besides records and removals (`Never` when nothing).
    type Other: Serialize + DeserializeOwned;
    /// The driver kind it serves.
    type Interface: Interface;
    /// What it keeps about each resource.
    type Record: Listed;
    /// The service over its backends and records (its core), once they are reconciled; why not (a
    /// kind's further records could not be opened).
    fn new(core: Core<Self::Interface, Self::Record>) -> Result<Self, String>;
    /// What every service has: backends, records, reconcile counts.
    fn core(&self) -> &Core<Self::Interface, Self::Record>;
    /// Its entry in [`kinds::KINDS`].
    const KIND: &'static ServiceKind;
    /// Runs one operation.
    fn handle(&self, op: Self::Op) -> Result<Reply<Self::Record, Self::Other>, ApiError>;
    /// One round of periodic work (health checks, refreshing what drivers report).
    fn periodic(&self);
    /// How `ctl` shows one of the kind's own answers, when not as `key: value` lines.
    fn format_other(_other: &Self::Other) -> Option<String> {
        None
    }
    /// A backend's capacity as last refreshed, for kinds that have one.
    fn capacity(&self, _backend: &str) -> Option<Capacity> {
        None
    }
    /// Its backends, as the host controls them, and the default one.
    fn table(&self) -> &BackendTable {
        self.core().backends.table()
    }
    /// The counts of the last reconcile of its records with its drivers.
    fn last_reconcile(&self) -> Option<ReconcileCounts> {
        self.core().last_reconcile.get()
    }
    /// Its records.
    fn records(&self) -> &Records<Self::Record> {
        &self.core().records
    }
    /// Runs every backend's cleanup at host stop, once no request is in flight.
    fn cleanup(&self) {
        for b in &self.table().controls {
            b.cleanup();
        }
    }
    /// Takes what it uses of the other services, once every service is built and before any request
    /// (compute: the network service, for instances with networks).
    fn link(&self, _links: &Links<'_>) {}
}

/// What a service may use of the host besides its own core, given once every service is built.
#[derive(Clone, Copy)]
pub struct Links<'a> {
    /// Every service of the host.
    pub services: &'a [Arc<dyn DynService>],
    /// The host's runtime directory (the control socket's): what does not outlive a boot.
    pub runtime_dir: &'a Path,
}

impl Links<'_> {
    /// The service of kind `name`, if the host runs it.
    pub fn service(&self, name: &str) -> Option<&Arc<dyn DynService>> {
        self.services.iter().find(|s| s.kind().name == name)
    }

    /// Where compute instances' network namespaces are bound (what compute makes there, network's
    /// ports in them belong to their instances).
    pub fn instance_netns_dir(&self) -> std::path::PathBuf {
        self.runtime_dir.join("netns")
    }
}

/// The arguments of an operation on one resource by name: `backend` checks that it is on that backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Named {
    /// Its name
    pub name: String,
    /// Check that it is on this backend
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// The arguments of an operation on a whole backend (default: the service's default backend) or on
/// all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct OnBackend {
    /// The backend
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// `ServiceKind::ctl_op`: the op enum is its own `ctl` subcommand.
fn ctl_op<O: clap::FromArgMatches + Operation>(m: &clap::ArgMatches) -> Result<Box<dyn KindOp>, String> {
    Ok(Box::new(O::from_arg_matches(m).map_err(|e| e.to_string())?))
}

/// What a service's operations answer: one record, several, a removal, or something of the kind's own.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Reply<R, X = Never> {
    /// One record.
    One(R),
    /// Several.
    Many(Vec<R>),
    /// A removed one.
    Removed(crate::control::protocol::Removed),
    /// Something else.
    Other(X),
}

/// No value: a [`Reply`] of a kind that answers nothing else.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub enum Never {}

/// A service seen through the JSON edge: what the host holds.
pub trait DynService: Send + Sync {
    /// Its entry in [`kinds::KINDS`].
    fn kind(&self) -> &'static ServiceKind;
    /// Runs one of its operations (parsed by its kind's [`ServiceKind::parse`]) and serializes the answer.
    fn handle(&self, op: Box<dyn KindOp>) -> Result<String, ApiError>;
    /// One round of periodic work (health checks, refreshing what drivers report).
    fn periodic(&self);
    /// Its backends, as the host controls them, and the default one.
    fn table(&self) -> &BackendTable;
    /// Its backends, as the host controls them.
    fn backends(&self) -> &[Arc<dyn BackendControl>];
    /// The backend used when a request names none.
    fn default_backend(&self) -> &str;
    /// A backend's capacity as last refreshed, for kinds that have one.
    fn capacity(&self, backend: &str) -> Option<Capacity>;
    /// The counts of the last reconcile of its records with its drivers.
    fn last_reconcile(&self) -> Option<ReconcileCounts>;
    /// How many records it has.
    fn records(&self) -> usize;
    /// How many records one backend holds.
    fn records_on(&self, backend: &str) -> usize;
    /// How many records there are of each (backend, status).
    fn records_by_status(&self) -> std::collections::BTreeMap<(String, String), u64>;
    /// Runs every backend's cleanup at host stop, once no request is in flight.
    fn cleanup(&self);
    /// See `Service::link`.
    fn link(&self, links: &Links<'_>);
    /// The service as its own type (for a service that uses another one).
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<S: Service> DynService for S {
    fn kind(&self) -> &'static ServiceKind {
        S::KIND
    }
    fn handle(&self, op: Box<dyn KindOp>) -> Result<String, ApiError> {
        let name = op.name();
        let op = op.into_any().downcast::<S::Op>().map_err(|_| {
            ApiError::internal(format!("{}: operation {name:?} was parsed for another service", S::KIND.name))
        })?;
        to_json(&Service::handle(self, *op)?)
    }
    fn periodic(&self) {
        Service::periodic(self)
    }
    fn table(&self) -> &BackendTable {
        Service::table(self)
    }
    fn backends(&self) -> &[Arc<dyn BackendControl>] {
        &Service::table(self).controls
    }
    fn default_backend(&self) -> &str {
        &self.table().default
    }
    fn capacity(&self, backend: &str) -> Option<Capacity> {
        Service::capacity(self, backend)
    }
    fn last_reconcile(&self) -> Option<ReconcileCounts> {
        Service::last_reconcile(self)
    }
    fn records(&self) -> usize {
        Service::records(self).len()
    }
    fn records_on(&self, backend: &str) -> usize {
        Service::records(self).count(backend)
    }
    fn records_by_status(&self) -> std::collections::BTreeMap<(String, String), u64> {
        Service::records(self).by_status()
    }
    fn cleanup(&self) {
        Service::cleanup(self)
    }
    fn link(&self, links: &Links<'_>) {
        Service::link(self, links)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Builds service `S` from its configuration, its records from the state database.
fn build_service<S: Service>(ctx: &ServiceContext<'_>) -> Result<Arc<dyn DynService>, Vec<String>> {
    let records = Records::open(ctx.db.clone(), ctx.state_dir).map_err(|e| vec![e.to_string()])?;
    let backends = Backends::build(ctx.service, ctx.build, ctx.backends, ctx.default_backend)?;
    Ok(Arc::new(S::new(Core::new(backends, records)).map_err(|e| vec![e])?))
}

/// Parses an answer's result as `T` (for formatting).
pub(crate) fn parse_result<T: DeserializeOwned>(result: &str) -> Result<T, String> {
    serde_json::from_str(result).map_err(|e| format!("unexpected answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind is complete, so that adding one cannot half-work: its own migrations build a table
    /// with its records' columns; docs/protocol.md has its section with examples; a fake driver of it
    /// is in the workspace and in the test drivers; plughost-api's testing has its conformance suite;
    /// `plughost new` has its template. (Walks the kinds: a new one is checked with no change here.)
    #[test]
    fn every_kind_is_complete() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let read = |rel: &str| std::fs::read_to_string(root.join(rel)).unwrap();
        let (protocol, test_drivers, workspace) =
            (read("docs/protocol.md"), read("tests/src/lib.rs"), read("Cargo.toml"));
        let dir = std::env::temp_dir().join(format!("plughost-kinds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = crate::state::StateDb::open(&dir).unwrap();
        for k in kinds::KINDS {
            let name = k.name;
            db.migrate_kind(k.table, k.migrations).unwrap();
            // As sets: records are written by column name, and a column a later migration adds comes last
            // in the table.
            let want: std::collections::BTreeSet<&str> = k.columns.iter().map(|c| c.name).collect();
            let found = db.table_columns(k.table).unwrap();
            let found: std::collections::BTreeSet<&str> = found.iter().map(String::as_str).collect();
            assert_eq!(found, want, "kind {name}: table {} against its records", k.table);
            let section = protocol
                .split(&format!("\n## {name}\n"))
                .nth(1)
                .unwrap_or_else(|| panic!("kind {name}: docs/protocol.md has no \"## {name}\" section"));
            let section = section.split("\n## ").next().unwrap();
            assert!(
                section.contains("```jsonl") && section.contains(&format!("\"service\": \"{name}\"")),
                "kind {name}: its section in docs/protocol.md has no examples"
            );
            let fake = format!("fake-{name}");
            assert!(
                workspace.contains(&format!("\"plugins/{fake}\"")),
                "kind {name}: no plugins/{fake} in the workspace"
            );
            assert!(
                test_drivers.contains(&format!("\"{fake}\"")),
                "kind {name}: {fake} is not in tests/src/lib.rs DRIVERS"
            );
            let api_kind = plughost_api::DriverKind::all()
                .find(|k| k.as_str() == name)
                .unwrap_or_else(|| panic!("kind {name}: unknown to plughost-api"));
            assert!(
                plughost_api::testing::checks_of(api_kind).is_some(),
                "kind {name}: no conformance suite in plughost_api::testing"
            );
            assert!(
                crate::authoring::scaffold::has_template(name),
                "kind {name}: `plughost new --kind {name}` has no template"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
