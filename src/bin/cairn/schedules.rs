//! `cairn schedules …`: create, change, pause, resume, trigger, delete and
//! list schedules.

use cairn::{App, Fired, Missed, Overlap, Schedule, ScheduleChange};
use clap::{Subcommand, ValueEnum};

use crate::{json_arg, print_json};

#[derive(Subcommand)]
pub enum ScheduleAction {
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
pub enum MissedArg {
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
pub enum OverlapArg {
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

pub async fn schedules(app: &App, action: ScheduleAction) -> cairn::Result<()> {
    match action {
        ScheduleAction::List { json } => {
            let rows = app.list_schedules().await?;
            if json {
                print_json(&rows);
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
