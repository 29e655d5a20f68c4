//! `cairn`: operate a cairn database from the shell.
//!
//! ```text
//! DATABASE_URL=postgres://… cairn migrate
//! cairn queue create emails
//! cairn metrics
//! cairn requeue emails 42
//! cairn schedules create nightly '30 2 * * *' --workflow report --timezone Europe/London
//! cairn schedules list --json
//! cairn runs list --status failed --since 2h
//! cairn runs retry --failed --workflow report
//! ```
//!
//! Exit status: 0 done, 1 refused or failed (the reason on stderr), 2 bad
//! usage, 3 no such run, schedule, queue or workflow.

use std::process::ExitCode;

use std::io::{IsTerminal, Write};

use cairn::{App, Fired, Missed, Overlap, RunFilter, RunStatus, Schedule, ScheduleChange, Uuid};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Put a dead-lettered job back on its queue.
    Requeue {
        /// The job's queue.
        queue: String,
        /// The job's id.
        id: i64,
    },
}

#[derive(Subcommand)]
enum RunAction {
    /// Runs, newest first.
    List {
        #[arg(long)]
        workflow: Option<String>,
        /// pending, running, sleeping, waiting, completed, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Started since: a time (RFC 3339) or an age such as 2h or 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// A run's status, input, output, error, timings, parent and children.
    Show {
        run: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// A run's history: attempts, waits, signals, failures, retries.
    History {
        run: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Start a run; prints its id.
    Start {
        workflow: String,
        /// The input, JSON.
        #[arg(long, default_value = "null")]
        input: String,
        /// An idempotency key: the same key names the same run.
        #[arg(long)]
        key: Option<String>,
    },
    /// Cancel a run and its children.
    Cancel { run: Uuid },
    /// Retry a failed run from its failed step, or with --failed every
    /// failed run that matches.
    Retry {
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        run: Option<Uuid>,
        /// Every failed run (narrowed by --workflow and --since).
        #[arg(long)]
        failed: bool,
        #[arg(long, requires = "failed")]
        workflow: Option<String>,
        #[arg(long, requires = "failed")]
        since: Option<String>,
    },
    /// Send a signal to a run.
    Signal {
        run: Uuid,
        name: String,
        /// The payload, JSON.
        #[arg(long, default_value = "null")]
        payload: String,
    },
}

#[derive(Subcommand)]
enum ScheduleAction {
    /// List every schedule with its next and last fire.
    List {
        /// One JSON object per schedule, in an array.
        #[arg(long)]
        json: bool,
    },
    /// Create a schedule that starts a workflow run or enqueues a job.
    Create {
        /// Its name.
        name: String,
        /// Five cron fields (quote them) or a shorthand such as @daily.
        cron: String,
        /// The workflow each tick starts.
        #[arg(long, conflicts_with = "queue", required_unless_present = "queue")]
        workflow: Option<String>,
        /// The queue each tick enqueues a job on.
        #[arg(long)]
        queue: Option<String>,
        /// The job's task name (default: the queue's name).
        #[arg(long, requires = "queue")]
        task: Option<String>,
        /// The input: a JSON object (`scheduled_at` is added per tick).
        #[arg(long, default_value = "{}")]
        input: String,
        /// An IANA time zone.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Ticks missed while no worker ran.
        #[arg(long, value_enum, default_value_t = MissedArg::Coalesce)]
        missed: MissedArg,
        /// A tick while the previous run is live.
        #[arg(long, value_enum, default_value_t = OverlapArg::Allow)]
        overlap: OverlapArg,
        /// Lower runs first.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i16,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Change a schedule; what is not given is kept.
    Update {
        name: String,
        #[arg(long)]
        cron: Option<String>,
        #[arg(long)]
        timezone: Option<String>,
        /// A JSON object.
        #[arg(long)]
        input: Option<String>,
        #[arg(long, value_enum)]
        missed: Option<MissedArg>,
        #[arg(long, value_enum)]
        overlap: Option<OverlapArg>,
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i16>,
    },
    /// Stop a schedule firing.
    Pause { name: String },
    /// Let a paused schedule fire again from its next tick.
    Resume { name: String },
    /// Fire a schedule now.
    Trigger { name: String },
    /// Delete a schedule (its runs are kept).
    Delete { name: String },
    /// Show the next fire times of a cron expression.
    Next {
        cron: String,
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// How many.
        #[arg(short, default_value_t = 5)]
        n: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum MissedArg {
    Coalesce,
    CatchUp,
}

impl From<MissedArg> for Missed {
    fn from(m: MissedArg) -> Self {
        match m {
            MissedArg::Coalesce => Missed::Coalesce,
            MissedArg::CatchUp => Missed::CatchUp,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OverlapArg {
    Allow,
    Skip,
    Queue,
}

impl From<OverlapArg> for Overlap {
    fn from(o: OverlapArg) -> Self {
        match o {
            OverlapArg::Allow => Overlap::Allow,
            OverlapArg::Skip => Overlap::Skip,
            OverlapArg::Queue => Overlap::Queue,
        }
    }
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
            match e {
                cairn::Error::NotFound(_) => ExitCode::from(3),
                _ => ExitCode::FAILURE,
            }
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
        Command::Schedules { action } => schedules(&app, action).await?,
        Command::Runs { action } => runs(&app, action).await?,
    }
    Ok(())
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

fn status_arg(text: Option<&str>) -> cairn::Result<Option<RunStatus>> {
    text.map(str::parse).transpose()
}

/// A JSON text column as a JSON value (for --json output).
fn json_text(text: Option<&str>) -> serde_json::Value {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(serde_json::Value::Null)
}

async fn runs(app: &App, action: RunAction) -> cairn::Result<()> {
    match action {
        RunAction::List {
            workflow,
            status,
            since,
            limit,
            json,
        } => {
            let mut filter = RunFilter::default().limit(limit);
            if let Some(w) = &workflow {
                filter = filter.workflow(w);
            }
            if let Some(s) = status_arg(status.as_deref())? {
                filter = filter.status(s);
            }
            if let Some(t) = since {
                filter = filter.since(since_arg(&t)?);
            }
            let rows = app.list_runs(filter).await?;
            if json {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id, "workflow": r.workflow, "status": r.status.as_str(),
                            "created_at": r.created_at, "finished_at": r.finished_at,
                            "error": r.error, "parent_run": r.parent_run,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            println!(
                "{:<36}  {:<20} {:<10} {:<19}  error",
                "run", "workflow", "status", "started (UTC)"
            );
            for r in rows {
                println!(
                    "{:<36}  {:<20} {:<10} {:<19}  {}",
                    r.id,
                    r.workflow,
                    r.status,
                    r.created_at.format("%Y-%m-%d %H:%M:%S"),
                    r.error.unwrap_or_default().lines().next().unwrap_or("")
                );
            }
        }
        RunAction::Show { run, json } => {
            let r = app.run(run).await?;
            let value = serde_json::json!({
                "id": r.id, "workflow": r.workflow, "status": r.status.as_str(),
                "input": json_text(Some(&r.input)), "output": json_text(r.output.as_deref()),
                "error": r.error, "idempotency_key": r.idempotency_key, "queue": r.queue,
                "priority": r.priority, "parent_run": r.parent_run, "parent_step": r.parent_step,
                "children": r.children, "created_at": r.created_at, "started_at": r.started_at,
                "finished_at": r.finished_at, "wake_at": r.wake_at,
            });
            if json {
                println!("{value}");
                return Ok(());
            }
            for (k, v) in value.as_object().into_iter().flatten() {
                if !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()) {
                    println!(
                        "{k:<16} {}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                    );
                }
            }
        }
        RunAction::History { run, json } => {
            let events = app.run_history(run).await?;
            if json {
                let rows: Vec<serde_json::Value> = events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "at": e.at, "ended_at": e.ended_at, "event": e.event, "step": e.step,
                            "attempt": e.attempt, "outcome": e.outcome, "error": e.error,
                            "detail": json_text(e.detail.as_deref()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            for e in events {
                println!(
                    "{}  {:<10} {:<20} {:<8} {:<10} {}",
                    e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
                    e.event,
                    e.step.unwrap_or_default(),
                    e.attempt.map(|a| format!("#{a}")).unwrap_or_default(),
                    e.outcome.unwrap_or_default(),
                    e.error.or(e.detail).unwrap_or_default()
                );
            }
        }
        RunAction::Start {
            workflow,
            input,
            key,
        } => {
            let input = json_arg("--input", &input)?;
            let start = app.start(&workflow, &input);
            let run = match &key {
                Some(key) => start.idempotency_key(key).await?,
                None => start.await?,
            };
            println!("{run}");
        }
        RunAction::Cancel { run } => {
            let n = app.cancel_run(run).await?;
            println!("cancelled {n} run(s)");
        }
        RunAction::Retry {
            run: Some(run),
            failed: false,
            ..
        } => {
            if app.retry_run(run).await? {
                println!("run {run} retried");
            } else {
                return Err(cairn::Error::InvalidState(format!(
                    "run {run} has not failed: nothing to retry"
                )));
            }
        }
        RunAction::Retry {
            workflow, since, ..
        } => {
            let mut filter = RunFilter::default().status(RunStatus::Failed).limit(10_000);
            if let Some(w) = &workflow {
                filter = filter.workflow(w);
            }
            if let Some(t) = since {
                filter = filter.since(since_arg(&t)?);
            }
            let failed = app.list_runs(filter).await?;
            let progress = std::io::stderr().is_terminal();
            let mut retried = 0;
            for (i, r) in failed.iter().enumerate() {
                if app.retry_run(r.id).await? {
                    retried += 1;
                }
                if progress {
                    eprint!("\rretrying: {}/{} ", i + 1, failed.len());
                    let _ = std::io::stderr().flush();
                }
            }
            if progress {
                eprintln!();
            }
            println!("retried {retried} failed run(s)");
        }
        RunAction::Signal { run, name, payload } => {
            let payload = json_arg("--payload", &payload)?;
            app.send_signal(run, &name, &payload).await?;
            println!("signal {name} sent to run {run}");
        }
    }
    Ok(())
}

async fn schedules(app: &App, action: ScheduleAction) -> cairn::Result<()> {
    match action {
        ScheduleAction::List { json } => {
            let rows = app.list_schedules().await?;
            if json {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "name": s.name, "cron": s.cron, "timezone": s.timezone,
                            "workflow": s.workflow, "queue": s.queue, "task": s.task,
                            "input": serde_json::from_str::<serde_json::Value>(&s.input).ok(),
                            "priority": s.priority, "missed": s.missed, "overlap": s.overlap,
                            "paused": s.paused, "next_fire": s.next_fire, "last_fire": s.last_fire,
                            "last_run": s.last_run, "last_job": s.last_job, "fired": s.fired,
                            "skipped": s.skipped, "last_error": s.last_error,
                            "created_at": s.created_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            println!(
                "{:<20} {:<16} {:<18} {:<20} {:<7} {:>7} {:<21} target",
                "name", "cron", "timezone", "policy", "state", "fired", "next fire (UTC)"
            );
            for s in rows {
                let target = match (&s.workflow, &s.queue, &s.task) {
                    (Some(w), _, _) => format!("workflow {w}"),
                    (None, Some(q), Some(t)) => format!("queue {q} (task {t})"),
                    (None, Some(q), None) => format!("queue {q}"),
                    _ => String::new(),
                };
                println!(
                    "{:<20} {:<16} {:<18} {:<20} {:<7} {:>7} {:<21} {target}{}",
                    s.name,
                    s.cron,
                    s.timezone,
                    format!("{}/{}", s.missed, s.overlap),
                    if s.paused { "paused" } else { "active" },
                    s.fired,
                    s.next_fire.format("%Y-%m-%d %H:%M:%S"),
                    s.last_error
                        .map(|e| format!("  (last error: {e})"))
                        .unwrap_or_default(),
                );
            }
        }
        ScheduleAction::Create {
            name,
            cron,
            workflow,
            queue,
            task,
            input,
            timezone,
            missed,
            overlap,
            priority,
            paused,
        } => {
            let input = json_arg("--input", &input)?;
            let schedule = match (workflow, queue) {
                (Some(w), _) => Schedule::workflow(&name, &cron, &w),
                (None, Some(q)) => Schedule::queue(&name, &cron, &q),
                (None, None) => unreachable!("clap requires --workflow or --queue"),
            };
            let mut schedule = schedule
                .input(&input)
                .timezone(&timezone)
                .missed(missed.into())
                .overlap(overlap.into())
                .priority(priority)
                .paused(paused);
            if let Some(task) = task {
                schedule = schedule.task_name(&task);
            }
            let first = app.create_schedule(schedule).await?;
            println!("schedule {name} created; first fire {first}");
        }
        ScheduleAction::Update {
            name,
            cron,
            timezone,
            input,
            missed,
            overlap,
            priority,
        } => {
            let mut change = ScheduleChange::default();
            if let Some(cron) = cron {
                change = change.cron(&cron);
            }
            if let Some(tz) = timezone {
                change = change.timezone(&tz);
            }
            if let Some(input) = input {
                change = change.input(&json_arg("--input", &input)?);
            }
            if let Some(m) = missed {
                change = change.missed(m.into());
            }
            if let Some(o) = overlap {
                change = change.overlap(o.into());
            }
            if let Some(p) = priority {
                change = change.priority(p);
            }
            let next = app.update_schedule(&name, change).await?;
            println!("schedule {name} updated; next fire {next}");
        }
        ScheduleAction::Pause { name } => {
            app.pause_schedule(&name).await?;
            println!("schedule {name} paused");
        }
        ScheduleAction::Resume { name } => {
            let next = app.resume_schedule(&name).await?;
            println!("schedule {name} resumed; next fire {next}");
        }
        ScheduleAction::Trigger { name } => match app.trigger_schedule(&name).await? {
            Fired::Run(run) => println!("started run {run}"),
            Fired::Job(job) => println!("enqueued job {job}"),
            _ => println!("fired"),
        },
        ScheduleAction::Delete { name } => {
            if app.delete_schedule(&name).await? {
                println!("schedule {name} deleted");
            } else {
                return Err(cairn::Error::NotFound(format!(
                    "unknown schedule \"{name}\""
                )));
            }
        }
        ScheduleAction::Next { cron, timezone, n } => {
            for t in app.next_fires(&cron, &timezone, n).await? {
                println!("{}", t.to_rfc3339());
            }
        }
    }
    Ok(())
}
