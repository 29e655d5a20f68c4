//! A flow defined as data and driven by Postgres: `examples/create_order.sql`
//! stores the flow `create_order` and starts a run of it, as `psql` would;
//! this program's worker runs the four step handlers, and the database
//! moves the run from one step to the next.
//!
//! ```text
//! cargo run --example flow              # store, start from SQL, run, print the output
//! cargo run --example flow -- worker    # only the worker: start runs from psql, e.g.
//! psql "$DATABASE_URL" -f examples/create_order.sql
//! ```

use std::time::Duration;

use cairn::Uuid;
use cairn::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Priced {
    price: i64,
    quantity: i64,
}

#[derive(Serialize)]
struct Product {
    id: i64,
    name: &'static str,
    price: i64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flow failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let app = App::builder().database_url(url).build().await?;

    // The step handlers, by name. Each gets what its step's "input" selects
    // from the run's context; its output joins the context under the step's
    // name.
    app.step_handler("validate_order", |ctx: Value, _job| async move {
        match ctx["input"]["quantity"].as_i64() {
            Some(q) if q >= 1 => Ok(json!({"valid": true})),
            _ => Err(HandlerError::fatal("quantity must be a whole number ≥ 1")),
        }
    })?;
    app.step_handler("get_product", |id: i64, _job| async move {
        Ok(Product {
            id,
            name: "widget",
            price: 250,
        })
    })?;
    app.step_handler("calculate_total", |p: Priced, _job| async move {
        Ok(p.price * p.quantity)
    })?;
    app.step_handler("charge", |total: i64, job: JobContext| async move {
        // The same key on every attempt of this step: the payment provider
        // charges once however often the step is retried.
        Ok(json!({"charged": total, "idempotency_key": job.idempotency_key()}))
    })?;
    app.initialize().await?; // also announces the handlers

    if std::env::args().nth(1).as_deref() == Some("worker") {
        println!("serving flow steps on queue 'workflows'; start runs from psql (Ctrl-C stops)");
        app.worker().queues(["workflows"]).run().await?;
        return Ok(());
    }

    // What `psql -f examples/create_order.sql` does.
    let script = include_str!("create_order.sql");
    sqlx::raw_sql(script).execute(app.pool()).await?;
    let run: Uuid = sqlx::query_scalar(
        "select id from cairn.runs where workflow = 'create_order' and idempotency_key = 'order-7'",
    )
    .fetch_one(app.pool())
    .await?;
    for step in app.plan_flow("create_order").await? {
        println!(
            "stage {}: {} ({} {})",
            step.stage, step.step, step.kind, step.target
        );
    }

    let worker = app.worker().queues(["workflows"]).concurrency(8);
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(worker.run_until(stop.clone().cancelled_owned()));
    let output: Value = tokio::time::timeout(Duration::from_secs(30), app.result(run)).await??;
    println!("run {run} completed: {output}");
    for e in app.run_history(run).await? {
        if let (Some(step), Some(outcome)) = (e.step, e.outcome) {
            println!("  {step}: {outcome}");
        }
    }
    stop.cancel();
    serving.await??;
    Ok(())
}
