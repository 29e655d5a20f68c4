//! Schema management: versioned migrations plus re-applied functions.
//!
//! `migrations/NNNN_*.sql` create tables and indexes; each is applied once
//! and recorded, with its MD5, in `cairn.migrations`. `sql/*.sql` hold the
//! functions as idempotent `CREATE OR REPLACE`; they are re-applied whenever
//! their combined checksum differs from the one recorded in
//! `cairn.function_bundle`. All of it runs in one transaction that first takes
//! a transaction-scoped advisory lock, so concurrent callers queue up and the
//! later ones find nothing to do. cairn never touches the application's own
//! `_sqlx_migrations`.

use sqlx::{Connection, PgConnection};

use crate::error::{DbContext, Error, Result};

struct Script {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Script] = &[
    Script {
        version: 1,
        name: "0001_queue.sql",
        sql: include_str!("../migrations/0001_queue.sql"),
    },
    Script {
        version: 2,
        name: "0002_workflow.sql",
        sql: include_str!("../migrations/0002_workflow.sql"),
    },
];

const FUNCTIONS: &[&str] = &[
    include_str!("../sql/00_base.sql"),
    include_str!("../sql/10_queue.sql"),
    include_str!("../sql/20_workflow.sql"),
    include_str!("../sql/90_grants.sql"),
];

/// `pg_advisory_xact_lock` key: the bytes of "cairn".
const LOCK_KEY: i64 = 0x63_61_69_72_6e;

const BOOTSTRAP: &str = "
create schema if not exists cairn;
create table if not exists cairn.migrations (
    version    integer primary key,
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default pg_catalog.now()
);
create table if not exists cairn.function_bundle (
    singleton  boolean primary key default true check (singleton),
    checksum   text not null,
    applied_at timestamptz not null default pg_catalog.now()
);
";

/// What [`App::initialize`](crate::App::initialize) changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Migrations applied by this call, in order.
    pub applied: Vec<i32>,
    /// Whether the stored functions were (re)installed by this call.
    pub functions_updated: bool,
}

impl MigrationReport {
    /// True when the schema was already current.
    pub fn is_noop(&self) -> bool {
        self.applied.is_empty() && !self.functions_updated
    }
}

/// The newest migration this binary carries.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

pub(crate) async fn run(conn: &mut PgConnection) -> Result<MigrationReport> {
    let mut tx = conn
        .begin()
        .await
        .db("starting the migration transaction")?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await
        .db("taking the migration lock")?;
    sqlx::raw_sql(BOOTSTRAP)
        .execute(&mut *tx)
        .await
        .db("creating the migration ledger")?;

    let applied: Vec<(i32, String, String)> =
        sqlx::query_as("select version, name, checksum from cairn.migrations order by version")
            .fetch_all(&mut *tx)
            .await
            .db("reading the migration ledger")?;

    let mut texts: Vec<&str> = MIGRATIONS.iter().map(|m| m.sql).collect();
    let bundle = FUNCTIONS.concat();
    texts.push(&bundle);
    let mut sums: Vec<String> = sqlx::query_scalar(
        "select md5(t) from unnest($1::text[]) with ordinality u(t, n) order by n",
    )
    .bind(&texts)
    .fetch_all(&mut *tx)
    .await
    .db("checksumming migrations")?;
    let bundle_sum = sums.pop().unwrap_or_default();

    let known = latest_version();
    for (version, name, checksum) in &applied {
        match MIGRATIONS.iter().position(|m| m.version == *version) {
            None if *version > known => {
                return Err(Error::SchemaTooNew {
                    version: *version,
                    known,
                });
            }
            Some(i) if sums[i] == *checksum => {}
            _ => {
                return Err(Error::MigrationEdited {
                    version: *version,
                    name: name.clone(),
                });
            }
        }
    }

    let mut report = MigrationReport::default();
    for (m, sum) in MIGRATIONS.iter().zip(&sums) {
        if applied.iter().any(|(v, _, _)| *v == m.version) {
            continue;
        }
        sqlx::raw_sql(m.sql)
            .execute(&mut *tx)
            .await
            .db("applying a migration")?;
        sqlx::query("insert into cairn.migrations (version, name, checksum) values ($1, $2, $3)")
            .bind(m.version)
            .bind(m.name)
            .bind(sum)
            .execute(&mut *tx)
            .await
            .db("recording a migration")?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "cairn migration applied"
        );
        report.applied.push(m.version);
    }

    let current: Option<String> = sqlx::query_scalar("select checksum from cairn.function_bundle")
        .fetch_optional(&mut *tx)
        .await
        .db("reading the function checksum")?;
    if current.as_deref() != Some(bundle_sum.as_str()) {
        for sql in FUNCTIONS {
            sqlx::raw_sql(*sql)
                .execute(&mut *tx)
                .await
                .db("installing cairn's functions")?;
        }
        sqlx::query(
            "insert into cairn.function_bundle (checksum) values ($1) \
             on conflict (singleton) do update set checksum = excluded.checksum, applied_at = now()",
        )
        .bind(&bundle_sum)
        .execute(&mut *tx)
        .await
        .db("recording the function checksum")?;
        report.functions_updated = true;
    }

    tx.commit().await.db("committing the migration")?;
    Ok(report)
}
