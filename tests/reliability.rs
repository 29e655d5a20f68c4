//! The kill storm: 2,000 three-step runs (half started from SQL) on a
//! private PostgreSQL cluster, while worker processes are SIGKILLed every
//! 1–3 s and the server itself is stopped with `-m immediate` (a power cut)
//! and restarted. Counted in the database at the end: runs lost, wrong
//! outputs, step bodies begun after their checkpoint committed, deadlocks,
//! runs left unfinished — each must be zero.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cairn::{App, WorkflowContext};
use common::cluster::{Cluster, retry};
use sqlx::PgPool;

const RUNS: i64 = 2000;
const WORKERS: usize = 3;

/// Three steps; each body first records that it began (in its own
/// transaction, so the commit time orders it against the checkpoint), then
/// works for a few milliseconds.
fn register(app: &App) {
    let db = common::direct_pool(app);
    app.workflow("three", move |ctx: WorkflowContext, n: i64| {
        let db = db.clone();
        async move {
            let mut v = n;
            for (i, op) in [("add", 1), ("mul", 2), ("add", 3)].into_iter().enumerate() {
                let (d, run) = (db.clone(), ctx.run_id());
                v = ctx
                    .step(&format!("s{}", i + 1), v, move |v: i64| async move {
                        sqlx::query("insert into bodies (run, step) values ($1, $2)")
                            .bind(run)
                            .bind(format!("s{}#1", i + 1))
                            .execute(&d)
                            .await?;
                        tokio::time::sleep(Duration::from_millis(10 + (v as u64 % 30))).await;
                        Ok(if op.0 == "add" { v + op.1 } else { v * op.1 })
                    })
                    .await?;
            }
            Ok(v)
        }
    })
    .unwrap();
}

fn expected(n: i64) -> i64 {
    (n + 1) * 2 + 3
}

/// Child entry: a worker process that keeps trying while the server is down.
#[test]
#[ignore = "run as a child process by the test in this file"]
fn child_storm_worker() {
    let Some((_, url)) = common::child_mode() else {
        return;
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        loop {
            let app = match common::builder(&url).max_connections(8).build().await {
                Ok(app) => app,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            register(&app);
            let result = app
                .worker()
                .queues(["workflows"])
                .concurrency(16)
                .lease(Duration::from_secs(2))
                .poll_interval(Duration::from_millis(200))
                .run()
                .await;
            if result.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

async fn connect(url: &str) -> PgPool {
    retry("connect", Duration::from_secs(60), || async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_survive_worker_kills_and_database_crashes() {
    let cluster = Cluster::start(&["track_commit_timestamp = on", "deadlock_timeout = 200ms"]);
    let url = cluster.url("postgres");
    let app = common::builder(&url).build().await.unwrap();
    register(&app);
    app.initialize().await.unwrap();
    sqlx::query(
        "create table bodies (run uuid, step text, at timestamptz default clock_timestamp())",
    )
    .execute(&common::direct_pool(&app))
    .await
    .unwrap();
    let observer = connect(&url).await;

    let mut children: Vec<common::ChildGuard> = (0..WORKERS)
        .map(|_| common::spawn_child("child_storm_worker", "worker", &url, &[]))
        .collect();
    let start = Instant::now();
    let mut kills = 0;
    let mut crashes = 0;
    let mut next_kill = Instant::now() + Duration::from_millis(1000);
    let crash_at = [0.2, 0.45, 0.7];

    // Producers: half from Rust, half from SQL, each with an idempotency key
    // so that a start retried after a crash makes no second run.
    let mut started = 0;
    let mut done = 0;
    while done < RUNS {
        if started < RUNS {
            let n = started;
            let key = format!("run-{n}");
            let ok = if n % 2 == 0 {
                app.start("three", &n).idempotency_key(&key).await.is_ok()
            } else {
                sqlx::query(
                    "select cairn.start_workflow('three', $1::text::jsonb, idempotency_key => $2)",
                )
                .bind(n.to_string())
                .bind(&key)
                .execute(&observer)
                .await
                .is_ok()
            };
            if ok {
                started += 1;
            }
        }
        if Instant::now() >= next_kill {
            let victim = kills % WORKERS;
            children[victim].kill().unwrap();
            children[victim].wait().unwrap();
            children[victim] = common::spawn_child("child_storm_worker", "worker", &url, &[]);
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(1000 + rand::random_range(0..2000));
        }
        if crashes < crash_at.len() && done as f64 >= crash_at[crashes] * RUNS as f64 {
            cluster.crash();
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.up();
            crashes += 1;
        }
        if started == RUNS || started % 50 == 0 {
            if let Ok(n) = sqlx::query_scalar::<_, i64>(
                "select count(*) from cairn.runs where status in ('completed', 'failed', 'cancelled')",
            )
            .fetch_one(&observer)
            .await
            {
                done = n;
            }
            if started == RUNS {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the storm did not finish: {done} of {RUNS} runs ended"
        );
    }
    for mut child in children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(kills >= 3, "workers were killed ({kills})");
    assert_eq!(crashes, crash_at.len(), "the database was crashed");

    let db = connect(&url).await;
    // Lost: every key names exactly one run.
    let keys: Vec<String> = sqlx::query_scalar("select idempotency_key from cairn.runs")
        .fetch_all(&db)
        .await
        .unwrap();
    let distinct: HashSet<&String> = keys.iter().collect();
    assert_eq!(
        (keys.len(), distinct.len()),
        (RUNS as usize, RUNS as usize),
        "runs lost or doubled"
    );
    // Unfinished and wrong.
    let outcomes: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("select idempotency_key, status, (output #>> '{}')::bigint from cairn.runs")
            .fetch_all(&db)
            .await
            .unwrap();
    let unfinished = outcomes.iter().filter(|o| o.1 != "completed").count();
    let wrong = outcomes
        .iter()
        .filter(|(key, _, out)| {
            let n: i64 = key.trim_start_matches("run-").parse().unwrap();
            *out != Some(expected(n))
        })
        .count();
    // Bodies begun after their step's checkpoint committed: the body's own
    // commit timestamp against the checkpoint's (track_commit_timestamp).
    let late: i64 = sqlx::query_scalar(
        "select count(*)
           from bodies b join cairn.steps s on s.run_id = b.run and s.key = b.step
          where s.status = 'completed'
            and pg_xact_commit_timestamp(b.xmin) > pg_xact_commit_timestamp(s.xmin)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let bodies = common::scalar_i64(&db, "select count(*) from bodies").await;
    let deadlocks = cluster.deadlocks_logged();
    eprintln!(
        "storm: {RUNS} runs, {kills} worker kills, {crashes} database crashes, {bodies} step bodies \
         (3 per run at least), {:.0} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(unfinished, 0, "runs left unfinished");
    assert_eq!(wrong, 0, "wrong outputs");
    assert_eq!(
        late, 0,
        "step bodies begun after their checkpoint committed"
    );
    assert_eq!(deadlocks, 0, "deadlocks");
    assert!(bodies >= 3 * RUNS, "{bodies}");
    db.close().await;
    observer.close().await;
    app.pool().close().await;
}
