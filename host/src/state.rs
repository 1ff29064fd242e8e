//! The host's durable state: `STATE_DIR/state.db`, one SQLite database (WAL mode) holding every
//! service's records, with a versioned schema and the migrations that build it; and the state-dir lock
//! that keeps a second host off the same directory.
//!
//! Durability: every write is its own transaction (or one transaction for a batch) committed with
//! `synchronous = FULL`, so an acknowledged change survives a process crash, `kill -9` and a power
//! loss; the WAL keeps each commit to one fsync (about 0.1 ms here, see docs/performance.md).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection, OptionalExtension};

/// The database file, in the state dir.
pub(crate) const DB_FILE: &str = "state.db";

/// In the state dir once its database held records: a database found empty beside it lost them.
pub(crate) const HELD_RECORDS: &str = ".held-records";

/// The lock file, in the state dir: held (`flock`) by the host using the directory.
pub(crate) const LOCK_FILE: &str = "plughost.lock";

/// Why the state could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another process holds the state dir.
    #[error("state dir \"{dir}\" is in use by another plughost{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse {
        /// The state dir.
        dir: PathBuf,
        /// The pid written by the holder, if readable.
        pid: Option<u32>,
    },
    /// A filesystem operation on a state file failed.
    #[error("state file \"{path}\": {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// SQLite refused an operation.
    #[error("state database \"{path}\": {reason}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The database was written by a newer plughost.
    #[error("state database \"{path}\" has schema version {found}, newer than this plughost understands ({known})")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A kind's table was written by a newer plughost.
    #[error(
        "state database \"{path}\": table {table} has version {found}, newer than this plughost understands ({known})"
    )]
    TableTooNew {
        /// The database file.
        path: PathBuf,
        /// The table.
        table: String,
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A row or a legacy file could not be turned into a record.
    #[error("{what} in \"{path}\": {reason}")]
    Corrupt {
        /// What was being read.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The host's own schema, one migration per version: `MIGRATIONS[i]` takes the database from version `i`
/// to `i + 1`. Append new ones; never change what one does. Each kind's records bring their own
/// migrations (`Record::MIGRATIONS`, applied by [`StateDb::migrate_kind`]): no shared list to forget.
///
/// Version 1 also created the tables of the volume and compute kinds, before kinds had migrations of
/// their own; a database made since has them from the kinds' first migrations, the same tables.
const MIGRATIONS: &[&str] = &[
    // 1: the legacy imports (and, in databases made before kinds had their own migrations, the volume
    // and compute tables: counted as those kinds' version 1).
    "CREATE TABLE imports (
        file TEXT PRIMARY KEY NOT NULL,
        records INTEGER NOT NULL,
        at INTEGER NOT NULL
    );",
];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How a column's SQL value maps to the record's JSON field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// TEXT ↔ string.
    Text,
    /// INTEGER ↔ number.
    Int,
    /// INTEGER 0/1 ↔ boolean.
    Bool,
    /// TEXT holding JSON ↔ object or array.
    Json,
}

/// One column of a record table: the record's field of the same name.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Column and field name.
    pub name: &'static str,
    /// How it maps.
    pub ty: ColumnType,
}

impl Column {
    /// A column.
    pub const fn new(name: &'static str, ty: ColumnType) -> Column {
        Column { name, ty }
    }
}

/// The open database.
pub struct StateDb {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// The [`HELD_RECORDS`] marker is known to be there.
    marked: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish_non_exhaustive()
    }
}

/// A record table's statements, built once from its columns.
#[derive(Debug)]
pub struct Table {
    name: &'static str,
    columns: &'static [Column],
    upsert: String,
    delete: String,
    select: String,
}

impl Table {
    /// The table `name` with `columns` (the first is the key: `name`).
    pub fn new(name: &'static str, columns: &'static [Column]) -> Table {
        let cols: Vec<&str> = columns.iter().map(|c| c.name).collect();
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        Table {
            name,
            columns,
            upsert: format!("INSERT OR REPLACE INTO {name} ({}) VALUES ({})", cols.join(", "), marks.join(", ")),
            delete: format!("DELETE FROM {name} WHERE name = ?1"),
            select: format!("SELECT {} FROM {name}", cols.join(", ")),
        }
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// One change to a record table.
#[derive(Debug)]
pub enum Write {
    /// Insert or replace a row (the record's fields as columns).
    Put(Vec<Value>),
    /// Delete the row of this name.
    Remove(String),
}

impl StateError {
    /// Whether it failed for lack of space (the disk, or a quota).
    pub(crate) fn disk_full(&self) -> bool {
        match self {
            StateError::Db { reason, .. } => reason.contains("database or disk is full"),
            StateError::Io { reason, .. } => reason.contains("no space left") || reason.contains("quota exceeded"),
            _ => false,
        }
    }
}

impl StateDb {
    /// Opens (creating it, private to its owner) `STATE_DIR/state.db` and brings its schema up to date.
    pub fn open(state_dir: &Path) -> Result<StateDb, StateError> {
        let path = state_dir.join(DB_FILE);
        let io = |e: std::io::Error| StateError::Io { path: path.clone(), reason: crate::util::fmt::io_text(&e) };
        // Created 0600 before SQLite opens it (its -wal and -shm files take the same mode).
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(io)?;
        let db_err = |e: rusqlite::Error| StateError::Db { path: path.clone(), reason: e.to_string() };
        let conn = Connection::open(&path).map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(db_err)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StateError::Db { path, reason: format!("cannot use WAL mode (got {mode})") });
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;").map_err(db_err)?;
        let db = StateDb { path, conn: Mutex::new(conn), marked: std::sync::atomic::AtomicBool::new(false) };
        db.migrate()?;
        db.ensure_identity()?;
        Ok(db)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, e: rusqlite::Error) -> StateError {
        StateError::Db { path: self.path.clone(), reason: e.to_string() }
    }

    /// The schema version of the database.
    pub fn version(&self) -> Result<i64, StateError> {
        let conn = self.conn();
        let has_table: bool = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n > 0)
            .map_err(|e| self.err(e))?;
        if !has_table {
            return Ok(0);
        }
        conn.query_row("SELECT coalesce(max(version), 0) FROM schema_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn migrate(&self) -> Result<(), StateError> {
        let found = self.version()?;
        if found > SCHEMA_VERSION {
            return Err(StateError::TooNew { path: self.path.clone(), found, known: SCHEMA_VERSION });
        }
        let mut conn = self.conn();
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
            let version = i as i64 + 1;
            let tx = conn.transaction().map_err(|e| self.err(e))?;
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
            )
            .map_err(|e| self.err(e))?;
            tx.execute_batch(sql).map_err(|e| self.err(e))?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
                rusqlite::params![version, crate::util::time::now() as i64],
            )
            .map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))?;
            log::info!("state database {}: schema version {version}", self.path.display());
        }
        Ok(())
    }

    /// Applies a kind's own migrations to its `table` (`migrations[i]` takes it from version `i` to
    /// `i + 1`), each in one transaction with its version, tracked per table in `kind_schema`. A table
    /// that exists with no version recorded was made by the host's first migration: version 1.
    pub(crate) fn migrate_kind(&self, table: &str, migrations: &[&str]) -> Result<(), StateError> {
        let known = migrations.len() as i64;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS kind_schema (
                name TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .map_err(|e| self.err(e))?;
        let recorded: Option<i64> = tx
            .query_row("SELECT version FROM kind_schema WHERE name = ?1", [table], |r| r.get(0))
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })
            .map_err(|e| self.err(e))?;
        let found = match recorded {
            Some(v) => v,
            None => {
                let exists: i64 = tx
                    .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |r| {
                        r.get(0)
                    })
                    .map_err(|e| self.err(e))?;
                i64::from(exists > 0)
            }
        };
        if found > known {
            return Err(StateError::TableTooNew { path: self.path.clone(), table: table.to_owned(), found, known });
        }
        for (i, sql) in migrations.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
            tx.execute_batch(sql).map_err(|e| self.err(e))?;
            log::info!("state database {}: table {table} at version {}", self.path.display(), i + 1);
        }
        tx.execute(
            "INSERT INTO kind_schema (name, version, applied_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, applied_at = excluded.applied_at",
            rusqlite::params![table, known.max(found), crate::util::time::now() as i64],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every row of `table`, as column values in the table's column order.
    pub fn rows(&self, table: &Table) -> Result<Vec<Vec<Value>>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&table.select).map_err(|e| self.err(e))?;
        let n = table.columns.len();
        let rows = stmt
            .query_map([], |row| (0..n).map(|i| row.get::<_, Value>(i)).collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Applies `writes` to `table` in one transaction (one fsync).
    pub fn write(&self, table: &Table, writes: &[Write]) -> Result<(), StateError> {
        {
            let mut conn = self.conn();
            if let [one] = writes {
                Self::apply(&conn, table, one).map_err(|e| self.err(e))?;
            } else {
                let tx = conn.transaction().map_err(|e| self.err(e))?;
                for w in writes {
                    Self::apply(&tx, table, w).map_err(|e| self.err(e))?;
                }
                tx.commit().map_err(|e| self.err(e))?;
            }
        }
        if !self.marked.load(std::sync::atomic::Ordering::Relaxed) && writes.iter().any(|w| matches!(w, Write::Put(_)))
        {
            self.mark();
        }
        Ok(())
    }

    /// Writes the [`HELD_RECORDS`] marker beside the database, naming its identity (once per process).
    fn mark(&self) {
        let Some(dir) = self.path.parent() else { return };
        let marker = dir.join(HELD_RECORDS);
        let Ok(id) = self.identity() else { return };
        // Written beside and renamed into place: a kill -9 leaves the old marker or the new one, never
        // an empty one.
        let tmp = dir.join(format!("{HELD_RECORDS}.tmp"));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "{id}")?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &marker));
        match written {
            Ok(()) => self.marked.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) => log::warn!("state dir {}: cannot write {HELD_RECORDS}: {e}", dir.display()),
        }
    }

    fn apply(conn: &Connection, table: &Table, w: &Write) -> Result<(), rusqlite::Error> {
        match w {
            Write::Put(values) => conn.prepare_cached(&table.upsert)?.execute(params_from_iter(values.iter())),
            Write::Remove(name) => conn.prepare_cached(&table.delete)?.execute([name]),
        }
        .map(drop)
    }

    /// Whether the legacy file `file` was imported already.
    pub fn imported(&self, file: &str) -> Result<bool, StateError> {
        self.conn()
            .query_row("SELECT 1 FROM imports WHERE file = ?1", [file], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.err(e))
    }

    /// Imports rows from the legacy file `file` into `table`, in one transaction that also records the
    /// import (so that it happens once, even if renaming the file afterwards is interrupted).
    pub fn import(&self, file: &str, table: &Table, rows: Vec<Vec<Value>>) -> Result<(), StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for row in &rows {
            Self::apply(&tx, table, &Write::Put(row.clone())).map_err(|e| self.err(e))?;
        }
        tx.execute(
            "INSERT INTO imports (file, records, at) VALUES (?1, ?2, ?3)",
            rusqlite::params![file, rows.len() as i64, crate::util::time::now() as i64],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    /// How many rows `tables` hold together (a missing table holds none).
    pub(crate) fn rows_in(&self, tables: &[&str]) -> Result<u64, StateError> {
        let conn = self.conn();
        let mut n = 0u64;
        for t in tables {
            let exists: bool = conn
                .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [t], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|c| c > 0)
                .map_err(|e| self.err(e))?;
            if exists {
                let c: i64 =
                    conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0)).map_err(|e| self.err(e))?;
                n += u64::try_from(c).unwrap_or(0);
            }
        }
        Ok(n)
    }

    /// This database's identity: a random number in its header (SQLite's `application_id`), given when
    /// it is created. A database file deleted, truncated or replaced has another one.
    fn identity(&self) -> Result<i32, StateError> {
        self.conn().query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(|e| self.err(e))
    }

    fn ensure_identity(&self) -> Result<(), StateError> {
        if self.identity()? != 0 {
            return Ok(());
        }
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new().hash_one(std::process::id()) as i32;
        let id = if random == 0 { 1 } else { random };
        self.conn().execute_batch(&format!("PRAGMA application_id = {id}")).map_err(|e| self.err(e))
    }

    /// Refuses a database that is not the one that held records here before (the marker
    /// [`HELD_RECORDS`] names that one's identity) and holds none: state.db was deleted, truncated or
    /// replaced, and starting on it would adopt every resource with a new id. A database emptied by
    /// deleting its records one by one is still the same one, and starts. With `accept`, starts and
    /// says so.
    pub(crate) fn check_not_emptied(&self, state_dir: &Path, tables: &[&str], accept: bool) -> Result<(), StateError> {
        let marker = state_dir.join(HELD_RECORDS);
        let Ok(held) = std::fs::read_to_string(&marker) else { return Ok(()) };
        let same = held.trim().parse::<i32>().ok() == Some(self.identity()?);
        if !same && self.rows_in(tables)? == 0 {
            if !accept {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    reason: format!(
                        "holds no records, but held some before ({HELD_RECORDS}): refusing to start and give every resource a new id; restore it, or start with --accept-empty-state"
                    ),
                });
            }
            log::warn!("state database {}: emptied; accepted (--accept-empty-state)", self.path.display());
            let _ = std::fs::remove_file(&marker);
        }
        Ok(())
    }

    /// Writes the marker that this database holds records, when it does (at start: it may hold records
    /// written by a version before the marker).
    pub(crate) fn mark_held(&self, tables: &[&str]) {
        if !self.marked.load(std::sync::atomic::Ordering::Relaxed) && self.rows_in(tables).is_ok_and(|n| n > 0) {
            self.mark();
        }
    }

    /// The columns of `table` as the database has them (for checking a record type against the schema).
    pub fn table_columns(&self, table: &str) -> Result<Vec<String>, StateError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})")).map_err(|e| self.err(e))?;
        let cols = stmt.query_map([], |r| r.get::<_, String>(1)).map_err(|e| self.err(e))?;
        cols.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

/// A row being read back into a record, column by column, by name (no JSON in between).
#[derive(Debug)]
pub(crate) struct RowReader {
    columns: &'static [Column],
    values: Vec<Option<Value>>,
}

impl RowReader {
    /// The values of a row, in the columns' order.
    pub(crate) fn new(columns: &'static [Column], row: Vec<Value>) -> RowReader {
        RowReader { columns, values: row.into_iter().map(Some).collect() }
    }

    fn take(&mut self, name: &str) -> Result<Value, String> {
        let i = self.columns.iter().position(|c| c.name == name).ok_or_else(|| format!("no column {name:?}"))?;
        Ok(self.values.get_mut(i).and_then(Option::take).unwrap_or(Value::Null))
    }

    /// A TEXT column that may be NULL.
    pub(crate) fn opt_text(&mut self, name: &str) -> Result<Option<String>, String> {
        match self.take(name)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s)),
            v => Err(format!("column {name:?}: {v:?} is not text")),
        }
    }

    /// A TEXT column.
    pub(crate) fn text(&mut self, name: &str) -> Result<String, String> {
        self.opt_text(name)?.ok_or_else(|| format!("column {name:?} is NULL"))
    }

    /// An INTEGER column that may be NULL, as `T`.
    pub(crate) fn opt_int<T: TryFrom<i64>>(&mut self, name: &str) -> Result<Option<T>, String> {
        match self.take(name)? {
            Value::Null => Ok(None),
            Value::Integer(i) => T::try_from(i).map(Some).map_err(|_| format!("column {name:?}: {i} is out of range")),
            v => Err(format!("column {name:?}: {v:?} is not an integer")),
        }
    }

    /// An INTEGER column, as `T`.
    pub(crate) fn int<T: TryFrom<i64>>(&mut self, name: &str) -> Result<T, String> {
        self.opt_int(name)?.ok_or_else(|| format!("column {name:?} is NULL"))
    }

    /// An INTEGER 0/1 column (NULL is false).
    pub(crate) fn boolean(&mut self, name: &str) -> Result<bool, String> {
        Ok(self.opt_int::<i64>(name)?.is_some_and(|i| i != 0))
    }

    /// A TEXT column holding JSON (NULL is the type's default).
    pub(crate) fn json<T: serde::de::DeserializeOwned + Default>(&mut self, name: &str) -> Result<T, String> {
        match self.opt_text(name)? {
            None => Ok(T::default()),
            Some(s) => serde_json::from_str(&s).map_err(|e| format!("column {name:?}: {e}")),
        }
    }

    /// A TEXT column holding a name parsed by `T::from_str` (a status).
    pub(crate) fn parsed<T: std::str::FromStr>(&mut self, name: &str) -> Result<T, String> {
        let text = self.text(name)?;
        text.parse().map_err(|_| format!("column {name:?}: unknown value {text:?}"))
    }
}

/// Column values, written once for every record type.
pub(crate) mod value {
    use rusqlite::types::Value;

    /// TEXT.
    pub(crate) fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }
    /// TEXT or NULL.
    pub(crate) fn opt_text(s: Option<&str>) -> Value {
        s.map(text).unwrap_or(Value::Null)
    }
    /// INTEGER (refusing what does not fit a signed 64-bit integer).
    pub(crate) fn int<T: TryInto<i64> + Copy + std::fmt::Display>(n: T) -> Result<Value, String> {
        n.try_into().map(Value::Integer).map_err(|_| format!("{n} does not fit a signed 64-bit integer"))
    }
    /// INTEGER or NULL.
    pub(crate) fn opt_int<T: TryInto<i64> + Copy + std::fmt::Display>(n: Option<T>) -> Result<Value, String> {
        n.map(int).unwrap_or(Ok(Value::Null))
    }
    /// INTEGER 0/1.
    pub(crate) fn boolean(b: bool) -> Value {
        Value::Integer(i64::from(b))
    }
    /// TEXT holding JSON.
    pub(crate) fn json<T: serde::Serialize>(v: &T) -> Result<Value, String> {
        serde_json::to_string(v).map(Value::Text).map_err(|e| e.to_string())
    }
}

/// The state-dir lock: held for as long as the host runs, released by the kernel when the process ends
/// (however it ends). It is taken on the state dir itself (which nobody can unlink from under a running
/// host while it holds anything) and on `plughost.lock` (which says who holds it, and excludes hosts of
/// earlier versions, which lock only the file).
#[derive(Debug)]
pub(crate) struct DirLock {
    dir: std::fs::File,
    file: std::fs::File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `state_dir`, or says which process holds it.
    pub(crate) fn take(state_dir: &Path) -> Result<DirLock, StateError> {
        use rustix::fs::FlockOperation::NonBlockingLockExclusive;
        let path = state_dir.join(LOCK_FILE);
        let in_use = || {
            let pid = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok());
            StateError::InUse { dir: state_dir.to_owned(), pid }
        };
        let dir_io =
            |e: std::io::Error| StateError::Io { path: state_dir.to_owned(), reason: crate::util::fmt::io_text(&e) };
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(state_dir)
            .map_err(dir_io)?;
        match rustix::fs::flock(&dir, NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(in_use()),
            Err(e) => return Err(dir_io(e.into())),
        }
        let file = Self::lock_file(&path, state_dir)?;
        Ok(DirLock { dir, file, path })
    }

    /// Opens, locks and writes the pid into the lock file.
    fn lock_file(path: &Path, state_dir: &Path) -> Result<std::fs::File, StateError> {
        use std::io::{Seek, Write};
        let io = |e: std::io::Error| StateError::Io { path: path.to_owned(), reason: crate::util::fmt::io_text(&e) };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let pid = std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok());
                return Err(StateError::InUse { dir: state_dir.to_owned(), pid });
            }
            Err(e) => return Err(io(e.into())),
        }
        f.set_len(0).map_err(io)?;
        f.rewind().map_err(io)?;
        writeln!(f, "{}", std::process::id()).map_err(io)?;
        Ok(f)
    }

    /// Checks, before each periodic round, that the lock still says what it should: the lock file at
    /// its path is the one this host holds (recreated if someone removed or replaced it; the state
    /// dir's own lock kept others out meanwhile), and the state dir is still where it was.
    pub(crate) fn verify(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
        let held = self.file.metadata().ok();
        let there = std::fs::symlink_metadata(&self.path).ok();
        if !matches!((&held, &there), (Some(h), Some(t)) if same(h, t)) {
            let dir = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
            log::error!(
                "state dir {}: the lock file {} was removed or replaced; the state dir itself stays locked, the file is written again",
                dir.display(),
                LOCK_FILE
            );
            let _ = std::fs::remove_file(&self.path);
            match Self::lock_file(&self.path, &dir) {
                Ok(f) => self.file = f,
                Err(e) => log::error!("{e}"),
            }
        }
        let dir_there = self.path.parent().and_then(|d| std::fs::metadata(d).ok());
        if let (Ok(held), Some(there)) = (self.dir.metadata(), dir_there) {
            if !same(&held, &there) {
                log::error!(
                    "state dir {}: replaced while this host runs (another directory is at its path now); this host keeps using the one it opened",
                    self.path.parent().unwrap_or(Path::new("")).display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("plughost-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn a_kinds_migrations_run_once_each_and_count_a_table_made_before_them_as_version_1() {
        let dir = temp_dir("migrate-kind");
        let db = StateDb::open(&dir).unwrap();
        let v1 = "CREATE TABLE things (name TEXT PRIMARY KEY NOT NULL)";
        let v2 = "ALTER TABLE things ADD COLUMN size INTEGER";
        // Fresh: both run.
        db.migrate_kind("things", &[v1, v2]).unwrap();
        assert_eq!(db.table_columns("things").unwrap(), ["name", "size"]);
        db.migrate_kind("things", &[v1, v2]).unwrap();
        // A table the host's first migration made (no version recorded): version 1, so only v2 runs.
        db.conn().execute_batch("CREATE TABLE legacy (name TEXT PRIMARY KEY NOT NULL)").unwrap();
        db.migrate_kind(
            "legacy",
            &["CREATE TABLE legacy (name TEXT PRIMARY KEY NOT NULL)", "ALTER TABLE legacy ADD COLUMN size INTEGER"],
        )
        .unwrap();
        assert_eq!(db.table_columns("legacy").unwrap(), ["name", "size"]);
        // A table a newer plughost migrated further is refused, naming it.
        let e = db.migrate_kind("things", &[v1]).unwrap_err();
        assert!(e.to_string().ends_with("table things has version 2, newer than this plughost understands (1)"), "{e}");
        // A table the database does not have yet, of a kind configured later, is made then.
        db.migrate_kind("later", &["CREATE TABLE later (name TEXT)"]).unwrap();
        assert_eq!(db.table_columns("later").unwrap(), ["name"]);
        drop(db);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let dir = temp_dir("migrate");
        let db = StateDb::open(&dir).unwrap();
        assert_eq!(db.version().unwrap(), SCHEMA_VERSION);
        drop(db);
        let db = StateDb::open(&dir).unwrap();
        assert_eq!(db.version().unwrap(), SCHEMA_VERSION, "reopening applies nothing twice");
        db.conn().execute("INSERT INTO schema_version VALUES (999, 0)", []).unwrap();
        drop(db);
        let e = StateDb::open(&dir).unwrap_err();
        assert!(matches!(e, StateError::TooNew { found: 999, .. }), "{e}");
        let tail = format!("has schema version 999, newer than this plughost understands ({SCHEMA_VERSION})");
        assert!(e.to_string().ends_with(&tail), "{e}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(DB_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_holder_of_the_state_dir_is_refused_with_the_first_ones_pid() {
        let dir = temp_dir("lock");
        let held = DirLock::take(&dir).unwrap();
        // flock locks belong to the open file description: a second open in this process conflicts too.
        let e = DirLock::take(&dir).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("state dir \"{}\" is in use by another plughost (pid {})", dir.display(), std::process::id())
        );
        drop(held);
        DirLock::take(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn removing_the_lock_file_lets_no_second_holder_in_and_it_is_written_again() {
        let dir = temp_dir("lock-removed");
        let mut held = DirLock::take(&dir).unwrap();
        std::fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        let e = DirLock::take(&dir).unwrap_err();
        assert!(matches!(e, StateError::InUse { .. }), "{e}");
        held.verify();
        let pid = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        drop(held);
        DirLock::take(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
