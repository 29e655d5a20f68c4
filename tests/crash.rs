//! Worker processes, really killed: 20,000 jobs across two processes each
//! handled once; a SIGKILLed worker's job is redelivered after its lease and
//! the dead attempt's completion is refused.

mod common;

use std::process::Command;
use std::time::Duration;

use cairn::{App, Task};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Serialize, Deserialize)]
struct Work {
    n: i64,
}
impl Task for Work {
    const QUEUE: &'static str = "work";
    type Output = ();
}

/// Registers the handler used by parent and children: record the effect in
/// the database (job, attempt, process), then finish — or, in "hang" mode,
/// never finish.
fn register(app: &App, hang: bool) {
    let db = common::direct_pool(app);
    app.task(move |_job: Work, ctx| {
        let db = db.clone();
        async move {
            sqlx::query("insert into effects (job_id, attempt, pid) values ($1, $2, $3)")
                .bind(ctx.id())
                .bind(ctx.attempt() as i32)
                .bind(std::process::id() as i32)
                .execute(&db)
                .await?;
            if hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(())
        }
    })
    .unwrap();
}

/// Child entry: a worker process. Mode "drain" runs until SIGTERM; "hang"
/// runs a handler that never returns, with a 1 s lease.
#[test]
#[ignore = "run as a child process by the tests in this file"]
fn child_worker() {
    let Some((mode, url)) = common::child_mode() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = common::builder(&url)
            .max_connections(8)
            .build()
            .await
            .unwrap();
        register(&app, mode == "hang");
        let stats = app
            .worker()
            .queues(["work"])
            .concurrency(16)
            .lease(Duration::from_secs(if mode == "hang" { 1 } else { 30 }))
            .run()
            .await
            .unwrap();
        println!("{stats:?}");
    });
}

async fn setup(pool: &PgPool) -> App {
    let app = common::app(pool).await;
    app.create_queue("work").await.unwrap();
    sqlx::query(
        "create table effects (job_id bigint, attempt int, pid int,
                               at timestamptz default clock_timestamp())",
    )
    .execute(pool)
    .await
    .unwrap();
    app
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[sqlx::test(migrations = false)]
async fn two_processes_drain_20000_jobs_each_exactly_once(pool: PgPool) {
    let app = setup(&pool).await;
    let jobs: Vec<Work> = (0..20_000).map(|n| Work { n }).collect();
    app.enqueue_batch(&jobs).await.unwrap();
    let url = common::url_of(&pool);
    let mut children: Vec<_> = (0..2)
        .map(|_| common::spawn_child("child_worker", "drain", &url, &[]))
        .collect();
    common::wait_for("20,000 effects", Duration::from_secs(240), || async {
        common::scalar_i64(&pool, "select count(*) from effects").await >= 20_000
    })
    .await;
    common::wait_for("an empty queue", Duration::from_secs(30), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await == 0
    })
    .await;
    for child in &children {
        signal(child, "-TERM");
    }
    for child in &mut children {
        assert!(
            child.wait().unwrap().success(),
            "worker exits cleanly on SIGTERM"
        );
    }
    let (total, distinct, redelivered, processes): (i64, i64, i64, i64) = sqlx::query_as(
        "select count(*), count(distinct job_id), count(*) filter (where attempt > 1), count(distinct pid)
           from effects",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((total, distinct, redelivered), (20_000, 20_000, 0));
    assert_eq!(processes, 2, "both processes took part");
}

#[sqlx::test(migrations = false)]
async fn a_sigkilled_workers_job_is_redelivered_and_its_late_completion_refused(pool: PgPool) {
    let app = setup(&pool).await;
    let id = app.enqueue(&Work { n: 1 }).await.unwrap();
    let mut child = common::spawn_child("child_worker", "hang", &common::url_of(&pool), &[]);
    common::wait_for(
        "the child to start the job",
        Duration::from_secs(30),
        || async { common::scalar_i64(&pool, "select count(*) from effects").await == 1 },
    )
    .await;
    let stale: i64 = sqlx::query_scalar("select lease from cairn.jobs where id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    child.kill().unwrap(); // SIGKILL, mid-handler
    child.wait().unwrap();
    // The dead worker's lease ends here (nothing extends it any more).
    let lease_end: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select leased_until from cairn.jobs where id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();

    register(&app, false);
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["work"])
            .poll_interval(Duration::from_millis(100))
            .run_until(stop.clone().cancelled_owned()),
    );
    common::wait_for(
        "the redelivered job to complete",
        Duration::from_secs(30),
        || async { common::scalar_i64(&pool, "select count(*) from cairn.jobs").await == 0 },
    )
    .await;
    stop.cancel();
    let stats = worker.await.unwrap().unwrap();
    assert_eq!(stats.completed, 1);

    let attempts: Vec<(i32, bool)> =
        sqlx::query_as("select attempt, at >= $2 from effects where job_id = $1 order by at")
            .bind(id)
            .bind(lease_end)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        attempts,
        [(1, false), (2, true)],
        "redelivered once, after the 1 s lease ran out"
    );
    let late: bool = sqlx::query_scalar("select cairn.ack($1, $2)")
        .bind(id)
        .bind(stale)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!late, "the killed attempt's lease completes nothing");
}
