//! The doctor's schema checks: how the installed schema stands against what
//! this binary would install (migrations, functions, drift), found with the
//! same checksums and catalog diff as an install, in a read-only
//! transaction: nothing is changed.

use sqlx::{Connection, PgConnection, Postgres, Transaction};

use super::{
    FOREIGN_OBJECTS, HOOKS, MIGRATIONS, RELEASE, catalog, checksums, diff, exec, latest_version,
    newer,
};
use crate::error::{DbContext, Result};
use crate::operate::{Check, Health};

/// The rows of the function ledger: checksum, release, recorded catalog.
type Installed = Option<(String, Option<String>, Option<serde_json::Value>)>;

/// The `migrations`, `functions` and `drift` checks, for
/// [`App::doctor`](crate::App::doctor).
pub(crate) async fn inspect(conn: &mut PgConnection) -> Result<Vec<Check>> {
    let mut tx = conn.begin().await.db("starting the schema check")?;
    exec(
        &mut tx,
        "set transaction read only",
        "starting the schema check",
    )
    .await?;
    exec(
        &mut tx,
        "set local search_path = pg_catalog, pg_temp",
        "setting search_path",
    )
    .await?;
    let owner: Option<String> = sqlx::query_scalar(
        "select pg_get_userbyid(n.nspowner)::text from pg_namespace n where n.nspname = 'cairn'",
    )
    .fetch_optional(&mut *tx)
    .await
    .db("inspecting schema cairn")?;
    let ledger: bool = sqlx::query_scalar(
        "select to_regclass('cairn.migrations') is not null \
            and to_regclass('cairn.function_bundle') is not null",
    )
    .fetch_one(&mut *tx)
    .await
    .db("inspecting schema cairn")?;
    let Some(owner) = owner.filter(|_| ledger) else {
        return Ok(vec![Check::new(
            "migrations",
            Health::Fail,
            "cairn is not installed in this database: run `cairn migrate` (or app.initialize())",
        )]);
    };
    let (sums, bundle_sum) = checksums(&mut tx).await?;
    let installed: Installed =
        sqlx::query_as("select checksum, release, catalog from cairn.function_bundle")
            .fetch_optional(&mut *tx)
            .await
            .db("reading the function ledger")?;
    let current = installed
        .as_ref()
        .is_some_and(|(sum, release, _)| *sum == bundle_sum && release.as_deref() == Some(RELEASE));
    let checks = vec![
        migrations(&mut tx, &sums).await?,
        functions(&installed, current),
        drift(&mut tx, &owner, &installed, current).await?,
    ];
    tx.rollback().await.db("ending the schema check")?;
    Ok(checks)
}

/// Every migration of this release applied, none edited, none newer.
async fn migrations(tx: &mut Transaction<'_, Postgres>, sums: &[String]) -> Result<Check> {
    let applied: Vec<(i32, String, String)> =
        sqlx::query_as("select version, name, checksum from cairn.migrations order by version")
            .fetch_all(&mut **tx)
            .await
            .db("reading the migration ledger")?;
    let known = latest_version();
    let newest = applied.iter().map(|(v, _, _)| *v).max().unwrap_or(0);
    let edited: Vec<&str> = applied
        .iter()
        .filter(|(v, _, sum)| {
            MIGRATIONS
                .iter()
                .zip(sums)
                .any(|(m, ours)| m.version == *v && ours != sum)
        })
        .map(|(_, name, _)| name.as_str())
        .collect();
    let pending: Vec<i32> = MIGRATIONS
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.iter().any(|(a, _, _)| a == v))
        .collect();
    let (health, detail) = if newest > known {
        (
            Health::Fail,
            format!(
                "the schema is at version {newest}, newer than this binary knows ({known}): upgrade cairn"
            ),
        )
    } else if !edited.is_empty() {
        (
            Health::Fail,
            format!(
                "applied migrations differ from this release's: {}",
                edited.join(", ")
            ),
        )
    } else if !pending.is_empty() {
        (
            Health::Fail,
            format!("migrations {pending:?} are not applied: run `cairn migrate`"),
        )
    } else {
        (Health::Ok, format!("all {known} applied"))
    };
    Ok(Check::new("migrations", health, detail))
}

/// The installed functions are this release's.
fn functions(installed: &Installed, current: bool) -> Check {
    let (health, detail) = match installed {
        None => (
            Health::Fail,
            "no functions are installed: run `cairn migrate`".to_owned(),
        ),
        Some((_, Some(release), _)) if newer(release, RELEASE) => (
            Health::Fail,
            format!(
                "installed by cairn {release}, newer than this binary ({RELEASE}): upgrade cairn"
            ),
        ),
        Some(_) if !current => (
            Health::Warn,
            format!("not this release's ({RELEASE}): `cairn migrate` installs them"),
        ),
        Some(_) => (Health::Ok, format!("release {RELEASE}, current")),
    };
    Check::new("functions", health, detail)
}

/// The live catalog against the one recorded at the last install, foreign
/// triggers, rules and policies, and objects another role owns.
async fn drift(
    tx: &mut Transaction<'_, Postgres>,
    owner: &str,
    installed: &Installed,
    current: bool,
) -> Result<Check> {
    let mut broken = Vec::new();
    let mut fixable = Vec::new();
    if let Some((_, _, Some(recorded))) = installed
        && current
    {
        let drift = diff(recorded, &catalog(tx).await?);
        broken.extend(drift.tables);
        // diff says what an install did; nothing is done here.
        fixable.extend(drift.repairable.iter().map(|m| {
            [
                (": put back", ": `cairn migrate` puts it back"),
                (": dropped", ": `cairn migrate` drops it"),
                (": re-created", ": `cairn migrate` re-creates it"),
            ]
            .iter()
            .find_map(|(done, todo)| m.strip_suffix(done).map(|k| format!("{k}{todo}")))
            .unwrap_or_else(|| m.clone())
        }));
        fixable.extend(drift.foreign);
    }
    let hooks: Vec<(String, String)> = sqlx::query_as(HOOKS)
        .fetch_all(&mut **tx)
        .await
        .db("inspecting schema cairn")?;
    fixable.extend(
        hooks
            .into_iter()
            .map(|(what, _)| format!("{what} is not cairn's: `cairn migrate` drops it")),
    );
    let foreign: Vec<String> = sqlx::query_scalar(FOREIGN_OBJECTS)
        .bind(owner)
        .fetch_all(&mut **tx)
        .await
        .db("inspecting schema cairn")?;
    broken.extend(
        foreign
            .into_iter()
            .map(|f| format!("{f} is not owned by the schema's owner {owner}")),
    );
    Ok(if !broken.is_empty() {
        broken.extend(fixable);
        Check::new("drift", Health::Fail, broken.join("; "))
    } else if !fixable.is_empty() {
        Check::new("drift", Health::Warn, fixable.join("; "))
    } else if current {
        Check::new(
            "drift",
            Health::Ok,
            format!("the catalog matches the last install (owner {owner})"),
        )
    } else {
        Check::new(
            "drift",
            Health::Ok,
            "checked after the functions are current",
        )
    })
}
