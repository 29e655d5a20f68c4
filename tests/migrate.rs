//! initialize(): idempotent, concurrent-safe, refuses newer or edited schemas.

mod common;

use std::io::Read;

use cairn::{App, Error};
use sqlx::PgPool;

/// Child entry: initialize the database named by CAIRN_URL and print what it did.
#[test]
#[ignore = "run as a child process by the tests in this file"]
fn child_initialize() {
    let Some((_, url)) = common::child_mode() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = App::builder()
            .database_url(url)
            .max_connections(1)
            .build()
            .await
            .unwrap();
        let report = app.initialize().await.unwrap();
        println!(
            "applied={:?} functions={}",
            report.applied, report.functions_updated
        );
    });
}

#[sqlx::test(migrations = false)]
async fn initialize_is_a_noop_when_current(pool: PgPool) {
    let app = common::app(&pool).await; // first call migrates
    let again = app.initialize().await.unwrap();
    assert!(again.is_noop(), "{again:?}");
    let versions: Vec<i32> = sqlx::query_scalar("select version from cairn.migrations order by 1")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(versions, (1..=cairn::latest_version()).collect::<Vec<_>>());
    // cairn never creates or uses the application's own sqlx ledger.
    let sqlx_ledger: Option<String> =
        sqlx::query_scalar("select to_regclass('public._sqlx_migrations')::text")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(sqlx_ledger, None);
}

#[sqlx::test(migrations = false)]
async fn eight_processes_initialize_at_once(pool: PgPool) {
    let url = common::url_of(&pool);
    let children: Vec<_> = (0..8)
        .map(|_| common::spawn_child("child_initialize", "initialize", &url, &[]))
        .collect();
    let mut applied_by = 0;
    for mut child in children {
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(child.wait().unwrap().success(), "a child failed: {out}");
        if out.contains("applied=[1") {
            applied_by += 1;
        }
    }
    assert_eq!(applied_by, 1, "exactly one process applies the migrations");
    let rows = common::scalar_i64(&pool, "select count(*) from cairn.migrations").await;
    assert_eq!(rows, i64::from(cairn::latest_version()));
    let bundles = common::scalar_i64(&pool, "select count(*) from cairn.function_bundle").await;
    assert_eq!(bundles, 1);
}

#[sqlx::test(migrations = false)]
async fn a_newer_schema_is_refused(pool: PgPool) {
    let app = common::app(&pool).await;
    sqlx::query("insert into cairn.migrations (version, name, checksum) values (9999, '9999_future.sql', 'x')")
        .execute(&pool)
        .await
        .unwrap();
    let err = app.initialize().await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { version: 9999, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade cairn"), "{err}");
}

#[sqlx::test(migrations = false)]
async fn what_a_migration_changes_is_not_reported_as_drift(pool: PgPool) {
    let app = common::app(&pool).await;
    // The schema as the same functions left it before migration 10: the
    // timer index with its old predicate, recorded as installed.
    sqlx::raw_sql(
        "delete from cairn.migrations where version = 10;
         drop index cairn.steps_timer_idx;
         create index steps_timer_idx on cairn.steps (wake_at)
             where kind = 'signal' and status = 'waiting' and wake_at is not null;
         update cairn.function_bundle
            set catalog = jsonb_set(catalog, '{index cairn.steps_timer_idx,definition}',
                                    to_jsonb(pg_get_indexdef('cairn.steps_timer_idx'::regclass)));",
    )
    .execute(&pool)
    .await
    .unwrap();
    let report = app.initialize().await.unwrap();
    assert_eq!(report.applied, [10]);
    assert!(report.repaired.is_empty(), "{report:?}");
    let definition: String =
        sqlx::query_scalar("select pg_get_indexdef('cairn.steps_timer_idx'::regclass)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!definition.contains("status"), "{definition}");
    assert!(app.initialize().await.unwrap().is_noop());
}

#[sqlx::test(migrations = false)]
async fn an_edited_migration_is_refused_and_nothing_changes(pool: PgPool) {
    let app = common::app(&pool).await;
    sqlx::query("update cairn.migrations set checksum = 'edited' where version = 1")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("update cairn.function_bundle set checksum = 'stale'")
        .execute(&pool)
        .await
        .unwrap();
    let err = app.initialize().await.unwrap_err();
    assert!(
        matches!(err, Error::MigrationEdited { version: 1, .. }),
        "{err}"
    );
    // The failed call rolled back: the function checksum was not rewritten.
    let sum: String = sqlx::query_scalar("select checksum from cairn.function_bundle")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sum, "stale");
}

#[sqlx::test(migrations = false)]
async fn every_function_pins_its_search_path_and_public_cannot_execute(pool: PgPool) {
    common::app(&pool).await;
    let unpinned: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text from pg_proc p
          where p.pronamespace = 'cairn'::regnamespace
            and not coalesce(p.proconfig @> array['search_path=pg_catalog, pg_temp'], false)",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(unpinned, Vec::<String>::new());
    let public: Vec<String> = sqlx::query_scalar(
        "select p.oid::regprocedure::text from pg_proc p
          where p.pronamespace = 'cairn'::regnamespace
            and exists (select from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                         where a.grantee = 0 and a.privilege_type = 'EXECUTE')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(public, Vec::<String>::new());
}
