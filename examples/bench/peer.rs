//! The peer: pgmq, driven through its own Rust client the way its
//! documentation recommends (batched sends, batched reads, batched deletes,
//! several consumers), on a queue table of its own in the same database.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use pgmq::PGMQueueExt;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::{BoxError, secs};

const QUEUE: &str = "bench";

pub struct Pgmq {
    client: PGMQueueExt,
}

impl Pgmq {
    /// Installs pgmq's SQL (no extension) and creates the queue.
    pub async fn install(url: &str) -> Result<Self, BoxError> {
        let pool = sqlx08::postgres::PgPoolOptions::new()
            .max_connections(32)
            .connect(url)
            .await?;
        let client = PGMQueueExt::new_with_pool(pool).await;
        client.install_sql_from_embedded().await?;
        client.create(QUEUE).await?;
        Ok(Self { client })
    }

    /// Sends `n` no-op messages, 1,000 per call.
    pub async fn fill(&self, n: usize) -> Result<(), BoxError> {
        let batch: Vec<Value> = (0..1_000).map(|i| json!({ "n": i })).collect();
        let mut left = n;
        while left > 0 {
            let take = left.min(batch.len());
            self.client.send_batch(QUEUE, &batch[..take]).await?;
            left -= take;
        }
        Ok(())
    }

    /// Sends `n` messages one call each. Returns the seconds it took.
    pub async fn send_one_by_one(&self, n: usize) -> Result<f64, BoxError> {
        let start = Instant::now();
        for i in 0..n {
            self.client.send(QUEUE, &json!({ "n": i })).await?;
        }
        Ok(secs(start))
    }

    /// Sends `n` messages, 1,000 per call. Returns the seconds it took.
    pub async fn send_batched(&self, n: usize) -> Result<f64, BoxError> {
        let start = Instant::now();
        self.fill(n).await?;
        Ok(secs(start))
    }

    /// Drains `n` waiting messages with `consumers` tasks, each reading
    /// `batch` at a time and deleting what it read in one call. Returns
    /// messages/s.
    pub async fn drain(&self, n: usize, consumers: usize, batch: i32) -> Result<f64, BoxError> {
        let deleted = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..consumers)
            .map(|_| {
                let (client, deleted) = (self.client.clone(), deleted.clone());
                tokio::spawn(async move {
                    while deleted.load(Ordering::Relaxed) < n {
                        let msgs = client.read_batch::<Value>(QUEUE, 30, batch).await?;
                        if msgs.is_empty() {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        let ids: Vec<i64> = msgs.iter().map(|m| m.msg_id).collect();
                        let d = client.delete_batch(QUEUE, &ids).await?;
                        deleted.fetch_add(d, Ordering::Relaxed);
                    }
                    Ok::<_, pgmq::errors::PgmqError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        Ok(n as f64 / secs(start))
    }

    /// Empties the queue with pgmq's own purge.
    pub async fn purge(&self) -> Result<(), BoxError> {
        self.client.purge_queue(QUEUE).await?;
        Ok(())
    }

    /// Deletes every waiting message through pgmq's batched delete, as an
    /// operator cancelling them all would.
    pub async fn delete_all(&self, pool: &PgPool) -> Result<(), BoxError> {
        sqlx::query("select pgmq.delete('bench', array(select msg_id from pgmq.q_bench))")
            .execute(pool)
            .await?;
        Ok(())
    }

    /// `vacuum analyze` of the queue table.
    pub async fn vacuum(&self, pool: &PgPool) -> Result<(), BoxError> {
        sqlx::query("vacuum analyze pgmq.q_bench")
            .execute(pool)
            .await?;
        Ok(())
    }
}
