//! Quickstart: typed jobs enqueued from Rust (one inside a transaction, a
//! batch) and from SQL, processed by a worker, with a retry and a dead letter
//! along the way. Self-terminating: it stops when the queue is drained.
//!
//! ```text
//! cargo run --example quickstart     # DATABASE_URL defaults to the local Postgres
//! ```

use std::time::Duration;

use cairn::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct SendEmail {
    to: String,
    subject: String,
}

impl Task for SendEmail {
    const QUEUE: &'static str = "emails";
    type Output = ();

    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default()
            .max_attempts(3)
            .backoff(cairn::Backoff::Fixed(Duration::from_millis(200)))
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let app = App::builder().database_url(url).build().await?;
    let report = app.initialize().await?;
    println!("schema cairn ready (applied {:?})", report.applied);
    app.drop_queue("emails").await?; // a clean slate for the demo
    app.create_queue("emails").await?;

    app.task(|email: SendEmail, ctx: JobContext| async move {
        if email.to.ends_with("@flaky.example") && ctx.attempt() == 1 {
            return Err(HandlerError::retryable("SMTP server busy"));
        }
        if !email.to.contains('@') {
            return Err(HandlerError::fatal(format!(
                "not an address: {:?}",
                email.to
            )));
        }
        println!(
            "  job {:>4} attempt {} -> sent {:?} to {}",
            ctx.id(),
            ctx.attempt(),
            email.subject,
            email.to
        );
        Ok(())
    })?;

    // From Rust, one by one.
    app.enqueue(&SendEmail {
        to: "ann@example.com".into(),
        subject: "Welcome".into(),
    })
    .await?;
    app.enqueue(&SendEmail {
        to: "bob@flaky.example".into(),
        subject: "Retry me".into(),
    })
    .await?;
    // Inside your own transaction: the job exists iff the transaction commits.
    let mut tx = app.pool().begin().await?;
    app.enqueue(&SendEmail {
        to: "cat@example.com".into(),
        subject: "Your order".into(),
    })
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    // A batch, in one round trip.
    let batch: Vec<SendEmail> = (1..=3)
        .map(|i| SendEmail {
            to: format!("user{i}@example.com"),
            subject: "Newsletter".into(),
        })
        .collect();
    app.enqueue_batch(&batch).await?;
    // From SQL, as any client could; and one that can never succeed.
    sqlx::query(
        r#"select cairn.send('emails', '{"to": "dan@example.com", "subject": "Sent from SQL"}')"#,
    )
    .execute(app.pool())
    .await?;
    sqlx::query(r#"select cairn.send('emails', '{"to": "nobody", "subject": "Bounce"}')"#)
        .execute(app.pool())
        .await?;
    println!("enqueued 8 jobs; working:");

    // Run the worker until the queue has nothing left to do.
    let watcher = app.clone();
    let drained = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match watcher.metrics("emails").await {
                Ok(m) if m.ready + m.delayed + m.in_flight == 0 => return,
                _ => {}
            }
        }
    };
    let stats = app
        .worker()
        .queues(["emails"])
        .concurrency(8)
        .run_until(drained)
        .await?;
    let m = app.metrics("emails").await?;
    println!(
        "done: {} completed, {} retried, {} dead-lettered (queue now: {} ready, {} dead)",
        stats.completed, stats.retried, stats.dead, m.ready, m.dead
    );
    let (id, error): (i64, String) = sqlx::query_as(
        "select id, last_error from cairn.archive where queue = 'emails' and outcome = 'dead'",
    )
    .fetch_one(app.pool())
    .await?;
    println!("dead letter: job {id}: {error}  (retry it with: cairn requeue emails {id})");
    Ok(())
}
