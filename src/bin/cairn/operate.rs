//! `cairn queues`, `workers`, `workflows`, `flows`, `dead` and `doctor`:
//! what an operator looks at.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use cairn::{App, Health};
use clap::Subcommand;

use crate::print_json;

#[derive(Subcommand)]
pub enum DeadAction {
    /// Dead letters, newest first, with their last error.
    List {
        /// Only this queue's.
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on their queue: one (`--id`) or all of it.
    Requeue {
        queue: String,
        /// Only this job.
        #[arg(long)]
        id: Option<i64>,
    },
}

#[derive(Subcommand)]
pub enum FlowAction {
    /// Stored flows, with their latest version.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A flow's dry run: its steps by stage.
    Plan {
        flow: String,
        #[arg(long)]
        json: bool,
    },
    /// SQL that recreates a flow (or, without a name, every flow) in
    /// another database.
    Export { flow: Option<String> },
}

pub async fn queues(app: &App, queue: Option<String>, json: bool) -> cairn::Result<()> {
    let rows = match queue {
        Some(q) => vec![app.metrics(&q).await?],
        None => app.metrics_all().await?,
    };
    if json {
        print_json(&rows);
        return Ok(());
    }
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "queue", "ready", "delayed", "in_flight", "dead", "archived", "oldest_age_s"
    );
    for m in rows {
        println!(
            "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12.3}",
            m.queue, m.ready, m.delayed, m.in_flight, m.dead, m.completed, m.oldest_ready_age
        );
    }
    Ok(())
}

pub async fn workers(app: &App, json: bool) -> cairn::Result<()> {
    let rows = app.list_workers().await?;
    if json {
        print_json(&rows);
        return Ok(());
    }
    println!(
        "{:<8} {:<20} {:>8} {:<5} {:<19} {:>5}  queues (handlers)",
        "worker", "host", "pid", "state", "since (UTC)", "slots"
    );
    for w in rows {
        println!(
            "{:<8} {:<20} {:>8} {:<5} {:<19} {:>5}  {} ({})",
            &w.id.to_string()[..8],
            w.host,
            w.pid,
            if w.alive { "alive" } else { "lost" },
            w.started_at.format("%Y-%m-%d %H:%M:%S"),
            w.concurrency,
            w.queues.join(", "),
            w.handlers.join(", ")
        );
    }
    Ok(())
}

pub async fn workflows(app: &App, json: bool) -> cairn::Result<()> {
    let rows = app.list_workflows().await?;
    if json {
        print_json(&rows);
        return Ok(());
    }
    println!(
        "{:<28} {:<9} {:<16} {:>8} {:>8} {:>10}",
        "workflow", "kind", "queue", "active", "failed", "completed"
    );
    for w in rows {
        println!(
            "{:<28} {:<9} {:<16} {:>8} {:>8} {:>10}",
            w.name,
            w.kind,
            w.queue.unwrap_or_default(),
            w.active,
            w.failed,
            w.completed
        );
    }
    Ok(())
}

pub async fn flows(app: &App, action: FlowAction) -> cairn::Result<()> {
    match action {
        FlowAction::List { json } => {
            let rows = app.list_flows().await?;
            if json {
                print_json(&rows);
                return Ok(());
            }
            println!(
                "{:<28} {:>7} {:>6} {:<16} updated (UTC)",
                "flow", "version", "steps", "queue"
            );
            for f in rows {
                println!(
                    "{:<28} {:>7} {:>6} {:<16} {}",
                    f.name,
                    f.version,
                    f.steps,
                    f.queue.unwrap_or_default(),
                    f.updated_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        FlowAction::Plan { flow, json } => {
            let steps = app.plan_flow(&flow).await?;
            if json {
                print_json(&steps);
                return Ok(());
            }
            for s in steps {
                let mut line = format!(
                    "stage {:>2}  {:<20} {} {}",
                    s.stage, s.step, s.kind, s.target
                );
                if !s.after.is_empty() {
                    line += &format!("  after {}", s.after.join(", "));
                }
                if let Some(c) = s.condition {
                    line += &format!("  when {c}");
                }
                if let Some(m) = s.fan_out {
                    line += &format!("  map {m}");
                }
                if let Some(l) = s.loop_to {
                    line += &format!("  goto {l}");
                }
                println!("{line}");
            }
        }
        FlowAction::Export { flow: Some(flow) } => println!("{}", app.export_flow(&flow).await?),
        FlowAction::Export { flow: None } => {
            for f in app.list_flows().await? {
                println!("{}", app.export_flow(&f.name).await?);
            }
        }
    }
    Ok(())
}

pub async fn dead(app: &App, action: DeadAction) -> cairn::Result<()> {
    match action {
        DeadAction::List { queue, limit, json } => {
            let rows = app.list_dead(queue.as_deref(), limit).await?;
            if json {
                print_json(&rows);
                return Ok(());
            }
            println!(
                "{:>10} {:<20} {:<20} {:>8} {:<19}  last error",
                "job", "queue", "task", "attempts", "died (UTC)"
            );
            for d in rows {
                println!(
                    "{:>10} {:<20} {:<20} {:>8} {:<19}  {}",
                    d.id,
                    d.queue,
                    d.task,
                    d.attempts,
                    d.died_at.format("%Y-%m-%d %H:%M:%S"),
                    d.last_error
                        .unwrap_or_default()
                        .lines()
                        .next()
                        .unwrap_or("")
                );
            }
        }
        DeadAction::Requeue {
            queue,
            id: Some(id),
        } => {
            if app.requeue(&queue, id).await? {
                println!("requeued job {id}");
            } else {
                return Err(cairn::Error::NotFound(format!(
                    "no dead letter {id} in queue {queue}"
                )));
            }
        }
        DeadAction::Requeue { queue, id: None } => {
            if std::io::stderr().is_terminal() {
                eprintln!("requeueing the dead letters of {queue}…");
            }
            let done = app.requeue_dead(&queue).await?;
            println!(
                "requeued {} dead letter(s); {} step job(s) left (retry their runs)",
                done.requeued, done.skipped
            );
        }
    }
    Ok(())
}

pub async fn doctor(app: &App, warn_after: Duration, json: bool) -> cairn::Result<ExitCode> {
    let checks = app.doctor(warn_after).await?;
    if json {
        print_json(&checks);
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            println!("{:<4}  {:<width$}  {}", c.status.as_str(), c.name, c.detail);
        }
    }
    Ok(match checks.iter().map(|c| c.status).max() {
        Some(Health::Fail) => ExitCode::FAILURE,
        Some(Health::Warn) => ExitCode::from(4),
        _ => ExitCode::SUCCESS,
    })
}
