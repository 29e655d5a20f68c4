//! The OpenTelemetry plugin: workflow runs, step attempts and tasks as spans,
//! and counters, histograms and queue gauges as metrics, exported over OTLP
//! (gRPC or HTTP/protobuf).
//!
//! A run's span is emitted once, when the run ends. It starts when the run
//! was started and is the child of the producer's `traceparent` (stored with
//! the run). Every executed step attempt is a child span of the run's span,
//! emitted by whichever worker ran it, across crashes. That works because the
//! run's span id is derived from the run id, so any process can name it as a
//! parent. Replayed steps are not reported: they did not execute.

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, ObservableGauge};
use opentelemetry::trace::{
    Span, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::plugin::{FailureInfo, Plugin, RunOutcome, StepEvent, TaskEvent, WorkflowEvent};
use crate::queue::QueueMetrics;

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

/// Builds an [`OtelPlugin`].
#[derive(Debug, Default)]
pub struct OtelPluginBuilder {
    endpoint: Option<String>,
    protocol: Option<Protocol>,
    service_name: Option<String>,
    queues: Option<(crate::pooler::Db, Duration)>,
    metrics_interval: Option<Duration>,
}

impl OtelPluginBuilder {
    /// The collector's address, e.g. `http://localhost:4317` for gRPC or
    /// `http://localhost:4318/v1/traces` for HTTP (default: the exporter's
    /// own, which honours `OTEL_EXPORTER_OTLP_ENDPOINT` and
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// The transport (default gRPC).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// The `service.name` resource attribute (default `cairn`, or
    /// `OTEL_SERVICE_NAME` when set).
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Also report each queue's depth (`cairn.queue.depth`, by state) and the
    /// age of its oldest ready job (`cairn.queue.oldest_age`), read from
    /// `cairn.metrics_all()` through `app`'s pool every `every`. Needs a
    /// Tokio runtime at `build`.
    pub fn queue_metrics(mut self, app: &crate::App, every: Duration) -> Self {
        self.queues = Some((app.db().clone(), every));
        self
    }

    /// How often metrics are exported (default 60 s).
    pub fn metrics_interval(mut self, every: Duration) -> Self {
        self.metrics_interval = Some(every);
        self
    }

    /// Builds the exporters: spans through a batch processor and metrics
    /// through a periodic reader, both on threads of their own. Call
    /// [`OtelPlugin::shutdown`] before exiting to flush.
    pub fn build(self) -> Result<OtelPlugin> {
        let config = |e: opentelemetry_otlp::ExporterBuildError| {
            Error::InvalidArgument(format!("cannot build the OTLP exporter: {e}"))
        };
        let protocol = self.protocol.unwrap_or(Protocol::Grpc);
        let endpoint = self.endpoint.clone();
        let exporter = match protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(e) = endpoint.clone() {
                    b = b.with_endpoint(e);
                }
                b.build().map_err(config)?
            }
            Protocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(e) = endpoint.clone() {
                    b = b.with_endpoint(e);
                }
                b.build().map_err(config)?
            }
        };
        let metric_exporter = match protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                b.build().map_err(config)?
            }
            Protocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(e) = endpoint {
                    // The traces URL names its signal; metrics have their own.
                    b = b.with_endpoint(e.replace("/v1/traces", "/v1/metrics"));
                }
                b.build().map_err(config)?
            }
        };
        let mut resource = Resource::builder();
        if let Some(name) = self.service_name {
            resource = resource.with_service_name(name);
        } else if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("cairn");
        }
        let resource = resource.build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(PinnedIds::default())
            .with_resource(resource.clone())
            .build();
        let tracer = provider.tracer("cairn");
        let reader = PeriodicReader::builder(metric_exporter)
            .with_interval(self.metrics_interval.unwrap_or(Duration::from_secs(60)))
            .build();
        let meters = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let queues = match self.queues {
            Some((app, every)) => Some(watch_queues(app, every)?),
            None => None,
        };
        let instruments = Arc::new(Instruments::new(&meters.meter("cairn"), queues));
        Ok(OtelPlugin {
            provider,
            tracer,
            meters,
            instruments,
        })
    }
}

/// Turns cairn's hooks into OpenTelemetry spans exported over OTLP. Register
/// a clone with [`App::plugin`](crate::App::plugin) and keep one to call
/// [`shutdown`](Self::shutdown) at exit.
///
/// Attributes follow the messaging conventions where they apply
/// (`messaging.system = cairn`, `messaging.destination.name` = the queue,
/// `messaging.operation.type = process`) plus `cairn.run_id`,
/// `cairn.workflow`, `cairn.step`, `cairn.attempt`, `cairn.replayed`,
/// `cairn.job_id` and `cairn.task`. Failures set the error status and add an
/// `exception` event.
#[derive(Clone, Debug)]
pub struct OtelPlugin {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    meters: SdkMeterProvider,
    instruments: Arc<Instruments>,
}

/// The metrics cairn reports.
#[derive(Debug)]
struct Instruments {
    /// Attempts started (claims acted on), by queue and kind.
    claimed: Counter<u64>,
    /// Task attempts by outcome: completed, retried, dead.
    jobs: Counter<u64>,
    /// Step attempts by outcome.
    steps: Counter<u64>,
    /// Runs ended, by outcome: completed, failed.
    runs: Counter<u64>,
    step_duration: Histogram<f64>,
    task_duration: Histogram<f64>,
    /// Kept alive: their callbacks read the queue snapshot.
    _gauges: Vec<ObservableGauge<f64>>,
    /// Stops the task that refreshes the queue snapshot.
    stop_watch: CancellationToken,
}

impl Instruments {
    fn new(
        meter: &Meter,
        queues: Option<(Arc<Mutex<Vec<QueueMetrics>>>, CancellationToken)>,
    ) -> Self {
        let mut gauges = Vec::new();
        let stop_watch = queues.as_ref().map(|q| q.1.clone()).unwrap_or_default();
        if let Some((snapshot, _)) = queues {
            let s = Arc::clone(&snapshot);
            gauges.push(
                meter
                    .f64_observable_gauge("cairn.queue.depth")
                    .with_description("Jobs in a queue, by state")
                    .with_unit("{job}")
                    .with_callback(move |o| {
                        for m in s.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                            for (state, n) in [
                                ("ready", m.ready),
                                ("delayed", m.delayed),
                                ("in_flight", m.in_flight),
                                ("dead", m.dead),
                            ] {
                                o.observe(
                                    n as f64,
                                    &[
                                        KeyValue::new(
                                            "messaging.destination.name",
                                            m.queue.clone(),
                                        ),
                                        KeyValue::new("cairn.state", state),
                                    ],
                                );
                            }
                        }
                    })
                    .build(),
            );
            gauges.push(
                meter
                    .f64_observable_gauge("cairn.queue.oldest_age")
                    .with_description("How long the oldest ready job has waited")
                    .with_unit("s")
                    .with_callback(move |o| {
                        for m in snapshot.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                            o.observe(
                                m.oldest_ready_age,
                                &[KeyValue::new("messaging.destination.name", m.queue.clone())],
                            );
                        }
                    })
                    .build(),
            );
        }
        Self {
            claimed: meter
                .u64_counter("cairn.jobs.claimed")
                .with_description(
                    "Claimed jobs a worker started (task attempts and run executions)",
                )
                .build(),
            jobs: meter
                .u64_counter("cairn.jobs")
                .with_description("Task attempts, by outcome")
                .build(),
            steps: meter
                .u64_counter("cairn.steps")
                .with_description("Workflow step attempts, by outcome")
                .build(),
            runs: meter
                .u64_counter("cairn.runs")
                .with_description("Workflow runs ended, by outcome")
                .build(),
            step_duration: meter
                .f64_histogram("cairn.step.duration")
                .with_description("Duration of workflow step attempts")
                .with_unit("s")
                .build(),
            task_duration: meter
                .f64_histogram("cairn.task.duration")
                .with_description("Duration of task attempts")
                .with_unit("s")
                .build(),
            _gauges: gauges,
            stop_watch,
        }
    }
}

/// Polls the queues' counters into a snapshot the gauges read, until
/// [`OtelPlugin::shutdown`] (or the plugin's last clone is dropped).
fn watch_queues(
    pool: crate::pooler::Db,
    every: Duration,
) -> Result<(Arc<Mutex<Vec<QueueMetrics>>>, CancellationToken)> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::InvalidArgument("queue_metrics needs a Tokio runtime at build()".into())
    })?;
    let snapshot = Arc::new(Mutex::new(Vec::new()));
    let weak = Arc::downgrade(&snapshot);
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    handle.spawn(async move {
        loop {
            let read = tokio::select! {
                _ = stopped.cancelled() => return,
                r = crate::db::metrics_all(&pool) => r,
            };
            match read {
                Ok(m) => match weak.upgrade() {
                    Some(s) => *s.lock().unwrap_or_else(|p| p.into_inner()) = m,
                    None => return, // the plugin is gone
                },
                Err(e) => tracing::warn!(error = %e, "cannot read queue metrics"),
            }
            tokio::select! {
                _ = stopped.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
    Ok((snapshot, stop))
}

impl OtelPlugin {
    /// Starts building the plugin.
    pub fn builder() -> OtelPluginBuilder {
        OtelPluginBuilder::default()
    }

    /// Exports what is buffered and stops the exporter. Runs the blocking
    /// flush on a blocking thread, so it is safe on any runtime.
    pub async fn shutdown(&self) -> Result<()> {
        self.instruments.stop_watch.cancel();
        let (provider, meters) = (self.provider.clone(), self.meters.clone());
        tokio::task::spawn_blocking(move || {
            let traces = provider.shutdown().map_err(|e| e.to_string());
            let metrics = meters.shutdown().map_err(|e| e.to_string());
            traces.and(metrics)
        })
        .await
        .map_err(|e| Error::InvalidArgument(format!("OTLP shutdown panicked: {e}")))?
        .map_err(|e| Error::InvalidArgument(format!("OTLP shutdown failed: {e}")))
    }

    /// Builds and ends a span with fixed ids, times and parent.
    fn emit(&self, span: Emit<'_>) {
        PINNED.with(|p| p.set((span.trace_id, span.span_id)));
        let parent = match span.parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let builder = SpanBuilder::from_name(span.name)
            .with_kind(SpanKind::Consumer)
            .with_start_time(span.start)
            .with_attributes(span.attributes);
        let mut s = self.tracer.build_with_context(builder, &parent);
        PINNED.with(|p| p.set((None, None)));
        if let Some(err) = span.error {
            s.add_event(
                "exception",
                vec![
                    KeyValue::new("exception.message", err.message.clone()),
                    KeyValue::new("cairn.will_retry", err.will_retry),
                ],
            );
            s.set_status(Status::error(err.message.clone()));
        } else {
            s.set_status(Status::Ok);
        }
        s.end_with_timestamp(span.end);
    }
}

struct Emit<'a> {
    name: String,
    trace_id: Option<TraceId>,
    span_id: Option<SpanId>,
    parent: Option<SpanContext>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    error: Option<&'a FailureInfo>,
}

fn messaging(queue: &str) -> [KeyValue; 3] {
    [
        KeyValue::new("messaging.system", "cairn"),
        KeyValue::new("messaging.destination.name", queue.to_owned()),
        KeyValue::new("messaging.operation.type", "process"),
    ]
}

/// The span context of a run: trace id from its traceparent (or the run
/// id), span id from the run id. Any process derives the same.
fn run_span(run: uuid::Uuid, traceparent: Option<&str>) -> SpanContext {
    let trace_id = traceparent
        .and_then(parse_traceparent)
        .map(|sc| sc.trace_id())
        .unwrap_or_else(|| TraceId::from_bytes(*run.as_bytes()));
    let mut id = [0u8; 8];
    id.copy_from_slice(&run.as_bytes()[8..16]);
    if id == [0; 8] {
        id[7] = 1;
    }
    SpanContext::new(
        trace_id,
        SpanId::from_bytes(id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// Parses a W3C `traceparent` into a remote span context.
pub fn parse_traceparent(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.split('-');
    let (_version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// The W3C `traceparent` of a context's span, if it has a valid one.
pub fn traceparent_of(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

fn outcome(error: Option<&FailureInfo>, dead: &'static str) -> &'static str {
    match error {
        None => "completed",
        Some(e) if e.will_retry => "retried",
        Some(_) => dead,
    }
}

impl Plugin for OtelPlugin {
    fn before_workflow(&self, e: &WorkflowEvent) {
        let attrs = [
            KeyValue::new("messaging.destination.name", e.queue.clone()),
            KeyValue::new("cairn.kind", "run"),
        ];
        self.instruments.claimed.add(1, &attrs);
    }

    fn after_workflow(&self, e: &WorkflowEvent, outcome: RunOutcome) {
        if outcome == RunOutcome::Completed {
            self.run_span(e, None);
            self.count_run(e, "completed");
        }
    }

    fn on_workflow_error(&self, e: &WorkflowEvent, error: &FailureInfo) {
        self.run_span(e, Some(error));
        self.count_run(e, "failed");
    }

    fn after_step(&self, e: &StepEvent) {
        self.step_span(e, None);
        self.count_step(e, None);
    }

    fn on_step_error(&self, e: &StepEvent, error: &FailureInfo) {
        self.step_span(e, Some(error));
        self.count_step(e, Some(error));
    }

    fn before_task(&self, e: &TaskEvent) {
        let attrs = [
            KeyValue::new("messaging.destination.name", e.queue.clone()),
            KeyValue::new("cairn.kind", "task"),
        ];
        self.instruments.claimed.add(1, &attrs);
    }

    fn after_task(&self, e: &TaskEvent) {
        self.task_span(e, None);
        self.count_task(e, None);
    }

    fn on_task_error(&self, e: &TaskEvent, error: &FailureInfo) {
        self.task_span(e, Some(error));
        self.count_task(e, Some(error));
    }
}

impl OtelPlugin {
    fn count_run(&self, e: &WorkflowEvent, outcome: &'static str) {
        let attrs = [
            KeyValue::new("cairn.workflow", e.workflow.clone()),
            KeyValue::new("cairn.outcome", outcome),
        ];
        self.instruments.runs.add(1, &attrs);
    }

    fn count_step(&self, e: &StepEvent, error: Option<&FailureInfo>) {
        let name = e.step.split('#').next().unwrap_or(&e.step).to_owned();
        let attrs = [
            KeyValue::new("cairn.workflow", e.workflow.clone()),
            KeyValue::new("cairn.step", name),
            KeyValue::new("cairn.outcome", outcome(error, "failed")),
        ];
        self.instruments.steps.add(1, &attrs);
        self.instruments
            .step_duration
            .record(e.elapsed.as_secs_f64(), &attrs[..2]);
    }

    fn count_task(&self, e: &TaskEvent, error: Option<&FailureInfo>) {
        let attrs = [
            KeyValue::new("messaging.destination.name", e.queue.clone()),
            KeyValue::new("cairn.task", e.task.clone()),
            KeyValue::new("cairn.outcome", outcome(error, "dead")),
        ];
        self.instruments.jobs.add(1, &attrs);
        self.instruments
            .task_duration
            .record(e.elapsed.as_secs_f64(), &attrs[..2]);
    }

    fn run_span(&self, e: &WorkflowEvent, error: Option<&FailureInfo>) {
        let me = run_span(e.run_id, e.traceparent.as_deref());
        let mut attributes = messaging(&e.queue).to_vec();
        attributes.push(KeyValue::new("cairn.run_id", e.run_id.to_string()));
        attributes.push(KeyValue::new("cairn.workflow", e.workflow.clone()));
        self.emit(Emit {
            name: format!("workflow {}", e.workflow),
            trace_id: Some(me.trace_id()),
            span_id: Some(me.span_id()),
            parent: e.traceparent.as_deref().and_then(parse_traceparent),
            start: e.run_created,
            end: e.started + e.elapsed,
            attributes,
            error,
        });
    }

    fn step_span(&self, e: &StepEvent, error: Option<&FailureInfo>) {
        let run = run_span(e.run_id, e.traceparent.as_deref());
        self.emit(Emit {
            name: format!("step {}", e.step.split('#').next().unwrap_or(&e.step)),
            trace_id: None,
            span_id: None,
            parent: Some(run),
            start: e.started,
            end: e.started + e.elapsed,
            attributes: vec![
                KeyValue::new("messaging.system", "cairn"),
                KeyValue::new("cairn.run_id", e.run_id.to_string()),
                KeyValue::new("cairn.workflow", e.workflow.clone()),
                KeyValue::new("cairn.step", e.step.clone()),
                KeyValue::new("cairn.attempt", i64::from(e.attempt)),
                KeyValue::new("cairn.replayed", false),
            ],
            error,
        });
    }

    fn task_span(&self, e: &TaskEvent, error: Option<&FailureInfo>) {
        // A job run as a workflow step is a child of its run's span; other
        // jobs continue their producer's trace.
        let parent = match e.parent_run {
            Some(run) => Some(run_span(run, e.traceparent.as_deref())),
            None => e.traceparent.as_deref().and_then(parse_traceparent),
        };
        let mut attributes = messaging(&e.queue).to_vec();
        attributes.push(KeyValue::new("cairn.job_id", e.job_id));
        attributes.push(KeyValue::new("cairn.task", e.task.clone()));
        attributes.push(KeyValue::new("cairn.attempt", i64::from(e.attempt)));
        if let Some(run) = e.parent_run {
            attributes.push(KeyValue::new("cairn.run_id", run.to_string()));
        }
        self.emit(Emit {
            name: format!("task {}", e.task),
            trace_id: None,
            span_id: None,
            parent,
            start: e.started,
            end: e.started + e.elapsed.max(Duration::from_nanos(1)),
            attributes,
            error,
        });
    }
}

thread_local! {
    /// Ids the next span built on this thread must take (run spans).
    static PINNED: Cell<(Option<TraceId>, Option<SpanId>)> = const { Cell::new((None, None)) };
}

/// Random ids, except where a run span pinned its own.
#[derive(Debug, Default)]
struct PinnedIds(RandomIdGenerator);

impl IdGenerator for PinnedIds {
    fn new_trace_id(&self) -> TraceId {
        PINNED
            .with(|p| p.get().0)
            .unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        PINNED
            .with(|p| p.get().1)
            .unwrap_or_else(|| self.0.new_span_id())
    }
}
