//! The `cairn runs` CLI against real runs served by a worker: start (with a
//! key), list with filters, show with children, history, signal, cancel,
//! retry one or all failed runs; `--json` output parses; exit codes say what
//! went wrong; `cairn doctor` finding what is wrong.

mod common;

use std::time::Duration;

use cairn::{HandlerError, RunFilter, RunStatus, WorkflowContext};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Runs the CLI and parses its JSON output.
fn cli_json(pool: &PgPool, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = common::cli(pool, args);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Runs the CLI, expecting success; its stdout.
fn cli_ok(pool: &PgPool, args: &[&str]) -> String {
    let (code, out, err) = common::cli(pool, args);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

#[sqlx::test(migrations = false)]
async fn runs_are_listed_shown_started_signalled_cancelled_and_retried(pool: PgPool) {
    sqlx::raw_sql("create table gate (open boolean not null); insert into gate values (false)")
        .execute(&pool)
        .await
        .unwrap();
    let app = common::app(&pool).await;
    app.workflow("greet", |ctx: WorkflowContext, name: String| async move {
        let text: String = ctx
            .step("compose", name, |n| async move { Ok(format!("hello {n}")) })
            .await?;
        Ok(text)
    })
    .unwrap();
    app.workflow("family", |ctx: WorkflowContext, n: i64| async move {
        let a: String = ctx.child("greet", &format!("kid {n}")).await?;
        Ok(a)
    })
    .unwrap();
    let gate = pool.clone();
    app.workflow("gated", move |ctx: WorkflowContext, n: i64| {
        let gate = gate.clone();
        async move {
            let n: i64 = ctx
                .step("pass", n, move |n| async move {
                    let open: bool = sqlx::query_scalar("select open from gate")
                        .fetch_one(&gate)
                        .await
                        .map_err(HandlerError::retryable)?;
                    if open {
                        Ok(n)
                    } else {
                        Err(HandlerError::fatal("the gate is shut"))
                    }
                })
                .await?;
            Ok(n)
        }
    })
    .unwrap();
    app.workflow("waiter", |ctx: WorkflowContext, _: ()| async move {
        let got: Option<i64> = ctx.wait_for_signal("go", None).await?;
        Ok(got.unwrap_or(0))
    })
    .unwrap();
    app.initialize().await.unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["workflows"])
            .poll_interval(Duration::from_millis(50))
            .run_until(stop.clone().cancelled_owned()),
    );

    // Start, by key: the same key names the same run.
    let id = cli_ok(
        &pool,
        &[
            "runs", "start", "greet", "--input", r#""ann""#, "--key", "k1",
        ],
    );
    let again = cli_ok(
        &pool,
        &[
            "runs", "start", "greet", "--input", r#""ann""#, "--key", "k1",
        ],
    );
    assert_eq!(id, again);
    let run: cairn::Uuid = id.trim().parse().unwrap();
    assert_eq!(app.result::<String>(run).await.unwrap(), "hello ann");
    let shown = cli_json(&pool, &["runs", "show", id.trim(), "--json"]);
    assert_eq!(shown["status"], "completed");
    assert_eq!(shown["input"], "ann");
    assert_eq!(shown["output"], "hello ann");
    assert_eq!(shown["idempotency_key"], "k1");
    assert_eq!(shown["queue"], "workflows");
    let text = cli_ok(&pool, &["runs", "show", id.trim()]);
    assert!(
        text.contains("status") && text.contains("completed"),
        "{text}"
    );

    let history = cli_json(&pool, &["runs", "history", id.trim(), "--json"]);
    let events: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"created"));
    assert_eq!(events.last(), Some(&"completed"));
    assert!(events.contains(&"attempt"), "{events:?}");
    let steps = cli_json(&pool, &["runs", "steps", id.trim(), "--json"]);
    assert_eq!(
        (&steps[0]["key"], &steps[0]["status"], &steps[0]["output"]),
        (
            &serde_json::json!("compose#1"),
            &serde_json::json!("completed"),
            &serde_json::json!("hello ann")
        ),
        "{steps}"
    );
    let text = cli_ok(&pool, &["runs", "steps", id.trim()]);
    assert!(
        text.contains("compose#1") && text.contains("\"hello ann\""),
        "{text}"
    );

    // A parent shows its child.
    let parent = app.start("family", &1).await.unwrap();
    app.result::<String>(parent).await.unwrap();
    let shown = cli_json(&pool, &["runs", "show", &parent.to_string(), "--json"]);
    let child = shown["children"][0].as_str().unwrap().to_owned();
    let shown_child = cli_json(&pool, &["runs", "show", &child, "--json"]);
    assert_eq!(shown_child["parent_run"], parent.to_string());
    assert_eq!(shown_child["output"], "hello kid 1");

    // Filters.
    let greets = cli_json(&pool, &["runs", "list", "--workflow", "greet", "--json"]);
    assert_eq!(greets.as_array().unwrap().len(), 2, "{greets}");
    let recent = cli_json(
        &pool,
        &[
            "runs",
            "list",
            "--status",
            "completed",
            "--since",
            "1h",
            "--json",
        ],
    );
    assert_eq!(recent.as_array().unwrap().len(), 3);
    let future = cli_json(
        &pool,
        &["runs", "list", "--since", "2999-01-01T00:00:00Z", "--json"],
    );
    assert_eq!(future.as_array().unwrap().len(), 0);
    let table = cli_ok(&pool, &["runs", "list"]);
    assert_eq!(table.lines().count(), 4, "a header and three runs: {table}");

    // Failed runs retried in bulk, once the cause is fixed.
    let mut gated = Vec::new();
    for n in 0..3 {
        gated.push(app.start("gated", &n).await.unwrap());
    }
    for &run in &gated {
        assert!(app.result::<i64>(run).await.is_err());
    }
    sqlx::query("update gate set open = true")
        .execute(&pool)
        .await
        .unwrap();
    let out = cli_ok(&pool, &["runs", "retry", "--failed", "--workflow", "gated"]);
    assert_eq!(out.trim(), "retried 3 failed run(s)");
    for (n, &run) in gated.iter().enumerate() {
        assert_eq!(app.result::<i64>(run).await.unwrap(), n as i64);
    }
    let (code, _, err) = common::cli(&pool, &["runs", "retry", &gated[0].to_string()]);
    assert_eq!(code, 1, "a completed run is not retried: {err}");

    // Signal one waiter, cancel another.
    let waiting = app.start("waiter", &()).await.unwrap();
    let doomed = app.start("waiter", &()).await.unwrap();
    common::wait_for("both waiters to wait", Duration::from_secs(10), || async {
        app.list_runs(
            RunFilter::default()
                .workflow("waiter")
                .status(RunStatus::Waiting),
        )
        .await
        .unwrap()
        .len()
            == 2
    })
    .await;
    cli_ok(
        &pool,
        &[
            "runs",
            "signal",
            &waiting.to_string(),
            "go",
            "--payload",
            "5",
        ],
    );
    assert_eq!(app.result::<i64>(waiting).await.unwrap(), 5);
    let out = cli_ok(&pool, &["runs", "cancel", &doomed.to_string()]);
    assert_eq!(out.trim(), "cancelled 1 run(s)");
    assert_eq!(app.run(doomed).await.unwrap().status, RunStatus::Cancelled);

    // Exit codes: 3 for what does not exist, 1 for what is refused, 2 for usage.
    let ghost = cairn::Uuid::new_v4().to_string();
    let (code, _, err) = common::cli(&pool, &["runs", "show", &ghost]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("unknown run"), "{err}");
    let (code, _, err) = common::cli(&pool, &["runs", "list", "--status", "bogus"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown run status"), "{err}");
    let (code, _, err) = common::cli(&pool, &["runs", "list", "--since", "last tuesday"]);
    assert_eq!(code, 1);
    assert!(err.contains("--since"), "{err}");
    let (code, _, err) = common::cli(&pool, &["runs", "start", "greet", "--input", "{nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("--input is not JSON"), "{err}");
    let (code, _, _) = common::cli(&pool, &["runs", "show", "not-a-uuid"]);
    assert_eq!(code, 2);

    stop.cancel();
    worker.await.unwrap().unwrap();
}

#[sqlx::test(migrations = false)]
async fn list_runs_and_run_from_rust(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("noop", |_ctx: WorkflowContext, n: i64| async move { Ok(n) })
        .unwrap();
    app.initialize().await.unwrap();
    let mut runs = Vec::new();
    for n in 0..5 {
        runs.push(app.start("noop", &n).await.unwrap());
    }
    let listed = app
        .list_runs(RunFilter::default().workflow("noop").limit(3))
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].id, runs[4], "newest first");
    assert!(listed.iter().all(|r| r.status == RunStatus::Pending));
    let detail = app.run(runs[2]).await.unwrap();
    assert_eq!((detail.input.as_str(), detail.priority), ("2", 0));
    assert!(detail.children.is_empty() && detail.parent_run.is_none());
    assert!(matches!(
        app.run(cairn::Uuid::new_v4()).await,
        Err(cairn::Error::NotFound(_))
    ));
    assert!(matches!(
        app.list_runs(RunFilter::default().limit(0)).await,
        Err(cairn::Error::InvalidArgument(_))
    ));
}

/// `cairn workers`, `workflows`, `queues`, `flows` and `dead` against a
/// running worker, a flow, and dead letters (a task's and a flow step's).
#[sqlx::test(migrations = false)]
async fn workers_workflows_queues_flows_and_dead_letters(pool: PgPool) {
    let app = common::app(&pool).await;
    common::mail_task(&app);
    app.workflow(
        "greet",
        |_ctx: WorkflowContext, n: i64| async move { Ok(n) },
    )
    .unwrap();
    app.step_handler("explode", |_: serde_json::Value, _ctx| async move {
        Err::<(), _>(HandlerError::fatal("boom"))
    })
    .unwrap();
    app.flow(cairn::Flow::new("doomed").step("explode"))
        .unwrap();
    app.initialize().await.unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["mail", "workflows"])
            .concurrency(3)
            .poll_interval(Duration::from_millis(50))
            .run_until(stop.clone().cancelled_owned()),
    );

    // The worker announces itself.
    common::wait_for("the worker's row", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workers").await == 1
    })
    .await;
    let workers = cli_json(&pool, &["workers", "--json"]);
    let w = &workers[0];
    assert_eq!(w["alive"], true);
    assert_eq!(w["pid"], std::process::id());
    assert_eq!(w["queues"], serde_json::json!(["mail", "workflows"]));
    assert_eq!(w["concurrency"], 3);
    let handlers: Vec<&str> = w["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    for h in ["mail", "greet", "explode"] {
        assert!(handlers.contains(&h), "{handlers:?}");
    }
    let table = cli_ok(&pool, &["workers"]);
    assert!(
        table.contains("alive") && table.contains("mail, workflows"),
        "{table}"
    );

    // Work: two runs, one flow run whose step dies, two mails (one dead).
    for n in [1, 2] {
        let run = app.start("greet", &n).await.unwrap();
        app.result::<i64>(run).await.unwrap();
    }
    let doomed = app
        .start_flow("doomed", &serde_json::json!({}))
        .await
        .unwrap();
    assert!(app.result::<serde_json::Value>(doomed).await.is_err());
    app.enqueue(&common::Mail { to: "ann".into() })
        .await
        .unwrap();
    app.enqueue(&common::Mail { to: String::new() })
        .await
        .unwrap();
    common::wait_for("the dead mail", Duration::from_secs(10), || async {
        app.metrics("mail").await.unwrap().dead == 1
    })
    .await;

    let workflows = cli_json(&pool, &["workflows", "--json"]);
    let find = |name: &str| {
        workflows
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {workflows}"))
    };
    let (greet, doomed_row) = (find("greet"), find("doomed"));
    assert_eq!(
        (
            greet["kind"].as_str(),
            greet["queue"].as_str(),
            greet["completed"].as_i64()
        ),
        (Some("workflow"), Some("workflows"), Some(2))
    );
    assert_eq!(
        (doomed_row["kind"].as_str(), doomed_row["failed"].as_i64()),
        (Some("flow"), Some(1))
    );
    assert!(cli_ok(&pool, &["workflows"]).contains("doomed"));

    let queues = cli_json(&pool, &["queues", "--json"]);
    let mail = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "mail")
        .unwrap();
    assert_eq!(mail["dead"], 1);
    assert!(
        cli_ok(&pool, &["metrics", "mail"]).contains("mail"),
        "the old name"
    );

    let flows = cli_json(&pool, &["flows", "list", "--json"]);
    assert_eq!(flows[0]["name"], "doomed");
    assert_eq!(flows[0]["definition"]["steps"][0]["name"], "explode");
    let plan = cli_json(&pool, &["flows", "plan", "doomed", "--json"]);
    assert_eq!(plan[0]["step"], "explode");
    assert!(cli_ok(&pool, &["flows", "export"]).contains("cairn.create_flow('doomed'"));

    // Dead letters: the mail and the flow's step job.
    let dead = cli_json(&pool, &["dead", "list", "--json"]);
    assert_eq!(dead.as_array().unwrap().len(), 2, "{dead}");
    let mail_dead = dead
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["queue"] == "mail")
        .unwrap();
    assert_eq!(mail_dead["payload"], serde_json::json!({"to": ""}));
    assert_eq!(mail_dead["last_error"], "no address");
    let only_mail = cli_json(&pool, &["dead", "list", "--queue", "mail", "--json"]);
    assert_eq!(only_mail.as_array().unwrap().len(), 1);
    assert!(cli_ok(&pool, &["dead", "list"]).contains("no address"));
    let (code, _, err) = common::cli(&pool, &["dead", "list", "--queue", "nope"]);
    assert_eq!(code, 3, "{err}");

    let out = cli_ok(&pool, &["dead", "requeue", "workflows"]);
    assert!(
        out.contains("requeued 0") && out.contains("1 step job"),
        "{out}"
    );
    let out = cli_ok(&pool, &["dead", "requeue", "mail"]);
    assert!(out.contains("requeued 1"), "{out}");
    // Requeued, it dies again (the address is still empty).
    common::wait_for("the mail to die again", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await == 0
            && app.metrics("mail").await.unwrap().dead == 1
    })
    .await;

    // A clean stop removes the worker's row.
    stop.cancel();
    worker.await.unwrap().unwrap();
    assert_eq!(
        cli_json(&pool, &["workers", "--json"]),
        serde_json::json!([])
    );
}

/// `cairn doctor`: the status of each check and the exit code of the worst.
fn doctor(
    pool: &PgPool,
    warn_after: &str,
) -> (i32, std::collections::BTreeMap<String, (String, String)>) {
    let (code, out, err) = common::cli(pool, &["doctor", "--json", "--warn-after", warn_after]);
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let map = checks
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                (
                    c["status"].as_str().unwrap().to_owned(),
                    c["detail"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    (code, map)
}

#[sqlx::test(migrations = false)]
async fn doctor_finds_what_is_wrong_and_exits_by_the_worst(pool: PgPool) {
    // Not installed: one failing check, exit 1.
    let (code, checks) = doctor(&pool, "5m");
    assert_eq!(code, 1);
    assert!(
        checks["migrations"].1.contains("not installed"),
        "{checks:?}"
    );

    let app = common::app(&pool).await;
    app.workflow("idle", |_ctx: WorkflowContext, _: ()| async move { Ok(()) })
        .unwrap();
    app.initialize().await.unwrap();

    // Healthy: every check ok, exit 0; the human table says so too.
    let (code, checks) = doctor(&pool, "5m");
    assert_eq!(code, 0, "{checks:?}");
    // (The xmin horizon is the whole cluster's: other tests' transactions
    // may show there, so it is checked below with one of this test's own.)
    assert!(
        checks
            .iter()
            .all(|(name, (s, _))| s == "ok" || name == "xmin horizon"),
        "{checks:?}"
    );
    for name in [
        "migrations",
        "functions",
        "drift",
        "roles",
        "oldest ready job",
        "workers",
        "expired leases",
        "long-running steps",
        "orphaned runs",
        "dead letters",
        "schedules",
        "timers",
        "dead rows in jobs",
        "xmin horizon",
    ] {
        assert!(checks.contains_key(name), "no check {name}: {checks:?}");
    }
    let table = cli_ok(&pool, &["doctor"]);
    assert!(
        table
            .lines()
            .all(|l| l.starts_with("ok ") || l.contains("xmin horizon")),
        "{table}"
    );

    // Work nobody serves, a lease that ran out, a function changed by hand,
    // a transaction left open: warnings, exit 4.
    sqlx::raw_sql(
        "select cairn.create_queue('orphan_q'); \
         select cairn.send('orphan_q', '{}'); select cairn.send('orphan_q', '{}'); \
         update cairn.jobs set visible_at = now() - interval '10 minutes'; \
         update cairn.jobs set lease = 7, leased_until = now() - interval '10 minutes' \
          where id = (select max(id) from cairn.jobs); \
         alter function cairn.metrics_all() reset search_path;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut open = pool.begin().await.unwrap();
    sqlx::query("select txid_current()")
        .execute(&mut *open)
        .await
        .unwrap();
    let (code, checks) = doctor(&pool, "1m");
    assert_eq!(code, 4, "{checks:?}");
    let warned = |name: &str, text: &str| {
        let (status, detail) = &checks[name];
        assert_eq!(status, "warn", "{name}: {detail}");
        assert!(detail.contains(text), "{name}: {detail}");
    };
    warned("oldest ready job", "in queue orphan_q");
    warned("workers", "no live worker serves orphan_q");
    warned("expired leases", "1 job(s) in orphan_q");
    warned(
        "drift",
        "function cairn.metrics_all(): its settings changed",
    );
    let (_, checks) = doctor(&pool, "0s");
    assert_eq!(checks["xmin horizon"].0, "warn", "{checks:?}");
    assert!(
        checks["xmin horizon"].1.contains("a transaction of"),
        "{checks:?}"
    );
    open.rollback().await.unwrap();

    // A run whose job is gone can never move: a failure, exit 1.
    let run = app.start("idle", &()).await.unwrap();
    sqlx::query("delete from cairn.jobs where run_id = $1")
        .bind(run)
        .execute(&pool)
        .await
        .unwrap();
    let (code, checks) = doctor(&pool, "1m");
    assert_eq!(code, 1, "{checks:?}");
    assert_eq!(checks["orphaned runs"].0, "fail");
    assert!(
        checks["orphaned runs"].1.contains(&run.to_string()),
        "{checks:?}"
    );

    // The doctor changed nothing; `cairn migrate` puts the function back.
    let (_, checks) = doctor(&pool, "1m");
    assert_eq!(checks["drift"].0, "warn");
    cli_ok(&pool, &["migrate"]);
    let (_, checks) = doctor(&pool, "1m");
    assert_eq!(checks["drift"].0, "ok", "{checks:?}");

    // The same from Rust.
    let from_rust = app.doctor(Duration::from_secs(60)).await.unwrap();
    assert_eq!(from_rust.len(), checks.len());
    assert!(
        from_rust
            .iter()
            .any(|c| c.name == "orphaned runs" && c.status == cairn::Health::Fail)
    );
}

#[sqlx::test(migrations = false)]
async fn queue_purge_empties_a_queue_in_batches(pool: PgPool) {
    let app = common::app(&pool).await;
    app.create_queue("bulk").await.unwrap();
    sqlx::query("select cairn.send_batch('bulk', array_fill('{}'::jsonb, array[12345]))")
        .execute(&pool)
        .await
        .unwrap();
    let out = cli_ok(&pool, &["queue", "purge", "bulk"]);
    assert_eq!(out.trim(), "purged 12345 jobs");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        0
    );
    let (code, _, err) = common::cli(&pool, &["queue", "purge", "nope"]);
    assert_eq!(code, 3, "{err}");
}
