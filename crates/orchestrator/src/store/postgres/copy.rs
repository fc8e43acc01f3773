//! `berth-orchestrator store copy --from <SQLite file> --to <postgres URL>`:
//! an orchestrator's state moved from its SQLite file into an empty
//! PostgreSQL database, every row of every table as it is (campaigns, runs
//! with their results, energy and provenance, power samples, hosts,
//! placements, deployments, replicas and their transitions), in one
//! transaction: a copy that fails leaves the database empty. The two
//! schemas have the same tables and columns; each column is converted to
//! the type PostgreSQL has for it, and rows go in with binary COPY. Run
//! counts are made by the database's own triggers as the runs go in.

use std::path::Path;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::{NoTls, Transaction};
use rusqlite::types::ValueRef;

use super::{PostgresStore, pool};
use crate::store::StoreError;
use crate::store::sqlite::SqliteStore;

/// The tables copied, each after those its rows refer to.
const TABLES: [&str; 8] = [
    "campaigns",
    "runs",
    "run_power_samples",
    "hosts",
    "placements",
    "deployments",
    "replicas",
    "deployment_transitions",
];

/// Tables whose `seq` comes from a sequence, moved past the copied rows so
/// that the next row inserted gets a number of its own.
const SEQUENCED: [&str; 3] = ["campaigns", "deployments", "deployment_transitions"];

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("--from {path}: no such file")]
    NoSource { path: String },
    #[error("--from {path}: {reason}")]
    Source { path: String, reason: String },
    #[error("--to {0}")]
    Target(#[from] StoreError),
    #[error("--to {url}: {reason}")]
    TargetDatabase { url: String, reason: String },
    #[error(
        "--to {url}: the database already holds {rows} rows of table {table}: copy into an empty database"
    )]
    NotEmpty {
        url: String,
        table: &'static str,
        rows: i64,
    },
    #[error("--from {path}: {table}.{column}: {found} cannot be stored as PostgreSQL's {wanted}")]
    Value {
        path: String,
        table: &'static str,
        column: String,
        found: &'static str,
        wanted: Type,
    },
}

/// Copies the SQLite store at `from` into the empty database at `to`; the
/// rows copied per table.
pub fn copy_sqlite_to_postgres(
    from: &Path,
    to: &str,
) -> Result<Vec<(&'static str, u64)>, CopyError> {
    let path = from.display().to_string();
    if !from.is_file() {
        return Err(CopyError::NoSource { path });
    }
    let source_error = |reason: String| CopyError::Source {
        path: path.clone(),
        reason,
    };
    // Opened as the orchestrator would, first: a file from an older
    // release gets today's columns.
    drop(SqliteStore::open(from).map_err(|e| source_error(e.to_string()))?);
    let sqlite =
        rusqlite::Connection::open_with_flags(from, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| source_error(e.to_string()))?;
    // Checks the URL and brings the database's schema up to date.
    drop(PostgresStore::open(to, 1)?);
    let url = pool::redact(to);
    let target_error = |error: postgres::Error| CopyError::TargetDatabase {
        url: url.clone(),
        reason: error.to_string(),
    };
    // A connection of its own: the store's carry a statement timeout, and
    // a large store's copy takes longer.
    let config: postgres::Config = to.parse().map_err(target_error)?;
    let mut client = config.connect(NoTls).map_err(target_error)?;
    let mut tx = client.transaction().map_err(target_error)?;
    for table in TABLES {
        tx.batch_execute(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
            .map_err(target_error)?;
        let rows: i64 = tx
            .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
            .map_err(target_error)?
            .get(0);
        if rows > 0 {
            return Err(CopyError::NotEmpty {
                url: url.clone(),
                table,
                rows,
            });
        }
    }
    let mut copied = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let rows = copy_table(&sqlite, &mut tx, table, &path).map_err(|failure| match failure {
            Failure::Sqlite(error) => source_error(format!("{table}: {error}")),
            Failure::Postgres(error) => target_error(error),
            Failure::Value(error) => error,
        })?;
        copied.push((table, rows));
    }
    for table in SEQUENCED {
        tx.batch_execute(&format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'seq'), \
             COALESCE((SELECT MAX(seq) FROM {table}), 0) + 1, false)"
        ))
        .map_err(target_error)?;
    }
    tx.commit().map_err(target_error)?;
    Ok(copied)
}

enum Failure {
    Sqlite(rusqlite::Error),
    Postgres(postgres::Error),
    Value(CopyError),
}

impl From<rusqlite::Error> for Failure {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(error)
    }
}

impl From<postgres::Error> for Failure {
    fn from(error: postgres::Error) -> Self {
        Self::Postgres(error)
    }
}

/// Copies `table`'s rows: PostgreSQL's columns (and their types) read from
/// SQLite by name.
fn copy_table(
    sqlite: &rusqlite::Connection,
    tx: &mut Transaction<'_>,
    table: &'static str,
    path: &str,
) -> Result<u64, Failure> {
    let shape = tx.prepare(&format!("SELECT * FROM {table} LIMIT 0"))?;
    let columns: Vec<String> = shape
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let types: Vec<Type> = shape.columns().iter().map(|c| c.type_().clone()).collect();
    let list = columns.join(", ");
    let mut select = sqlite.prepare(&format!("SELECT {list} FROM {table}"))?;
    let sink = tx.copy_in(&format!("COPY {table} ({list}) FROM STDIN BINARY"))?;
    let mut writer = BinaryCopyInWriter::new(sink, &types);
    let mut rows = select.query([])?;
    let mut copied = 0;
    while let Some(row) = rows.next()? {
        let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(columns.len());
        for (index, wanted) in types.iter().enumerate() {
            let value = row.get_ref(index)?;
            values.push(convert(value, wanted).ok_or_else(|| {
                Failure::Value(CopyError::Value {
                    path: path.to_string(),
                    table,
                    column: columns[index].clone(),
                    found: kind(value),
                    wanted: wanted.clone(),
                })
            })?);
        }
        let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
        writer.write(&refs)?;
        copied += 1;
    }
    writer.finish()?;
    Ok(copied)
}

/// A SQLite value as the PostgreSQL type of its column (NULL as a typed
/// NULL); None when it cannot be one.
fn convert(value: ValueRef<'_>, wanted: &Type) -> Option<Box<dyn ToSql + Sync>> {
    Some(match (value, wanted) {
        (ValueRef::Null, t) if *t == Type::INT8 => Box::new(None::<i64>),
        (ValueRef::Null, t) if *t == Type::INT4 => Box::new(None::<i32>),
        (ValueRef::Null, t) if *t == Type::FLOAT8 => Box::new(None::<f64>),
        (ValueRef::Null, t) if *t == Type::BOOL => Box::new(None::<bool>),
        (ValueRef::Null, t) if *t == Type::BYTEA => Box::new(None::<Vec<u8>>),
        (ValueRef::Null, t) if *t == Type::TEXT => Box::new(None::<String>),
        (ValueRef::Integer(n), t) if *t == Type::INT8 => Box::new(n),
        (ValueRef::Integer(n), t) if *t == Type::INT4 => Box::new(i32::try_from(n).ok()?),
        (ValueRef::Integer(n), t) if *t == Type::BOOL => Box::new(n != 0),
        (ValueRef::Integer(n), t) if *t == Type::FLOAT8 => Box::new(n as f64),
        (ValueRef::Real(x), t) if *t == Type::FLOAT8 => Box::new(x),
        (ValueRef::Text(text), t) if *t == Type::TEXT => {
            Box::new(String::from_utf8(text.to_vec()).ok()?)
        }
        (ValueRef::Blob(bytes), t) if *t == Type::BYTEA => Box::new(bytes.to_vec()),
        _ => return None,
    })
}

fn kind(value: ValueRef<'_>) -> &'static str {
    match value {
        ValueRef::Null => "NULL",
        ValueRef::Integer(_) => "an integer",
        ValueRef::Real(_) => "a real",
        ValueRef::Text(_) => "a text",
        ValueRef::Blob(_) => "a blob",
    }
}
