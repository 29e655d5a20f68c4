//! `cairn runs …`: list, show, start, cancel, retry and signal runs.

use std::io::{IsTerminal, Write};

use cairn::{App, RunFilter, RunStatus, Uuid};
use clap::Subcommand;

use crate::{json_arg, print_json, since_arg};

#[derive(Subcommand)]
pub enum RunAction {
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
    /// A run's durable steps as they stand: status, attempts, time taken,
    /// output or error.
    Steps {
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

pub async fn runs(app: &App, action: RunAction) -> cairn::Result<()> {
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
            if let Some(s) = status.as_deref().map(str::parse::<RunStatus>).transpose()? {
                filter = filter.status(s);
            }
            if let Some(t) = since {
                filter = filter.since(since_arg(&t)?);
            }
            let rows = app.list_runs(filter).await?;
            if json {
                print_json(&rows);
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
            let value = serde_json::to_value(&r).unwrap_or_default();
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
                print_json(&events);
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
        RunAction::Steps { run, json } => {
            let steps = app.run_steps(run).await?;
            if json {
                print_json(&steps);
                return Ok(());
            }
            for s in steps {
                let took = match (s.started_at, s.finished_at) {
                    (Some(a), Some(b)) => format!("{} ms", (b - a).num_milliseconds()),
                    (Some(_), None) => "…".to_owned(),
                    _ => String::new(),
                };
                let mut shown = s.error.or(s.output).unwrap_or_default();
                if shown.chars().count() > 80 {
                    shown = shown.chars().take(79).chain(['…']).collect();
                }
                println!(
                    "{:>3}  {:<20} {:<7} {:<10} #{:<3} {:>9}  {}",
                    s.seq, s.key, s.kind, s.status, s.attempts, took, shown
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
