//! The OpenTelemetry plugin: workflow runs, step attempts and tasks as spans,
//! exported over OTLP (gRPC or HTTP/protobuf).
//!
//! A run's span is emitted once, when the run ends. It starts when the run
//! was started and is the child of the producer's `traceparent` (stored with
//! the run). Every executed step attempt is a child span of the run's span,
//! emitted by whichever worker ran it, across crashes. That works because the
//! run's span id is derived from the run id, so any process can name it as a
//! parent. Replayed steps are not reported: they did not execute.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};

use crate::error::{Error, Result};
use crate::plugin::{FailureInfo, Plugin, RunOutcome, StepEvent, TaskEvent, WorkflowEvent};

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

    /// Builds the exporter and its batch processor (which runs on its own
    /// thread). Call [`OtelPlugin::shutdown`] before exiting to flush.
    pub fn build(self) -> Result<OtelPlugin> {
        let config = |e: opentelemetry_otlp::ExporterBuildError| {
            Error::InvalidArgument(format!("cannot build the OTLP exporter: {e}"))
        };
        let exporter = match self.protocol.unwrap_or(Protocol::Grpc) {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if let Some(e) = self.endpoint {
                    b = b.with_endpoint(e);
                }
                b.build().map_err(config)?
            }
            Protocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(e) = self.endpoint {
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
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(PinnedIds::default())
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("cairn");
        Ok(OtelPlugin { provider, tracer })
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
}

impl OtelPlugin {
    /// Starts building the plugin.
    pub fn builder() -> OtelPluginBuilder {
        OtelPluginBuilder::default()
    }

    /// Exports what is buffered and stops the exporter. Runs the blocking
    /// flush on a blocking thread, so it is safe on any runtime.
    pub async fn shutdown(&self) -> Result<()> {
        let provider = self.provider.clone();
        tokio::task::spawn_blocking(move || provider.shutdown())
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

impl Plugin for OtelPlugin {
    fn after_workflow(&self, e: &WorkflowEvent, outcome: RunOutcome) {
        if outcome == RunOutcome::Completed {
            self.run_span(e, None);
        }
    }

    fn on_workflow_error(&self, e: &WorkflowEvent, error: &FailureInfo) {
        self.run_span(e, Some(error));
    }

    fn after_step(&self, e: &StepEvent) {
        self.step_span(e, None);
    }

    fn on_step_error(&self, e: &StepEvent, error: &FailureInfo) {
        self.step_span(e, Some(error));
    }

    fn after_task(&self, e: &TaskEvent) {
        self.task_span(e, None);
    }

    fn on_task_error(&self, e: &TaskEvent, error: &FailureInfo) {
        self.task_span(e, Some(error));
    }
}

impl OtelPlugin {
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
