//! Schedules: cron ticks that start workflow runs or enqueue jobs. Reading
//! cron, time zones, daylight-saving rules and the tick itself live in SQL
//! (`sql/60_schedules.sql`); every worker calls the tick about once a second.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::Result;
use crate::task::Task;

/// What a schedule does with ticks missed while no worker ran (all workers
/// down for three hours, say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Missed {
    /// One run for all of them (for the first tick missed); the next fires
    /// at the first tick after now. The default.
    #[default]
    Coalesce,
    /// Every missed tick fires, oldest first, at most 100 per tick call, so
    /// a long outage does not flood the queue at once.
    CatchUp,
}

impl Missed {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Missed::Coalesce => "coalesce",
            Missed::CatchUp => "catch_up",
        }
    }
}

/// What a schedule does with a tick while the run (or job) it started last
/// is still live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overlap {
    /// Fire anyway. The default.
    #[default]
    Allow,
    /// Drop the tick (counted in [`ScheduleInfo::skipped`]).
    Skip,
    /// Hold the tick and fire it once the previous run has ended.
    Queue,
}

impl Overlap {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Overlap::Allow => "allow",
            Overlap::Skip => "skip",
            Overlap::Queue => "queue",
        }
    }
}

/// What a tick starts.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Workflow(String),
    Queue(String),
}

/// A schedule to create with [`App::create_schedule`](crate::App::create_schedule).
///
/// ```no_run
/// # async fn demo(app: cairn::App) -> cairn::Result<()> {
/// use cairn::{Missed, Schedule};
/// let first = app
///     .create_schedule(
///         Schedule::workflow("nightly_report", "30 2 * * *", "report")
///             .timezone("Europe/London")
///             .missed(Missed::CatchUp),
///     )
///     .await?;
/// println!("first report at {first}");
/// # Ok(()) }
/// ```
///
/// Each run's input is the schedule's input (a JSON object, `{}` by
/// default) with `"scheduled_at"` added: the tick's time in UTC, RFC 3339,
/// which a `chrono::DateTime<Utc>` field reads.
#[derive(Debug)]
pub struct Schedule {
    pub(crate) name: String,
    pub(crate) cron: String,
    pub(crate) target: Target,
    pub(crate) task: Option<String>,
    pub(crate) input: Result<String>,
    pub(crate) timezone: String,
    pub(crate) missed: Missed,
    pub(crate) overlap: Overlap,
    pub(crate) priority: i16,
    pub(crate) paused: bool,
}

impl Schedule {
    fn new(name: &str, cron: &str, target: Target) -> Self {
        Self {
            name: name.to_owned(),
            cron: cron.to_owned(),
            target,
            task: None,
            input: Ok("{}".to_owned()),
            timezone: "UTC".to_owned(),
            missed: Missed::default(),
            overlap: Overlap::default(),
            priority: 0,
            paused: false,
        }
    }

    /// A schedule named `name` that starts a run of `workflow` at every tick
    /// of `cron` (five fields or a shorthand such as `@daily`).
    pub fn workflow(name: &str, cron: &str, workflow: &str) -> Self {
        Self::new(name, cron, Target::Workflow(workflow.to_owned()))
    }

    /// A schedule that enqueues `task` (a job of task `T`) at every tick.
    /// `T` must serialize to a JSON object; its handler reads the job as a
    /// `T` (serde ignores the added `scheduled_at` unless `T` has the field).
    pub fn task<T: Task>(name: &str, cron: &str, task: &T) -> Self {
        Self::new(name, cron, Target::Queue(T::QUEUE.to_owned()))
            .task_name(T::NAME)
            .input(task)
    }

    /// A schedule that enqueues a job on `queue` (task named as the queue)
    /// at every tick, as `cairn.send(queue, input)` would.
    pub fn queue(name: &str, cron: &str, queue: &str) -> Self {
        Self::new(name, cron, Target::Queue(queue.to_owned()))
    }

    /// The task name of the jobs a [`queue`](Self::queue) schedule enqueues
    /// (default: the queue's name). A workflow schedule refuses one.
    pub fn task_name(mut self, task: &str) -> Self {
        self.task = Some(task.to_owned());
        self
    }

    /// The input of every run (or job): a value that serializes to a JSON
    /// object. `"scheduled_at"` is added to it.
    pub fn input<I: Serialize + ?Sized>(mut self, input: &I) -> Self {
        self.input = crate::app::serialize(input, "schedule input");
        self
    }

    /// The IANA time zone whose wall clock the cron fields match (default
    /// `UTC`), e.g. `Europe/London`.
    pub fn timezone(mut self, timezone: &str) -> Self {
        timezone.clone_into(&mut self.timezone);
        self
    }

    /// What ticks missed while no worker ran do; see [`Missed`].
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// What a tick does while the previous run is live; see [`Overlap`].
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// The priority of every run or job (lower runs first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Create it paused; [`App::resume_schedule`](crate::App::resume_schedule)
    /// starts it.
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }
}

/// Changes to a schedule, for [`App::update_schedule`](crate::App::update_schedule);
/// what is left unset is kept.
#[derive(Debug, Default)]
pub struct ScheduleChange {
    pub(crate) cron: Option<String>,
    pub(crate) timezone: Option<String>,
    pub(crate) input: Option<Result<String>>,
    pub(crate) missed: Option<Missed>,
    pub(crate) overlap: Option<Overlap>,
    pub(crate) priority: Option<i16>,
}

impl ScheduleChange {
    /// A new cron expression; the next fire becomes its first tick from now.
    pub fn cron(mut self, cron: &str) -> Self {
        self.cron = Some(cron.to_owned());
        self
    }

    /// A new time zone; the next fire becomes the first tick from now.
    pub fn timezone(mut self, timezone: &str) -> Self {
        self.timezone = Some(timezone.to_owned());
        self
    }

    /// A new input (a JSON object).
    pub fn input<I: Serialize + ?Sized>(mut self, input: &I) -> Self {
        self.input = Some(crate::app::serialize(input, "schedule input"));
        self
    }

    /// A new policy for missed ticks.
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = Some(missed);
        self
    }

    /// A new overlap policy.
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = Some(overlap);
        self
    }

    /// A new priority.
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = Some(priority);
        self
    }
}

/// A schedule as stored, from [`App::list_schedules`](crate::App::list_schedules).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct ScheduleInfo {
    /// Its name.
    pub name: String,
    /// The cron expression.
    pub cron: String,
    /// The IANA time zone.
    pub timezone: String,
    /// The workflow a tick starts, if it starts runs.
    pub workflow: Option<String>,
    /// The queue a tick enqueues on, if it enqueues jobs.
    pub queue: Option<String>,
    /// The task name of those jobs, if not the queue's name.
    pub task: Option<String>,
    /// The input, as JSON text (`scheduled_at` is added per tick).
    #[serde(serialize_with = "crate::json::embedded")]
    pub input: String,
    /// The priority of what it starts.
    pub priority: i32,
    /// `coalesce` or `catch_up`.
    pub missed: String,
    /// `allow`, `skip` or `queue`.
    pub overlap: String,
    /// Whether it is paused.
    pub paused: bool,
    /// Its next tick.
    pub next_fire: DateTime<Utc>,
    /// The last tick that fired.
    pub last_fire: Option<DateTime<Utc>>,
    /// The run it started last (by a tick or a trigger).
    pub last_run: Option<uuid::Uuid>,
    /// The job it enqueued last.
    pub last_job: Option<i64>,
    /// Ticks (and triggers) fired.
    pub fired: i64,
    /// Ticks dropped by [`Overlap::Skip`].
    pub skipped: i64,
    /// Why the last tick could not fire, if it could not (its queue was
    /// dropped, say); such a tick is dropped, the next one tried.
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// What [`App::trigger_schedule`](crate::App::trigger_schedule) started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fired {
    /// A workflow run.
    Run(uuid::Uuid),
    /// A job.
    Job(i64),
}
