//! What every record is, whatever its kind: the shared [`Meta`], the [`Record`] trait with its
//! accessors written once, and a record as a row of its table (column by column, no JSON between).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use rusqlite::types::Value;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::state::{value, Column, RowReader};

/// A record's status: its names are the wire's and the table's (`available`, `running`); `ERROR` is the
/// status of a record that is in error (with a reason).
pub(crate) trait Status:
    Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr + Send + Sync + 'static
{
    /// The error status.
    const ERROR: Self;
}

/// What every record has, whatever its kind, written once: a kind's record flattens it in (the wire
/// shows its fields beside the kind's) and stores it in the same-named columns of its table.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct Meta<S> {
    /// Stable id.
    pub id: String,
    /// Name, unique within the service.
    pub name: String,
    /// Backend holding it.
    pub backend: String,
    /// Where it is in its life.
    pub status: S,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
    /// Last change, seconds since the epoch.
    pub updated_at: u64,
    /// Why the status is the error status.
    #[serde(default)]
    pub reason: Option<String>,
    /// Found on the backend without a record and adopted (with a new id).
    #[serde(default)]
    pub adopted: bool,
    /// The digest of the driver library that created it (`blake3:…`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_digest: Option<String>,
}

impl<S: Status> Meta<S> {
    /// A new record's: a fresh id, created and updated now.
    pub(crate) fn new(name: &str, backend: &str, status: S) -> Meta<S> {
        let t = crate::util::time::now();
        Meta {
            id: new_id(),
            name: name.to_owned(),
            backend: backend.to_owned(),
            status,
            created_at: t,
            updated_at: t,
            reason: None,
            adopted: false,
            driver_digest: None,
        }
    }

    /// After taking what a driver reports: when anything `changed`, the record was updated now.
    /// Returns `changed`.
    pub(crate) fn touch(&mut self, changed: bool) -> bool {
        if changed {
            self.updated_at = crate::util::time::now();
        }
        changed
    }

    /// The value of one of its columns; `None` for a column that is the kind's.
    fn column(&self, name: &str) -> Option<Result<Value, String>> {
        Some(match name {
            "id" => Ok(value::text(&self.id)),
            "name" => Ok(value::text(&self.name)),
            "backend" => Ok(value::text(&self.backend)),
            "status" => Ok(Value::Text(self.status.to_string())),
            "created_at" => value::int(self.created_at),
            "updated_at" => value::int(self.updated_at),
            "reason" => Ok(value::opt_text(self.reason.as_deref())),
            "adopted" => Ok(value::boolean(self.adopted)),
            "driver_digest" => Ok(value::opt_text(self.driver_digest.as_deref())),
            _ => return None,
        })
    }

    fn read(row: &mut RowReader) -> Result<Meta<S>, String> {
        Ok(Meta {
            id: row.text("id")?,
            name: row.text("name")?,
            backend: row.text("backend")?,
            status: row.parsed("status")?,
            created_at: row.int("created_at")?,
            updated_at: row.int("updated_at")?,
            reason: row.opt_text("reason")?,
            adopted: row.boolean("adopted")?,
            driver_digest: row.opt_text("driver_digest")?,
        })
    }
}

/// A resource record (a volume, an instance): the shared [`Meta`] and the kind's own fields.
pub(crate) trait Record: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Its status type.
    type Status: Status;
    /// What the resource is called in messages: `volume`, `instance`.
    const WHAT: &'static str;
    /// Its table in the state database: `volumes`, `instances` (and `STATE_DIR/<table>.json`, the file
    /// imported from older versions).
    const TABLE: &'static str;
    /// The table's columns in the table's order: the meta's and the kind's (checked against the schema
    /// by a test).
    const COLUMNS: &'static [Column];
    /// The table's migrations: `MIGRATIONS[i]` takes it from version `i` to `i + 1` (append; never change
    /// one that shipped). Applied when the service's records open.
    const MIGRATIONS: &'static [&'static str];
    /// What every record has.
    fn meta(&self) -> &Meta<Self::Status>;
    /// The same, to change.
    fn meta_mut(&mut self) -> &mut Meta<Self::Status>;
    /// The value of one of the kind's own columns.
    fn column(&self, name: &str) -> Result<Value, String>;
    /// The record from its meta and the kind's columns of a row.
    fn from_row(meta: Meta<Self::Status>, row: &mut RowReader) -> Result<Self, String>;

    /// Its name, unique within the service.
    fn name(&self) -> &str {
        &self.meta().name
    }
    /// The backend holding it.
    fn backend(&self) -> &str {
        &self.meta().backend
    }
    /// Its status.
    fn status(&self) -> Self::Status {
        self.meta().status
    }
    /// Changes its status (clearing `reason` unless it is the error status) and its `updated_at`.
    fn set_status(&mut self, status: Self::Status) {
        let m = self.meta_mut();
        m.status = status;
        if status != Self::Status::ERROR {
            m.reason = None;
        }
        m.updated_at = crate::util::time::now();
    }
    /// Why it is in error, if it is.
    fn reason(&self) -> Option<&str> {
        self.meta().reason.as_deref()
    }
    /// Puts it in error, saying why.
    fn fail(&mut self, reason: &str) {
        self.set_status(Self::Status::ERROR);
        self.meta_mut().reason = Some(reason.to_owned());
    }
}

/// A record table's columns in the table's order: the meta's first four, the kind's own (`"size":
/// Int, ...`), then the rest of the meta's. The meta's are written here once, beside [`Meta`]'s own
/// reading and writing of them.
macro_rules! columns {
    ($($name:literal: $ty:ident),* $(,)?) => {
        &[
            $crate::state::Column::new("name", $crate::state::ColumnType::Text),
            $crate::state::Column::new("id", $crate::state::ColumnType::Text),
            $crate::state::Column::new("backend", $crate::state::ColumnType::Text),
            $crate::state::Column::new("status", $crate::state::ColumnType::Text),
            $($crate::state::Column::new($name, $crate::state::ColumnType::$ty),)*
            $crate::state::Column::new("created_at", $crate::state::ColumnType::Int),
            $crate::state::Column::new("updated_at", $crate::state::ColumnType::Int),
            $crate::state::Column::new("reason", $crate::state::ColumnType::Text),
            $crate::state::Column::new("adopted", $crate::state::ColumnType::Bool),
            $crate::state::Column::new("driver_digest", $crate::state::ColumnType::Text),
        ]
    };
}
pub(crate) use columns;

/// Implements [`Record`] (and [`Status`] for its status type) for a record with a `meta` field: its
/// status type and error status, what it is called, its table, columns and migrations, then the kind's own
/// `column` and `from_row`.
macro_rules! record {
    ($record:ty, $status:ty, error: $error:expr, $what:literal, $table:literal, $columns:expr, $migrations:expr, { $($own:tt)* }) => {
        impl $crate::services::meta::Status for $status {
            const ERROR: $status = $error;
        }
        impl $crate::services::meta::Record for $record {
            type Status = $status;
            const WHAT: &'static str = $what;
            const TABLE: &'static str = $table;
            const COLUMNS: &'static [$crate::state::Column] = $columns;
            const MIGRATIONS: &'static [&'static str] = $migrations;
            fn meta(&self) -> &$crate::services::meta::Meta<$status> {
                &self.meta
            }
            fn meta_mut(&mut self) -> &mut $crate::services::meta::Meta<$status> {
                &mut self.meta
            }
            $($own)*
        }
    };
}
pub(crate) use record;

/// A record as its row: every column by name, the meta's and the kind's.
pub(crate) fn to_row<R: Record>(r: &R) -> Result<Vec<Value>, String> {
    R::COLUMNS
        .iter()
        .map(|c| r.meta().column(c.name).unwrap_or_else(|| r.column(c.name)).map_err(|e| format!("{}: {e}", c.name)))
        .collect()
}

/// A row back as its record.
pub(crate) fn from_row<R: Record>(row: Vec<Value>) -> Result<R, String> {
    let mut row = RowReader::new(R::COLUMNS, row);
    let meta = Meta::read(&mut row)?;
    R::from_row(meta, &mut row)
}

/// Why a record is in error when its driver no longer reports the resource.
pub(crate) const MISSING: &str = "missing from backend";

/// A fresh record id: 16 hex digits, unique within this host.
pub(crate) fn new_id() -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", (nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9))
}
