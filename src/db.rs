//! The only place with SQL text: one small function per stored function.
//!
//! Every state change is one call of one `cairn.*` function (one round trip);
//! nothing here reads, modifies and writes back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::error::{DbContext, Result};

/// A job handed out by a claim, with the lease that fences it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ClaimedJob {
    pub id: i64,
    pub task: String,
    pub payload: String,
    pub attempts: i32,
    pub lease: i64,
}

/// One queue's counters, from `cairn.metrics`.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct QueueMetrics {
    /// The queue's name.
    #[sqlx(rename = "queue_name")]
    pub queue: String,
    /// Jobs visible now, waiting for a worker.
    pub ready: i64,
    /// Jobs scheduled for later (a delay or a retry backoff).
    pub delayed: i64,
    /// Jobs leased by a worker right now.
    pub in_flight: i64,
    /// Dead-lettered jobs kept in `cairn.archive`.
    pub dead: i64,
    /// Completed jobs kept in `cairn.archive`.
    pub completed: i64,
    /// How long the oldest ready job has been waiting, in seconds.
    pub oldest_ready_age: f64,
    /// The database time of the measurement.
    pub measured_at: DateTime<Utc>,
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

pub(crate) async fn send(
    db: impl PgExecutor<'_>,
    queue: &str,
    task: &str,
    payload: &str,
    delay: Duration,
    priority: i16,
) -> Result<i64> {
    sqlx::query_scalar("select cairn.send($1, $2::jsonb, $3, $4, $5)")
        .bind(queue)
        .bind(payload)
        .bind(secs(delay))
        .bind(i32::from(priority))
        .bind(task)
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
        "select id, task, payload::text as payload, attempts, lease \
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
