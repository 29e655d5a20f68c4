//! Schema management: versioned migrations, re-applied functions, and a
//! guard on everything in schema `cairn`.
//!
//! `migrations/NNNN_*.sql` create tables and indexes; each is applied once
//! and recorded, with its MD5, in `cairn.migrations`. `sql/*.sql` hold the
//! functions and grants as idempotent `CREATE OR REPLACE`; they are
//! re-applied when their combined checksum differs from the one recorded in
//! `cairn.function_bundle`, or when the live catalog has drifted from the
//! one recorded after the last install.
//!
//! All of it runs in one transaction that first takes a transaction-scoped
//! advisory lock, so concurrent callers queue up and the later ones find
//! nothing to do. Before anything is written it checks that schema `cairn`
//! and everything in it belong to the installing role: cairn never installs
//! into a schema someone else created (whose owner could later replace the
//! code that runs as `SECURITY DEFINER`). cairn never touches the
//! application's own `_sqlx_migrations`.

use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres, Transaction};

use crate::error::{DbContext, Error, Result};

mod inspect;
pub(crate) use inspect::inspect;

struct Script {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// One migration: its version and its file under `migrations/`.
macro_rules! migration {
    ($version:literal, $name:literal) => {
        Script {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../../migrations/", $name)),
        }
    };
}

const MIGRATIONS: &[Script] = &[
    migration!(1, "0001_queue.sql"),
    migration!(2, "0002_workflow.sql"),
    migration!(3, "0003_integrity.sql"),
    migration!(4, "0004_throughput.sql"),
    migration!(5, "0005_retention.sql"),
    migration!(6, "0006_schedules.sql"),
    migration!(7, "0007_flows.sql"),
    migration!(8, "0008_operate.sql"),
    migration!(9, "0009_timers.sql"),
    migration!(10, "0010_hot_steps.sql"),
    migration!(11, "0011_runs_by_age.sql"),
    migration!(12, "0012_hot_claims.sql"),
];

const FUNCTIONS: &[&str] = &[
    include_str!("../../sql/00_base.sql"),
    include_str!("../../sql/10_queue.sql"),
    include_str!("../../sql/20_run_engine.sql"),
    include_str!("../../sql/30_run_api.sql"),
    include_str!("../../sql/40_worker.sql"),
    include_str!("../../sql/50_retention.sql"),
    include_str!("../../sql/60_schedules.sql"),
    include_str!("../../sql/70_flows.sql"),
    include_str!("../../sql/80_operate.sql"),
    // Last: install_functions finds stale functions before it grants.
    include_str!("../../sql/90_grants.sql"),
];

/// The release whose functions this binary installs.
const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// `pg_advisory_xact_lock` key: the bytes of "cairn".
const LOCK_KEY: i64 = 0x63_61_69_72_6e;

const LEDGER: &str = "
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
alter table cairn.function_bundle
    add column if not exists release text,
    add column if not exists catalog jsonb;
";

/// Everything in schema `cairn` that is not owned by role `$1` (the
/// installing role, or for the doctor the schema's owner).
const FOREIGN_OBJECTS: &str = "
select kind || ' ' || name || ' (owned by ' || owner || ')'
  from (select 'relation' as kind, c.relname::text as name, pg_catalog.pg_get_userbyid(c.relowner) as owner
          from pg_catalog.pg_class c where c.relnamespace = 'cairn'::regnamespace
        union all
        select 'function', p.oid::regprocedure::text, pg_catalog.pg_get_userbyid(p.proowner)
          from pg_catalog.pg_proc p where p.pronamespace = 'cairn'::regnamespace
        union all
        select 'type', t.typname::text, pg_catalog.pg_get_userbyid(t.typowner)
          from pg_catalog.pg_type t where t.typnamespace = 'cairn'::regnamespace
        union all
        select 'operator', o.oprname::text, pg_catalog.pg_get_userbyid(o.oprowner)
          from pg_catalog.pg_operator o where o.oprnamespace = 'cairn'::regnamespace
        union all
        select 'collation', c.collname::text, pg_catalog.pg_get_userbyid(c.collowner)
          from pg_catalog.pg_collation c where c.collnamespace = 'cairn'::regnamespace
        union all
        select 'conversion', c.conname::text, pg_catalog.pg_get_userbyid(c.conowner)
          from pg_catalog.pg_conversion c where c.connamespace = 'cairn'::regnamespace) o
 where owner <> $1
 order by 1";

/// Triggers, rules and row-security policies on cairn's tables that are not
/// cairn's own. cairn defines one, `runs_ended` calling
/// `cairn.notify_run_ended()`; any other would run code inside cairn's own
/// statements.
const HOOKS: &str = "
select 'trigger ' || t.tgname || ' on cairn.' || c.relname,
       pg_catalog.format('drop trigger %I on cairn.%I', t.tgname, c.relname)
  from pg_catalog.pg_trigger t join pg_catalog.pg_class c on c.oid = t.tgrelid
 where c.relnamespace = 'cairn'::regnamespace and not t.tgisinternal
   and not (c.relname = 'runs' and t.tgname = 'runs_ended'
            and t.tgfoid = pg_catalog.to_regprocedure('cairn.notify_run_ended()'))
union all
select 'rule ' || r.rulename || ' on cairn.' || c.relname,
       pg_catalog.format('drop rule %I on cairn.%I', r.rulename, c.relname)
  from pg_catalog.pg_rewrite r join pg_catalog.pg_class c on c.oid = r.ev_class
 where c.relnamespace = 'cairn'::regnamespace and r.rulename <> '_RETURN'
union all
select 'policy ' || p.polname || ' on cairn.' || c.relname,
       pg_catalog.format('drop policy %I on cairn.%I', p.polname, c.relname)
  from pg_catalog.pg_policy p join pg_catalog.pg_class c on c.oid = p.polrelid
 where c.relnamespace = 'cairn'::regnamespace";

/// The live catalog of schema `cairn` as JSON: per object its owner, grants
/// and definition (functions: the MD5 of the body, settings, security).
/// Recorded after every install, compared at every `initialize`.
const CATALOG: &str = "
with objects(key, val) as (
    select 'schema cairn',
           pg_catalog.jsonb_build_object(
               'owner', pg_catalog.pg_get_userbyid(n.nspowner),
               'grants', coalesce((select pg_catalog.string_agg(a::text, ' ' order by a::text)
                                     from pg_catalog.unnest(n.nspacl) a), ''))
      from pg_catalog.pg_namespace n where n.nspname = 'cairn'
    union all
    select 'function ' || p.oid::regprocedure::text,
           pg_catalog.jsonb_build_object(
               'body', case when p.proname = 'now' and p.pronargs = 0
                             and exists (select from cairn.test_clock)
                            then 'the test clock' else pg_catalog.md5(p.prosrc) end,
               'settings', coalesce(pg_catalog.array_to_string(p.proconfig, ' '), ''),
               'security', case when p.prosecdef then 'definer' else 'invoker' end,
               'volatility', p.provolatile::text,
               'owner', pg_catalog.pg_get_userbyid(p.proowner),
               'grants', coalesce((select pg_catalog.string_agg(a::text, ' ' order by a::text)
                                     from pg_catalog.unnest(p.proacl) a), ''))
      from pg_catalog.pg_proc p where p.pronamespace = 'cairn'::regnamespace
    union all
    select case c.relkind when 'r' then 'table' when 'i' then 'index' when 'S' then 'sequence'
                          when 'v' then 'view' else 'relation' end || ' cairn.' || c.relname,
           pg_catalog.jsonb_build_object(
               'owner', pg_catalog.pg_get_userbyid(c.relowner),
               'grants', coalesce((select pg_catalog.string_agg(a::text, ' ' order by a::text)
                                     from pg_catalog.unnest(c.relacl) a), ''),
               'definition', case c.relkind
                   when 'i' then pg_catalog.pg_get_indexdef(c.oid)
                   when 'v' then pg_catalog.pg_get_viewdef(c.oid)
                   when 'r' then
                       (select pg_catalog.string_agg(
                                   a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
                                   || case when a.attnotnull then ' not null' else '' end
                                   || coalesce(' default ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid), ''),
                                   ', ' order by a.attnum)
                          from pg_catalog.pg_attribute a
                          left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                         where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped)
                       || '; ' ||
                       coalesce((select pg_catalog.string_agg(k.conname || ' ' || pg_catalog.pg_get_constraintdef(k.oid),
                                                               ', ' order by k.conname)
                                   from pg_catalog.pg_constraint k where k.conrelid = c.oid), '')
                   else '' end)
      from pg_catalog.pg_class c
     where c.relnamespace = 'cairn'::regnamespace and c.relkind in ('r', 'i', 'S', 'v', 'm', 'p', 'f')
)
select coalesce(pg_catalog.jsonb_object_agg(key, val), '{}'::jsonb) from objects";

/// What [`App::initialize`](crate::App::initialize) changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Migrations applied by this call, in order.
    pub applied: Vec<i32>,
    /// Whether the stored functions were (re)installed by this call.
    pub functions_updated: bool,
    /// What this call found changed in schema `cairn` since the last install
    /// and put back (a function's body, settings or grants, a dropped
    /// function or index, a trigger someone added).
    pub repaired: Vec<String>,
    /// What it found and left alone (objects that are not cairn's).
    pub noticed: Vec<String>,
}

impl MigrationReport {
    /// True when the schema was already current and untouched.
    pub fn is_noop(&self) -> bool {
        self.applied.is_empty() && !self.functions_updated && self.repaired.is_empty()
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
    // Nothing a caller's search_path holds can capture a name below.
    exec(
        &mut tx,
        "set local search_path = pg_catalog, pg_temp",
        "setting search_path",
    )
    .await?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await
        .db("taking the migration lock")?;

    let mut report = MigrationReport::default();
    guard_schema(&mut tx).await?;
    remove_hooks(&mut tx, &mut report).await?;
    sqlx::raw_sql(LEDGER)
        .execute(&mut *tx)
        .await
        .db("creating the migration ledger")?;

    let applied: Vec<(i32, String, String)> =
        sqlx::query_as("select version, name, checksum from cairn.migrations order by version")
            .fetch_all(&mut *tx)
            .await
            .db("reading the migration ledger")?;
    let (sums, bundle_sum) = checksums(&mut tx).await?;

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

    let installed: Option<(String, Option<String>, Option<serde_json::Value>)> =
        sqlx::query_as("select checksum, release, catalog from cairn.function_bundle")
            .fetch_optional(&mut *tx)
            .await
            .db("reading the function ledger")?;
    if let Some((_, Some(release), _)) = &installed
        && newer(release, RELEASE)
    {
        return Err(Error::FunctionsTooNew {
            installed: release.clone(),
            ours: RELEASE.to_owned(),
        });
    }

    // Drift is what changed since the last install, read before this
    // run's migrations: what they change is not drift.
    let current = installed
        .as_ref()
        .is_some_and(|(sum, release, _)| *sum == bundle_sum && release.as_deref() == Some(RELEASE));
    let recorded = installed.and_then(|(_, _, catalog)| catalog);
    let drift = match (&recorded, current) {
        (Some(recorded), true) => diff(recorded, &catalog(&mut tx).await?),
        _ => Drift::default(),
    };
    if let Some(broken) = drift.tables.first() {
        return Err(Error::Drift(format!(
            "{broken}; cairn cannot repair a changed table: restore it, or restore the database from a backup"
        )));
    }

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

    if !current || !drift.repairable.is_empty() || !report.applied.is_empty() {
        install_functions(&mut tx, &recorded, &drift).await?;
        report.functions_updated = true;
        report.repaired.extend(drift.repairable);
        let live = catalog(&mut tx).await?;
        sqlx::query(
            "insert into cairn.function_bundle (checksum, release, catalog) values ($1, $2, $3) \
             on conflict (singleton) do update set checksum = excluded.checksum, \
             release = excluded.release, catalog = excluded.catalog, applied_at = now()",
        )
        .bind(&bundle_sum)
        .bind(RELEASE)
        .bind(&live)
        .execute(&mut *tx)
        .await
        .db("recording the installed functions")?;
    }
    report.noticed = drift.foreign;
    for repaired in &report.repaired {
        tracing::warn!(%repaired, "cairn repaired schema drift");
    }

    tx.commit().await.db("committing the migration")?;
    Ok(report)
}

/// The MD5 of each migration, and of the function bundle.
async fn checksums(tx: &mut Transaction<'_, Postgres>) -> Result<(Vec<String>, String)> {
    let mut texts: Vec<&str> = MIGRATIONS.iter().map(|m| m.sql).collect();
    let bundle = FUNCTIONS.concat();
    texts.push(&bundle);
    let mut sums: Vec<String> = sqlx::query_scalar(
        "select md5(t) from unnest($1::text[]) with ordinality u(t, n) order by n",
    )
    .bind(&texts)
    .fetch_all(&mut **tx)
    .await
    .db("checksumming migrations")?;
    let bundle_sum = sums.pop().unwrap_or_default();
    Ok((sums, bundle_sum))
}

/// Runs SQL that is cairn's own, or that the catalog wrote (identifiers
/// quoted by `format('%I')`, `regprocedure` or `pg_get_indexdef`).
async fn exec(
    tx: &mut Transaction<'_, Postgres>,
    sql: impl Into<String>,
    what: &'static str,
) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql.into()))
        .execute(&mut **tx)
        .await
        .db(what)?;
    Ok(())
}

/// Refuses a schema `cairn` that the installing role does not own, or that
/// holds anything it does not own; creates the schema when there is none.
async fn guard_schema(tx: &mut Transaction<'_, Postgres>) -> Result<()> {
    let owner: Option<(String, String)> = sqlx::query_as(
        "select pg_get_userbyid(n.nspowner)::text, current_user::text \
           from pg_namespace n where n.nspname = 'cairn'",
    )
    .fetch_optional(&mut **tx)
    .await
    .db("inspecting schema cairn")?;
    match owner {
        None => {
            // Not IF NOT EXISTS: if another role creates it between the
            // check and here, this fails instead of installing into theirs.
            exec(tx, "create schema cairn", "creating schema cairn").await
        }
        Some((owner, me)) if owner != me => Err(Error::UnsafeSchema(format!(
            "schema cairn is owned by role {owner:?}, not by {me:?} (the role installing cairn); \
             cairn installs only into a schema it owns, because the owner of the schema could \
             replace code that runs with its privileges. If the schema is yours, run \
             ALTER SCHEMA cairn OWNER TO {me}; otherwise drop it"
        ))),
        Some((_, me)) => {
            let foreign: Vec<String> = sqlx::query_scalar(FOREIGN_OBJECTS)
                .bind(&me)
                .fetch_all(&mut **tx)
                .await
                .db("inspecting schema cairn")?;
            if foreign.is_empty() {
                Ok(())
            } else {
                Err(Error::UnsafeSchema(format!(
                    "schema cairn holds objects the installing role does not own: {}; \
                     cairn will not install next to them",
                    foreign.join(", ")
                )))
            }
        }
    }
}

/// Drops triggers, rules and policies on cairn's tables that are not
/// cairn's own, before any statement could fire them.
async fn remove_hooks(
    tx: &mut Transaction<'_, Postgres>,
    report: &mut MigrationReport,
) -> Result<()> {
    let hooks: Vec<(String, String)> = sqlx::query_as(HOOKS)
        .fetch_all(&mut **tx)
        .await
        .db("inspecting schema cairn")?;
    for (what, drop) in hooks {
        exec(tx, drop, "dropping a foreign trigger, rule or policy").await?;
        report
            .repaired
            .push(format!("{what} was not cairn's: dropped"));
    }
    Ok(())
}

async fn catalog(tx: &mut Transaction<'_, Postgres>) -> Result<serde_json::Value> {
    sqlx::query_scalar(CATALOG)
        .fetch_one(&mut **tx)
        .await
        .db("reading the catalog of schema cairn")
}

/// Re-applies every function file, puts back indexes that were dropped, and
/// drops functions this release does not define (left over from an older
/// one, or added by hand).
async fn install_functions(
    tx: &mut Transaction<'_, Postgres>,
    recorded: &Option<serde_json::Value>,
    drift: &Drift,
) -> Result<()> {
    // The grants come last (see FUNCTIONS), after the stale functions are
    // found: a GRANT or REVOKE rewrites every function's catalog row, which
    // would make an old function look freshly created.
    let (grants, definitions) = FUNCTIONS
        .split_last()
        .expect("FUNCTIONS ends with the grants");
    for sql in definitions {
        exec(tx, *sql, "installing cairn's functions").await?;
    }
    // A function that the scripts above did not create or replace in this
    // transaction is not part of this release.
    let stale: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text from pg_proc p \
          where p.pronamespace = 'cairn'::regnamespace \
            and p.xmin::text <> (pg_current_xact_id()::text::bigint % 4294967296)::text",
    )
    .fetch_all(&mut **tx)
    .await
    .db("listing stale functions")?;
    for function in stale {
        exec(
            tx,
            format!("drop function {function}"),
            "dropping a stale function",
        )
        .await?;
    }
    exec(tx, *grants, "granting cairn's functions").await?;
    if let Some(recorded) = recorded {
        for index in &drift.missing_indexes {
            if let Some(def) = recorded[index]["definition"].as_str() {
                exec(tx, def, "re-creating an index").await?;
            }
        }
    }
    // A test clock that was on stays on.
    exec(
        tx,
        "do $$ begin if exists (select from cairn.test_clock) then \
         perform cairn.advance_test_clock(0); end if; end $$",
        "keeping the test clock",
    )
    .await
}

/// How the live catalog differs from the one recorded at the last install.
#[derive(Debug, Default)]
struct Drift {
    /// Changes an install puts back, as messages.
    repairable: Vec<String>,
    /// Keys of indexes that were dropped.
    missing_indexes: Vec<String>,
    /// Tables whose columns or constraints changed: not repairable.
    tables: Vec<String>,
    /// Objects that are not cairn's, left alone.
    foreign: Vec<String>,
}

fn diff(recorded: &serde_json::Value, live: &serde_json::Value) -> Drift {
    let empty = serde_json::Map::new();
    let (old, new) = (
        recorded.as_object().unwrap_or(&empty),
        live.as_object().unwrap_or(&empty),
    );
    let mut drift = Drift::default();
    for (key, was) in old {
        match new.get(key) {
            None if key.starts_with("index ") => {
                drift.missing_indexes.push(key.clone());
                drift
                    .repairable
                    .push(format!("{key} was dropped: re-created"));
            }
            None if key.starts_with("function ") => {
                drift
                    .repairable
                    .push(format!("{key} was dropped: re-created"));
            }
            None => drift.tables.push(format!("{key} was dropped")),
            Some(now) if now != was => {
                let fields: Vec<String> = [
                    "body",
                    "settings",
                    "security",
                    "volatility",
                    "grants",
                    "owner",
                    "definition",
                ]
                .iter()
                .filter(|f| was.get(**f) != now.get(**f))
                .map(|f| match *f {
                    "body" => "its body was replaced".to_owned(),
                    "settings" => format!(
                        "its settings changed from {:?} to {:?}",
                        was["settings"].as_str().unwrap_or(""),
                        now["settings"].as_str().unwrap_or("")
                    ),
                    "grants" => format!(
                        "its grants changed from {:?} to {:?}",
                        was["grants"].as_str().unwrap_or(""),
                        now["grants"].as_str().unwrap_or("")
                    ),
                    other => format!("its {other} changed"),
                })
                .collect();
                let message = format!("{key}: {}", fields.join(", "));
                if key.starts_with("table ") && was.get("definition") != now.get("definition") {
                    drift.tables.push(message);
                } else {
                    drift.repairable.push(format!("{message}: put back"));
                }
            }
            Some(_) => {}
        }
    }
    for key in new.keys().filter(|k| !old.contains_key(*k)) {
        if key.starts_with("function ") {
            drift
                .repairable
                .push(format!("{key} is not cairn's: dropped"));
        } else {
            drift
                .foreign
                .push(format!("{key} is not cairn's: left alone"));
        }
    }
    drift
}

/// Whether release `a` is newer than `b` (dotted numbers; a pre-release tag
/// is ignored).
fn newer(a: &str, b: &str) -> bool {
    fn parts(v: &str) -> Vec<u64> {
        v.split(['-', '+'])
            .next()
            .unwrap_or("")
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    }
    parts(a) > parts(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_order() {
        assert!(newer("0.2.0", "0.1.9"));
        assert!(newer("1.0.0", "0.99.99"));
        assert!(!newer("0.1.0", "0.1.0"));
        assert!(!newer("0.1.0-rc.1", "0.1.0"));
        assert!(!newer("0.0.9", "0.1.0"));
    }

    #[test]
    fn drift_is_classified() {
        let recorded = serde_json::json!({
            "function cairn.send(text)": {"body": "a", "settings": "search_path=pg_catalog, pg_temp", "grants": ""},
            "function cairn.claim(text)": {"body": "b"},
            "index cairn.jobs_claim_idx": {"definition": "CREATE INDEX jobs_claim_idx ON cairn.jobs (x)"},
            "table cairn.jobs": {"definition": "id bigint", "grants": ""},
        });
        let live = serde_json::json!({
            "function cairn.send(text)": {"body": "a", "settings": "", "grants": "=X/owner"},
            "function cairn.evil(text)": {"body": "z"},
            "table cairn.jobs": {"definition": "id bigint", "grants": ""},
            "table cairn.mine": {"definition": "x int"},
        });
        let d = diff(&recorded, &live);
        assert_eq!(d.missing_indexes, ["index cairn.jobs_claim_idx"]);
        assert!(d.tables.is_empty());
        assert_eq!(d.foreign, ["table cairn.mine is not cairn's: left alone"]);
        let all = d.repairable.join("\n");
        assert!(all.contains("function cairn.send(text): its settings changed from \"search_path=pg_catalog, pg_temp\" to \"\", its grants changed from \"\" to \"=X/owner\": put back"), "{all}");
        assert!(
            all.contains("function cairn.claim(text) was dropped: re-created"),
            "{all}"
        );
        assert!(
            all.contains("function cairn.evil(text) is not cairn's: dropped"),
            "{all}"
        );
    }
}

#[cfg(test)]
mod schema_tests {
    use sqlx::PgPool;

    use crate::run::{RunStatus, StepKind, StepStatus};

    /// The values a `check (col in (...))` constraint allows.
    async fn check_list(pool: &PgPool, table: &str, column: &str) -> Vec<String> {
        let def: String = sqlx::query_scalar(
            "select pg_get_constraintdef(k.oid) from pg_constraint k
              where k.conrelid = ('cairn.' || $1)::regclass and k.contype = 'c'
                and pg_get_constraintdef(k.oid) like '%' || $2 || '%'",
        )
        .bind(table)
        .bind(column)
        .fetch_one(pool)
        .await
        .unwrap();
        def.split('\'')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    #[sqlx::test(migrations = false)]
    async fn rust_enums_equal_the_check_lists(pool: PgPool) {
        super::run(&mut pool.acquire().await.unwrap())
            .await
            .unwrap();
        let runs: Vec<&str> = RunStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(check_list(&pool, "runs", "status").await, runs);
        let statuses: Vec<&str> = StepStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(check_list(&pool, "steps", "status").await, statuses);
        let kinds: Vec<&str> = StepKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(check_list(&pool, "steps", "kind").await, kinds);
    }
}
