//! Workers and producers through a transaction-pooling PgBouncer (Debian's
//! package, started by the test, with fewer server connections than cairn
//! has clients), the listener and migrations connecting directly: tasks,
//! batches, workflows with steps, children, task steps, durable sleeps and
//! signals, starts inside the caller's transaction, results woken by
//! notification, cancel, retry, pruning and a schedule's tick. Every job
//! runs once, every run ends with the right output.

mod common;

use std::time::Duration;

use cairn::{App, HandlerError, Schedule, Task, WorkflowContext};
use common::bouncer::Bouncer;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Serialize, Deserialize)]
struct Note {
    n: i64,
}
impl Task for Note {
    const QUEUE: &'static str = "notes";
    type Output = i64;
}

/// Backends that cairn's apps hold on this database (through the pooler or
/// directly).
async fn cairn_backends(pool: &PgPool) -> i64 {
    common::scalar_i64(
        pool,
        "select count(*) from pg_stat_activity
          where datname = current_database() and application_name = 'cairn'",
    )
    .await
}

async fn app_through(bouncer: &Bouncer, pool: &PgPool) -> App {
    let database = pool.connect_options().get_database().unwrap().to_owned();
    App::builder()
        .database_url(bouncer.url(&database))
        .transaction_pooler(common::url_of(pool))
        .max_connections(8)
        .build()
        .await
        .unwrap()
}

fn register(app: &App, effects: &PgPool) {
    let db = effects.clone();
    app.task(move |note: Note, _ctx| {
        let db = db.clone();
        async move {
            sqlx::query("insert into effects (what) values ($1)")
                .bind(format!("note:{}", note.n))
                .execute(&db)
                .await
                .map_err(HandlerError::retryable)?;
            Ok(note.n * 10)
        }
    })
    .unwrap();
    let db = effects.clone();
    app.workflow("order", move |ctx: WorkflowContext, n: i64| {
        let db = db.clone();
        async move {
            let run = ctx.run_id();
            let d = db.clone();
            let charged: i64 = ctx
                .step("charge", n, move |n| async move {
                    sqlx::query("insert into effects (what) values ($1)")
                        .bind(format!("charge:{run}"))
                        .execute(&d)
                        .await
                        .map_err(HandlerError::retryable)?;
                    Ok(n + 1)
                })
                .await?;
            // Negative, so the plain notes (0 and up) never share its effect.
            let noted: i64 = ctx.task(&Note { n: -charged }).await?;
            let shipped: i64 = ctx.child("ship", &noted).await?;
            ctx.sleep(Duration::from_millis(20)).await;
            let bonus: Option<i64> = ctx
                .wait_for_signal("bonus", Some(Duration::from_secs(2)))
                .await?;
            Ok(shipped + bonus.unwrap_or(0))
        }
    })
    .unwrap();
    app.workflow("ship", |ctx: WorkflowContext, n: i64| async move {
        let n: i64 = ctx.step("pack", n, |n| async move { Ok(n + 2) }).await?;
        Ok(n)
    })
    .unwrap();
    app.workflow(
        "tick",
        |_ctx: WorkflowContext, input: serde_json::Value| async move {
            Ok(input["scheduled_at"].clone())
        },
    )
    .unwrap();
    app.workflow("flaky", |ctx: WorkflowContext, n: i64| async move {
        let n: i64 = ctx
            .step("maybe", n, |n| async move {
                if n < 0 {
                    Err(HandlerError::fatal("negative"))
                } else {
                    Ok(n)
                }
            })
            .await?;
        Ok(n)
    })
    .unwrap();
}

/// The pooler is real: two clients get the same server session.
#[sqlx::test(migrations = false)]
async fn the_pooler_shares_server_sessions_between_clients(pool: PgPool) {
    let bouncer = Bouncer::start(1);
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let mut pids = Vec::new();
    for _ in 0..2 {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&bouncer.url(&database))
            .await
            .unwrap();
        let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
            .persistent(false)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        pids.push(pid);
        sqlx::Connection::close(conn).await.unwrap();
    }
    assert_eq!(pids[0], pids[1], "{}", bouncer.log());
}

#[sqlx::test(migrations = false)]
async fn workers_and_producers_run_through_a_transaction_pooler(pool: PgPool) {
    sqlx::query("create table effects (what text not null)")
        .execute(&pool)
        .await
        .unwrap();
    let bouncer = Bouncer::start(3);
    let producer = app_through(&bouncer, &pool).await;
    register(&producer, &pool);
    producer.initialize().await.unwrap();
    // Workers create the queues they serve as they start; the producer must
    // not race them.
    producer.create_queue("notes").await.unwrap();

    // Two worker processes' worth of apps, each with its own pool.
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let app = app_through(&bouncer, &pool).await;
        register(&app, &pool);
        workers.push(tokio::spawn(
            app.worker()
                .queues(["notes", "workflows"])
                .concurrency(16)
                .poll_interval(Duration::from_millis(200))
                .prune_interval(Duration::from_millis(500))
                .run_until(stop.clone().cancelled_owned()),
        ));
    }

    // Plain jobs: one at a time, a batch, and inside the caller's transaction.
    let mut ids = Vec::new();
    for n in 0..100 {
        ids.push(producer.enqueue(&Note { n }).await.unwrap());
    }
    let batch: Vec<Note> = (100..1_100).map(|n| Note { n }).collect();
    ids.extend(producer.enqueue_batch(&batch).await.unwrap());
    let mut tx = producer.pool().begin().await.unwrap();
    ids.push(
        producer
            .enqueue(&Note { n: 1_100 })
            .execute(&mut *tx)
            .await
            .unwrap(),
    );
    ids.extend(
        producer
            .enqueue_batch(&[Note { n: 1_101 }, Note { n: 1_102 }])
            .execute(&mut tx)
            .await
            .unwrap(),
    );
    tx.commit().await.unwrap();
    assert_eq!(ids.len(), 1_103);

    // Workflows: started on the pool and inside a transaction.
    let mut runs = Vec::new();
    for n in 0..60 {
        let run = if n % 2 == 0 {
            producer
                .start("order", &n)
                .idempotency_key(&format!("order-{n}"))
                .await
                .unwrap()
        } else {
            let mut tx = producer.pool().begin().await.unwrap();
            let run = producer.start("order", &n).execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
            run
        };
        runs.push((n, run));
    }
    for &(n, run) in &runs {
        if n % 3 == 0 {
            producer.send_signal(run, "bonus", &1000).await.unwrap();
        }
    }
    let flaky = producer.start("flaky", &-1).await.unwrap();
    let cancelled = producer
        .start("order", &-5)
        .delay(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(producer.cancel_run(cancelled).await.unwrap(), 1);

    // Results are woken by notifications on the direct connection.
    for &(n, run) in &runs {
        let got: i64 = tokio::time::timeout(Duration::from_secs(120), producer.result(run))
            .await
            .expect("a result within two minutes")
            .unwrap();
        let bonus = if n % 3 == 0 { 1000 } else { 0 };
        assert_eq!(got, -(n + 1) * 10 + 2 + bonus, "run {n}");
    }
    assert!(producer.result::<i64>(flaky).await.is_err());
    assert!(producer.retry_run(flaky).await.unwrap());

    common::wait_for("every note to run", Duration::from_secs(60), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from effects where what like 'note:%'",
        )
        .await
            >= 1_103 + 60
    })
    .await;

    // The workers fire a schedule's tick through the pooler, once.
    producer
        .create_schedule(Schedule::workflow("ticks", "*/1 * * * *", "tick"))
        .await
        .unwrap();
    sqlx::query("select cairn.advance_test_clock(60)")
        .execute(&pool)
        .await
        .unwrap();
    let ticked = "select count(*) from cairn.runs where workflow = 'tick' and status = 'completed'";
    common::wait_for("the tick's run", Duration::from_secs(30), || async {
        common::scalar_i64(&pool, ticked).await >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // One run per tick: the minute the test clock moved over, and one more
    // if the real clock crossed a minute meanwhile; never a tick twice.
    let (runs, ticks): (i64, i64) = sqlx::query_as(
        "select count(*), count(distinct idempotency_key) from cairn.runs where workflow = 'tick'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(runs, ticks, "a tick fired twice");
    assert!((1..=2).contains(&runs), "{runs} ticks fired");

    stop.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }

    // Each job ran once, each step once.
    let twice = common::scalar_i64(
        &pool,
        "select count(*) from (select what from effects group by what having count(*) > 1) d",
    )
    .await;
    assert_eq!(twice, 0);
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from effects").await,
        1_103 + 60 + 60
    );
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs where queue_id = (select id from cairn.queues where name = 'notes')").await,
        0
    );
    let metrics = producer.metrics("notes").await.unwrap();
    assert_eq!((metrics.ready, metrics.in_flight, metrics.dead), (0, 0, 0));
    // The workers' prunes went through the pooler too.
    assert_eq!(
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.retention where pruned_at is not null"
        )
        .await,
        1
    );

    // Nothing of cairn's is left open on a server session.
    drop(producer);
    drop(bouncer);
    common::wait_for(
        "cairn's sessions to close",
        Duration::from_secs(10),
        || async { cairn_backends(&pool).await == 0 },
    )
    .await;
}
