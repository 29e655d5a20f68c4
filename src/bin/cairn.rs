//! `cairn`: operate a cairn database from the shell.
//!
//! ```text
//! DATABASE_URL=postgres://… cairn migrate
//! cairn queue create emails
//! cairn metrics
//! cairn requeue emails 42
//! ```

use std::process::ExitCode;

use cairn::App;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Operate cairn's queues in a PostgreSQL database")]
struct Cli {
    /// The database to operate on.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade schema `cairn` (what App::initialize() does).
    Migrate,
    /// Create, drop or purge a queue.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Show per-queue counters (all queues, or one).
    Metrics {
        /// Only this queue.
        queue: Option<String>,
    },
    /// Put a dead-lettered job back on its queue.
    Requeue {
        /// The job's queue.
        queue: String,
        /// The job's id.
        id: i64,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Create a queue (a no-op if it exists).
    Create { name: String },
    /// Drop a queue with all its jobs, archive and dead letters.
    Drop { name: String },
    /// Delete every live job of a queue.
    Purge { name: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "cairn=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> cairn::Result<()> {
    let app = App::builder()
        .database_url(cli.database_url)
        .max_connections(1)
        .build()
        .await?;
    match cli.command {
        Command::Migrate => {
            let report = app.initialize().await?;
            if report.is_noop() {
                println!(
                    "schema cairn is current (migration {})",
                    cairn::latest_version()
                );
            } else {
                println!(
                    "applied migrations {:?}; functions {}",
                    report.applied,
                    if report.functions_updated {
                        "installed"
                    } else {
                        "unchanged"
                    }
                );
            }
            for line in &report.repaired {
                println!("repaired: {line}");
            }
            for line in &report.noticed {
                println!("noticed: {line}");
            }
        }
        Command::Queue { action } => match action {
            QueueAction::Create { name } => {
                app.create_queue(&name).await?;
                println!("queue {name} ready");
            }
            QueueAction::Drop { name } => {
                let dropped = app.drop_queue(&name).await?;
                println!("{}", if dropped { "dropped" } else { "no such queue" });
            }
            QueueAction::Purge { name } => {
                println!("purged {} jobs", app.purge_queue(&name).await?);
            }
        },
        Command::Metrics { queue } => {
            let rows = match queue {
                Some(q) => vec![app.metrics(&q).await?],
                None => app.metrics_all().await?,
            };
            println!(
                "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12}",
                "queue", "ready", "delayed", "in_flight", "dead", "archived", "oldest_age_s"
            );
            for m in rows {
                println!(
                    "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12.3}",
                    m.queue,
                    m.ready,
                    m.delayed,
                    m.in_flight,
                    m.dead,
                    m.completed,
                    m.oldest_ready_age
                );
            }
        }
        Command::Requeue { queue, id } => {
            let ok = app.requeue(&queue, id).await?;
            println!(
                "{}",
                if ok {
                    "requeued"
                } else {
                    "no such dead letter"
                }
            );
        }
    }
    Ok(())
}
