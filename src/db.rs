//! The only place with SQL text: one small function per stored function.
//!
//! Every state change is one call of one `cairn.*` function (one round trip);
//! nothing here reads, modifies and writes back. Calls whose loss in a crash
//! is harmless (a claim, a lease extension, beginning an execution or a step
//! that carries no outcome) turn off synchronous commit for their own
//! transaction; the SQL functions never do it for a caller's transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{FromRow, PgExecutor, Row};

use crate::error::{DbContext, Result};
use crate::flow::{FlowInfo, PlannedStep};
use crate::operate::{Check, DeadLetter, Requeued, WorkerInfo, WorkflowInfo};
use crate::pooler::Db;
use crate::queue::QueueMetrics;
use crate::retention::{Pruned, Retention};
use crate::run::{RunDetail, RunEvent, RunFilter, RunInfo, RunStep, RunSummary, StepStatus};
use crate::schedule::{Fired, Missed, Overlap, Schedule, ScheduleChange, ScheduleInfo, Target};

/// A job handed out by a claim, with the lease that fences it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ClaimedJob {
    pub id: i64,
    pub task: String,
    pub payload: String,
    pub attempts: i32,
    pub lease: i64,
    /// The workflow run waiting for this job's output, if any.
    pub parent_run: Option<uuid::Uuid>,
    /// The producer's W3C trace context.
    pub traceparent: Option<String>,
    /// The workflow run this job drives, if it is a run's job.
    pub run_id: Option<uuid::Uuid>,
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub(crate) async fn create_queue(db: impl PgExecutor<'_>, queue: &str) -> Result<()> {
    sqlx::query("select cairn.create_queue($1)")
        .bind(queue)
        .execute(db)
        .await
        .db("creating a queue")?;
    Ok(())
}

pub(crate) async fn drop_queue(db: impl PgExecutor<'_>, queue: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.drop_queue($1)")
        .bind(queue)
        .fetch_one(db)
        .await
        .db("dropping a queue")
}

pub(crate) async fn purge_queue(db: impl PgExecutor<'_>, queue: &str) -> Result<i64> {
    sqlx::query_scalar("select cairn.purge_queue($1)")
        .bind(queue)
        .fetch_one(db)
        .await
        .db("purging a queue")
}

pub(crate) async fn purge_queue_batch(
    db: impl PgExecutor<'_>,
    queue: &str,
    limit: u32,
) -> Result<i64> {
    sqlx::query_scalar("select cairn.purge_queue($1, $2)")
        .bind(queue)
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .fetch_one(db)
        .await
        .db("purging a queue")
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn send(
    db: impl PgExecutor<'_>,
    queue: &str,
    task: &str,
    payload: &str,
    delay: Duration,
    priority: i16,
    traceparent: Option<&str>,
) -> Result<i64> {
    sqlx::query_scalar("select cairn.send($1, $2::jsonb, $3, $4, $5, $6)")
        .bind(queue)
        .bind(payload)
        .bind(secs(delay))
        .bind(i32::from(priority))
        .bind(task)
        .bind(traceparent)
        .fetch_one(db)
        .await
        .db("enqueueing a job")
}

pub(crate) async fn send_batch(
    db: impl PgExecutor<'_>,
    queue: &str,
    task: &str,
    payloads: &[String],
    delay: Duration,
    priority: i16,
) -> Result<Vec<i64>> {
    // The ids as one array, in the order the function returns them: one
    // row on the wire instead of one per job.
    sqlx::query_scalar("select array(select cairn.send_batch($1, $2::jsonb[], $3, $4, $5))")
        .bind(queue)
        .bind(payloads)
        .bind(secs(delay))
        .bind(i32::from(priority))
        .bind(task)
        .fetch_one(db)
        .await
        .db("enqueueing a batch of jobs")
}

/// Where a claim resumes in a queue's order: the (priority, visibility time)
/// of the last job the previous claim took.
pub(crate) type QueuePosition = (i32, DateTime<Utc>);

/// Leases up to `qty` jobs, resuming at `from` (`None`: from the head of
/// the queue). Returns them and where the next claim should resume.
pub(crate) async fn claim(
    db: &Db,
    queue: &str,
    lease: Duration,
    qty: usize,
    tasks: &[String],
    from: Option<QueuePosition>,
) -> Result<(Vec<ClaimedJob>, Option<QueuePosition>)> {
    let rows = sqlx::query(
        "select c.id, c.task, c.payload::text as payload, c.attempts, c.lease, c.parent_run, \
                c.traceparent, c.run_id, c.next_priority, c.next_at \
           from (select set_config('synchronous_commit', 'off', true)) async_commit, \
                cairn.claim_from($1, $2, $3, $4, $5, $6) c",
    )
    .bind(queue)
    .bind(secs(lease))
    .bind(i32::try_from(qty).unwrap_or(i32::MAX))
    .bind(tasks)
    .bind(from.map(|f| f.0))
    .bind(from.map(|f| f.1))
    .fetch_all(db)
    .await
    .db("claiming jobs")?;
    let next = match rows.first() {
        Some(row) => Some((
            row.try_get("next_priority").db("claiming jobs")?,
            row.try_get("next_at").db("claiming jobs")?,
        )),
        None => None,
    };
    let jobs = rows
        .iter()
        .map(ClaimedJob::from_row)
        .collect::<std::result::Result<_, _>>()
        .db("claiming jobs")?;
    Ok((jobs, next))
}

pub(crate) async fn ack(db: &Db, ids: &[i64], leases: &[i64]) -> Result<Vec<i64>> {
    sqlx::query_scalar("select cairn.ack($1, $2)")
        .bind(ids)
        .bind(leases)
        .fetch_all(db)
        .await
        .db("acknowledging jobs")
}

/// Acks jobs run as workflow steps, handing each output to its step.
pub(crate) async fn ack_with_outputs(
    db: &Db,
    ids: &[i64],
    leases: &[i64],
    outputs: &[Option<String>],
) -> Result<Vec<i64>> {
    sqlx::query_scalar("select cairn.ack($1, $2, $3::jsonb[])")
        .bind(ids)
        .bind(leases)
        .bind(outputs)
        .fetch_all(db)
        .await
        .db("acknowledging step jobs")
}

/// A job leased by [`ack_and_take`], and the queue it sits in.
pub(crate) struct TakenJob {
    pub queue: String,
    pub job: ClaimedJob,
}

/// What [`ack_and_take`] may lease: up to `qty` jobs, for `lease`, sitting
/// in `queues` and naming one of `tasks` (the worker's step handlers).
pub(crate) struct Take<'a> {
    pub lease: Duration,
    pub qty: usize,
    pub queues: &'a [String],
    pub tasks: &'a [String],
}

/// Acks jobs run as flow steps, as [`ack_with_outputs`], and leases the
/// step jobs those acks started, as `take` allows. Returns the ids acked
/// and the jobs taken.
pub(crate) async fn ack_and_take(
    db: &Db,
    ids: &[i64],
    leases: &[i64],
    outputs: &[Option<String>],
    take: Take<'_>,
) -> Result<(Vec<i64>, Vec<TakenJob>)> {
    let rows = sqlx::query(
        "select taken, id, task, payload::text as payload, attempts, lease, parent_run, \
                traceparent, run_id, queue \
           from cairn.ack_and_take($1, $2, $3::jsonb[], $4, $5, $6, $7)",
    )
    .bind(ids)
    .bind(leases)
    .bind(outputs)
    .bind(secs(take.lease))
    .bind(i32::try_from(take.qty).unwrap_or(i32::MAX))
    .bind(take.queues)
    .bind(take.tasks)
    .fetch_all(db)
    .await
    .db("acknowledging step jobs")?;
    let mut acked = Vec::new();
    let mut taken = Vec::new();
    for row in &rows {
        if row.try_get("taken").db("acknowledging step jobs")? {
            taken.push(TakenJob {
                queue: row.try_get("queue").db("acknowledging step jobs")?,
                job: ClaimedJob::from_row(row).db("acknowledging step jobs")?,
            });
        } else {
            acked.push(row.try_get("id").db("acknowledging step jobs")?);
        }
    }
    Ok((acked, taken))
}

pub(crate) async fn archive(
    db: &Db,
    ids: &[i64],
    leases: &[i64],
    outputs: &[Option<String>],
) -> Result<Vec<i64>> {
    sqlx::query_scalar("select cairn.archive($1, $2, $3::jsonb[])")
        .bind(ids)
        .bind(leases)
        .bind(outputs)
        .fetch_all(db)
        .await
        .db("archiving jobs")
}

pub(crate) async fn retry(
    db: &Db,
    id: i64,
    lease: i64,
    delay: Duration,
    error: &str,
) -> Result<bool> {
    sqlx::query_scalar("select cairn.retry($1, $2, $3, $4)")
        .bind(id)
        .bind(lease)
        .bind(secs(delay))
        .bind(error)
        .fetch_one(db)
        .await
        .db("scheduling a retry")
}

pub(crate) async fn fail(db: &Db, id: i64, lease: i64, error: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.fail($1, $2, $3)")
        .bind(id)
        .bind(lease)
        .bind(error)
        .fetch_one(db)
        .await
        .db("dead-lettering a job")
}

pub(crate) async fn extend(
    db: &Db,
    ids: &[i64],
    leases: &[i64],
    lease: Duration,
) -> Result<Vec<i64>> {
    sqlx::query_scalar(
        "select e from cairn.extend($1, $2, $3) e \
          where set_config('synchronous_commit', 'off', true) is not null",
    )
    .bind(ids)
    .bind(leases)
    .bind(secs(lease))
    .fetch_all(db)
    .await
    .db("extending leases")
}

pub(crate) async fn release(db: &Db, ids: &[i64], leases: &[i64]) -> Result<Vec<i64>> {
    sqlx::query_scalar("select cairn.release($1, $2)")
        .bind(ids)
        .bind(leases)
        .fetch_all(db)
        .await
        .db("releasing jobs")
}

pub(crate) async fn delete(db: impl PgExecutor<'_>, queue: &str, id: i64) -> Result<bool> {
    sqlx::query_scalar("select cairn.delete($1, $2)")
        .bind(queue)
        .bind(id)
        .fetch_one(db)
        .await
        .db("deleting a job")
}

pub(crate) async fn requeue(db: impl PgExecutor<'_>, queue: &str, id: i64) -> Result<bool> {
    sqlx::query_scalar("select cairn.requeue($1, $2)")
        .bind(queue)
        .bind(id)
        .fetch_one(db)
        .await
        .db("requeueing a dead letter")
}

pub(crate) async fn metrics(db: impl PgExecutor<'_>, queue: &str) -> Result<QueueMetrics> {
    sqlx::query_as("select * from cairn.metrics($1)")
        .bind(queue)
        .fetch_one(db)
        .await
        .db("reading queue metrics")
}

pub(crate) async fn metrics_all(db: impl PgExecutor<'_>) -> Result<Vec<QueueMetrics>> {
    sqlx::query_as("select * from cairn.metrics_all()")
        .fetch_all(db)
        .await
        .db("reading queue metrics")
}

// ---- workflow runs: the API -------------------------------------------------

pub(crate) async fn register_workflow(
    db: impl PgExecutor<'_>,
    workflow: &str,
    queue: &str,
) -> Result<()> {
    sqlx::query("select cairn.register_workflow($1, $2)")
        .bind(workflow)
        .bind(queue)
        .execute(db)
        .await
        .db("registering a workflow")?;
    Ok(())
}

/// A run to start: what `cairn.start_workflow` takes.
pub(crate) struct NewRun<'a> {
    pub workflow: &'a str,
    pub input: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub queue: Option<&'a str>,
    pub priority: i16,
    pub delay: Duration,
    pub traceparent: Option<&'a str>,
    /// `reject` or `return`: what an idempotency key that names a run with
    /// another input means.
    pub conflict: &'static str,
}

pub(crate) async fn start_workflow(db: impl PgExecutor<'_>, run: NewRun<'_>) -> Result<uuid::Uuid> {
    sqlx::query_scalar("select cairn.start_workflow($1, $2::jsonb, $3, $4, $5, $6, $7, $8)")
        .bind(run.workflow)
        .bind(run.input)
        .bind(run.idempotency_key)
        .bind(run.queue)
        .bind(i32::from(run.priority))
        .bind(secs(run.delay))
        .bind(run.traceparent)
        .bind(run.conflict)
        .fetch_one(db)
        .await
        .db("starting a workflow")
}

pub(crate) async fn send_signal(
    db: impl PgExecutor<'_>,
    run: uuid::Uuid,
    name: &str,
    payload: &str,
) -> Result<i64> {
    sqlx::query_scalar("select cairn.send_signal($1, $2, $3::jsonb)")
        .bind(run)
        .bind(name)
        .bind(payload)
        .fetch_one(db)
        .await
        .db("sending a signal")
}

pub(crate) async fn cancel_run(db: impl PgExecutor<'_>, run: uuid::Uuid) -> Result<i32> {
    sqlx::query_scalar("select cairn.cancel_run($1)")
        .bind(run)
        .fetch_one(db)
        .await
        .db("cancelling a run")
}

pub(crate) async fn retry_run(db: impl PgExecutor<'_>, run: uuid::Uuid) -> Result<bool> {
    sqlx::query_scalar("select cairn.retry_run($1)")
        .bind(run)
        .fetch_one(db)
        .await
        .db("retrying a run")
}

pub(crate) async fn run_status(db: impl PgExecutor<'_>, run: uuid::Uuid) -> Result<RunInfo> {
    sqlx::query_as(
        "select id, workflow, status, output::text as output, error, created_at, started_at, \
         finished_at, wake_at from cairn.run_status($1)",
    )
    .bind(run)
    .fetch_one(db)
    .await
    .db("reading a run's status")
}

pub(crate) async fn get_run(db: impl PgExecutor<'_>, run: uuid::Uuid) -> Result<RunDetail> {
    sqlx::query_as(
        "select id, workflow, status, input::text as input, output::text as output, error, \
         idempotency_key, queue, priority, parent_run, parent_step, children, created_at, \
         started_at, finished_at, wake_at from cairn.get_run($1)",
    )
    .bind(run)
    .fetch_one(db)
    .await
    .db("reading a run")
}

pub(crate) async fn list_runs(
    db: impl PgExecutor<'_>,
    filter: &RunFilter,
) -> Result<Vec<RunSummary>> {
    sqlx::query_as(
        "select run_id as id, run_workflow as workflow, run_status as status, created_at, \
         finished_at, error, parent_run from cairn.list_runs($1, $2, $3, $4)",
    )
    .bind(filter.workflow.as_deref())
    .bind(filter.status.map(|s| s.as_str()))
    .bind(i32::try_from(filter.limit).unwrap_or(i32::MAX))
    .bind(filter.since)
    .fetch_all(db)
    .await
    .db("listing runs")
}

pub(crate) async fn run_history(db: impl PgExecutor<'_>, run: uuid::Uuid) -> Result<Vec<RunEvent>> {
    sqlx::query_as(
        "select at, ended_at, event, step, attempt, outcome, error, detail::text as detail \
           from cairn.run_history($1)",
    )
    .bind(run)
    .fetch_all(db)
    .await
    .db("reading a run's history")
}

pub(crate) async fn run_steps(db: impl PgExecutor<'_>, run: uuid::Uuid) -> Result<Vec<RunStep>> {
    sqlx::query_as(
        "select seq, key, kind, status, input::text as input, output::text as output, error, \
         attempts, started_at, finished_at from cairn.run_steps($1)",
    )
    .bind(run)
    .fetch_all(db)
    .await
    .db("reading a run's steps")
}

pub(crate) async fn doctor(db: impl PgExecutor<'_>, warn_after: f64) -> Result<Vec<Check>> {
    sqlx::query_as("select check_name as name, status, detail from cairn.doctor($1)")
        .bind(warn_after)
        .fetch_all(db)
        .await
        .db("checking the installation's health")
}

// ---- workflow runs: the worker's calls -------------------------------------

/// Where a run is: its id, job and lease.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunLease {
    pub run: uuid::Uuid,
    pub job: i64,
    pub lease: i64,
}

/// One checkpoint as `cairn.load_run` returns it.
#[derive(Debug)]
pub(crate) struct RecordedStep {
    pub key: String,
    pub seq: i32,
    pub status: StepStatus,
    /// The output as JSON text, decoded once into the type the code asks for.
    pub output: Option<String>,
    pub error: Option<String>,
    pub wake_at: Option<DateTime<Utc>>,
    pub fingerprint: Option<String>,
}

/// A run's state for a replay, from `cairn.load_run`.
#[derive(Debug)]
pub(crate) struct LoadedRun {
    /// Why the job was refused (not the run's job): it was dead-lettered.
    pub refused: Option<String>,
    pub input: String,
    pub db_now: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub traceparent: Option<String>,
    pub steps: Vec<RecordedStep>,
}

#[derive(sqlx::FromRow)]
struct LoadedRow {
    refused: Option<String>,
    input: Option<String>,
    db_now: Option<DateTime<Utc>>,
    created_at: Option<DateTime<Utc>>,
    traceparent: Option<String>,
    key: Option<String>,
    seq: Option<i32>,
    status: Option<String>,
    output: Option<String>,
    error: Option<String>,
    wake_at: Option<DateTime<Utc>>,
    fingerprint: Option<String>,
}

/// The columns of `cairn.load_run` (and of `load_runs`, after `n`).
macro_rules! loaded_columns {
    () => {
        "refused, input::text as input, db_now, created_at, traceparent, key, seq, status, \
         output::text as output, error, wake_at, fingerprint"
    };
}

/// A run from its rows: the run's, then one per checkpoint.
fn loaded(rows: impl IntoIterator<Item = LoadedRow>) -> Option<LoadedRun> {
    let mut rows = rows.into_iter();
    let run = rows.next()?;
    let steps = rows
        .filter_map(|r| {
            Some(RecordedStep {
                key: r.key?,
                seq: r.seq?,
                status: StepStatus::parse(r.status.as_deref()?)?,
                output: r.output,
                error: r.error,
                wake_at: r.wake_at,
                fingerprint: r.fingerprint,
            })
        })
        .collect();
    Some(LoadedRun {
        refused: run.refused,
        input: run.input.unwrap_or_else(|| "null".into()),
        db_now: run.db_now.unwrap_or_else(Utc::now),
        created_at: run.created_at.unwrap_or_else(Utc::now),
        traceparent: run.traceparent,
        steps,
    })
}

/// `None` when the lease no longer holds the run's job.
pub(crate) async fn load_run(db: &Db, at: RunLease) -> Result<Option<LoadedRun>> {
    let rows: Vec<LoadedRow> = sqlx::query_as(concat!(
        "select set_config('synchronous_commit', 'off', true) as async_commit, ",
        loaded_columns!(),
        " from cairn.load_run($1, $2, $3)"
    ))
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .fetch_all(db)
    .await
    .db("loading a run")?;
    Ok(loaded(rows))
}

/// Several `load_run` calls in one `cairn.load_runs` call: an answer per
/// call, in order.
pub(crate) async fn load_runs(db: &Db, calls: &[RunLease]) -> Result<Vec<Batched<LoadedRun>>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        n: i32,
        #[sqlx(flatten)]
        run: LoadedRow,
    }
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "select set_config('synchronous_commit', 'off', true) as async_commit, n, ",
        loaded_columns!(),
        " from cairn.load_runs($1, $2, $3)"
    ))
    .bind(calls.iter().map(|c| c.run).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.job).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.lease).collect::<Vec<_>>())
    .fetch_all(db)
    .await
    .db("loading runs")?;
    // The rows of one call are consecutive, the run's first.
    let mut by_call: Vec<(i32, Vec<LoadedRow>)> = Vec::new();
    for row in rows {
        match by_call.last_mut() {
            Some((n, rows)) if *n == row.n => rows.push(row.run),
            _ => by_call.push((row.n, vec![row.run])),
        }
    }
    Ok(answers(
        calls.len(),
        by_call.into_iter().map(|(n, rows)| {
            let answer = match rows.first().and_then(|r| r.refused.as_deref()) {
                Some("busy") => Batched::Busy,
                _ => Batched::Done(loaded(rows)),
            };
            (n, answer)
        }),
    ))
}

/// What `cairn.begin_step` answered.
#[derive(Debug)]
pub(crate) enum Begun {
    /// The attempt with this number began.
    Started(i32),
    /// The step was already settled (by another writer): use this.
    Recorded {
        status: StepStatus,
        output: Option<String>,
        error: Option<String>,
    },
    /// The key was recorded with another input fingerprint.
    Mismatch,
}

/// One `cairn.begin_step` call: write `done`, then begin an attempt of step
/// `key`. Without outcomes to write (`durable` false) the commit need not
/// wait for the WAL flush: losing a begun attempt in a crash of the database
/// only loses the count of that attempt.
#[derive(Debug)]
pub(crate) struct BeginCall {
    pub at: RunLease,
    pub done: String,
    pub durable: bool,
    pub key: String,
    pub seq: i32,
    pub fingerprint: Option<String>,
    pub input: String,
}

#[derive(sqlx::FromRow)]
struct BegunRow {
    outcome: String,
    attempt: Option<i32>,
    output: Option<String>,
    error: Option<String>,
}

impl BegunRow {
    fn begun(self) -> Begun {
        match self.outcome.as_str() {
            "started" => Begun::Started(self.attempt.unwrap_or(1)),
            "mismatch" => Begun::Mismatch,
            other => Begun::Recorded {
                status: StepStatus::parse(other).unwrap_or(StepStatus::Failed),
                output: self.output,
                error: self.error,
            },
        }
    }
}

/// One call of `cairn.begin_step`. `None` when the lease was lost.
pub(crate) async fn begin_step(db: &Db, call: &BeginCall) -> Result<Option<Begun>> {
    let row: Option<BegunRow> = sqlx::query_as(
        "select outcome, attempt, output::text, error \
           from cairn.begin_step($1, $2, $3, $4::jsonb, $5, $6, $7, $8::jsonb) \
          where $9 or set_config('synchronous_commit', 'off', true) is not null",
    )
    .bind(call.at.run)
    .bind(call.at.job)
    .bind(call.at.lease)
    .bind(&call.done)
    .bind(&call.key)
    .bind(call.seq)
    .bind(call.fingerprint.as_deref())
    .bind(&call.input)
    .bind(call.durable)
    .fetch_optional(db)
    .await
    .db("beginning a step")?;
    Ok(row.map(BegunRow::begun))
}

/// What one call of a batch (`begin_steps`, `load_runs`, `complete_runs`)
/// answered.
#[derive(Debug)]
pub(crate) enum Batched<T> {
    /// What the call alone would have answered (`None`: the lease was lost).
    Done(Option<T>),
    /// The batch could not make it (another transaction held the run
    /// locked, or a child run): make this call alone.
    Busy,
}

/// One answer per call of a batch, from its rows tagged with positions
/// from 1: the calls without a row lost their lease.
fn answers<T>(n: usize, rows: impl IntoIterator<Item = (i32, Batched<T>)>) -> Vec<Batched<T>> {
    let mut answers: Vec<Batched<T>> = (0..n).map(|_| Batched::Done(None)).collect();
    for (at, answer) in rows {
        if let Some(slot) = usize::try_from(at - 1)
            .ok()
            .and_then(|i| answers.get_mut(i))
        {
            *slot = answer;
        }
    }
    answers
}

/// Several `begin_step` calls in one `cairn.begin_steps` call (one round
/// trip, one transaction): an answer per call, in order. The commit waits
/// for the WAL flush if any call carries outcomes.
pub(crate) async fn begin_steps(db: &Db, calls: &[BeginCall]) -> Result<Vec<Batched<Begun>>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        n: i32,
        #[sqlx(flatten)]
        begun: BegunRow,
    }
    let durable = calls.iter().any(|c| c.durable);
    let rows: Vec<Row> = sqlx::query_as(
        "select n, outcome, attempt, output::text, error \
           from cairn.begin_steps($1, $2, $3, $4::jsonb[], $5, $6, $7, $8::jsonb[]) \
          where $9 or set_config('synchronous_commit', 'off', true) is not null",
    )
    .bind(calls.iter().map(|c| c.at.run).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.at.job).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.at.lease).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.done.as_str()).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.key.as_str()).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.seq).collect::<Vec<_>>())
    .bind(
        calls
            .iter()
            .map(|c| c.fingerprint.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(calls.iter().map(|c| c.input.as_str()).collect::<Vec<_>>())
    .bind(durable)
    .fetch_all(db)
    .await
    .db("beginning steps")?;
    Ok(answers(
        calls.len(),
        rows.into_iter().map(|r| {
            let answer = match r.begun.outcome.as_str() {
                "busy" => Batched::Busy,
                _ => Batched::Done(Some(r.begun.begun())),
            };
            (r.n, answer)
        }),
    ))
}

/// Writes `done`; false when the lease was lost.
pub(crate) async fn record_steps(db: &Db, at: RunLease, done: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.record_steps($1, $2, $3, $4::jsonb)")
        .bind(at.run)
        .bind(at.job)
        .bind(at.lease)
        .bind(done)
        .fetch_one(db)
        .await
        .db("recording finished steps")
}

/// `(wake_at, done)`, or `None` when the lease was lost.
pub(crate) async fn sleep_step(
    db: &Db,
    at: RunLease,
    done: &str,
    key: &str,
    seq: i32,
    duration: Duration,
) -> Result<Option<(DateTime<Utc>, bool)>> {
    sqlx::query_as(
        "select wake_at, passed from cairn.sleep_step($1, $2, $3, $4::jsonb, $5, $6, $7)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(done)
    .bind(key)
    .bind(seq)
    .bind(secs(duration))
    .fetch_optional(db)
    .await
    .db("recording a sleep")
}

/// `(done, output, wake_at)`, or `None` when the lease was lost.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn await_signal(
    db: &Db,
    at: RunLease,
    done: &str,
    key: &str,
    seq: i32,
    name: &str,
    timeout: Option<Duration>,
) -> Result<Option<(bool, Option<String>, Option<DateTime<Utc>>)>> {
    sqlx::query_as(
        "select settled, output::text, wake_at \
           from cairn.await_signal($1, $2, $3, $4::jsonb, $5, $6, $7, $8)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(done)
    .bind(key)
    .bind(seq)
    .bind(name)
    .bind(timeout.map(secs))
    .fetch_optional(db)
    .await
    .db("waiting for a signal")
}

/// The state of a step that starts a child run or a step job.
#[derive(Debug)]
pub(crate) struct Started {
    pub status: StepStatus,
    pub output: Option<String>,
    pub error: Option<String>,
    /// The key was recorded with another input fingerprint.
    pub mismatch: bool,
}

fn started(row: (String, Option<String>, Option<String>)) -> Started {
    let (outcome, output, error) = row;
    Started {
        status: StepStatus::parse(&outcome).unwrap_or(StepStatus::Waiting),
        output,
        error,
        mismatch: outcome == "mismatch",
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_child(
    db: &Db,
    at: RunLease,
    done: &str,
    key: &str,
    seq: i32,
    fingerprint: Option<&str>,
    workflow: &str,
    input: &str,
) -> Result<Option<Started>> {
    let row = sqlx::query_as(
        "select outcome, output::text, error \
           from cairn.start_child($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9::jsonb)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(done)
    .bind(key)
    .bind(seq)
    .bind(fingerprint)
    .bind(workflow)
    .bind(input)
    .fetch_optional(db)
    .await
    .db("starting a child run")?;
    Ok(row.map(started))
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_task_step(
    db: &Db,
    at: RunLease,
    done: &str,
    key: &str,
    seq: i32,
    fingerprint: Option<&str>,
    queue: &str,
    task: &str,
    payload: &str,
) -> Result<Option<Started>> {
    let row = sqlx::query_as(
        "select outcome, output::text, error \
           from cairn.start_task_step($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10::jsonb)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(done)
    .bind(key)
    .bind(seq)
    .bind(fingerprint)
    .bind(queue)
    .bind(task)
    .bind(payload)
    .fetch_optional(db)
    .await
    .db("starting a step job")?;
    Ok(row.map(started))
}

pub(crate) async fn suspend_run(
    db: &Db,
    at: RunLease,
    done: &str,
    wake_at: Option<DateTime<Utc>>,
    retry_in: Option<Duration>,
    status: &str,
) -> Result<bool> {
    sqlx::query_scalar("select cairn.suspend_run($1, $2, $3, $4::jsonb, $5, $6, $7)")
        .bind(at.run)
        .bind(at.job)
        .bind(at.lease)
        .bind(done)
        .bind(wake_at)
        .bind(retry_in.map(secs))
        .bind(status)
        .fetch_one(db)
        .await
        .db("suspending a run")
}

/// One `cairn.complete_run` call: write `done`, then end the run with
/// `output`.
#[derive(Debug)]
pub(crate) struct CompleteCall {
    pub at: RunLease,
    pub done: String,
    pub output: String,
}

/// `Some(true)` completed, `Some(false)` failed (its output broke the JSON
/// limits), `None` when the lease was lost.
pub(crate) async fn complete_run(db: &Db, call: &CompleteCall) -> Result<Option<bool>> {
    let status: Option<String> =
        sqlx::query_scalar("select cairn.complete_run($1, $2, $3, $4::jsonb, $5::jsonb)")
            .bind(call.at.run)
            .bind(call.at.job)
            .bind(call.at.lease)
            .bind(&call.done)
            .bind(&call.output)
            .fetch_one(db)
            .await
            .db("completing a run")?;
    Ok(status.map(|s| s == "completed"))
}

/// Several `complete_run` calls in one `cairn.complete_runs` call: an
/// answer per call, in order. Their jobs are locked in the order given:
/// send them in id order.
pub(crate) async fn complete_runs(db: &Db, calls: &[CompleteCall]) -> Result<Vec<Batched<bool>>> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "select n, status from cairn.complete_runs($1, $2, $3, $4::jsonb[], $5::jsonb[])",
    )
    .bind(calls.iter().map(|c| c.at.run).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.at.job).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.at.lease).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.done.as_str()).collect::<Vec<_>>())
    .bind(calls.iter().map(|c| c.output.as_str()).collect::<Vec<_>>())
    .fetch_all(db)
    .await
    .db("completing runs")?;
    Ok(answers(
        calls.len(),
        rows.into_iter().map(|(n, status)| {
            let answer = match status.as_str() {
                "busy" => Batched::Busy,
                s => Batched::Done(Some(s == "completed")),
            };
            (n, answer)
        }),
    ))
}

pub(crate) async fn fail_run(db: &Db, at: RunLease, done: &str, error: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.fail_run($1, $2, $3, $4::jsonb, $5)")
        .bind(at.run)
        .bind(at.job)
        .bind(at.lease)
        .bind(done)
        .bind(error)
        .fetch_one(db)
        .await
        .db("failing a run")
}

/// A connection of its own that `LISTEN`s on `channel`: to Postgres itself,
/// never through a transaction pooler.
pub(crate) async fn listen(db: &Db, channel: &str) -> sqlx::Result<PgListener> {
    let mut listener = match db.direct() {
        Some(direct) => {
            let direct = PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(direct.clone());
            PgListener::connect_with(&direct).await?
        }
        None => PgListener::connect_with(db.pool()).await?,
    };
    listener.listen(channel).await?;
    Ok(listener)
}

pub(crate) async fn set_retention(db: impl PgExecutor<'_>, keep: Retention) -> Result<()> {
    sqlx::query("select cairn.set_retention(make_interval(secs => $1), make_interval(secs => $2))")
        .bind(keep.completed.map(secs))
        .bind(keep.failed.map(secs))
        .execute(db)
        .await
        .db("setting the retention")?;
    Ok(())
}

pub(crate) async fn retention(db: impl PgExecutor<'_>) -> Result<Retention> {
    let (completed, failed): (Option<f64>, Option<f64>) = sqlx::query_as(
        "select extract(epoch from r.completed)::float8, extract(epoch from r.failed)::float8
           from cairn.retention r",
    )
    .fetch_one(db)
    .await
    .db("reading the retention")?;
    let keep = |s: Option<f64>| s.map(|s| Duration::from_secs_f64(s.max(0.0)));
    Ok(Retention {
        completed: keep(completed),
        failed: keep(failed),
    })
}

pub(crate) async fn prune(db: impl PgExecutor<'_>, batch: u32) -> Result<Pruned> {
    let (runs, archived): (i32, i32) = sqlx::query_as("select * from cairn.prune($1)")
        .bind(i32::try_from(batch).unwrap_or(i32::MAX))
        .fetch_one(db)
        .await
        .db("pruning finished work")?;
    Ok(Pruned {
        runs: u64::try_from(runs).unwrap_or(0),
        archived: u64::try_from(archived).unwrap_or(0),
    })
}

// ---- schedules -----------------------------------------------------------

pub(crate) async fn create_schedule(
    db: impl PgExecutor<'_>,
    s: &Schedule,
    input: &str,
) -> Result<DateTime<Utc>> {
    let (workflow, queue) = match &s.target {
        Target::Workflow(w) => (Some(w.as_str()), None),
        Target::Queue(queue) => (None, Some(queue.as_str())),
    };
    sqlx::query_scalar(
        "select cairn.create_schedule($1, $2, workflow => $3, input => $4::jsonb, \
         timezone => $5, queue => $6, task => $7, missed => $8, overlap => $9, \
         priority => $10, paused => $11)",
    )
    .bind(&s.name)
    .bind(&s.cron)
    .bind(workflow)
    .bind(input)
    .bind(&s.timezone)
    .bind(queue)
    .bind(s.task.as_deref())
    .bind(s.missed.as_str())
    .bind(s.overlap.as_str())
    .bind(i32::from(s.priority))
    .bind(s.paused)
    .fetch_one(db)
    .await
    .db("creating a schedule")
}

pub(crate) async fn update_schedule(
    db: impl PgExecutor<'_>,
    name: &str,
    change: &ScheduleChange,
    input: Option<&str>,
) -> Result<DateTime<Utc>> {
    sqlx::query_scalar(
        "select cairn.update_schedule($1, cron => $2, timezone => $3, input => $4::jsonb, \
         missed => $5, overlap => $6, priority => $7)",
    )
    .bind(name)
    .bind(change.cron.as_deref())
    .bind(change.timezone.as_deref())
    .bind(input)
    .bind(change.missed.map(Missed::as_str))
    .bind(change.overlap.map(Overlap::as_str))
    .bind(change.priority.map(i32::from))
    .fetch_one(db)
    .await
    .db("updating a schedule")
}

pub(crate) async fn pause_schedule(db: impl PgExecutor<'_>, name: &str) -> Result<()> {
    sqlx::query("select cairn.pause_schedule($1)")
        .bind(name)
        .execute(db)
        .await
        .db("pausing a schedule")?;
    Ok(())
}

pub(crate) async fn resume_schedule(db: impl PgExecutor<'_>, name: &str) -> Result<DateTime<Utc>> {
    sqlx::query_scalar("select cairn.resume_schedule($1)")
        .bind(name)
        .fetch_one(db)
        .await
        .db("resuming a schedule")
}

pub(crate) async fn delete_schedule(db: impl PgExecutor<'_>, name: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.delete_schedule($1)")
        .bind(name)
        .fetch_one(db)
        .await
        .db("deleting a schedule")
}

pub(crate) async fn trigger_schedule(db: impl PgExecutor<'_>, name: &str) -> Result<Fired> {
    let (run, job): (Option<uuid::Uuid>, Option<i64>) =
        sqlx::query_as("select run_id, job_id from cairn.trigger_schedule($1)")
            .bind(name)
            .fetch_one(db)
            .await
            .db("triggering a schedule")?;
    Ok(match (run, job) {
        (Some(run), _) => Fired::Run(run),
        (None, Some(job)) => Fired::Job(job),
        (None, None) => unreachable!("cairn.trigger_schedule starts a run or a job"),
    })
}

pub(crate) async fn list_schedules(db: impl PgExecutor<'_>) -> Result<Vec<ScheduleInfo>> {
    sqlx::query_as(
        "select name, cron, timezone, workflow, queue, task, input::text as input, priority, \
         missed, overlap, paused, next_fire, last_fire, last_run, last_job, fired, skipped, \
         last_error, created_at from cairn.list_schedules()",
    )
    .fetch_all(db)
    .await
    .db("listing schedules")
}

pub(crate) async fn next_fires(
    db: impl PgExecutor<'_>,
    cron: &str,
    timezone: &str,
    n: u32,
) -> Result<Vec<DateTime<Utc>>> {
    sqlx::query_scalar("select cairn.next_fires($1, $2, $3)")
        .bind(cron)
        .bind(timezone)
        .bind(i32::try_from(n).unwrap_or(i32::MAX))
        .fetch_all(db)
        .await
        .db("computing fire times")
}

pub(crate) async fn tick_schedules(db: impl PgExecutor<'_>, batch: u32) -> Result<u32> {
    let fired: i32 = sqlx::query_scalar("select cairn.tick_schedules($1)")
        .bind(i32::try_from(batch).unwrap_or(i32::MAX))
        .fetch_one(db)
        .await
        .db("firing due schedules")?;
    Ok(u32::try_from(fired).unwrap_or(0))
}

// ---- flows ---------------------------------------------------------------

pub(crate) async fn fire_timers(db: impl PgExecutor<'_>, batch: u32) -> Result<u32> {
    let fired: i32 = sqlx::query_scalar("select cairn.fire_timers($1)")
        .bind(i32::try_from(batch).unwrap_or(i32::MAX))
        .fetch_one(db)
        .await
        .db("firing due flow timers")?;
    Ok(u32::try_from(fired).unwrap_or(0))
}

pub(crate) async fn register_step_handler(db: impl PgExecutor<'_>, name: &str) -> Result<()> {
    sqlx::query("select cairn.register_step_handler($1)")
        .bind(name)
        .execute(db)
        .await
        .db("registering a step handler")?;
    Ok(())
}

pub(crate) async fn create_flow(
    db: impl PgExecutor<'_>,
    name: &str,
    definition: &serde_json::Value,
) -> Result<i32> {
    sqlx::query_scalar("select cairn.create_flow($1, $2::jsonb)")
        .bind(name)
        .bind(definition.to_string())
        .fetch_one(db)
        .await
        .db("storing a flow")
}

/// A row of `cairn.plan_flow`.
#[derive(sqlx::FromRow)]
struct PlanRow {
    stage: i32,
    step: String,
    kind: String,
    target: String,
    after: Vec<String>,
    condition: Option<String>,
    fan_out: Option<String>,
    loop_to: Option<String>,
}

pub(crate) async fn plan_flow(db: impl PgExecutor<'_>, flow: &str) -> Result<Vec<PlannedStep>> {
    let rows: Vec<PlanRow> = sqlx::query_as(
        "select stage, step, kind, target, after, condition, fan_out, loop_to \
         from cairn.plan_flow($1::text)",
    )
    .bind(flow)
    .fetch_all(db)
    .await
    .db("planning a flow")?;
    Ok(rows
        .into_iter()
        .map(|r| PlannedStep {
            stage: u32::try_from(r.stage).unwrap_or(0),
            step: r.step,
            kind: r.kind,
            target: r.target,
            after: r.after,
            condition: r.condition,
            fan_out: r.fan_out,
            loop_to: r.loop_to,
        })
        .collect())
}

pub(crate) async fn list_flows(db: impl PgExecutor<'_>) -> Result<Vec<FlowInfo>> {
    sqlx::query_as(
        "select name, version, steps, queue, definition::text as definition, created_at, \
         updated_at from cairn.list_flows()",
    )
    .fetch_all(db)
    .await
    .db("listing flows")
}

pub(crate) async fn export_flow(db: impl PgExecutor<'_>, flow: &str) -> Result<String> {
    sqlx::query_scalar("select cairn.export_flow($1)")
        .bind(flow)
        .fetch_one(db)
        .await
        .db("exporting a flow")
}

// ---- operate: workers, workflows, dead letters ------------------------------

pub(crate) async fn worker_hello(
    db: impl PgExecutor<'_>,
    id: uuid::Uuid,
    host: &str,
    queues: &[String],
    handlers: &[String],
    concurrency: usize,
) -> Result<()> {
    sqlx::query("select cairn.worker_hello($1, $2, $3, $4, $5, $6)")
        .bind(id)
        .bind(host)
        .bind(i32::try_from(std::process::id()).unwrap_or(i32::MAX))
        .bind(queues)
        .bind(handlers)
        .bind(i32::try_from(concurrency).unwrap_or(i32::MAX))
        .execute(db)
        .await
        .db("announcing the worker")
        .map(drop)
}

/// False when the worker's row is gone (it must say hello again).
pub(crate) async fn worker_seen(db: impl PgExecutor<'_>, id: uuid::Uuid) -> Result<bool> {
    sqlx::query_scalar("select cairn.worker_seen($1)")
        .bind(id)
        .fetch_one(db)
        .await
        .db("reporting the worker alive")
}

pub(crate) async fn worker_bye(db: impl PgExecutor<'_>, id: uuid::Uuid) -> Result<()> {
    sqlx::query("select cairn.worker_bye($1)")
        .bind(id)
        .execute(db)
        .await
        .db("removing the worker")
        .map(drop)
}

pub(crate) async fn list_workers(db: impl PgExecutor<'_>) -> Result<Vec<WorkerInfo>> {
    sqlx::query_as(
        "select id, host, pid, queues, handlers, concurrency, started_at, seen_at, alive \
           from cairn.list_workers()",
    )
    .fetch_all(db)
    .await
    .db("listing workers")
}

pub(crate) async fn list_workflows(db: impl PgExecutor<'_>) -> Result<Vec<WorkflowInfo>> {
    sqlx::query_as(
        "select name, kind, queue, registered_at, active, failed, completed \
           from cairn.list_workflows()",
    )
    .fetch_all(db)
    .await
    .db("listing workflows")
}

pub(crate) async fn list_dead(
    db: impl PgExecutor<'_>,
    queue: Option<&str>,
    limit: u32,
) -> Result<Vec<DeadLetter>> {
    sqlx::query_as(
        "select id, queue_name as queue, task, payload::text as payload, attempts, last_error, \
         enqueued_at, died_at, run_id, parent_run from cairn.list_dead($1, $2)",
    )
    .bind(queue)
    .bind(i32::try_from(limit).unwrap_or(i32::MAX))
    .fetch_all(db)
    .await
    .db("listing dead letters")
}

pub(crate) async fn requeue_dead(db: impl PgExecutor<'_>, queue: &str) -> Result<Requeued> {
    let (requeued, skipped): (i64, i64) =
        sqlx::query_as("select requeued, skipped from cairn.requeue_dead($1)")
            .bind(queue)
            .fetch_one(db)
            .await
            .db("requeueing dead letters")?;
    Ok(Requeued { requeued, skipped })
}
