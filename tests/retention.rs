//! Retention: finished runs (with their children, steps, history and
//! signals) and archived jobs are deleted once past their window, in
//! batches, one prune at a time, by the workers on their own; nothing live
//! and nothing younger is touched.

mod common;

use std::time::Duration;

use cairn::{App, Error, HandlerError, Retention, WorkflowContext};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const DAY: f64 = 86_400.0;

async fn advance_clock(pool: &PgPool, seconds: f64) {
    sqlx::query("select cairn.advance_test_clock($1)")
        .bind(seconds)
        .execute(pool)
        .await
        .unwrap();
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    common::scalar_i64(pool, sql).await
}

/// Rows in every table a run writes, as (runs, steps, events, signals).
async fn run_rows(pool: &PgPool) -> (i64, i64, i64, i64) {
    (
        count(pool, "select count(*) from cairn.runs").await,
        count(pool, "select count(*) from cairn.steps").await,
        count(pool, "select count(*) from cairn.run_events").await,
        count(pool, "select count(*) from cairn.signals").await,
    )
}

/// Prunes until a call finds less than a full batch: (runs, archived jobs).
async fn prune_all(app: &App) -> (u64, u64) {
    let (mut runs, mut archived) = (0, 0);
    loop {
        let p = app.prune().await.unwrap();
        runs += p.runs;
        archived += p.archived;
        if p.runs < 500 && p.archived < 500 {
            return (runs, archived);
        }
    }
}

fn register(app: &App) {
    app.workflow("parent", |ctx: WorkflowContext, n: i64| async move {
        let doubled: i64 = ctx.step("double", n, |n| async move { Ok(n * 2) }).await?;
        let kid: i64 = ctx.child("kid", &doubled).await?;
        Ok(kid)
    })
    .unwrap();
    app.workflow("kid", |ctx: WorkflowContext, n: i64| async move {
        let n: i64 = ctx.step("inc", n, |n| async move { Ok(n + 1) }).await?;
        Ok(n)
    })
    .unwrap();
    app.workflow("doomed", |ctx: WorkflowContext, n: i64| async move {
        let _: i64 = ctx
            .step("boom", n, |_| async move {
                Err::<i64, _>(HandlerError::fatal("no"))
            })
            .await?;
        Ok(n)
    })
    .unwrap();
    app.workflow("patient", |ctx: WorkflowContext, _n: i64| async move {
        let got: Option<i64> = ctx.wait_for_signal("go", None).await?;
        Ok(got.unwrap_or(0))
    })
    .unwrap();
}

fn worker(
    app: &App,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<cairn::Result<cairn::WorkerStats>> {
    tokio::spawn(
        app.worker()
            .queues(["workflows"])
            .poll_interval(Duration::from_millis(50))
            .prune_interval(None)
            .run_until(stop.clone().cancelled_owned()),
    )
}

/// Completed runs go after 7 days with their children and everything they
/// wrote; failed runs and dead letters stay until 30; a waiting run and a
/// younger run stay; the archive follows the same windows.
#[sqlx::test(migrations = false)]
async fn finished_work_goes_when_its_window_passes_and_nothing_else_does(pool: PgPool) {
    let app = common::app(&pool).await;
    register(&app);
    app.register_workflows().await.unwrap();
    assert_eq!(app.retention().await.unwrap(), Retention::default());

    let stop = CancellationToken::new();
    let w = worker(&app, &stop);
    let mut done = Vec::new();
    for n in 0..20 {
        let run = app
            .start("parent", &n)
            .idempotency_key(&format!("p{n}"))
            .await
            .unwrap();
        done.push(run);
    }
    let mut failed = Vec::new();
    for n in 0..3 {
        failed.push(app.start("doomed", &n).await.unwrap());
    }
    let patient = app.start("patient", &0).await.unwrap();
    for &run in &done {
        assert_eq!(app.result::<i64>(run).await.unwrap() % 2, 1);
    }
    for &run in &failed {
        assert!(matches!(
            app.result::<i64>(run).await,
            Err(Error::RunFailed { .. })
        ));
    }
    // A signal kept by a completed run, so its signals are pruned too.
    sqlx::query("insert into cairn.signals (run_id, name, payload, sent_at) values ($1, 'late', 'null', now())")
        .bind(done[0])
        .execute(&pool)
        .await
        .unwrap();
    // The archive: two completed jobs and one dead letter.
    app.create_queue("q").await.unwrap();
    sqlx::raw_sql(
        "select cairn.send_batch('q', array['{}', '{}', '{}']::jsonb[]);
         with c as (select id, lease from cairn.claim('q', 30, 3) order by id)
         select cairn.archive((array_agg(id))[1:2], (array_agg(lease))[1:2]),
                cairn.fail((array_agg(id))[3], (array_agg(lease))[3], 'bad') from c",
    )
    .execute(&pool)
    .await
    .unwrap();
    stop.cancel();
    w.await.unwrap().unwrap();

    let before = run_rows(&pool).await;
    assert_eq!(before.0, 20 * 2 + 3 + 1, "parents, kids, failed, waiting");
    assert_eq!(
        count(&pool, "select count(*) from cairn.archive").await,
        3 + 3,
        "two completed, one dead letter, three failed runs' jobs"
    );

    // Six days on: nothing is old enough.
    advance_clock(&pool, 6.0 * DAY).await;
    assert_eq!(prune_all(&app).await, (0, 0));
    assert_eq!(run_rows(&pool).await, before);

    // Eight days: the completed families and completed jobs go.
    advance_clock(&pool, 2.0 * DAY).await;
    assert_eq!(prune_all(&app).await, (40, 2));
    let left: Vec<String> = sqlx::query_scalar("select workflow from cairn.runs order by workflow")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, ["doomed", "doomed", "doomed", "patient"]);
    for (table, sql) in [
        (
            "steps",
            "select count(*) from cairn.steps s where not exists (select from cairn.runs r where r.id = s.run_id)",
        ),
        (
            "history",
            "select count(*) from cairn.run_events e where not exists (select from cairn.runs r where r.id = e.run_id)",
        ),
        (
            "signals",
            "select count(*) from cairn.signals g where not exists (select from cairn.runs r where r.id = g.run_id)",
        ),
    ] {
        assert_eq!(
            count(&pool, sql).await,
            0,
            "{table} of pruned runs left behind"
        );
    }
    assert!(
        count(&pool, "select count(*) from cairn.steps").await >= 3,
        "the failed runs keep their steps"
    );
    assert_eq!(
        count(
            &pool,
            "select count(*) from cairn.archive where outcome = 'dead'"
        )
        .await,
        4
    );
    // The key names no run any more: the same start makes a new run.
    let again = app.start("parent", &0).idempotency_key("p0").await.unwrap();
    assert_ne!(again, done[0]);
    app.cancel_run(again).await.unwrap();

    // Thirty-one days: failed runs, dead letters and the run cancelled 23
    // days ago go; the waiting run stays, however old.
    advance_clock(&pool, 23.0 * DAY).await;
    assert_eq!(prune_all(&app).await, (3 + 1, 4));
    let left: Vec<cairn::Uuid> = sqlx::query_scalar("select id from cairn.runs")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, [patient]);
    assert_eq!(count(&pool, "select count(*) from cairn.archive").await, 0);

    // Keep for ever: nothing more goes, however old.
    app.set_retention(Retention {
        completed: None,
        failed: None,
    })
    .await
    .unwrap();
    advance_clock(&pool, 3650.0 * DAY).await;
    assert_eq!(prune_all(&app).await, (0, 0));
    assert_eq!(count(&pool, "select count(*) from cairn.runs").await, 1);
}

/// Inserts `n` completed root runs that finished `age_days` ago.
async fn finished_runs(pool: &PgPool, n: i32, age_days: f64) {
    sqlx::query(
        "insert into cairn.runs (workflow, queue_id, input, status, created_at, updated_at, finished_at)
         select 'w', 1, to_jsonb(g), 'completed', now(), now(), now() - make_interval(secs => $2)
           from generate_series(1, $1) g",
    )
    .bind(n)
    .bind(age_days * DAY)
    .execute(pool)
    .await
    .unwrap();
}

/// A long backlog goes in batches of 500; while one prune runs, another
/// returns at once with nothing; a family with a live child waits for it.
#[sqlx::test(migrations = false)]
async fn prune_is_batched_single_and_waits_for_live_children(pool: PgPool) {
    let app = common::app(&pool).await;
    finished_runs(&pool, 1_200, 8.0).await;
    finished_runs(&pool, 50, 1.0).await;

    // Another prune under way: this one does nothing and does not wait.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select from cairn.retention for update")
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(app.prune().await.unwrap(), cairn::Pruned::default());
    assert!(started.elapsed() < Duration::from_secs(5));
    holder.rollback().await.unwrap();

    let mut batches = Vec::new();
    loop {
        let p = app.prune().await.unwrap();
        batches.push(p.runs);
        if p.runs < 500 {
            break;
        }
    }
    assert_eq!(batches, [500, 500, 200]);
    assert_eq!(count(&pool, "select count(*) from cairn.runs").await, 50);

    // A finished root whose child still runs is kept, whole, until the
    // child ends.
    sqlx::query("delete from cairn.runs")
        .execute(&pool)
        .await
        .unwrap();
    finished_runs(&pool, 1, 8.0).await;
    sqlx::query(
        "insert into cairn.runs (workflow, queue_id, input, status, created_at, updated_at, parent_run, parent_step)
         select 'w', 1, 'null', 'running', now(), now(), id, 'child:w' from cairn.runs",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(app.prune().await.unwrap().runs, 0);
    assert_eq!(count(&pool, "select count(*) from cairn.runs").await, 2);
    sqlx::query(
        "update cairn.runs set status = 'completed', finished_at = now() where status = 'running'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(app.prune().await.unwrap().runs, 2);
    assert_eq!(count(&pool, "select count(*) from cairn.runs").await, 0);
}

/// A worker's prune keeps the plans it made on its first calls, often on
/// an empty database. Planned so, each batch read every step ever recorded
/// (a sequential scan). A batch of 500 runs after 20,000 runs of three
/// steps finished must read a bounded number of rows per run it prunes.
#[sqlx::test(migrations = false)]
async fn prune_work_per_run_does_not_grow_with_the_history(pool: PgPool) {
    common::app(&pool).await;
    let mut conn = common::planned_on_empty(
        &pool,
        "vacuum analyze cairn.runs, cairn.steps, cairn.run_events, cairn.signals",
        "select * from cairn.prune()",
    )
    .await;
    // The history, from another connection: 20,000 runs of three steps
    // that finished 8 days ago.
    common::finished_history(&pool, 20_000, 8.0).await;
    let tables = ["runs", "steps", "run_events", "signals"];
    let before = common::rows_read(&mut conn, &tables).await;
    let (runs, _): (i32, i32) = sqlx::query_as("select * from cairn.prune()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(runs, 500);
    let per_run = (common::rows_read(&mut conn, &tables).await - before) / 500;
    assert_eq!(
        count(&pool, "select count(*) from cairn.steps").await,
        58_500
    );
    // A handful with good plans; a sequential scan of the steps alone
    // reads 120 per run.
    assert!(per_run < 30, "{per_run} rows read per run pruned");
}

/// Workers prune on their own, whichever of them gets there first.
#[sqlx::test(migrations = false)]
async fn workers_prune_in_the_background(pool: PgPool) {
    let app = common::app(&pool).await;
    app.task(|_: Noop, _ctx| async move { Ok(()) }).unwrap();
    finished_runs(&pool, 1_700, 8.0).await;
    let stop = CancellationToken::new();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(
                app.worker()
                    .queues(["noop"])
                    .prune_interval(Duration::from_millis(200))
                    .run_until(stop.clone().cancelled_owned()),
            )
        })
        .collect();
    common::wait_for("the workers to prune", Duration::from_secs(20), || async {
        count(&pool, "select count(*) from cairn.runs").await == 0
    })
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    assert!(
        count(
            &pool,
            "select count(*) from cairn.retention where pruned_at is not null"
        )
        .await
            == 1
    );
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Noop;
impl cairn::Task for Noop {
    const QUEUE: &'static str = "noop";
    type Output = ();
}

/// Bad windows and batches are refused with their SQLSTATE, and change
/// nothing; a worker may prune but not change the windows.
#[sqlx::test(migrations = false)]
async fn bad_retention_is_refused_and_only_admins_set_it(pool: PgPool) {
    let app = common::app(&pool).await;
    for (sql, code) in [
        ("select cairn.set_retention('-1 day', '30 days')", "22023"),
        ("select cairn.set_retention('7 days', '-1 second')", "22023"),
        ("select cairn.prune(0)", "22023"),
        ("select cairn.prune(10001)", "22023"),
        ("select cairn.prune(null)", "22023"),
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some(code),
            "{sql}: {err}"
        );
    }
    assert_eq!(app.retention().await.unwrap(), Retention::default());

    let worker = common::Login::create(&pool, "cairn_worker", "pruner").await;
    let pruned = sqlx::query("select * from cairn.prune()")
        .execute(&worker.pool)
        .await;
    let set = sqlx::query("select cairn.set_retention(null, null)")
        .execute(&worker.pool)
        .await;
    worker.drop(&pool).await;
    assert!(pruned.is_ok(), "{pruned:?}");
    assert_eq!(
        common::sqlstate(&set.unwrap_err()).as_deref(),
        Some("42501")
    );
    assert_eq!(app.retention().await.unwrap(), Retention::default());
}
