//! The only place with SQL text: one small function per stored function.
//!
//! Every state change is one call of one `cairn.*` function (one round trip);
//! nothing here reads, modifies and writes back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::error::{DbContext, Result};
use crate::queue::QueueMetrics;
use crate::run::RunInfo;

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
    sqlx::query_scalar("select cairn.send_batch($1, $2::jsonb[], $3, $4, $5)")
        .bind(queue)
        .bind(payloads)
        .bind(secs(delay))
        .bind(i32::from(priority))
        .bind(task)
        .fetch_all(db)
        .await
        .db("enqueueing a batch of jobs")
}

pub(crate) async fn claim(
    db: &PgPool,
    queue: &str,
    lease: Duration,
    qty: usize,
    tasks: &[String],
) -> Result<Vec<ClaimedJob>> {
    sqlx::query_as(
        "select id, task, payload::text as payload, attempts, lease, parent_run, traceparent \
         from cairn.claim($1, $2, $3, $4)",
    )
    .bind(queue)
    .bind(secs(lease))
    .bind(i32::try_from(qty).unwrap_or(i32::MAX))
    .bind(tasks)
    .fetch_all(db)
    .await
    .db("claiming jobs")
}

pub(crate) async fn ack(db: &PgPool, ids: &[i64], leases: &[i64]) -> Result<Vec<i64>> {
    sqlx::query_scalar("select cairn.ack($1, $2)")
        .bind(ids)
        .bind(leases)
        .fetch_all(db)
        .await
        .db("acknowledging jobs")
}

/// Acks jobs run as workflow steps, handing each output to its step.
pub(crate) async fn ack_with_outputs(
    db: &PgPool,
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

pub(crate) async fn archive(
    db: &PgPool,
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
    db: &PgPool,
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

pub(crate) async fn fail(db: &PgPool, id: i64, lease: i64, error: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.fail($1, $2, $3)")
        .bind(id)
        .bind(lease)
        .bind(error)
        .fetch_one(db)
        .await
        .db("dead-lettering a job")
}

pub(crate) async fn extend(
    db: &PgPool,
    ids: &[i64],
    leases: &[i64],
    lease: Duration,
) -> Result<Vec<i64>> {
    sqlx::query_scalar("select cairn.extend($1, $2, $3)")
        .bind(ids)
        .bind(leases)
        .bind(secs(lease))
        .fetch_all(db)
        .await
        .db("extending leases")
}

pub(crate) async fn release(db: &PgPool, ids: &[i64], leases: &[i64]) -> Result<Vec<i64>> {
    sqlx::query_scalar("select cairn.release($1, $2)")
        .bind(ids)
        .bind(leases)
        .fetch_all(db)
        .await
        .db("releasing jobs")
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

// ---- workflows -------------------------------------------------------------

/// A run's state for a replay, from `cairn.load_run`.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LoadedRun {
    pub status: String,
    pub input: String,
    pub db_now: DateTime<Utc>,
    pub steps: String,
    pub created_at: DateTime<Utc>,
    pub traceparent: Option<String>,
}

/// Where a run is: its id, job and lease.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunLease {
    pub run: uuid::Uuid,
    pub job: i64,
    pub lease: i64,
}

pub(crate) async fn register_workflow(db: &PgPool, workflow: &str, queue: &str) -> Result<()> {
    sqlx::query("select cairn.register_workflow($1, $2)")
        .bind(workflow)
        .bind(queue)
        .execute(db)
        .await
        .db("registering a workflow")?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_workflow(
    db: impl PgExecutor<'_>,
    workflow: &str,
    input: &str,
    idempotency_key: Option<&str>,
    queue: Option<&str>,
    priority: i16,
    delay: Duration,
    traceparent: Option<&str>,
) -> Result<uuid::Uuid> {
    sqlx::query_scalar("select cairn.start_workflow($1, $2::jsonb, $3, $4, $5, $6, $7)")
        .bind(workflow)
        .bind(input)
        .bind(idempotency_key)
        .bind(queue)
        .bind(i32::from(priority))
        .bind(secs(delay))
        .bind(traceparent)
        .fetch_one(db)
        .await
        .db("starting a workflow")
}

pub(crate) async fn load_run(db: &PgPool, at: RunLease) -> Result<Option<LoadedRun>> {
    sqlx::query_as(
        "select status, input::text as input, db_now, steps::text as steps, created_at, \
         traceparent from cairn.load_run($1, $2, $3)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .fetch_optional(db)
    .await
    .db("loading a run")
}

/// A checkpoint to write.
pub(crate) struct Checkpoint<'a> {
    pub key: &'a str,
    pub seq: i32,
    pub kind: &'static str,
    pub status: &'static str,
    pub input: Option<&'a str>,
    pub output: Option<&'a str>,
    pub error: Option<&'a str>,
    pub attempts: i32,
}

/// What a checkpoint left recorded: the database time, and the step's
/// status, output and error as stored (another writer's, if it won).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Recorded {
    pub db_now: DateTime<Utc>,
    pub status_now: String,
    pub output_now: Option<String>,
    pub error_now: Option<String>,
}

/// `None` when the lease was lost.
pub(crate) async fn checkpoint(
    db: &PgPool,
    at: RunLease,
    c: Checkpoint<'_>,
) -> Result<Option<Recorded>> {
    sqlx::query_as(
        "select db_now, status_now, output_now::text as output_now, error_now \
         from cairn.checkpoint($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(c.key)
    .bind(c.seq)
    .bind(c.kind)
    .bind(c.status)
    .bind(c.input)
    .bind(c.output)
    .bind(c.error)
    .bind(c.attempts)
    .fetch_optional(db)
    .await
    .db("writing a checkpoint")
}

/// `(wake_at, done)`, or `None` when the lease was lost.
pub(crate) async fn sleep_step(
    db: &PgPool,
    at: RunLease,
    key: &str,
    seq: i32,
    duration: Duration,
) -> Result<Option<(DateTime<Utc>, bool)>> {
    sqlx::query_as("select wake_at, done from cairn.sleep_step($1, $2, $3, $4, $5, $6)")
        .bind(at.run)
        .bind(at.job)
        .bind(at.lease)
        .bind(key)
        .bind(seq)
        .bind(secs(duration))
        .fetch_optional(db)
        .await
        .db("recording a sleep")
}

/// `(done, output, wake_at)`, or `None` when the lease was lost.
pub(crate) async fn await_signal(
    db: &PgPool,
    at: RunLease,
    key: &str,
    seq: i32,
    name: &str,
    timeout: Option<Duration>,
) -> Result<Option<(bool, Option<String>, Option<DateTime<Utc>>)>> {
    sqlx::query_as(
        "select done, output::text, wake_at from cairn.await_signal($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(key)
    .bind(seq)
    .bind(name)
    .bind(timeout.map(secs))
    .fetch_optional(db)
    .await
    .db("waiting for a signal")
}

pub(crate) async fn suspend_run(
    db: &PgPool,
    at: RunLease,
    wake_at: Option<DateTime<Utc>>,
    status: &str,
) -> Result<bool> {
    sqlx::query_scalar("select cairn.suspend_run($1, $2, $3, $4, $5)")
        .bind(at.run)
        .bind(at.job)
        .bind(at.lease)
        .bind(wake_at)
        .bind(status)
        .fetch_one(db)
        .await
        .db("suspending a run")
}

pub(crate) async fn complete_run(db: &PgPool, at: RunLease, output: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.complete_run($1, $2, $3, $4::jsonb)")
        .bind(at.run)
        .bind(at.job)
        .bind(at.lease)
        .bind(output)
        .fetch_one(db)
        .await
        .db("completing a run")
}

pub(crate) async fn fail_run(db: &PgPool, at: RunLease, error: &str) -> Result<bool> {
    sqlx::query_scalar("select cairn.fail_run($1, $2, $3, $4)")
        .bind(at.run)
        .bind(at.job)
        .bind(at.lease)
        .bind(error)
        .fetch_one(db)
        .await
        .db("failing a run")
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

pub(crate) async fn cancel_run(db: &PgPool, run: uuid::Uuid) -> Result<i32> {
    sqlx::query_scalar("select cairn.cancel_run($1)")
        .bind(run)
        .fetch_one(db)
        .await
        .db("cancelling a run")
}

pub(crate) async fn retry_run(db: &PgPool, run: uuid::Uuid) -> Result<bool> {
    sqlx::query_scalar("select cairn.retry_run($1)")
        .bind(run)
        .fetch_one(db)
        .await
        .db("retrying a run")
}

pub(crate) async fn run_status(db: &PgPool, run: uuid::Uuid) -> Result<RunInfo> {
    sqlx::query_as(
        "select id, workflow, status, output::text as output, error, created_at, started_at, \
         finished_at, wake_at from cairn.run_status($1)",
    )
    .bind(run)
    .fetch_one(db)
    .await
    .db("reading a run's status")
}

/// `(done, output, error)` of a child run or step job; `None` when the lease
/// was lost.
pub(crate) type Started = Option<(bool, Option<String>, Option<String>)>;

pub(crate) async fn start_child(
    db: &PgPool,
    at: RunLease,
    key: &str,
    seq: i32,
    workflow: &str,
    input: &str,
) -> Result<Started> {
    sqlx::query_as(
        "select done, output::text, error from cairn.start_child($1, $2, $3, $4, $5, $6, $7::jsonb)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(key)
    .bind(seq)
    .bind(workflow)
    .bind(input)
    .fetch_optional(db)
    .await
    .db("starting a child run")
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_task_step(
    db: &PgPool,
    at: RunLease,
    key: &str,
    seq: i32,
    queue: &str,
    task: &str,
    payload: &str,
) -> Result<Started> {
    sqlx::query_as(
        "select done, output::text, error \
         from cairn.start_task_step($1, $2, $3, $4, $5, $6, $7, $8::jsonb)",
    )
    .bind(at.run)
    .bind(at.job)
    .bind(at.lease)
    .bind(key)
    .bind(seq)
    .bind(queue)
    .bind(task)
    .bind(payload)
    .fetch_optional(db)
    .await
    .db("starting a step job")
}
