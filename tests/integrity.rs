//! The engine's promises under adversarial use: a replay returns the right
//! output or fails loudly, the history tells the truth, only the engine
//! moves a run, nothing is stuck for ever, no deadlock, no step after a
//! cancel, durability is never lowered, and inputs are checked where they
//! enter. Each test names the item of the integrity review it covers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cairn::{
    App, Backoff, Error, HandlerError, OnConflict, RetryPolicy, RunEvent, RunStatus,
    WorkflowContext,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

struct Worker {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<cairn::Result<cairn::WorkerStats>>,
}

impl Worker {
    fn start(app: &App, queues: &[&str]) -> Self {
        Self::start_with(app.worker().queues(queues.iter().copied()))
    }

    fn start_with(builder: cairn::WorkerBuilder) -> Self {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(
            builder
                .poll_interval(Duration::from_millis(50))
                .run_until(stop.clone().cancelled_owned()),
        );
        Self { stop, handle }
    }

    async fn stop(self) -> cairn::WorkerStats {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn advance_clock(pool: &PgPool, seconds: f64) {
    sqlx::query("select cairn.advance_test_clock($1)")
        .bind(seconds)
        .execute(pool)
        .await
        .unwrap();
}

async fn status(app: &App, run: cairn::Uuid) -> RunStatus {
    app.run_status(run).await.unwrap().status
}

async fn wait_status(app: &App, run: cairn::Uuid, want: RunStatus) {
    common::wait_for(
        &format!("run {run} to be {want}"),
        Duration::from_secs(30),
        || async { status(app, run).await == want },
    )
    .await;
}

// ---- A1: a replay returns the right output, or fails loudly --------------

/// How many times the "spawned" workflow has been executed in this process.
static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

#[sqlx::test(migrations = false)]
async fn steps_reached_in_another_order_on_replay_fail_loudly(pool: PgPool) {
    let app = common::app(&pool).await;
    // Eight steps of one name, each reached after a non-durable await whose
    // length depends on the execution: the keys go to other inputs on replay.
    app.workflow("spawned", |ctx: WorkflowContext, _: ()| async move {
        let execution = EXECUTIONS.fetch_add(1, Ordering::SeqCst);
        let mut set = tokio::task::JoinSet::new();
        for item in 0..8_u64 {
            let ctx = ctx.clone();
            set.spawn(async move {
                let wait = if execution == 0 { item } else { 8 - item };
                tokio::time::sleep(Duration::from_millis(15 * wait)).await;
                ctx.step("item", item, |i| async move { Ok(i * 10) }).await
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap()?);
        }
        ctx.sleep(Duration::from_secs(60)).await;
        Ok(out)
    })
    .unwrap();
    let worker = Worker::start(&app, &["workflows"]);
    let run = app.start("spawned", &()).await.unwrap();
    wait_status(&app, run, RunStatus::Sleeping).await;
    advance_clock(&pool, 61.0).await;
    let err = app.result::<Vec<u64>>(run).await.unwrap_err();
    worker.stop().await;
    let Error::RunFailed { error, .. } = err else {
        panic!("{err}")
    };
    assert!(error.contains("non-determinism"), "{error}");
    assert!(error.contains("step item#"), "names the key: {error}");
    assert!(
        error.contains("another input"),
        "says what differed: {error}"
    );
}

#[sqlx::test(migrations = false)]
async fn join_all_fans_out_over_a_thousand_items_across_forced_replays(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(
        &pool,
        "create table squared (item int, attempt int, ok boolean)",
    )
    .await;
    let db = pool.clone();
    app.workflow("fan_out", move |ctx: WorkflowContext, n: i64| {
        let db = db.clone();
        async move {
            let squares: Vec<i64> = ctx
                .join_all((0..n).map(|item| {
                    let db = db.clone();
                    ctx.step("square", item, move |i| async move {
                        // Every 50th item fails twice: each failure parks the
                        // run for its backoff, and the run replays.
                        let flaky = i % 50 == 7;
                        let ok: bool = sqlx::query_scalar(
                            "with t as (select count(*) + 1 as n from squared where item = $1)
                             insert into squared select $1, t.n, not ($2 and t.n < 3) from t
                             returning ok",
                        )
                        .bind(i as i32)
                        .bind(flaky)
                        .fetch_one(&db)
                        .await?;
                        if ok {
                            Ok(i * i)
                        } else {
                            Err(HandlerError::retryable("not yet"))
                        }
                    })
                    .retry(
                        RetryPolicy::default()
                            .backoff(Backoff::Fixed(Duration::from_millis(100)))
                            .jitter(0.0),
                    )
                }))
                .await?;
            Ok(squares)
        }
    })
    .unwrap();
    let worker = Worker::start(&app, &["workflows"]);
    let run = app.start("fan_out", &1000_i64).await.unwrap();
    let squares: Vec<i64> = app.result(run).await.unwrap();
    worker.stop().await;
    assert_eq!(squares, (0..1000).map(|i| i * i).collect::<Vec<_>>());
    // Each item succeeded exactly once; the failing ones ran three times.
    let (succeeded, items, runs): (i64, i64, i64) = sqlx::query_as(
        "select count(*) filter (where ok), count(distinct item), count(*) from squared",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((succeeded, items, runs), (1000, 1000, 1000 + 20 * 2));
    let resumed: i64 =
        sqlx::query_scalar("select count(*) from cairn.run_history($1) where event = 'resumed'")
            .bind(run)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(resumed >= 2, "the run was replayed ({resumed} times)");
}

// ---- A2: the history tells the truth --------------------------------------

#[sqlx::test(migrations = false)]
async fn the_history_keeps_every_attempt_and_survives_a_retry(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(
        &pool,
        "create table switch (healed boolean); insert into switch values (false)",
    )
    .await;
    let db = pool.clone();
    app.workflow("flaky", move |ctx: WorkflowContext, _: ()| {
        let db = db.clone();
        async move {
            ctx.step("slow", (), |_| async {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                Ok(())
            })
            .await?;
            let d = db.clone();
            ctx.step("call", (), move |_| async move {
                let healed: bool = sqlx::query_scalar("select healed from switch")
                    .fetch_one(&d)
                    .await?;
                if healed {
                    Ok(())
                } else {
                    Err(HandlerError::retryable("service down"))
                }
            })
            .retry(
                RetryPolicy::default()
                    .max_attempts(2)
                    .backoff(Backoff::Fixed(Duration::from_millis(50)))
                    .jitter(0.0),
            )
            .await?;
            Ok(())
        }
    })
    .unwrap();
    let worker = Worker::start(&app, &["workflows"]);
    let run = app.start("flaky", &()).await.unwrap();
    assert!(matches!(
        app.result::<()>(run).await,
        Err(Error::RunFailed { .. })
    ));
    exec(&pool, "update switch set healed = true").await;
    assert!(app.retry_run(run).await.unwrap());
    app.result::<()>(run).await.unwrap();
    worker.stop().await;

    // A 1 s step shows its duration.
    let slow: f64 = sqlx::query_scalar(
        "select extract(epoch from finished_at - started_at)::float8 from cairn.run_steps($1)
          where key = 'slow#1'",
    )
    .bind(run)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(slow >= 1.0, "the step's real duration: {slow}");

    let history = app.run_history(run).await.unwrap();
    type Line = (String, Option<String>, Option<i32>, Option<String>);
    let line = |e: &RunEvent| -> Line {
        (
            e.event.clone(),
            e.step.clone(),
            e.attempt,
            e.outcome.clone(),
        )
    };
    let story: Vec<Line> = history.iter().map(line).collect();
    let call = |attempt, outcome: &str| {
        (
            "attempt".to_owned(),
            Some("call#1".to_owned()),
            Some(attempt),
            Some(outcome.to_owned()),
        )
    };
    let event = |name: &str| (name.to_owned(), None, None, None);
    let expected = [
        event("created"),
        event("started"),
        (
            "attempt".to_owned(),
            Some("slow#1".to_owned()),
            Some(1),
            Some("completed".to_owned()),
        ),
        call(1, "retrying"),
        event("suspended"),
        event("resumed"),
        call(2, "failed"),
        event("failed"),
        event("retried"),
        call(1, "completed"),
        event("completed"),
    ];
    assert_eq!(story, expected, "{history:#?}");
    let failures: Vec<&str> = history.iter().filter_map(|e| e.error.as_deref()).collect();
    assert!(
        failures
            .iter()
            .any(|e| e.contains("service down (attempt 2 of 2, giving up)")),
        "{failures:?}"
    );
    // Every attempt has its start and end.
    assert!(
        history
            .iter()
            .filter(|e| e.event == "attempt")
            .all(|e| e.ended_at.is_some_and(|end| end >= e.at))
    );
}

// ---- B3, B4: only the engine moves a run ---------------------------------

fn register_sleeper(app: &App, pool: &PgPool) {
    let db = pool.clone();
    app.workflow("sleeper", move |ctx: WorkflowContext, _: ()| {
        let db = db.clone();
        async move {
            let d = db.clone();
            ctx.step("before", (), move |_| async move {
                sqlx::query("insert into effects values ('before')")
                    .execute(&d)
                    .await?;
                Ok(())
            })
            .await?;
            ctx.sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    })
    .unwrap();
    app.workflow(
        "other",
        |_ctx: WorkflowContext, _: ()| async move { Ok(()) },
    )
    .unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_producer_cannot_forge_a_runs_job(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(&pool, "create table effects (what text)").await;
    register_sleeper(&app, &pool);
    app.register_workflows().await.unwrap();
    let run = app.start("sleeper", &()).await.unwrap();
    let worker = Worker::start(&app, &["workflows"]);
    wait_status(&app, run, RunStatus::Sleeping).await;

    // The producer's way in is closed: a workflow's name is refused as a task.
    for task in ["sleeper", "other"] {
        let err = sqlx::query(
            "select cairn.send('workflows', jsonb_build_object('run_id', $1::uuid), task => $2)",
        )
        .bind(run)
        .bind(task)
        .execute(&pool)
        .await
        .unwrap_err();
        assert_eq!(common::sqlstate(&err).as_deref(), Some("22023"), "{err}");
        assert!(err.to_string().contains("is a workflow"), "{err}");
    }
    // Jobs written behind the API's back (by the table owner, say), naming
    // the run under its own workflow and under another, are dead-lettered
    // by the worker and move nothing.
    exec(
        &pool,
        &format!(
            "insert into cairn.jobs (queue_id, task, payload, visible_at, enqueued_at)
             select q.id, t, jsonb_build_object('run_id', '{run}'::uuid), now(), now()
               from cairn.queues q, unnest(array['sleeper', 'other']) t where q.name = 'workflows';
             select pg_notify('cairn', 'workflows');"
        ),
    )
    .await;
    common::wait_for("both forged jobs dead", Duration::from_secs(10), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.archive where outcome = 'dead' and last_error like '%drives no run%'",
        )
        .await
            == 2
    })
    .await;
    worker.stop().await;
    assert_eq!(
        status(&app, run).await,
        RunStatus::Sleeping,
        "the sleep was not skipped"
    );
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from effects").await,
        1
    );
}

#[sqlx::test(migrations = false)]
async fn worker_calls_are_fenced_on_the_runs_own_job(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(&pool, "create table effects (what text)").await;
    register_sleeper(&app, &pool);
    app.register_workflows().await.unwrap();
    app.create_queue("plain").await.unwrap();
    let run = app.start("sleeper", &()).await.unwrap();
    // Any job's lease: a plain job claimed by hand.
    exec(&pool, "select cairn.send('plain', '{}')").await;
    let (job, lease): (i64, i64) =
        sqlx::query_as("select id, lease from cairn.claim('plain', 30, 1)")
            .fetch_one(&pool)
            .await
            .unwrap();
    for (call, what) in [
        (
            "select cairn.fail_run($1, $2, $3, '[]', 'forged')::text",
            "fail_run",
        ),
        (
            "select cairn.complete_run($1, $2, $3, '[]', '1')::text",
            "complete_run",
        ),
        (
            "select cairn.suspend_run($1, $2, $3, '[]', null, 0, 'sleeping')::text",
            "suspend_run",
        ),
        (
            "select count(*)::text from cairn.load_run($1, $2, $3)",
            "load_run",
        ),
        (
            "select count(*)::text from cairn.begin_step($1, $2, $3, '[]', 'x#1', 0, null, '1')",
            "begin_step",
        ),
        (
            "select cairn.record_steps($1, $2, $3, '[]')::text",
            "record_steps",
        ),
        (
            "select count(*)::text from cairn.load_runs(array[$1], array[$2], array[$3])",
            "load_runs",
        ),
        (
            "select count(*)::text from cairn.begin_steps(array[$1], array[$2], array[$3],
                                                          array['[]']::jsonb[], '{x#1}', '{0}',
                                                          '{null}', array['1']::jsonb[])",
            "begin_steps",
        ),
        (
            "select count(*)::text from cairn.complete_runs(array[$1], array[$2], array[$3],
                                                            array['[]']::jsonb[], array['1']::jsonb[])",
            "complete_runs",
        ),
    ] {
        let out: Option<String> = sqlx::query_scalar(call)
            .bind(run)
            .bind(job)
            .bind(lease)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(
            matches!(out.as_deref(), None | Some("false") | Some("0") | Some("1")),
            "{what}: {out:?}"
        );
    }
    // load_run with a job that is not the run's dead-letters that job.
    let refused: i64 = common::scalar_i64(
        &pool,
        "select count(*) from cairn.archive where outcome = 'dead' and last_error like '%is not the job of run%'",
    )
    .await;
    assert_eq!(refused, 1);
    let info = app.run_status(run).await.unwrap();
    assert_eq!(info.status, RunStatus::Pending, "the run is untouched");
    assert_eq!(info.error, None);
}

// ---- B5, B6: nothing stays active for ever; requeue revives --------------

#[sqlx::test(migrations = false)]
async fn a_run_whose_job_is_lost_every_time_fails_and_can_be_retried(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(&pool, "create table effects (what text)").await;
    register_sleeper(&app, &pool);
    app.register_workflows().await.unwrap();
    let run = app.start("sleeper", &()).await.unwrap();
    // Ten deliveries whose workers all died (the lease runs out each time).
    for _ in 0..10 {
        exec(
            &pool,
            "select * from cairn.claim('workflows', 0.001, 1); select pg_sleep(0.01)",
        )
        .await;
    }
    let worker = Worker::start(&app, &["workflows"]);
    let err = app.result::<()>(run).await.unwrap_err();
    let Error::RunFailed { error, .. } = &err else {
        panic!("{err}")
    };
    assert!(error.contains("10 deliveries without a result"), "{error}");
    // retry_run revives it, and so does requeue of its dead job.
    assert!(app.retry_run(run).await.unwrap());
    wait_status(&app, run, RunStatus::Sleeping).await;
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_runs_job_removed_by_an_operator_fails_the_run_and_wakes_its_parent(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(&pool, "create table effects (what text)").await;
    register_sleeper(&app, &pool);
    app.workflow("parent", |ctx: WorkflowContext, _: ()| async move {
        match ctx.child::<_, ()>("sleeper", &()).await {
            Ok(()) => Ok("child done".to_owned()),
            Err(e) => Ok(format!("child failed: {e}")),
        }
    })
    .unwrap();
    app.create_queue("parked").await.unwrap();
    app.register_workflows().await.unwrap();
    let worker = Worker::start(&app, &["workflows"]);

    // delete: the run fails, saying why.
    let run = app.start("sleeper", &()).await.unwrap();
    wait_status(&app, run, RunStatus::Sleeping).await;
    let job: i64 = sqlx::query_scalar("select job_id from cairn.runs where id = $1")
        .bind(run)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(app.delete_job("workflows", job).await.unwrap());
    let err = app.result::<()>(run).await.unwrap_err();
    assert!(err.to_string().contains("deleted by an operator"), "{err}");

    // purge: a parent waiting on a child whose job is purged is woken.
    let parent = app.start("parent", &()).await.unwrap();
    common::wait_for("the child to sleep", Duration::from_secs(10), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.runs where workflow = 'sleeper' and status = 'sleeping' and parent_run is not null",
        )
        .await
            == 1
    })
    .await;
    worker.stop().await;
    let purged = app.purge_queue("workflows").await.unwrap();
    assert!(purged >= 2, "the child's and the parent's jobs: {purged}");
    let active = common::scalar_i64(
        &pool,
        "select count(*) from cairn.runs where status not in ('completed', 'failed', 'cancelled')",
    )
    .await;
    assert_eq!(active, 0, "no run is left waiting for a job that is gone");
    let child_error: String =
        sqlx::query_scalar("select error from cairn.runs where parent_run = $1")
            .bind(parent)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(child_error.contains("purged"), "{child_error}");
    // The parent's step learned why its child failed.
    let step_error: String =
        sqlx::query_scalar("select error from cairn.steps where run_id = $1 and kind = 'child'")
            .bind(parent)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(step_error.contains("purged"), "{step_error}");
    // Retrying the parent runs its failed step again: a new child.
    assert!(app.retry_run(parent).await.unwrap());
    let worker = Worker::start(&app, &["workflows"]);
    common::wait_for("a new child", Duration::from_secs(10), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.runs where workflow = 'sleeper' and parent_run is not null",
        )
        .await
            == 2
    })
    .await;
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn requeue_of_a_failed_runs_dead_job_revives_the_run(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(
        &pool,
        "create table switch (healed boolean); insert into switch values (false)",
    )
    .await;
    let db = pool.clone();
    app.workflow("gated", move |ctx: WorkflowContext, _: ()| {
        let db = db.clone();
        async move {
            let d = db.clone();
            let n: i32 = ctx
                .step("check", (), move |_| async move {
                    let healed: bool = sqlx::query_scalar("select healed from switch")
                        .fetch_one(&d)
                        .await?;
                    if healed {
                        Ok(7)
                    } else {
                        Err(HandlerError::fatal("not healed"))
                    }
                })
                .await?;
            Ok(n)
        }
    })
    .unwrap();
    app.task(|_: Ping, _| async { Err::<(), _>(HandlerError::fatal("no")) })
        .unwrap();
    app.workflow("uses_task", |ctx: WorkflowContext, _: ()| async move {
        ctx.task(&Ping).await?;
        Ok(())
    })
    .unwrap();
    let worker = Worker::start(&app, &["workflows", "pings"]);
    let run = app.start("gated", &()).await.unwrap();
    assert!(app.result::<i32>(run).await.is_err());
    // Heal, then requeue the run's dead job (as `cairn requeue` would): the
    // run is revived, resumes at its failed step, and completes.
    exec(&pool, "update switch set healed = true").await;
    let dead: i64 =
        sqlx::query_scalar("select id from cairn.archive where run_id = $1 and outcome = 'dead'")
            .bind(run)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(app.requeue("workflows", dead).await.unwrap());
    assert_eq!(app.result::<i32>(run).await.unwrap(), 7);
    let err = app.requeue("workflows", dead).await.unwrap();
    assert!(!err, "the dead letter is gone once revived");

    // A dead step job cannot be requeued alone.
    let with_task = app.start("uses_task", &()).await.unwrap();
    assert!(app.result::<()>(with_task).await.is_err());
    let step_job: i64 = sqlx::query_scalar(
        "select id from cairn.archive where parent_run = $1 and outcome = 'dead'",
    )
    .bind(with_task)
    .fetch_one(&pool)
    .await
    .unwrap();
    let err = app.requeue("pings", step_job).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidState(ref m) if m.contains("retry the run")),
        "{err}"
    );
    worker.stop().await;
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Ping;
impl cairn::Task for Ping {
    const QUEUE: &'static str = "pings";
    type Output = ();
}

// ---- B7: no deadlock, whatever races -------------------------------------

#[derive(serde::Serialize, serde::Deserialize)]
struct Chore {
    n: i64,
}
impl cairn::Task for Chore {
    const QUEUE: &'static str = "chores";
    type Output = i64;
}

async fn deadlocks(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select deadlocks from pg_stat_database where datname = current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn cancels_completions_failures_signals_and_children_race_without_deadlock(pool: PgPool) {
    const RUNS: i64 = 2000;
    let app = common::app(&pool).await;
    app.workflow("kid", |ctx: WorkflowContext, n: i64| async move {
        let v: i64 = ctx.step("work", n, |n| async move { Ok(n + 1) }).await?;
        if n % 11 == 0 {
            return Err(HandlerError::fatal("kid gave up"));
        }
        Ok(v)
    })
    .unwrap();
    app.workflow("racer", |ctx: WorkflowContext, n: i64| async move {
        let a: i64 = ctx.step("a", n, |n| async move { Ok(n * 2) }).await?;
        // Signals may arrive before, during or after the wait.
        let go: Option<i64> = ctx
            .wait_for_signal("go", Some(Duration::from_secs(60)))
            .await?;
        let (kid, chore) = tokio::join!(ctx.child::<_, i64>("kid", &n), ctx.task(&Chore { n }));
        let kid = kid.unwrap_or(-1);
        let chore = chore?;
        if n % 7 == 0 {
            return Err(HandlerError::fatal("racer gave up"));
        }
        Ok(a + kid + chore + go.unwrap_or(0))
    })
    .unwrap();
    app.task(|c: Chore, _| async move { Ok(c.n) }).unwrap();
    app.register_workflows().await.unwrap();
    app.create_queue("chores").await.unwrap();
    let before = deadlocks(&pool).await;

    let workers: Vec<Worker> = (0..3)
        .map(|_| {
            Worker::start_with(
                app.worker()
                    .queues(["workflows", "chores"])
                    .concurrency(24)
                    .lease(Duration::from_secs(5)),
            )
        })
        .collect();
    let mut runs = Vec::new();
    for n in 0..RUNS {
        runs.push(app.start("racer", &n).await.unwrap());
    }
    // Meanwhile, from two tasks: runs are signalled (and go on to their
    // child, their step job, their end), and a third of them are cancelled —
    // waiting, or racing the signal's wake-up, their child's end and their
    // step job's end.
    let chaos = |offset: usize| {
        let app = app.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            for (i, run) in runs.iter().enumerate().skip(offset).step_by(2) {
                match i % 6 {
                    0 => {}
                    1 => {
                        let _ = app.send_signal(*run, "go", &(i as i64)).await;
                        let _ = app.cancel_run(*run).await;
                    }
                    _ => {
                        let _ = app.send_signal(*run, "go", &(i as i64)).await;
                    }
                }
                if i % 64 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            for (i, run) in runs.iter().enumerate().skip(offset).step_by(2) {
                if i % 6 == 0 || i % 6 == 3 {
                    let _ = app.cancel_run(*run).await;
                }
            }
        })
    };
    let (a, b) = tokio::join!(chaos(0), chaos(1));
    a.unwrap();
    b.unwrap();
    common::wait_for("every run to end", Duration::from_secs(240), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.runs where status not in ('completed', 'failed', 'cancelled')",
        )
        .await
            == 0
    })
    .await;
    for w in workers {
        w.stop().await;
    }
    // Backends report their counters when they exit.
    app.pool().close().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = deadlocks(&pool).await;
    let (done, failed, cancelled): (i64, i64, i64) = sqlx::query_as(
        "select count(*) filter (where status = 'completed'), count(*) filter (where status = 'failed'),
                count(*) filter (where status = 'cancelled')
           from cairn.runs where workflow = 'racer'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(done + failed + cancelled, RUNS);
    assert!(
        cancelled > 0 && failed > 0 && done > 0,
        "{done} {failed} {cancelled}"
    );
    assert_eq!(after - before, 0, "deadlocks detected");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        0,
        "no job left behind"
    );
}

// ---- B8: after cancel_run commits, no step starts ------------------------

#[sqlx::test(migrations = false)]
async fn no_step_begins_after_its_runs_cancel_commits(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(&pool, "create table began (run uuid, at timestamptz)").await;
    let db = pool.clone();
    app.workflow("stepper", move |ctx: WorkflowContext, _: ()| {
        let db = db.clone();
        async move {
            for i in 0..40 {
                let (d, run) = (db.clone(), ctx.run_id());
                ctx.step(&format!("s{i}"), i, move |_| async move {
                    // The first thing the body does: note the time.
                    let at = chrono::Utc::now();
                    sqlx::query("insert into began values ($1, $2)")
                        .bind(run)
                        .bind(at)
                        .execute(&d)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    Ok(())
                })
                .await?;
            }
            Ok(())
        }
    })
    .unwrap();
    app.register_workflows().await.unwrap();
    let worker = Worker::start_with(app.worker().queues(["workflows"]).concurrency(32));
    let mut runs = Vec::new();
    for _ in 0..150 {
        runs.push(app.start("stepper", &()).await.unwrap());
    }
    let mut cancelled_at = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(if i % 3 == 0 { 7 } else { 1 })).await;
        app.cancel_run(*run).await.unwrap();
        cancelled_at.push((*run, chrono::Utc::now()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;
    let mut late = 0;
    for (run, at) in &cancelled_at {
        late +=
            sqlx::query_scalar::<_, i64>("select count(*) from began where run = $1 and at > $2")
                .bind(run)
                .bind(at)
                .fetch_one(&pool)
                .await
                .unwrap();
    }
    let begun = common::scalar_i64(&pool, "select count(*) from began").await;
    assert!(begun > 150, "steps ran before their cancels ({begun})");
    assert_eq!(
        late, 0,
        "step bodies begun after their run's cancel committed"
    );
}

#[sqlx::test(migrations = false)]
async fn a_running_step_sees_its_runs_cancel_within_a_heartbeat(pool: PgPool) {
    let app = common::app(&pool).await;
    let stopped: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let started = Arc::new(tokio::sync::Notify::new());
    let (s, st) = (Arc::clone(&stopped), Arc::clone(&started));
    app.workflow("long", move |ctx: WorkflowContext, _: ()| {
        let (s, st) = (Arc::clone(&s), Arc::clone(&st));
        async move {
            ctx.step("forever", (), move |_| async move {
                struct Noted(Arc<std::sync::Mutex<Option<Instant>>>);
                impl Drop for Noted {
                    fn drop(&mut self) {
                        *self.0.lock().unwrap() = Some(Instant::now());
                    }
                }
                let _noted = Noted(s);
                st.notify_one();
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok(())
            })
            .await?;
            Ok(())
        }
    })
    .unwrap();
    app.register_workflows().await.unwrap();
    // A 3 s lease: the heartbeat beats every second.
    let worker = Worker::start_with(
        app.worker()
            .queues(["workflows"])
            .lease(Duration::from_secs(3)),
    );
    let run = app.start("long", &()).await.unwrap();
    started.notified().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.cancel_run(run).await.unwrap();
    let cancelled = Instant::now();
    common::wait_for("the handler to stop", Duration::from_secs(5), || async {
        stopped.lock().unwrap().is_some()
    })
    .await;
    let took = stopped.lock().unwrap().unwrap() - cancelled;
    worker.stop().await;
    assert!(
        took <= Duration::from_millis(1300),
        "stopped {took:?} after the cancel"
    );
    assert_eq!(status(&app, run).await, RunStatus::Cancelled);
}

// ---- C9: durability is never lowered for the caller ----------------------

#[sqlx::test(migrations = false)]
async fn calls_inside_a_callers_transaction_keep_its_durability(pool: PgPool) {
    let app = common::app(&pool).await;
    app.create_queue("q").await.unwrap();
    exec(
        &pool,
        "select cairn.send('q', '{}'); select cairn.send('q', '{}')",
    )
    .await;
    let mut tx = pool.begin().await.unwrap();
    for call in [
        "select * from cairn.claim('q', 30, 1)",
        "select * from cairn.read('q', 30, 1)",
        "select cairn.extend(array[1]::bigint[], array[1]::bigint[], 30)",
        "select * from cairn.load_run(gen_random_uuid(), 1, 1)",
        "select cairn.record_steps(gen_random_uuid(), 1, 1, '[]')",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(call.to_owned()))
            .execute(&mut *tx)
            .await
            .unwrap();
        let sc: String = sqlx::query_scalar("show synchronous_commit")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(sc, "on", "after {call}");
    }
    tx.rollback().await.unwrap();
}

// ---- C10: the install cannot be squatted ---------------------------------

/// A login role for one test, dropped (with what it owns here) at the end.
struct TempRole {
    name: String,
    pool: PgPool,
}

impl TempRole {
    async fn create(pool: &PgPool, prefix: &str) -> Self {
        let name = format!(
            "{prefix}_{}",
            &cairn::Uuid::new_v4().simple().to_string()[..8]
        );
        exec(pool, &format!("create role {name} login")).await;
        Self {
            name,
            pool: pool.clone(),
        }
    }

    async fn connect(&self, url: &str) -> PgPool {
        let url = url.replacen(
            "postgres://postgres@",
            &format!("postgres://{}@", self.name),
            1,
        );
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap()
    }

    async fn drop(self) {
        exec(&self.pool, "drop schema if exists cairn cascade").await;
        exec(
            &self.pool,
            &format!("drop owned by {0}; drop role {0}", self.name),
        )
        .await;
    }
}

#[sqlx::test(migrations = false)]
async fn initialize_refuses_a_schema_someone_else_created(pool: PgPool) {
    let url = common::url_of(&pool);
    let squatter = TempRole::create(&pool, "squatter").await;
    exec(
        &pool,
        &format!(
            "grant create on database \"{}\" to {}",
            pool.connect_options().get_database().unwrap(),
            squatter.name
        ),
    )
    .await;
    let theirs = squatter.connect(&url).await;
    // The squatter prepares a ledger table with a trigger that would run as
    // whoever installs cairn.
    exec(
        &theirs,
        "create schema cairn;
         create table cairn.pwned (who text);
         create table cairn.migrations (version integer primary key, name text, checksum text,
                                        applied_at timestamptz default now());
         create function cairn.note() returns trigger language plpgsql as
           $$ begin insert into cairn.pwned values (current_user); return new; end $$;
         create trigger note before insert on cairn.migrations
           for each row execute function cairn.note();",
    )
    .await;
    theirs.close().await;
    let app = common::builder(&url).build().await.unwrap();
    let err = app.initialize().await.unwrap_err();
    assert!(matches!(err, Error::UnsafeSchema(_)), "{err}");
    assert!(err.to_string().contains(&squatter.name), "{err}");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.pwned").await,
        0
    );
    assert_eq!(
        common::scalar_i64(
            &pool,
            "select count(*) from pg_proc where pronamespace = 'cairn'::regnamespace"
        )
        .await,
        1,
        "nothing was installed"
    );
    app.pool().close().await;
    squatter.drop().await;
}

#[sqlx::test(migrations = false)]
async fn initialize_refuses_objects_of_another_role_in_its_schema(pool: PgPool) {
    let url = common::url_of(&pool);
    let app = common::app(&pool).await;
    let other = TempRole::create(&pool, "neighbour").await;
    exec(
        &pool,
        &format!("grant usage, create on schema cairn to {}", other.name),
    )
    .await;
    let theirs = other.connect(&url).await;
    exec(
        &theirs,
        "create function cairn.claim(text) returns int language sql as 'select 1'",
    )
    .await;
    theirs.close().await;
    let err = app.initialize().await.unwrap_err();
    assert!(
        matches!(err, Error::UnsafeSchema(ref m) if m.contains("cairn.claim(text)") && m.contains(&other.name)),
        "{err}"
    );
    app.pool().close().await;
    exec(&pool, "drop function cairn.claim(text)").await;
    other.drop().await;
}

// ---- C11: drift is found, repaired and reported; upgrades match fresh ----

#[sqlx::test(migrations = false)]
async fn initialize_repairs_drift_and_says_what_it_repaired(pool: PgPool) {
    let app = common::app(&pool).await;
    exec(
        &pool,
        "create or replace function cairn.check_task_name(task text) returns void
           language plpgsql immutable set search_path = pg_catalog, pg_temp as $$ begin end $$;
         drop function cairn.run_history(uuid);
         grant execute on function cairn.claim(text, double precision, integer, text[]) to public;
         alter function cairn.send(text, jsonb, double precision, integer, text, text) reset search_path;
         create function cairn.extra() returns int language sql as 'select 1';
         create function cairn.spy() returns trigger language plpgsql as $$ begin return new; end $$;
         create trigger spy before insert on cairn.jobs for each row execute function cairn.spy();
         create or replace trigger runs_ended after update on cairn.runs
           for each row execute function cairn.spy();
         drop index cairn.jobs_parent_run_idx;",
    )
    .await;
    let report = app.initialize().await.unwrap();
    let repaired = report.repaired.join("\n");
    for expected in [
        "function cairn.check_task_name(text): its body was replaced: put back",
        "function cairn.run_history(uuid) was dropped: re-created",
        "function cairn.claim(text,double precision,integer,text[]): its grants changed",
        "function cairn.send(text,jsonb,double precision,integer,text,text): its settings changed",
        "function cairn.extra() is not cairn's: dropped",
        "trigger spy on cairn.jobs was not cairn's: dropped",
        // cairn's own trigger name, calling someone else's function.
        "trigger runs_ended on cairn.runs was not cairn's: dropped",
        "index cairn.jobs_parent_run_idx was dropped: re-created",
    ] {
        assert!(
            repaired.contains(expected),
            "missing {expected:?} in:\n{repaired}"
        );
    }
    assert!(report.functions_updated);
    // Repaired for real: a second call finds nothing to do.
    let again = app.initialize().await.unwrap();
    assert!(again.is_noop(), "{again:?}");
    let public: i64 = common::scalar_i64(
        &pool,
        "select count(*) from pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
          where p.pronamespace = 'cairn'::regnamespace and a.grantee = 0",
    )
    .await;
    assert_eq!(public, 0);
    // A newer cairn's functions are never overwritten.
    exec(&pool, "update cairn.function_bundle set release = '99.0.0'").await;
    let err = app.initialize().await.unwrap_err();
    assert!(
        matches!(err, Error::FunctionsTooNew { ref installed, .. } if installed == "99.0.0"),
        "{err}"
    );
}

/// Installs cairn 0.1.0 the way its `initialize()` did: ledger, migrations
/// 0001-0002, functions (its SQL is kept in tests/fixtures/cairn-0.1.0).
async fn install_release_0_1_0(pool: &PgPool) {
    const MIGRATIONS: [(i32, &str, &str); 2] = [
        (
            1,
            "0001_queue.sql",
            include_str!("../migrations/0001_queue.sql"),
        ),
        (
            2,
            "0002_workflow.sql",
            include_str!("../migrations/0002_workflow.sql"),
        ),
    ];
    const FUNCTIONS: [&str; 4] = [
        include_str!("fixtures/cairn-0.1.0/00_base.sql"),
        include_str!("fixtures/cairn-0.1.0/10_queue.sql"),
        include_str!("fixtures/cairn-0.1.0/20_workflow.sql"),
        include_str!("fixtures/cairn-0.1.0/90_grants.sql"),
    ];
    exec(
        pool,
        "create schema cairn;
         create table cairn.migrations (version integer primary key, name text not null,
             checksum text not null, applied_at timestamptz not null default pg_catalog.now());
         create table cairn.function_bundle (singleton boolean primary key default true check (singleton),
             checksum text not null, applied_at timestamptz not null default pg_catalog.now());",
    )
    .await;
    for (version, name, sql) in MIGRATIONS {
        exec(pool, sql).await;
        sqlx::query(
            "insert into cairn.migrations (version, name, checksum) values ($1, $2, md5($3))",
        )
        .bind(version)
        .bind(name)
        .bind(sql)
        .execute(pool)
        .await
        .unwrap();
    }
    for sql in FUNCTIONS {
        exec(pool, sql).await;
    }
    sqlx::query("insert into cairn.function_bundle (checksum) values (md5($1))")
        .bind(FUNCTIONS.concat())
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn upgrading_from_0_1_0_gives_exactly_a_fresh_install_and_keeps_runs_going(pool: PgPool) {
    install_release_0_1_0(&pool).await;
    // A run in flight under 0.1.0: started, its first step checkpointed, its
    // job parked for a sleep (as a 0.1.0 worker left it).
    let run: cairn::Uuid = {
        exec(&pool, "select cairn.create_queue('workflows'); select cairn.register_workflow('upgrade', 'workflows')").await;
        let run = sqlx::query_scalar("select cairn.start_workflow('upgrade', '5')")
            .fetch_one(&pool)
            .await
            .unwrap();
        let (job, lease): (i64, i64) =
            sqlx::query_as("select id, lease from cairn.claim('workflows', 30, 1)")
                .fetch_one(&pool)
                .await
                .unwrap();
        let loaded: i64 = sqlx::query_scalar("select count(*) from cairn.load_run($1, $2, $3)")
            .bind(run)
            .bind(job)
            .bind(lease)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(loaded, 1);
        sqlx::query("select * from cairn.checkpoint($1, $2, $3, 'double#1', 0, 'step', 'completed', '5', '10', null, 1)")
            .bind(run)
            .bind(job)
            .bind(lease)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("select cairn.suspend_run($1, $2, $3, now(), 'sleeping')")
            .bind(run)
            .bind(job)
            .bind(lease)
            .execute(&pool)
            .await
            .unwrap();
        run
    };

    let upgraded = common::app(&pool).await;
    let fresh_db = format!(
        "cairn_fresh_{}",
        &cairn::Uuid::new_v4().simple().to_string()[..8]
    );
    exec(&pool, &format!("drop database if exists \"{fresh_db}\"")).await;
    exec(&pool, &format!("create database \"{fresh_db}\"")).await;
    let fresh_url = format!(
        "{}/{fresh_db}",
        common::url_of(&pool).rsplit_once('/').unwrap().0
    );
    let fresh = App::builder()
        .database_url(&fresh_url)
        .build()
        .await
        .unwrap();
    fresh.initialize().await.unwrap();
    let catalog = |p: PgPool| async move {
        sqlx::query_scalar::<_, serde_json::Value>("select catalog from cairn.function_bundle")
            .fetch_one(&p)
            .await
            .unwrap()
    };
    let (a, b) = (
        catalog(pool.clone()).await,
        catalog(fresh.pool().clone()).await,
    );
    let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
    let differ: Vec<&String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "upgraded and fresh catalogs differ in {differ:?}"
    );
    assert!(upgraded.initialize().await.unwrap().is_noop());
    fresh.pool().close().await;
    exec(&pool, &format!("drop database \"{fresh_db}\" with (force)")).await;

    // The run started under 0.1.0 finishes under this release, and its
    // checkpointed step is not run again.
    let ran = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&ran);
    upgraded
        .workflow("upgrade", move |ctx: WorkflowContext, n: i64| {
            let r = Arc::clone(&r);
            async move {
                let doubled: i64 = ctx
                    .step("double", n, move |n| async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        Ok(n * 2)
                    })
                    .await?;
                Ok(doubled + 1)
            }
        })
        .unwrap();
    let worker = Worker::start(&upgraded, &["workflows"]);
    assert_eq!(upgraded.result::<i64>(run).await.unwrap(), 11);
    worker.stop().await;
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "the checkpointed step did not run again"
    );
}

// ---- C12: a producer-only service can start runs on a fresh database -----

#[sqlx::test(migrations = false)]
async fn a_producer_starts_runs_before_any_worker_has_run(pool: PgPool) {
    let url = common::url_of(&pool);
    // The service that defines the workflow initializes; no worker runs.
    let service = common::builder(&url).build().await.unwrap();
    service
        .workflow(
            "welcome",
            |_ctx: WorkflowContext, name: String| async move { Ok(format!("hi {name}")) },
        )
        .unwrap();
    service.initialize().await.unwrap();
    let run = service.start("welcome", &"ann").await.unwrap();
    assert_eq!(status(&service, run).await, RunStatus::Pending);
    // From SQL too.
    exec(&pool, "select cairn.start_workflow('welcome', '\"bob\"')").await;
    // A producer that does not define it gets the hint that says what to do.
    let producer = common::builder(&url).build().await.unwrap();
    let err = producer.start("unknown_one", &1).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("unknown workflow") && m.contains("hint:") && m.contains("register_workflow")),
        "{err}"
    );
    // A workflow defined after initialize() is announced by its first start.
    producer
        .workflow("late", |_ctx: WorkflowContext, _: ()| async move { Ok(()) })
        .unwrap();
    producer.start("late", &()).await.unwrap();
    // The worker, when it comes, runs what was started.
    let worker = Worker::start(&service, &["workflows"]);
    assert_eq!(service.result::<String>(run).await.unwrap(), "hi ann");
    worker.stop().await;
}

// ---- D13, D15: inputs are checked where they enter -----------------------

#[sqlx::test(migrations = false)]
async fn oversized_deep_and_unrepresentable_json_is_refused_at_every_entry(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow(
        "echo",
        |_ctx: WorkflowContext, v: serde_json::Value| async move { Ok(v) },
    )
    .unwrap();
    app.register_workflows().await.unwrap();
    app.create_queue("q").await.unwrap();
    let run = app.start("echo", &1).await.unwrap();
    // A 64 MiB value that Postgres stores compressed (to a few hundred kB).
    exec(
        &pool,
        "create table big as select to_jsonb(repeat('x', 64 * 1024 * 1024)) as j",
    )
    .await;
    let deep = format!("'{}1{}'::jsonb", "[".repeat(65), "]".repeat(65));
    let ok_deep = format!("'{}1{}'::jsonb", "[".repeat(64), "]".repeat(64));
    let cases = [
        ("select cairn.send('q', j) from big".to_owned(), "54000"),
        (
            "select cairn.send_batch('q', array[j]) from big".to_owned(),
            "54000",
        ),
        (
            "select cairn.start_workflow('echo', j) from big".to_owned(),
            "54000",
        ),
        (
            format!("select cairn.send_signal('{run}', 's', j) from big"),
            "54000",
        ),
        (format!("select cairn.send('q', {deep})"), "22023"),
        (
            format!("select cairn.start_workflow('echo', {deep})"),
            "22023",
        ),
        (
            format!("select cairn.send_signal('{run}', 's', {deep})"),
            "22023",
        ),
        (
            "select cairn.send('q', '{\"n\": 1e400}')".to_owned(),
            "22023",
        ),
        (
            format!("select cairn.send_batch('q', array['1'::jsonb, {deep}])"),
            "22023",
        ),
        (
            "select cairn.start_workflow('echo', '1e400')".to_owned(),
            "22023",
        ),
    ];
    for (sql, code) in &cases {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await
            .expect_err(sql);
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some(*code),
            "{sql}: {err}"
        );
    }
    exec(&pool, &format!("select cairn.send('q', {ok_deep})")).await;
    assert_eq!(
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.jobs where queue_id = cairn.queue_id('q')"
        )
        .await,
        1,
        "only the value within the limits was stored"
    );
    // From Rust, the same limits are checked before anything is sent.
    let mut nested = serde_json::json!(1);
    for _ in 0..70 {
        nested = serde_json::json!([nested]);
    }
    let err = app.start("echo", &nested).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.contains("deeper than 64")),
        "{err}"
    );
    let big = "x".repeat(2 << 20);
    let err = app.send_signal(run, "s", &big).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.contains("above the 1 MiB limit")),
        "{err}"
    );
}

#[sqlx::test(migrations = false)]
async fn oversized_outputs_fail_their_step_or_run_and_never_loop(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("big_step", |ctx: WorkflowContext, _: ()| async move {
        let s: String = ctx
            .step("huge", (), |_| async { Ok("x".repeat(2 << 20)) })
            .await?;
        Ok(s.len())
    })
    .unwrap();
    app.workflow("big_output", |_ctx: WorkflowContext, _: ()| async move {
        Ok("y".repeat(20 << 20))
    })
    .unwrap();
    let worker = Worker::start(&app, &["workflows"]);
    let a = app.start("big_step", &()).await.unwrap();
    let b = app.start("big_output", &()).await.unwrap();
    for run in [a, b] {
        let err = app.result::<serde_json::Value>(run).await.unwrap_err();
        assert!(
            matches!(err, Error::RunFailed { ref error, .. } if error.contains("above the 1 MiB limit")),
            "{err}"
        );
    }
    worker.stop().await;
    // A plain job archived with a huge output by hand is refused too.
    app.create_queue("q").await.unwrap();
    exec(&pool, "select cairn.send('q', '{}')").await;
    let err = sqlx::query(
        "select cairn.archive(c.id, c.lease, to_jsonb(repeat('z', 2 * 1024 * 1024)))
           from cairn.claim('q', 30, 1) c",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("54000"), "{err}");
}

// ---- D14: NULLs and unknown runs get the documented SQLSTATEs ------------

#[sqlx::test(migrations = false)]
async fn nulls_get_22004_and_unknown_runs_42704_everywhere(pool: PgPool) {
    let app = common::app(&pool).await;
    app.create_queue("q").await.unwrap();
    let nulls = [
        "select cairn.create_queue(null)",
        "select cairn.drop_queue(null)",
        "select cairn.purge_queue(null)",
        "select cairn.send(null, '{}')",
        "select cairn.send('q', null)",
        "select cairn.send('q', '{}', delay => null)",
        "select cairn.send('q', '{}', priority => null)",
        "select cairn.send_batch('q', null)",
        "select cairn.send_batch('q', array['1'::jsonb], priority => null)",
        "select * from cairn.claim('q', null, 1)",
        "select * from cairn.claim('q', 30, null)",
        "select * from cairn.read('q', 30, null)",
        "select * from cairn.pop('q', null)",
        "select cairn.ack(null::bigint, 1)",
        "select cairn.ack(1, null::bigint)",
        "select cairn.ack(null::bigint[], null::bigint[])",
        "select cairn.ack(array[null]::bigint[], array[1]::bigint[])",
        "select cairn.archive(null::bigint, 1)",
        "select cairn.retry(null, 1, 1)",
        "select cairn.retry(1, 1, null)",
        "select cairn.fail(null, 1, 'x')",
        "select cairn.fail(1, null, 'x')",
        "select cairn.extend(null, array[1]::bigint[], 30)",
        "select cairn.set_vt(null, 1, 1)",
        "select cairn.release(null, null)",
        "select cairn.delete('q', null)",
        "select cairn.requeue('q', null)",
        "select * from cairn.metrics(null)",
        "select cairn.register_workflow(null, 'q')",
        "select cairn.register_workflow('w', null)",
        "select cairn.start_workflow(null, '{}')",
        "select cairn.send_signal(null, 'x')",
        "select cairn.send_signal(gen_random_uuid(), null)",
        "select * from cairn.run_status(null)",
        "select * from cairn.run_steps(null)",
        "select * from cairn.run_history(null)",
        "select cairn.cancel_run(null)",
        "select cairn.retry_run(null)",
        "select * from cairn.list_runs(lim => null)",
        "select * from cairn.load_run(null, 1, 1)",
        "select * from cairn.begin_step(gen_random_uuid(), null, 1, '[]', 'k', 0, null, '1')",
        "select cairn.record_steps(gen_random_uuid(), 1, null, '[]')",
        "select cairn.complete_run(null, 1, 1, '[]', '1')",
        "select cairn.fail_run(null, 1, 1, '[]', 'x')",
        "select * from cairn.load_runs(array[gen_random_uuid()], null, '{1}')",
        "select * from cairn.begin_steps(array[gen_random_uuid()], '{1}', '{1}', array['[]']::jsonb[], '{k}', '{null}', '{null}', '{1}')",
        "select * from cairn.complete_runs(array[gen_random_uuid()], '{1}', '{null}', array['[]']::jsonb[], '{1}')",
    ];
    for sql in nulls {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("22004"),
            "{sql}: {err}"
        );
    }
    for sql in [
        "select * from cairn.run_status(gen_random_uuid())",
        "select * from cairn.run_steps(gen_random_uuid())",
        "select * from cairn.run_history(gen_random_uuid())",
        "select cairn.send_signal(gen_random_uuid(), 'x')",
        "select cairn.cancel_run(gen_random_uuid())",
        "select cairn.retry_run(gen_random_uuid())",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some("42704"),
            "{sql}: {err}"
        );
    }
}

// ---- D16: the same key with other arguments is a conflict ----------------

#[sqlx::test(migrations = false)]
async fn an_idempotency_key_reused_with_another_input_is_refused_or_returned(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow(
        "order",
        |_ctx: WorkflowContext, n: i64| async move { Ok(n) },
    )
    .unwrap();
    app.register_workflows().await.unwrap();
    let first = app
        .start("order", &7_i64)
        .idempotency_key("o-7")
        .await
        .unwrap();
    // The same start again (a retried request) is the same run.
    assert_eq!(
        app.start("order", &7_i64)
            .idempotency_key("o-7")
            .await
            .unwrap(),
        first
    );
    // Another input under the same key is refused, naming the run and why.
    let err = app
        .start("order", &8_i64)
        .idempotency_key("o-7")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(ref m) if m.contains(&first.to_string()) && m.contains("input")),
        "{err}"
    );
    let err = app
        .start("order", &7_i64)
        .idempotency_key("o-7")
        .priority(5)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict(ref m) if m.contains("priority")),
        "{err}"
    );
    // ...unless the caller asks for the existing run whatever its input.
    let same = app
        .start("order", &8_i64)
        .idempotency_key("o-7")
        .on_conflict(OnConflict::ReturnExisting)
        .await
        .unwrap();
    assert_eq!(same, first);
    let from_sql: cairn::Uuid = sqlx::query_scalar(
        "select cairn.start_workflow('order', '9', idempotency_key => 'o-7', conflict => 'return')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(from_sql, first);
    let err = sqlx::query("select cairn.start_workflow('order', '9', idempotency_key => 'o-7')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("23505"), "{err}");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.runs").await,
        1
    );
}
