//! Shared test helpers: an initialized App on the test's own database, and
//! child worker processes (the test binary re-executed in a child mode).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn::App;
use sqlx::PgPool;

/// The URL of the database `#[sqlx::test]` created for this test.
pub fn url_of(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or("postgres")
    )
}

/// A builder for the database at `url`: direct, or, when
/// `CAIRN_TEST_POOLER` names a transaction pooler in front of the shared
/// server (`scripts/with-pgbouncer.sh`), through it, with `url` as the direct
/// URL the listener and migrations need. Other users and private clusters
/// stay direct (the pooler knows only `postgres` on port 5432).
pub fn builder(url: &str) -> cairn::AppBuilder {
    let shared = url.starts_with("postgres://postgres@127.0.0.1:5432/");
    match std::env::var("CAIRN_TEST_POOLER") {
        Ok(pooler) if shared => {
            let database = url.rsplit('/').next().unwrap_or("postgres");
            App::builder()
                .database_url(format!("{pooler}/{database}"))
                .transaction_pooler(url)
        }
        _ => App::builder().database_url(url),
    }
}

/// A pool for a test's own statements beside `app`'s: `app.pool()` itself,
/// or, when that goes through the test pooler, the same database reached
/// directly (sqlx keeps named statements, which need a session; cairn's own
/// calls behind a pooler are sent unnamed, user code must do the same).
pub fn direct_pool(app: &App) -> PgPool {
    let options = app.pool().connect_options();
    let pooler_port = std::env::var("CAIRN_TEST_POOLER")
        .ok()
        .and_then(|u| u.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()));
    if pooler_port != Some(options.get_port()) {
        return app.pool().clone();
    }
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy_with((*options).clone().port(5432))
}

/// An App with its own pool on the test database, schema initialized.
pub async fn app(pool: &PgPool) -> App {
    let app = builder(&url_of(pool))
        .max_connections(12)
        .build()
        .await
        .expect("connect");
    app.initialize().await.expect("initialize");
    app
}

/// A child process that is killed when dropped, so a failing test leaves no
/// worker behind.
pub struct ChildGuard(pub Child);

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts this test binary again as a child process running the `#[ignore]`d
/// test `entry`, with `CAIRN_CHILD=<mode>` and `CAIRN_URL=<url>`.
pub fn spawn_child(entry: &str, mode: &str, url: &str, env: &[(&str, String)]) -> ChildGuard {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args([
        "--ignored",
        "--exact",
        entry,
        "--nocapture",
        "--test-threads=1",
    ])
    .env("CAIRN_CHILD", mode)
    .env("CAIRN_URL", url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildGuard(cmd.spawn().expect("spawn child"))
}

/// The child mode this process was started in, if any.
pub fn child_mode() -> Option<(String, String)> {
    Some((
        std::env::var("CAIRN_CHILD").ok()?,
        std::env::var("CAIRN_URL").ok()?,
    ))
}

/// Polls `probe` until it returns true, panicking after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !probe().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn scalar_i64(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// A mail job: the task `mail` on queue `mail`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Mail {
    pub to: String,
}
impl cairn::Task for Mail {
    const QUEUE: &'static str = "mail";
    type Output = ();
}

/// Registers the `mail` task: it succeeds, or fails for good (a dead
/// letter at once) when the address is empty.
pub fn mail_task(app: &App) {
    app.task(|m: Mail, _ctx| async move {
        if m.to.is_empty() {
            Err(cairn::HandlerError::fatal("no address"))
        } else {
            Ok(())
        }
    })
    .unwrap();
}

pub mod bouncer;
pub mod cluster;

/// Runs the `cairn` CLI on the test database: (exit code, stdout, stderr).
pub fn cli(pool: &PgPool, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env("DATABASE_URL", url_of(pool))
        .env("RUST_LOG", "off")
        .output()
        .expect("run the cairn CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a statement that must fail; returns (SQLSTATE, message).
pub async fn refused(pool: &PgPool, sql: &str) -> (String, String) {
    let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .expect_err(sql);
    let code = sqlstate(&err).unwrap_or_default();
    (code, err.as_database_error().unwrap().message().to_owned())
}

/// The SQLSTATE of a database error.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
}

/// A login role in `group` (`cairn_producer`, `cairn_worker`, …) for this
/// test, with a pool connected as it; drop it with [`Login::drop`]. Roles are
/// cluster-wide: the name carries the process id and a tag.
pub struct Login {
    pub name: String,
    pub pool: PgPool,
}

impl Login {
    pub async fn create(admin: &PgPool, group: &str, tag: &str) -> Login {
        let name = format!("cairn_test_{tag}_{}", std::process::id());
        for sql in [
            format!("drop role if exists {name}"),
            format!("create role {name} login in role {group}"),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(admin)
                .await
                .unwrap();
        }
        let url = url_of(admin).replacen("postgres://postgres@", &format!("postgres://{name}@"), 1);
        let pool = PgPool::connect(&url).await.unwrap();
        Login { name, pool }
    }

    pub async fn drop(self, admin: &PgPool) {
        self.pool.close().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("drop role {}", self.name)))
            .execute(admin)
            .await
            .unwrap();
    }
}

/// Sends this connection's statistics and drops its cached snapshot of
/// them, so the next read of `pg_stat_*` counts everything done so far.
pub async fn fresh_stats(conn: &mut sqlx::PgConnection) {
    sqlx::raw_sql("select pg_stat_force_next_flush(); select pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Rows of the cairn tables `tables` read so far (by sequential and index
/// scans), as seen from this connection.
pub async fn rows_read(conn: &mut sqlx::PgConnection, tables: &[&str]) -> i64 {
    fresh_stats(conn).await;
    sqlx::query_scalar(
        "select sum(seq_tup_read + coalesce(idx_tup_fetch, 0))::bigint
           from pg_stat_user_tables where schemaname = 'cairn' and relname = any ($1)",
    )
    .bind(tables)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// A connection whose plans for `call` were made while the tables `vacuum`
/// names were empty and known to be: `vacuum` (a VACUUM ANALYZE of them)
/// first, then `call` six times (PL/pgSQL keeps a generic plan from the
/// sixth call on, and with it what the statistics said then).
pub async fn planned_on_empty(
    pool: &PgPool,
    vacuum: &'static str,
    call: &'static str,
) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    sqlx::query(vacuum).execute(pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for _ in 0..6 {
        sqlx::query(call).execute(&mut *conn).await.unwrap();
    }
    conn
}

/// Runs `sql` on a connection of its own and sends that connection's
/// statistics, so what it read cannot land inside a later count.
pub async fn written_apart(pool: &PgPool, sql: &'static str) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query(sql).execute(&mut *conn).await.unwrap();
    fresh_stats(&mut conn).await;
}

/// Writes a history from a connection of its own: `runs` completed root
/// runs of three completed steps each, finished `days_ago`. Its statistics
/// are sent before it returns, so they cannot land inside a later count.
pub async fn finished_history(pool: &PgPool, runs: i32, days_ago: f64) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query(
        "with r as (
             insert into cairn.runs (workflow, queue_id, input, status, created_at, updated_at,
                                     finished_at)
             select 'old', 1, to_jsonb(g), 'completed', now(), now(),
                    now() - make_interval(secs => $2 * 86400)
               from generate_series(1, $1) g
             returning id)
         insert into cairn.steps (run_id, key, seq, kind, status, output, attempts, started_at,
                                  finished_at)
         select r.id, s.key, s.seq, 'step', 'completed', '1', 1, now(), now()
           from r, unnest('{one,two,three}'::text[]) with ordinality as s(key, seq)",
    )
    .bind(runs)
    .bind(days_ago)
    .execute(&mut *conn)
    .await
    .unwrap();
    fresh_stats(&mut conn).await;
}
