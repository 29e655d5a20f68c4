//! Scale-out: one backlog drained by 1, 2 and 4 worker processes on the same
//! database, each process a worker of its own (this binary, started again in
//! worker mode), all serving one queue.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cairn::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{BoxError, redact, reference, secs};

#[derive(Serialize, Deserialize)]
struct Tick {
    n: u32,
}
impl Task for Tick {
    const QUEUE: &'static str = "scale";
    type Output = ();
}

/// Jobs per drain.
const N: usize = 40_000;
/// Each process's worker concurrency.
const CONCURRENCY: usize = 256;

pub async fn run(url: &str) -> Result<(), BoxError> {
    let app = App::builder().database_url(url).build().await?;
    app.initialize().await?;
    app.create_queue("scale").await?;
    let pool = app.pool().clone();
    println!(
        "cairn scale-out: {N} no-op jobs drained by 1, 2 and 4 worker processes, concurrency {CONCURRENCY} each (PostgreSQL at {})",
        redact(url)
    );
    let (ref_rate, _) = reference(&pool, 3_000).await?;
    println!(
        "{:<46} {ref_rate:>9.0} /s",
        "reference: single-row UPDATE transactions"
    );
    let batch: Vec<Tick> = (0..1_000).map(|n| Tick { n }).collect();
    let mut first = None;
    for processes in [1, 2, 4] {
        let mut workers = Vec::new();
        for _ in 0..processes {
            workers.push(spawn_worker(url).await?);
        }
        sqlx::query("vacuum analyze cairn.jobs")
            .execute(&pool)
            .await?;
        let mut tx = pool.begin().await?;
        for _ in 0..N / batch.len() {
            app.enqueue_batch(&batch).execute(&mut tx).await?;
        }
        tx.commit().await?;
        let start = Instant::now();
        while sqlx::query_scalar::<_, bool>("select exists (select from cairn.jobs)")
            .fetch_one(&pool)
            .await?
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let rate = N as f64 / secs(start);
        for mut w in workers {
            drop(w.stdin.take()); // end of input: the worker shuts down
            w.wait().await?;
        }
        let base = *first.get_or_insert(rate);
        println!(
            "{:<46} {rate:>9.0} /s   {:>5.2} x one process, {:>5.1} x reference",
            format!("drain, {processes} worker process(es)"),
            rate / base,
            rate / ref_rate
        );
    }
    app.pool().close().await;
    Ok(())
}

/// Starts this binary as a worker process and waits until it serves.
async fn spawn_worker(url: &str) -> Result<Child, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["scale-worker", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).await?;
    if line.trim() != "ready" {
        return Err(format!("the worker process said {line:?}").into());
    }
    Ok(child)
}

/// Worker mode: serve the queue until stdin closes.
pub async fn worker(url: &str) -> Result<(), BoxError> {
    let app = App::builder()
        .database_url(url)
        .max_connections(8)
        .build()
        .await?;
    app.task(|_: Tick, _ctx| async move { Ok(()) })?;
    let worker = app
        .worker()
        .queues(["scale"])
        .concurrency(CONCURRENCY)
        .run_until(async {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        });
    let ready = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!("ready");
    };
    let (stats, ()) = tokio::join!(worker, ready);
    stats?;
    Ok(())
}
