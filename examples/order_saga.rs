//! An order saga: charge → reserve → ship, and when shipping fails for good,
//! compensate: release the stock and refund the charge.
//!
//! ```text
//! cargo run --example order_saga          # press Ctrl-C mid-run, then run it again:
//! cargo run --example order_saga          # the same orders resume where they stopped
//! cargo run --example order_saga -- --new # start fresh orders
//!
//! # with traces: docker compose -f docker/compose.yml up -d, then
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 cargo run --example order_saga
//! # and metrics for its Grafana dashboard too:
//! CAIRN_METRICS=1 OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 cargo run --example order_saga
//! ```
//!
//! Each step takes a second, so there is time to interrupt. The orders are
//! started with idempotency keys, so a second run of this program finds the
//! same runs instead of starting new ones. Completed steps are not run again
//! (their lines do not reappear); the step that was interrupted runs again.

use std::time::Duration;

use cairn::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
    cents: i64,
    address: String,
}

#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Shipped { tracking: String },
    Refunded { reason: String },
}

/// Pretend work: each step takes a second.
async fn work(order: u32, what: &str) {
    println!("  order {order}: {what}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn saga(ctx: WorkflowContext, order: Order) -> Result<Outcome, HandlerError> {
    let id = order.id;
    let charge: String = ctx
        .step("charge", order.cents, move |cents| async move {
            work(id, &format!("charging {:.2} EUR", cents as f64 / 100.0)).await;
            Ok(format!("ch_{id}"))
        })
        .await?;
    ctx.step("reserve", id, move |id| async move {
        work(id, "reserving stock").await;
        Ok(())
    })
    .await?;
    let shipped = ctx
        .step(
            "ship",
            order.address.clone(),
            move |address: String| async move {
                work(id, &format!("shipping to {address}")).await;
                if address.is_empty() {
                    return Err(HandlerError::fatal("no delivery address"));
                }
                Ok(format!("TRK-{id}"))
            },
        )
        .await;
    match shipped {
        Ok(tracking) => Ok(Outcome::Shipped { tracking }),
        Err(e) => {
            // Compensate, in reverse order; these steps are durable too.
            ctx.step("release", id, move |id| async move {
                work(id, "releasing stock").await;
                Ok(())
            })
            .await?;
            ctx.step("refund", charge, move |charge: String| async move {
                work(id, &format!("refunding {charge}")).await;
                Ok(())
            })
            .await?;
            Ok(Outcome::Refunded {
                reason: e.to_string(),
            })
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order_saga failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let app = App::builder().database_url(url).build().await?;
    app.initialize().await?;
    app.workflow("order_saga", saga)?;
    // With OTEL_EXPORTER_OTLP_ENDPOINT set (see docker/compose.yml), every
    // run and step becomes a span in your trace UI.
    let otel = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(_) => {
            let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
                Ok("http/protobuf") => cairn::otel::Protocol::HttpProtobuf,
                _ => cairn::otel::Protocol::Grpc,
            };
            let mut otel = cairn::otel::OtelPlugin::builder().protocol(protocol);
            // CAIRN_METRICS=1: metrics too, for the compose stack's Grafana.
            let metrics = std::env::var("CAIRN_METRICS").is_ok_and(|v| v == "1");
            if metrics {
                otel = otel
                    .metrics_interval(Duration::from_secs(5))
                    .queue_metrics(&app, Duration::from_secs(5));
            }
            let otel = otel.build()?;
            app.plugin(otel.clone());
            println!(
                "exporting spans{} over OTLP ({protocol:?})",
                if metrics { " and metrics" } else { "" }
            );
            Some(otel)
        }
        None => None,
    };

    let batch = if std::env::args().any(|a| a == "--new") {
        cairn::Uuid::new_v4().to_string()
    } else {
        "demo".to_string()
    };
    let orders = [
        Order {
            id: 1,
            cents: 1250,
            address: "1 Trail Road".into(),
        },
        Order {
            id: 2,
            cents: 990,
            address: String::new(),
        }, // cannot ship: refunded
    ];

    // A short lease: if the last run of this program was killed, its runs
    // are picked up again within two seconds.
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["workflows"])
            .lease(Duration::from_secs(2))
            .shutdown_timeout(Duration::ZERO)
            .run_until(stop.clone().cancelled_owned()),
    );
    tokio::time::sleep(Duration::from_millis(200)).await; // let it register the workflow

    let mut runs = Vec::new();
    for order in &orders {
        let key = format!("order-{}-{batch}", order.id);
        let run = app.start("order_saga", order).idempotency_key(&key).await?;
        let status = app.run_status(run).await?.status;
        println!("order {} is run {run} ({status})", order.id);
        runs.push((order.id, run));
    }

    let results = async {
        let mut out = Vec::new();
        for (id, run) in &runs {
            out.push((*id, *run, app.result::<Outcome>(*run).await));
        }
        out
    };
    let results = tokio::select! {
        r = results => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: run this example again and the orders resume");
            stop.cancel();
            let _ = worker.await;
            if let Some(otel) = otel {
                otel.shutdown().await;
            }
            return Ok(());
        }
    };
    stop.cancel();
    worker.await??;
    if let Some(otel) = otel {
        otel.shutdown().await;
    }

    for (id, run, result) in results {
        println!("order {id}: {:?}", result?);
        let steps: Vec<(String, String, i32)> =
            sqlx::query_as("select key, status, attempts from cairn.run_steps($1)")
                .bind(run)
                .fetch_all(app.pool())
                .await?;
        for (key, status, attempts) in steps {
            println!("    {key:<12} {status:<10} attempts {attempts}");
        }
    }
    Ok(())
}
