//! 1,000 runs, each with a random durable sleep, a signal, a child run and a
//! step on another queue, across two worker processes: all complete, and no
//! handler runs twice (counted in the database).

mod common;

use std::time::Duration;

use cairn::{App, Task, WorkflowContext};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

const RUNS: i64 = 1_000;

#[derive(Serialize, Deserialize)]
struct Remote {
    run: cairn::Uuid,
    n: i64,
}
impl Task for Remote {
    const QUEUE: &'static str = "remote";
    type Output = i64;
}

async fn effect(db: &PgPool, run: cairn::Uuid, what: &str) -> Result<(), sqlx::Error> {
    sqlx::query("insert into effects (run, what, pid) values ($1, $2, $3)")
        .bind(run)
        .bind(what)
        .bind(std::process::id() as i32)
        .execute(db)
        .await
        .map(|_| ())
}

fn register(app: &App) {
    let db = common::direct_pool(app);
    app.workflow("leaf", move |ctx: WorkflowContext, n: i64| {
        let db = db.clone();
        async move {
            let run = ctx.run_id();
            let d = db.clone();
            Ok(ctx
                .step("double", n, move |n| async move {
                    effect(&d, run, "leaf").await?;
                    Ok(n * 2)
                })
                .await?)
        }
    })
    .unwrap();
    let db = common::direct_pool(app);
    app.workflow("mix", move |ctx: WorkflowContext, n: i64| {
        let db = db.clone();
        async move {
            let run = ctx.run_id();
            let d = db.clone();
            let a: i64 = ctx
                .step("a", n, move |n| async move {
                    effect(&d, run, "a").await?;
                    Ok(n + 1)
                })
                .await?;
            let pause = ctx.random().await;
            ctx.sleep(Duration::from_millis((pause * 200.0) as u64))
                .await;
            let go: Option<i64> = ctx
                .wait_for_signal("go", Some(Duration::from_secs(120)))
                .await?;
            let leaf: i64 = ctx.child("leaf", &n).await?;
            let remote: i64 = ctx.task(&Remote { run, n }).await?;
            Ok(a + go.unwrap_or(-1_000_000) + leaf + remote)
        }
    })
    .unwrap();
    let db = common::direct_pool(app);
    app.task(move |r: Remote, _ctx| {
        let db = db.clone();
        async move {
            effect(&db, r.run, "remote").await?;
            Ok(r.n * 3)
        }
    })
    .unwrap();
}

/// Child entry: a worker process for both queues.
#[test]
#[ignore = "run as a child process by the tests in this file"]
fn child_mixed_worker() {
    let Some((_, url)) = common::child_mode() else {
        return;
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let app = common::builder(&url)
            .max_connections(8)
            .build()
            .await
            .unwrap();
        register(&app);
        app.worker()
            .queues(["workflows", "remote"])
            .concurrency(32)
            .poll_interval(Duration::from_millis(200))
            .run()
            .await
            .unwrap();
    });
}

#[sqlx::test(migrations = false)]
async fn a_thousand_mixed_runs_across_two_processes(pool: PgPool) {
    let app = common::app(&pool).await;
    sqlx::query("create table effects (run uuid, what text, pid int)")
        .execute(&pool)
        .await
        .unwrap();
    register(&app);
    app.create_queue("workflows").await.unwrap();
    app.create_queue("remote").await.unwrap();
    for w in ["leaf", "mix"] {
        sqlx::query("select cairn.register_workflow($1, 'workflows')")
            .bind(w)
            .execute(&pool)
            .await
            .unwrap();
    }
    let url = common::url_of(&pool);
    let mut children: Vec<_> = (0..2)
        .map(|_| common::spawn_child("child_mixed_worker", "worker", &url, &[]))
        .collect();

    let mut runs = Vec::new();
    for n in 0..RUNS {
        let run = app.start("mix", &n).await.unwrap();
        // Half the signals arrive before the run waits for them.
        if n % 2 == 0 {
            app.send_signal(run, "go", &n).await.unwrap();
        }
        runs.push((run, n));
    }
    for (run, n) in runs.iter().filter(|(_, n)| n % 2 == 1) {
        app.send_signal(*run, "go", n).await.unwrap();
    }
    common::wait_for("1,000 completed runs", Duration::from_secs(300), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.runs where workflow = 'mix' and status = 'completed'",
        )
        .await
            == RUNS
    })
    .await;
    for child in &children {
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }
    for child in &mut children {
        assert!(child.wait().unwrap().success());
    }

    for (run, n) in &runs {
        let out: i64 = app.result(*run).await.unwrap();
        assert_eq!(out, (n + 1) + n + 2 * n + 3 * n, "run {n}");
    }
    let (total, per_run_max, processes): (i64, i64, i64) = sqlx::query_as(
        "select sum(c)::bigint, max(c)::bigint, (select count(distinct pid) from effects)
           from (select count(*) c from effects group by run, what) x",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        total,
        3 * RUNS,
        "one 'a', one 'remote' per run and one 'leaf' per child"
    );
    assert_eq!(per_run_max, 1, "no handler ran twice");
    assert_eq!(processes, 2, "both processes took part");
    let failed = common::scalar_i64(
        &pool,
        "select count(*) from cairn.runs where status <> 'completed'",
    )
    .await;
    assert_eq!(failed, 0);
}
