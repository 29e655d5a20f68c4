//! The OpenTelemetry plugin's cost: 3-step runs with the plugin off and on.

use std::sync::atomic::Ordering;

use super::BoxError;
use super::workflow::{drain_runs_with, workflow_app};

/// An OTLP/gRPC receiver that counts the spans it is sent.
mod receiver {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    pub struct Counter(pub Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl TraceService for Counter {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(n, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// Accepts metrics and drops them: only spans are counted here.
    pub struct Metrics;

    #[tonic::async_trait]
    impl MetricsService for Metrics {
        async fn export(
            &self,
            _request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// Serves on a free loopback port; returns the port and the span count.
    pub async fn start() -> Result<(u16, Arc<AtomicUsize>), super::BoxError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let count = Arc::new(AtomicUsize::new(0));
        let service = TraceServiceServer::new(Counter(count.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .add_service(MetricsServiceServer::new(Metrics))
                .serve(([127, 0, 0, 1], port).into()),
        );
        Ok((port, count))
    }
}

/// The workflow benchmark's 3-step runs at concurrency 64, with the
/// OpenTelemetry plugin off and on (exporting to a real OTLP receiver).
pub async fn run(url: &str) -> Result<(), BoxError> {
    let app = workflow_app(url).await?;
    app.initialize().await?;
    app.worker()
        .queues(["workflows"])
        .run_until(async {})
        .await?;
    let (port, spans) = receiver::start().await?;
    let otel = cairn::otel::OtelPlugin::builder()
        .endpoint(format!("http://127.0.0.1:{port}"))
        .metrics(true)
        .build()?;
    println!(
        "cairn OpenTelemetry overhead (PostgreSQL at {})",
        super::redact(url)
    );
    // Runs drain at 2,000 a second or more: rounds of a few seconds each,
    // so that one hiccup of this shared machine does not make the figure.
    let n = 12_000;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    // Alternate, so that drift on this shared machine hits both alike.
    for _ in 0..3 {
        off.push(drain_runs_with(url, &app, "three", n, 64, None).await?.0);
        on.push(
            drain_runs_with(url, &app, "three", n, 64, Some(otel.clone()))
                .await?
                .0,
        );
    }
    otel.shutdown().await;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (off, on) = (mean(&off), mean(&on));
    println!(
        "{:<48} {off:>9.0} /s",
        "3-step runs, concurrency 64, plugin off"
    );
    println!(
        "{:<48} {on:>9.0} /s",
        "3-step runs, concurrency 64, OTel plugin on"
    );
    println!(
        "{:<48} {:>9.3} x   ({} spans received over OTLP/gRPC)",
        "time with the plugin / time without",
        off / on,
        spans.load(Ordering::Relaxed)
    );
    Ok(())
}
