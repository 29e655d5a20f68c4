//! A scheduled workflow: a report that runs every minute in London time.
//! Creates the schedule, prints its next fire times, triggers one run at
//! once, then lets a worker fire the next real tick (up to a minute away)
//! and stops. Any other client could create the same schedule with
//! `select cairn.create_schedule('minutely_report', '* * * * *', workflow =>
//! 'report', timezone => 'Europe/London')`.
//!
//! ```text
//! cargo run --example scheduled     # DATABASE_URL defaults to the local Postgres
//! ```

use std::time::Duration;

use cairn::prelude::*;
use cairn::{Fired, Overlap, Schedule};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// A run's input: the schedule's input with the tick it was started for.
#[derive(Serialize, Deserialize)]
struct ReportInput {
    team: String,
    scheduled_at: DateTime<Utc>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scheduled failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let app = App::builder().database_url(url).build().await?;
    app.workflow(
        "report",
        |ctx: WorkflowContext, input: ReportInput| async move {
            let text: String = ctx
                .step("compose", input, |i| async move {
                    Ok(format!("report for {} as of {}", i.team, i.scheduled_at))
                })
                .await?;
            Ok(text)
        },
    )?;
    app.initialize().await?;

    app.delete_schedule("minutely_report").await?; // a clean slate for the demo
    let first = app
        .create_schedule(
            Schedule::workflow("minutely_report", "* * * * *", "report")
                .input(&serde_json::json!({ "team": "ops" }))
                .timezone("Europe/London")
                .overlap(Overlap::Skip),
        )
        .await?;
    println!("schedule created; first tick at {first}");
    for t in app.next_fires("30 2 * * *", "Europe/London", 3).await? {
        println!("  '30 2 * * *' in London would fire at {t}");
    }

    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["workflows"])
            .run_until(stop.clone().cancelled_owned()),
    );

    // A run right now, outside the ticks.
    if let Fired::Run(run) = app.trigger_schedule("minutely_report").await? {
        let text: String = app.result(run).await?;
        println!("triggered run {run}: {text}");
    }

    // The worker fires the next tick itself.
    println!("waiting for the tick at {first} ...");
    let ticked = loop {
        let s = app
            .list_schedules()
            .await?
            .into_iter()
            .find(|s| s.name == "minutely_report")
            .ok_or("the schedule vanished")?;
        if s.last_fire.is_some() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let run = ticked.last_run.ok_or("a workflow tick starts a run")?;
    let text: String = app.result(run).await?;
    println!("tick {} started run {run}: {text}", first);
    println!(
        "schedule: fired {}, next tick at {}",
        ticked.fired, ticked.next_fire
    );

    app.delete_schedule("minutely_report").await?;
    stop.cancel();
    worker.await??;
    println!("done");
    Ok(())
}
