//! The OpenTelemetry plugin: workflow runs, step attempts and tasks as spans,
//! and (when asked for) counters, histograms and queue gauges as metrics,
//! exported over OTLP (gRPC or HTTP/protobuf).
//!
//! A run's span is emitted once, when the run ends. It starts when the run
//! was started and is the child of the producer's `traceparent` (stored with
//! the run). Every executed step attempt is a child span of the run's span,
//! emitted by whichever worker ran it, across crashes. That works because the
//! run's span id is derived from the run id, so any process can name it as a
//! parent. Replayed steps are not reported: they did not execute.
//!
//! A step's or task's span is live while its handler runs and is the current
//! OpenTelemetry context there: spans the handler opens are its children, and
//! so are its `tracing` spans and events through [`OtelPlugin::layer`].
//!
//! Telemetry never fails the program: an export that fails (a backend that is
//! down, or one that takes traces and refuses metrics) is logged, and
//! [`OtelPlugin::shutdown`] returns within its time limit.

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
use crate::plugin::{
    Attempt, FailureInfo, Plugin, RunOutcome, StepEvent, TaskEvent, WorkflowEvent,
};
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
    metrics: bool,
    metrics_endpoint: Option<String>,
    metrics_interval: Option<Duration>,
    shutdown_timeout: Option<Duration>,
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

    /// Also export metrics, to the same collector as the spans (for
    /// OTLP/HTTP, its `/v1/metrics` path). Off by default: many trace
    /// backends (Jaeger, Phoenix) take traces only.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Export metrics to this collector address instead (turns metrics on).
    pub fn metrics_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.metrics = true;
        self.metrics_endpoint = Some(endpoint.into());
        self
    }

    /// Also report each queue's depth (`cairn.queue.depth`, by state) and the
    /// age of its oldest ready job (`cairn.queue.oldest_age`), read from
    /// `cairn.metrics_all()` through `app`'s pool every `every`. Turns
    /// metrics on. Needs a Tokio runtime at `build`.
    pub fn queue_metrics(mut self, app: &crate::App, every: Duration) -> Self {
        self.queues = Some((app.db().clone(), every));
        self.metrics = true;
        self
    }

    /// How often metrics are exported (default 60 s).
    pub fn metrics_interval(mut self, every: Duration) -> Self {
        self.metrics_interval = Some(every);
        self
    }

    /// The longest a single export, and [`OtelPlugin::shutdown`], may take
    /// (default 2 s). What is not exported by then is dropped, and logged.
    pub fn shutdown_timeout(mut self, limit: Duration) -> Self {
        self.shutdown_timeout = Some(limit);
        self
    }

    /// Builds the exporters: spans through a batch processor and metrics (if
    /// asked for) through a periodic reader, both on threads of their own.
    /// Call [`OtelPlugin::shutdown`] before exiting to flush.
    pub fn build(self) -> Result<OtelPlugin> {
        let config = |e: opentelemetry_otlp::ExporterBuildError| {
            Error::InvalidArgument(format!("cannot build the OTLP exporter: {e}"))
        };
        let protocol = self.protocol.unwrap_or(Protocol::Grpc);
        let limit = self.shutdown_timeout.unwrap_or(Duration::from_secs(2));
        let exporter = match protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(limit);
                if let Some(e) = self.endpoint.clone() {
                    b = b.with_endpoint(e);
                }
                b.build().map_err(config)?
            }
            Protocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_timeout(limit);
                if let Some(e) = self.endpoint.clone() {
                    b = b.with_endpoint(e);
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
        if !self.metrics {
            return Ok(OtelPlugin {
                provider,
                tracer,
                meters: None,
                instruments: None,
                shutdown_timeout: limit,
            });
        }
        let metrics_endpoint = self.metrics_endpoint.or_else(|| match protocol {
            Protocol::Grpc => self.endpoint,
            // The traces URL names its signal; metrics have their own.
            Protocol::HttpProtobuf => self
                .endpoint
                .map(|e| e.replace("/v1/traces", "/v1/metrics")),
        });
        let metric_exporter = match protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .with_timeout(limit);
                if let Some(e) = metrics_endpoint {
                    b = b.with_endpoint(e);
                }
                b.build().map_err(config)?
            }
            Protocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_timeout(limit);
                if let Some(e) = metrics_endpoint {
                    b = b.with_endpoint(e);
                }
                b.build().map_err(config)?
            }
        };
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
            meters: Some(meters),
            instruments: Some(instruments),
            shutdown_timeout: limit,
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
    /// Present when metrics were asked for.
    meters: Option<SdkMeterProvider>,
    instruments: Option<Arc<Instruments>>,
    shutdown_timeout: Duration,
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

    /// A `tracing` layer that exports the program's own `tracing` spans
    /// through this plugin's exporter. Inside a handler, they are children of
    /// the step's or task's span; events logged in a handler outside any span
    /// of the program's become events of that span. Spans and events of the
    /// crates the exporter is made of (`h2`, `hyper`, `tonic`, `tower`,
    /// `reqwest`, `opentelemetry`) are left out. Add it to the subscriber:
    /// `tracing_subscriber::registry().with(otel.layer()).init()`.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let ours = || tracing_subscriber::filter::filter_fn(|meta| exported(meta.target()));
        tracing_opentelemetry::layer()
            .with_tracer(self.tracer.clone())
            .with_filter(ours())
            .and_then(AttemptEvents.with_filter(ours()))
    }

    /// Exports what is buffered and stops the exporters, in at most the
    /// shutdown timeout (default 2 s). A failed or unfinished export is
    /// logged (target `cairn`), never returned: telemetry does not fail the
    /// program.
    pub async fn shutdown(&self) {
        let limit = self.shutdown_timeout;
        let traces = {
            let provider = self.provider.clone();
            finish("traces", limit, move || {
                provider.shutdown_with_timeout(limit)
            })
        };
        match (&self.meters, &self.instruments) {
            (Some(meters), Some(instruments)) => {
                instruments.stop_watch.cancel();
                let meters = meters.clone();
                let metrics = finish("metrics", limit, move || {
                    meters.shutdown_with_timeout(limit)
                });
                tokio::join!(traces, metrics);
            }
            _ => traces.await,
        }
    }

    /// The metrics, if asked for.
    fn count(&self, record: impl FnOnce(&Instruments)) {
        if let Some(instruments) = &self.instruments {
            record(instruments);
        }
    }

    /// Starts an attempt's span, live until its `after_*` or `on_*_error`
    /// hook ends it (or, if the attempt is abandoned, until its context is
    /// dropped).
    fn start_attempt(
        &self,
        name: String,
        parent: Option<SpanContext>,
        start: SystemTime,
        attributes: Vec<KeyValue>,
    ) -> Context {
        let parent = remote_parent(parent);
        let builder = SpanBuilder::from_name(name)
            .with_kind(SpanKind::Consumer)
            .with_start_time(start)
            .with_attributes(attributes);
        let span = self.tracer.build_with_context(builder, &parent);
        parent.with_span(span).with_value(Live)
    }

    /// Ends the current attempt's span (the hooks run in its context).
    fn end_attempt(&self, end: SystemTime, error: Option<&FailureInfo>) {
        Context::map_current(|cx| {
            if cx.get::<Live>().is_none() {
                return;
            }
            let span = cx.span();
            match error {
                Some(err) => {
                    span.add_event(
                        "exception",
                        vec![
                            KeyValue::new("exception.message", err.message.clone()),
                            KeyValue::new("cairn.will_retry", err.will_retry),
                        ],
                    );
                    span.set_status(Status::error(err.message.clone()));
                }
                None => span.set_status(Status::Ok),
            }
            span.end_with_timestamp(end);
        });
    }

    /// Builds and ends a run's span, with the ids derived from the run.
    fn emit_run(&self, e: &WorkflowEvent, error: Option<&FailureInfo>) {
        let me = run_span(e.run_id, e.traceparent.as_deref());
        let mut attributes = messaging(&e.queue).to_vec();
        attributes.push(KeyValue::new("cairn.run_id", e.run_id.to_string()));
        attributes.push(KeyValue::new("cairn.workflow", e.workflow.clone()));
        PINNED.with(|p| p.set((Some(me.trace_id()), Some(me.span_id()))));
        let parent = remote_parent(e.traceparent.as_deref().and_then(parse_traceparent));
        let builder = SpanBuilder::from_name(format!("workflow {}", e.workflow))
            .with_kind(SpanKind::Consumer)
            .with_start_time(e.run_created)
            .with_attributes(attributes);
        let mut span = self.tracer.build_with_context(builder, &parent);
        PINNED.with(|p| p.set((None, None)));
        match error {
            Some(err) => {
                span.add_event(
                    "exception",
                    vec![KeyValue::new("exception.message", err.message.clone())],
                );
                span.set_status(Status::error(err.message.clone()));
            }
            None => span.set_status(Status::Ok),
        }
        span.end_with_timestamp(e.started + e.elapsed);
    }
}

/// Whether the layer exports spans and events of this target. Not cairn's
/// own `cairn.task`, `cairn.step` and `cairn.run` spans, which carry ids for
/// logs (the trace has those as real spans already), nor those of the crates
/// the exporter itself is made of: exporting them would feed back.
fn exported(target: &str) -> bool {
    const EXPORTER: [&str; 6] = ["h2", "hyper", "tonic", "tower", "reqwest", "opentelemetry"];
    let krate = target.split("::").next().unwrap_or(target);
    target != "cairn::attempt" && !EXPORTER.contains(&krate) && !krate.starts_with("hyper_")
}

/// A context whose parent span lives in another process (or is derived).
fn remote_parent(parent: Option<SpanContext>) -> Context {
    match parent {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    }
}

/// Marks a context whose span is an attempt's, started by this plugin.
#[derive(Debug)]
struct Live;

/// Runs a blocking shutdown on a thread of its own and waits for it at most
/// `limit` (a detached thread does not hold the process at exit).
async fn finish(
    signal: &'static str,
    limit: Duration,
    work: impl FnOnce() -> opentelemetry_sdk::error::OTelSdkResult + Send + 'static,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("cairn-otel-{signal}"))
        .spawn(move || {
            let _ = tx.send(work());
        });
    if let Err(e) = spawned {
        tracing::warn!(target: "cairn", signal, error = %e, "cannot flush OpenTelemetry");
        return;
    }
    match tokio::time::timeout(limit + Duration::from_millis(200), rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::warn!(target: "cairn", signal, error = %e, "OTLP export failed at shutdown")
        }
        Ok(Err(_)) => tracing::warn!(target: "cairn", signal, "OTLP shutdown panicked"),
        Err(_) => tracing::warn!(
            target: "cairn",
            signal,
            ?limit,
            "OTLP shutdown did not finish in time; what was left is dropped"
        ),
    }
}

/// Makes `tracing` events that happen in an attempt's handler, outside any
/// span of the program's, events of the attempt's span.
struct AttemptEvents;

impl<S> tracing_subscriber::Layer<S> for AttemptEvents
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if event.parent().is_some() || ctx.lookup_current().is_some() {
            return; // the span layer puts it on that span
        }
        Context::map_current(|cx| {
            let span = cx.span();
            if cx.get::<Live>().is_none() || !span.is_recording() {
                return;
            }
            let meta = event.metadata();
            let mut fields = EventFields {
                message: None,
                attributes: vec![
                    KeyValue::new("level", meta.level().as_str()),
                    KeyValue::new("target", meta.target().to_owned()),
                ],
            };
            event.record(&mut fields);
            let name = fields.message.unwrap_or_else(|| meta.name().to_owned());
            span.add_event(name, fields.attributes);
        });
    }
}

/// An event's message and fields, as span event attributes.
struct EventFields {
    message: Option<String>,
    attributes: Vec<KeyValue>,
}

impl tracing::field::Visit for EventFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_owned());
        } else {
            self.attributes
                .push(KeyValue::new(field.name(), value.to_owned()));
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        match i64::try_from(value) {
            Ok(v) => self.record_i64(field, v),
            Err(_) => self.record_str(field, &value.to_string()),
        }
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }
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
        self.count(|i| {
            let attrs = [
                KeyValue::new("messaging.destination.name", e.queue.clone()),
                KeyValue::new("cairn.kind", "run"),
            ];
            i.claimed.add(1, &attrs);
        });
    }

    fn after_workflow(&self, e: &WorkflowEvent, outcome: RunOutcome) {
        if outcome == RunOutcome::Completed {
            self.emit_run(e, None);
            self.count_run(e, "completed");
        }
    }

    fn on_workflow_error(&self, e: &WorkflowEvent, error: &FailureInfo) {
        self.emit_run(e, Some(error));
        self.count_run(e, "failed");
    }

    fn after_step(&self, e: &StepEvent) {
        self.end_attempt(e.started + e.elapsed, None);
        self.count_step(e, None);
    }

    fn on_step_error(&self, e: &StepEvent, error: &FailureInfo) {
        self.end_attempt(e.started + e.elapsed, Some(error));
        self.count_step(e, Some(error));
    }

    fn before_task(&self, e: &TaskEvent) {
        self.count(|i| {
            let attrs = [
                KeyValue::new("messaging.destination.name", e.queue.clone()),
                KeyValue::new("cairn.kind", "task"),
            ];
            i.claimed.add(1, &attrs);
        });
    }

    fn after_task(&self, e: &TaskEvent) {
        self.end_attempt(e.started + e.elapsed.max(Duration::from_nanos(1)), None);
        self.count_task(e, None);
    }

    fn on_task_error(&self, e: &TaskEvent, error: &FailureInfo) {
        self.end_attempt(
            e.started + e.elapsed.max(Duration::from_nanos(1)),
            Some(error),
        );
        self.count_task(e, Some(error));
    }

    fn attempt_context(&self, attempt: Attempt<'_>) -> Option<Context> {
        Some(match attempt {
            // The run's span is emitted when the run ends; its id is known
            // now, so the workflow's own spans can name it as parent.
            Attempt::Workflow(e) => {
                remote_parent(Some(run_span(e.run_id, e.traceparent.as_deref())))
            }
            Attempt::Step(e) => self.start_attempt(
                format!("step {}", e.step.split('#').next().unwrap_or(&e.step)),
                Some(run_span(e.run_id, e.traceparent.as_deref())),
                e.started,
                vec![
                    KeyValue::new("messaging.system", "cairn"),
                    KeyValue::new("cairn.run_id", e.run_id.to_string()),
                    KeyValue::new("cairn.workflow", e.workflow.clone()),
                    KeyValue::new("cairn.step", e.step.clone()),
                    KeyValue::new("cairn.attempt", i64::from(e.attempt)),
                    KeyValue::new("cairn.replayed", false),
                ],
            ),
            Attempt::Task(e) => {
                // A code-first run's step job is a child of its run's span.
                // A flow's steps and other jobs continue their producer's
                // trace: a flow run is driven by Postgres, and no worker
                // emits a span for the run itself.
                let parent = match e.parent_run {
                    Some(run) if !e.flow_step => Some(run_span(run, e.traceparent.as_deref())),
                    _ => e.traceparent.as_deref().and_then(parse_traceparent),
                };
                let mut attributes = messaging(&e.queue).to_vec();
                attributes.push(KeyValue::new("cairn.job_id", e.job_id));
                attributes.push(KeyValue::new("cairn.task", e.task.clone()));
                attributes.push(KeyValue::new("cairn.attempt", i64::from(e.attempt)));
                if let Some(run) = e.parent_run {
                    attributes.push(KeyValue::new("cairn.run_id", run.to_string()));
                }
                let kind = if e.flow_step { "step" } else { "task" };
                self.start_attempt(format!("{kind} {}", e.task), parent, e.started, attributes)
            }
        })
    }
}

impl OtelPlugin {
    fn count_run(&self, e: &WorkflowEvent, outcome: &'static str) {
        self.count(|i| {
            let attrs = [
                KeyValue::new("cairn.workflow", e.workflow.clone()),
                KeyValue::new("cairn.outcome", outcome),
            ];
            i.runs.add(1, &attrs);
        });
    }

    fn count_step(&self, e: &StepEvent, error: Option<&FailureInfo>) {
        self.count(|i| {
            let name = e.step.split('#').next().unwrap_or(&e.step).to_owned();
            let attrs = [
                KeyValue::new("cairn.workflow", e.workflow.clone()),
                KeyValue::new("cairn.step", name),
                KeyValue::new("cairn.outcome", outcome(error, "failed")),
            ];
            i.steps.add(1, &attrs);
            i.step_duration.record(e.elapsed.as_secs_f64(), &attrs[..2]);
        });
    }

    fn count_task(&self, e: &TaskEvent, error: Option<&FailureInfo>) {
        self.count(|i| {
            let attrs = [
                KeyValue::new("messaging.destination.name", e.queue.clone()),
                KeyValue::new("cairn.task", e.task.clone()),
                KeyValue::new("cairn.outcome", outcome(error, "dead")),
            ];
            i.jobs.add(1, &attrs);
            i.task_duration.record(e.elapsed.as_secs_f64(), &attrs[..2]);
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
