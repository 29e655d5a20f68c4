//! `cairn`: operate a cairn database from the shell.
//!
//! ```text
//! DATABASE_URL=postgres://… cairn migrate
//! cairn queue create emails
//! cairn queues
//! cairn workers
//! cairn dead list --queue emails
//! cairn dead requeue emails
//! cairn schedules create nightly '30 2 * * *' --workflow report --timezone Europe/London
//! cairn schedules list --json
//! cairn runs list --status failed --since 2h
//! cairn runs retry --failed --workflow report
//! CAIRN_API_TOKEN=… cairn serve --listen 127.0.0.1:8080
//! ```
//!
//! Exit status: 0 done, 1 refused or failed (the reason on stderr), 2 bad
//! usage, 3 no such run, schedule, queue or workflow.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use cairn::App;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

mod operate;
mod runs;
mod schedules;

use runs::{RunAction, runs};
use schedules::{ScheduleAction, schedules};

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
    /// Per-queue counters: ready, delayed, in flight, dead, archived, and
    /// the oldest ready job's age (all queues, or one).
    #[command(visible_alias = "metrics")]
    Queues {
        /// Only this queue.
        queue: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The installation's health: schema current and undrifted, roles,
    /// waiting work, leases, orphaned runs, dead rows, the xmin horizon.
    /// Exit status 0 all ok, 4 warnings, 1 a failure.
    Doctor {
        /// Report ready jobs, expired leases, running steps, open
        /// transactions and late schedules older than this.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        warn_after: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// The worker processes: alive or lost, what they serve, since when.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Code-first workflows and flows, with counts of their runs.
    Workflows {
        #[arg(long)]
        json: bool,
    },
    /// List, plan and export flows.
    Flows {
        #[command(subcommand)]
        action: operate::FlowAction,
    },
    /// List dead letters, and put them back.
    Dead {
        #[command(subcommand)]
        action: operate::DeadAction,
    },
    /// List, show, start, cancel, retry and signal workflow runs.
    Runs {
        #[command(subcommand)]
        action: RunAction,
    },
    /// Create, change, pause, resume, trigger, delete and list schedules.
    Schedules {
        #[command(subcommand)]
        action: ScheduleAction,
    },
    /// Serve the HTTP API (JSON under /api/; see /api/openapi.json) and the
    /// web dashboard (at /).
    Serve {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// A bearer token that may read and write (repeatable). Prefer the
        /// environment: command lines are visible to other users.
        #[arg(
            long = "token",
            env = "CAIRN_API_TOKEN",
            value_delimiter = ',',
            hide_env_values = true
        )]
        tokens: Vec<String>,
        /// A bearer token that may only read.
        #[arg(
            long = "read-token",
            env = "CAIRN_API_READ_TOKEN",
            value_delimiter = ',',
            hide_env_values = true
        )]
        read_tokens: Vec<String>,
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
    /// Delete every live job of a queue (in batches of 5,000, with progress
    /// on a terminal).
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
        Ok(code) => code,
        Err(e) => {
            eprintln!("cairn: {e}");
            match e {
                cairn::Error::NotFound(_) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn run(cli: Cli) -> cairn::Result<ExitCode> {
    let app = App::builder()
        .database_url(cli.database_url)
        .max_connections(if matches!(cli.command, Command::Serve { .. }) {
            8
        } else {
            1
        })
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
                // In batches, each its own transaction, with progress on a
                // terminal; it stops once as many jobs as were there at the
                // start are gone, so producers cannot keep it going.
                const BATCH: u32 = 5_000;
                let m = app.metrics(&name).await?;
                let total = m.ready + m.delayed + m.in_flight;
                let progress = std::io::stderr().is_terminal() && total > i64::from(BATCH);
                let mut purged = 0;
                loop {
                    let n = app.purge_queue_batch(&name, BATCH).await?;
                    purged += n;
                    if progress {
                        eprint!("\rpurging {name}: {purged}/{total} ");
                        let _ = std::io::stderr().flush();
                    }
                    if n < i64::from(BATCH) || purged >= total {
                        break;
                    }
                }
                if progress {
                    eprintln!();
                }
                println!("purged {purged} jobs");
            }
        },
        Command::Queues { queue, json } => operate::queues(&app, queue, json).await?,
        Command::Doctor { warn_after, json } => {
            return operate::doctor(&app, warn_after, json).await;
        }
        Command::Workers { json } => operate::workers(&app, json).await?,
        Command::Workflows { json } => operate::workflows(&app, json).await?,
        Command::Flows { action } => operate::flows(&app, action).await?,
        Command::Dead { action } => operate::dead(&app, action).await?,
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
        Command::Serve {
            listen,
            tokens,
            read_tokens,
        } => {
            let mut keys = cairn::http::Tokens::new();
            for t in tokens.iter().filter(|t| !t.is_empty()) {
                keys = keys.full(t);
            }
            for t in read_tokens.iter().filter(|t| !t.is_empty()) {
                keys = keys.read_only(t);
            }
            if keys.is_empty() {
                return Err(cairn::Error::InvalidArgument(
                    "give the API a token: CAIRN_API_TOKEN (or --token), and CAIRN_API_READ_TOKEN for read-only access".into(),
                ));
            }
            let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
                cairn::Error::InvalidArgument(format!("cannot listen on {listen}: {e}"))
            })?;
            let addr = listener.local_addr().map_err(|e| {
                cairn::Error::InvalidArgument(format!("cannot listen on {listen}: {e}"))
            })?;
            println!("serving the cairn API on http://{addr}/api/");
            println!("the dashboard is at http://{addr}/ (sign in with an API token)");
            cairn::http::serve(app, keys, listener, cairn::shutdown_signal()).await?;
        }
        Command::Schedules { action } => schedules(&app, action).await?,
        Command::Runs { action } => runs(&app, action).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON argument, refused before anything is sent if it does not parse.
fn json_arg(what: &str, text: &str) -> cairn::Result<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| cairn::Error::InvalidArgument(format!("{what} is not JSON: {e}")))
}

/// `--since`: an RFC 3339 time, or an age such as `2h` or `7d` before now.
fn since_arg(text: &str) -> cairn::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let age = humantime::parse_duration(text).map_err(|e| {
        cairn::Error::InvalidArgument(format!(
            "--since {text:?} is neither an RFC 3339 time nor an age such as 2h: {e}"
        ))
    })?;
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .ok_or_else(|| cairn::Error::InvalidArgument(format!("--since {text:?} is too far back")))
}

/// Prints a value as one line of JSON (`--json`).
fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("cairn: cannot write JSON: {e}"),
    }
}
