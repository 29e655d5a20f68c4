//! End to end through a real OTLP receiver running as its own process (built
//! on the official OpenTelemetry protobuf definitions): a run started from
//! SQL with a traceparent, its worker SIGKILLed mid-step, resumed by a worker
//! with the OpenTelemetry plugin. The span tree must hang together.

mod common;

use std::io::{BufRead, Write};
use std::time::Duration;

use cairn::otel::OtelPlugin;
use cairn::{App, HandlerError, WorkflowContext};
use serde_json::{Value, json};
use sqlx::PgPool;
use tracing::Instrument;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

mod receiver {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use axum::response::IntoResponse;
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
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    use opentelemetry_proto::tonic::metrics::v1::number_data_point;
    use prost::Message;
    use serde_json::json;

    pub struct Sink(pub Mutex<std::fs::File>);

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    impl Sink {
        /// Appends every span of a request as a JSON line.
        pub fn write(&self, request: ExportTraceServiceRequest) {
            let mut file = self.0.lock().unwrap();
            for rs in request.resource_spans {
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        let attributes: serde_json::Map<String, serde_json::Value> = span
                            .attributes
                            .iter()
                            .map(|kv| {
                                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Any::StringValue(s)) => json!(s),
                                    Some(Any::IntValue(i)) => json!(i),
                                    Some(Any::BoolValue(b)) => json!(b),
                                    Some(Any::DoubleValue(d)) => json!(d),
                                    _ => json!(null),
                                };
                                (kv.key.clone(), v)
                            })
                            .collect();
                        let line = json!({
                            "name": span.name,
                            "trace_id": hex(&span.trace_id),
                            "span_id": hex(&span.span_id),
                            "parent_span_id": hex(&span.parent_span_id),
                            "status": span.status.map(|s| s.code).unwrap_or(0),
                            "events": span.events.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
                            "kind": span.kind,
                            "attributes": attributes,
                        });
                        writeln!(file, "{line}").unwrap();
                    }
                }
            }
            file.flush().unwrap();
        }
    }

    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.write(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// OTLP/gRPC for traces only, like Jaeger or Phoenix: a metrics export
    /// gets `Unimplemented`.
    pub fn grpc_traces_only(file: std::fs::File) -> tonic::service::Routes {
        tonic::service::Routes::new(TraceServiceServer::new(Sink(Mutex::new(file))))
    }

    /// OTLP/gRPC: traces, and metrics as `{"metric", "attributes", "value"}`
    /// lines (histograms report their count).
    pub fn grpc(file: std::fs::File) -> tonic::service::Routes {
        let sink = Arc::new(Sink(Mutex::new(file)));
        tonic::service::Routes::new(TraceServiceServer::from_arc(sink.clone()))
            .add_service(MetricsServiceServer::from_arc(sink))
    }

    #[tonic::async_trait]
    impl MetricsService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            let mut file = self.0.lock().unwrap();
            for rm in request.into_inner().resource_metrics {
                for sm in rm.scope_metrics {
                    for m in sm.metrics {
                        let points: Vec<(Vec<KeyValue>, f64)> = match m.data {
                            Some(Data::Sum(s)) => s
                                .data_points
                                .into_iter()
                                .map(|p| (p.attributes, number(p.value)))
                                .collect(),
                            Some(Data::Gauge(g)) => g
                                .data_points
                                .into_iter()
                                .map(|p| (p.attributes, number(p.value)))
                                .collect(),
                            Some(Data::Histogram(h)) => h
                                .data_points
                                .into_iter()
                                .map(|p| (p.attributes, p.count as f64))
                                .collect(),
                            _ => Vec::new(),
                        };
                        for (attributes, value) in points {
                            let attributes: serde_json::Map<String, serde_json::Value> = attributes
                                .iter()
                                .map(|kv| {
                                    let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                        Some(Any::StringValue(s)) => json!(s),
                                        _ => json!(null),
                                    };
                                    (kv.key.clone(), v)
                                })
                                .collect();
                            let line =
                                json!({"metric": m.name, "attributes": attributes, "value": value});
                            writeln!(file, "{line}").unwrap();
                        }
                    }
                }
            }
            file.flush().unwrap();
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }

    fn number(v: Option<number_data_point::Value>) -> f64 {
        match v {
            Some(number_data_point::Value::AsInt(i)) => i as f64,
            Some(number_data_point::Value::AsDouble(d)) => d,
            None => 0.0,
        }
    }

    /// OTLP/HTTP with protobuf bodies: POST /v1/traces.
    pub fn http(file: std::fs::File) -> axum::Router {
        let sink = Arc::new(Sink(Mutex::new(file)));
        axum::Router::new()
            // Metrics are accepted and not recorded (the gRPC test checks them).
            .route(
                "/v1/metrics",
                axum::routing::post(|| async {
                    (
                        [("content-type", "application/x-protobuf")],
                        ExportMetricsServiceResponse {
                            partial_success: None,
                        }
                        .encode_to_vec(),
                    )
                }),
            )
            .route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let sink = sink.clone();
                    async move {
                        match ExportTraceServiceRequest::decode(body) {
                            Ok(request) => {
                                sink.write(request);
                                let reply = ExportTraceServiceResponse {
                                    partial_success: None,
                                };
                                (
                                    [("content-type", "application/x-protobuf")],
                                    reply.encode_to_vec(),
                                )
                                    .into_response()
                            }
                            Err(_) => axum::http::StatusCode::BAD_REQUEST.into_response(),
                        }
                    }
                }),
            )
    }
}

/// Child entries: "receiver" / "http-receiver" (an OTLP/gRPC or OTLP/HTTP
/// receiver on CAIRN_PORT writing spans to CAIRN_SPANS) and "worker" (a
/// worker whose "ship" step hangs).
#[test]
#[ignore = "run as a child process by the tests in this file"]
fn child_process() {
    let Some((mode, url)) = common::child_mode() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        if mode == "receiver" || mode == "traces-only-receiver" {
            let port: u16 = std::env::var("CAIRN_PORT").unwrap().parse().unwrap();
            let file = std::fs::File::create(std::env::var("CAIRN_SPANS").unwrap()).unwrap();
            let routes = if mode == "receiver" {
                receiver::grpc(file)
            } else {
                receiver::grpc_traces_only(file)
            };
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve(([127, 0, 0, 1], port).into())
                .await
                .unwrap();
        } else if mode == "traced-program" {
            traced_program(url).await;
        } else if mode == "http-receiver" {
            let port: u16 = std::env::var("CAIRN_PORT").unwrap().parse().unwrap();
            let file = std::fs::File::create(std::env::var("CAIRN_SPANS").unwrap()).unwrap();
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            axum::serve(listener, receiver::http(file)).await.unwrap();
        } else {
            let app = common::builder(&url)
                .max_connections(4)
                .build()
                .await
                .unwrap();
            register(&app, true);
            app.worker()
                .queues(["workflows"])
                .lease(Duration::from_secs(1))
                .run()
                .await
                .unwrap();
        }
    });
}

fn register(app: &App, hang: bool) {
    let db = common::direct_pool(app);
    app.workflow("traced", move |ctx: WorkflowContext, _: ()| {
        let db = db.clone();
        async move {
            let d = db.clone();
            ctx.step("charge", (), move |_| async move {
                sqlx::query("insert into effects values ('charge')")
                    .execute(&d)
                    .await?;
                Ok(())
            })
            .await?;
            let d = db.clone();
            ctx.step("ship", (), move |_| async move {
                sqlx::query("insert into effects values ('ship')")
                    .execute(&d)
                    .await?;
                if hang {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                let tries: i64 =
                    sqlx::query_scalar("select count(*) from effects where what = 'ship'")
                        .fetch_one(&d)
                        .await?;
                // The resumed worker's first attempt fails (retryable).
                if tries == 2 {
                    Err(HandlerError::retryable("carrier busy"))
                } else {
                    Ok(())
                }
            })
            .retry(
                cairn::RetryPolicy::default()
                    .backoff(cairn::Backoff::Fixed(Duration::from_millis(50)))
                    .jitter(0.0),
            )
            .await?;
            ctx.step("notify", (), |_| async { Ok(()) }).await?;
            Ok(())
        }
    })
    .unwrap();
}

/// Starts the receiver process (`mode` "receiver" for gRPC or
/// "http-receiver"); returns it, its port and the file it writes.
async fn start_receiver(
    pool: &PgPool,
    mode: &str,
    tag: &str,
) -> (common::ChildGuard, u16, std::path::PathBuf) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = std::env::temp_dir().join(format!("{tag}-{}-{port}.jsonl", std::process::id()));
    let receiver = common::spawn_child(
        "child_process",
        mode,
        &common::url_of(pool),
        &[
            ("CAIRN_PORT", port.to_string()),
            ("CAIRN_SPANS", file.display().to_string()),
        ],
    );
    common::wait_for("the receiver", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    (receiver, port, file)
}

fn spans(path: &std::path::Path) -> Vec<Value> {
    match std::fs::File::open(path) {
        Ok(f) => std::io::BufReader::new(f)
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[sqlx::test(migrations = false)]
async fn spans_from_a_sql_producer_through_a_crash_to_the_last_step(pool: PgPool) {
    let app = common::app(&pool).await;
    sqlx::query("create table effects (what text)")
        .execute(&pool)
        .await
        .unwrap();
    app.create_queue("workflows").await.unwrap();
    sqlx::query("select cairn.register_workflow('traced', 'workflows')")
        .execute(&pool)
        .await
        .unwrap();
    let url = common::url_of(&pool);

    // The receiver: a separate process.
    let (mut receiver, port, spans_file) = start_receiver(&pool, "receiver", "cairn-spans").await;

    // A SQL producer continues its own trace into the run.
    let run: cairn::Uuid =
        sqlx::query_scalar("select cairn.start_workflow('traced', 'null', traceparent => $1)")
            .bind(format!("00-{TRACE}-{PRODUCER_SPAN}-01"))
            .fetch_one(&pool)
            .await
            .unwrap();
    let err =
        sqlx::query("select cairn.start_workflow('traced', 'null', traceparent => 'garbage')")
            .execute(&pool)
            .await
            .unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("22023")
    );

    // A worker process takes it and is killed in the middle of "ship".
    let mut worker = common::spawn_child("child_process", "worker", &url, &[]);
    common::wait_for("ship to start", Duration::from_secs(30), || async {
        common::scalar_i64(&pool, "select count(*) from effects where what = 'ship'").await == 1
    })
    .await;
    worker.kill().unwrap();
    worker.wait().unwrap();

    // A worker with the OpenTelemetry plugin resumes and finishes the run.
    let otel = OtelPlugin::builder()
        .endpoint(format!("http://127.0.0.1:{port}"))
        .build()
        .unwrap();
    app.plugin(otel.clone());
    register(&app, false);
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(
        app.worker()
            .queues(["workflows"])
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(100))
            .run_until(stop.clone().cancelled_owned()),
    );
    app.result::<()>(run).await.unwrap();
    stop.cancel();
    handle.await.unwrap().unwrap();
    otel.shutdown().await;
    common::wait_for(
        "the run's span at the receiver",
        Duration::from_secs(30),
        || async {
            spans(&spans_file)
                .iter()
                .any(|s| s["name"] == "workflow traced")
        },
    )
    .await;
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    // Spans only: the receiver writes metrics to the same file.
    let got: Vec<Value> = spans(&spans_file)
        .into_iter()
        .filter(|l| l.get("name").is_some())
        .collect();
    let _ = std::fs::remove_file(&spans_file);

    let names: Vec<&str> = got.iter().map(|s| s["name"].as_str().unwrap()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    // "charge" ran in the killed process and was replayed here: no span.
    assert_eq!(
        sorted,
        ["step notify", "step ship", "step ship", "workflow traced"],
        "{got:#?}"
    );
    assert!(
        got.iter().all(|s| s["trace_id"] == TRACE),
        "one trace, the producer's"
    );

    let run_span = got.iter().find(|s| s["name"] == "workflow traced").unwrap();
    assert_eq!(
        run_span["parent_span_id"], PRODUCER_SPAN,
        "the run continues the producer's span"
    );
    let attrs = &run_span["attributes"];
    assert_eq!(attrs["messaging.system"], "cairn");
    assert_eq!(attrs["messaging.destination.name"], "workflows");
    assert_eq!(attrs["messaging.operation.type"], "process");
    assert_eq!(attrs["cairn.run_id"], json!(run.to_string()));
    assert_eq!(attrs["cairn.workflow"], "traced");

    let steps: Vec<&Value> = got
        .iter()
        .filter(|s| s["name"] != "workflow traced")
        .collect();
    for s in &steps {
        assert_eq!(
            s["parent_span_id"], run_span["span_id"],
            "steps are children of the run: {s}"
        );
        assert_eq!(s["attributes"]["cairn.replayed"], false);
    }
    let ship: Vec<&&Value> = steps.iter().filter(|s| s["name"] == "step ship").collect();
    // Attempt 1 was cut short by the kill (counted, but it reported no span);
    // the resumed worker's attempts are 2 (failed) and 3.
    let failed = ship
        .iter()
        .find(|s| s["attributes"]["cairn.attempt"] == 2)
        .unwrap();
    assert_eq!(failed["status"], 2, "error status on the failed attempt");
    assert_eq!(failed["events"], json!(["exception"]));
    let ok = ship
        .iter()
        .find(|s| s["attributes"]["cairn.attempt"] == 3)
        .unwrap();
    assert_eq!(ok["status"], 1);
    let _ = std::io::stdout().flush();
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Notify {
    to: String,
}
impl cairn::Task for Notify {
    const QUEUE: &'static str = "notify";
    type Output = ();
}

#[sqlx::test(migrations = false)]
async fn http_protobuf_export_and_a_task_and_a_flow_continuing_a_sql_producers_trace(pool: PgPool) {
    let app = common::app(&pool).await;
    app.create_queue("notify").await.unwrap();
    let (mut receiver, port, spans_file) =
        start_receiver(&pool, "http-receiver", "cairn-http-spans").await;

    let otel = OtelPlugin::builder()
        .protocol(cairn::otel::Protocol::HttpProtobuf)
        .endpoint(format!("http://127.0.0.1:{port}/v1/traces"))
        .service_name("cairn-test")
        .build()
        .unwrap();
    app.plugin(otel.clone());
    app.task(|_n: Notify, _ctx| async move { Ok(()) }).unwrap();
    // A flow from SQL too: its step's span continues the producer's trace
    // (no worker emits a span for a flow run itself).
    app.step_handler("pack", |_: Value, _ctx| async move { Ok(1) })
        .unwrap();
    app.flow(cairn::Flow::new("parcel").step("pack")).unwrap();
    app.initialize().await.unwrap();
    sqlx::query("select cairn.send('notify', '{\"to\": \"ann\"}', traceparent => $1)")
        .bind(format!("00-{TRACE}-{PRODUCER_SPAN}-01"))
        .execute(&pool)
        .await
        .unwrap();
    let parcel: cairn::Uuid =
        sqlx::query_scalar("select cairn.start_flow('parcel', '{}', traceparent => $1)")
            .bind(format!("00-{TRACE}-{PRODUCER_SPAN}-01"))
            .fetch_one(&pool)
            .await
            .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(
        app.worker()
            .queues(["notify", "workflows"])
            .run_until(stop.clone().cancelled_owned()),
    );
    common::wait_for("the task", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await == 0
    })
    .await;
    app.result::<Value>(parcel).await.unwrap();
    stop.cancel();
    handle.await.unwrap().unwrap();
    otel.shutdown().await;
    common::wait_for("the spans", Duration::from_secs(30), || async {
        spans(&spans_file).len() >= 2
    })
    .await;
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    let got: Vec<Value> = spans(&spans_file)
        .into_iter()
        .filter(|l| l.get("name").is_some())
        .collect();
    let _ = std::fs::remove_file(&spans_file);
    assert_eq!(got.len(), 2, "{got:#?}");
    let step = got
        .iter()
        .find(|s| s["name"] == "step pack")
        .expect("the flow's step span");
    assert_eq!(step["trace_id"], TRACE);
    assert_eq!(step["parent_span_id"], PRODUCER_SPAN, "{step:#}");
    assert_eq!(step["attributes"]["cairn.run_id"], parcel.to_string());
    let task = got
        .iter()
        .find(|s| s["name"] == "task notify")
        .expect("the task's span");
    assert_eq!(task["name"], "task notify");
    assert_eq!(task["trace_id"], TRACE);
    assert_eq!(task["parent_span_id"], PRODUCER_SPAN);
    assert_eq!(task["attributes"]["messaging.destination.name"], "notify");
    assert_eq!(task["attributes"]["cairn.attempt"], 1);
    assert_eq!(task["status"], 1);
}

#[sqlx::test(migrations = false)]
async fn metrics_count_outcomes_time_steps_and_watch_queues(pool: PgPool) {
    let app = common::app(&pool).await;
    app.create_queue("notify").await.unwrap();
    let (mut receiver, port, file) = start_receiver(&pool, "receiver", "cairn-metrics").await;
    let otel = OtelPlugin::builder()
        .endpoint(format!("http://127.0.0.1:{port}"))
        .queue_metrics(&app, Duration::from_millis(50))
        .build()
        .unwrap();
    app.plugin(otel.clone());
    app.task(|n: Notify, _ctx| async move {
        if n.to.is_empty() {
            Err(HandlerError::fatal("nobody"))
        } else {
            Ok(())
        }
    })
    .unwrap();
    app.workflow("one_step", |ctx: WorkflowContext, _: ()| async move {
        ctx.step("only", (), |_| async { Ok(()) }).await?;
        Ok(())
    })
    .unwrap();
    for to in ["ann", "bob", ""] {
        app.enqueue(&Notify { to: to.into() }).await.unwrap();
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(
        app.worker()
            .queues(["notify", "workflows"])
            .run_until(stop.clone().cancelled_owned()),
    );
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;
    let run = app.start("one_step", &()).await.unwrap();
    app.result::<()>(run).await.unwrap();
    common::wait_for("the tasks", Duration::from_secs(10), || async {
        app.metrics("notify").await.unwrap().dead == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // a fresh queue snapshot
    stop.cancel();
    handle.await.unwrap().unwrap();
    otel.shutdown().await; // exports the metrics
    common::wait_for("the metrics", Duration::from_secs(30), || async {
        spans(&file)
            .iter()
            .any(|l| l["metric"] == "cairn.queue.depth")
    })
    .await;
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    let lines = spans(&file);
    let _ = std::fs::remove_file(&file);

    let value = |metric: &str, attrs: &[(&str, &str)]| -> f64 {
        lines
            .iter()
            .filter(|l| {
                l["metric"] == metric && attrs.iter().all(|(k, v)| l["attributes"][*k] == *v)
            })
            .map(|l| l["value"].as_f64().unwrap())
            .sum()
    };
    assert_eq!(
        value("cairn.jobs", &[("cairn.outcome", "completed")]),
        2.0,
        "{lines:#?}"
    );
    assert_eq!(value("cairn.jobs", &[("cairn.outcome", "dead")]), 1.0);
    assert_eq!(value("cairn.jobs.claimed", &[("cairn.kind", "task")]), 3.0);
    assert_eq!(
        value(
            "cairn.steps",
            &[("cairn.step", "only"), ("cairn.outcome", "completed")]
        ),
        1.0
    );
    assert_eq!(value("cairn.runs", &[("cairn.outcome", "completed")]), 1.0);
    assert_eq!(
        value("cairn.step.duration", &[("cairn.step", "only")]),
        1.0,
        "one recorded duration"
    );
    assert_eq!(
        value("cairn.task.duration", &[("cairn.task", "notify")]),
        3.0
    );
    let dead_depth = value(
        "cairn.queue.depth",
        &[
            ("messaging.destination.name", "notify"),
            ("cairn.state", "dead"),
        ],
    );
    assert_eq!(dead_depth, 1.0);
    assert!(
        lines
            .iter()
            .any(|l| l["metric"] == "cairn.queue.oldest_age")
    );

    // The compose stack's Grafana dashboard asks only for metrics and labels
    // cairn sends, under the names the collector's Prometheus exporter gives
    // them: dots become underscores, counters end in `_total`, unit `s` adds
    // `_seconds`, histograms are read through `_bucket`.
    let prometheus = |otel: &str| -> String {
        let base = otel.replace('.', "_");
        match otel {
            "cairn.jobs" | "cairn.jobs.claimed" | "cairn.steps" | "cairn.runs" => {
                format!("{base}_total")
            }
            "cairn.step.duration" | "cairn.task.duration" => format!("{base}_seconds_bucket"),
            "cairn.queue.oldest_age" => format!("{base}_seconds"),
            _ => base,
        }
    };
    let mut sent: std::collections::HashMap<String, std::collections::HashSet<String>> =
        Default::default();
    for l in lines.iter().filter(|l| l["metric"].is_string()) {
        sent.entry(prometheus(l["metric"].as_str().unwrap()))
            .or_default()
            .extend(
                l["attributes"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|k| k.replace('.', "_")),
            );
    }
    let dashboard: Value =
        serde_json::from_str(include_str!("../docker/grafana/dashboards/cairn.json")).unwrap();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            // The metric is the cairn_ name outside the `by (…)` groups.
            let outside: String = expr
                .split("by (")
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part
                    } else {
                        part.split_once(')').map_or("", |p| p.1)
                    }
                })
                .collect();
            let metric = outside
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .find(|w| w.starts_with("cairn_"))
                .unwrap_or_else(|| panic!("no cairn metric in {expr}"));
            let labels = sent.get(metric).unwrap_or_else(|| {
                panic!("the dashboard asks for {metric}, which cairn does not send: {expr}")
            });
            for group in expr.split("by (").skip(1) {
                for label in group.split(')').next().unwrap().split(',').map(str::trim) {
                    assert!(
                        label == "le" || labels.contains(label),
                        "{expr}: cairn sends no {label} on {metric} (it sends {labels:?})"
                    );
                }
            }
            asked += 1;
        }
    }
    assert_eq!(asked, 12, "every panel's queries were checked");
}

/// A program instrumented with `tracing`: its own spans and events, inside a
/// producer span, a workflow step and a task, exported through the plugin's
/// layer, with metrics on against a backend that refuses them. Prints how
/// long shutdown took.
async fn traced_program(url: String) {
    use tracing_subscriber::layer::SubscriberExt;
    let port = std::env::var("CAIRN_PORT").unwrap();
    let app = common::builder(&url)
        .max_connections(4)
        .build()
        .await
        .unwrap();
    app.initialize().await.unwrap();
    app.create_queue("notify").await.unwrap();
    let otel = OtelPlugin::builder()
        .endpoint(format!("http://127.0.0.1:{port}"))
        .metrics(true)
        .metrics_interval(Duration::from_millis(100))
        .queue_metrics(&app, Duration::from_millis(100))
        .build()
        .unwrap();
    app.plugin(otel.clone());
    let subscriber = tracing_subscriber::registry().with(otel.layer());
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let producer = app.clone();
    app.workflow("nested", move |ctx: WorkflowContext, _: ()| {
        let app = producer.clone();
        async move {
            ctx.step("charge", (), move |_| async move {
                tracing::info!(amount = 42, "talking to the bank");
                async {
                    tracing::info!("card accepted");
                    app.enqueue(&Notify { to: "ann".into() }).await?;
                    Ok::<_, HandlerError>(())
                }
                .instrument(tracing::info_span!("charge card", card = "visa"))
                .await
            })
            .await?;
            Ok(())
        }
    })
    .unwrap();
    app.task(|_n: Notify, _ctx| {
        async {
            tracing::info!("sent");
            Ok(())
        }
        .instrument(tracing::info_span!("send mail"))
    })
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["workflows", "notify"])
            .poll_interval(Duration::from_millis(50))
            .run_until(stop.clone().cancelled_owned()),
    );
    let run = async { app.start("nested", &()).await.unwrap() }
        .instrument(tracing::info_span!("producer"))
        .await;
    app.result::<()>(run).await.unwrap();
    let db = common::direct_pool(&app);
    common::wait_for("the task", Duration::from_secs(30), || async {
        common::scalar_i64(&db, "select count(*) from cairn.jobs").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // a few refused metric exports
    stop.cancel();
    worker.await.unwrap().unwrap();
    let clock = std::time::Instant::now();
    otel.shutdown().await;
    println!("shutdown took {} ms", clock.elapsed().as_millis());
}

#[sqlx::test(migrations = false)]
async fn user_spans_nest_under_steps_and_a_traces_only_backend_fails_nothing(pool: PgPool) {
    let (mut receiver, port, spans_file) =
        start_receiver(&pool, "traces-only-receiver", "cairn-nested").await;
    let mut program = common::spawn_child(
        "child_process",
        "traced-program",
        &common::url_of(&pool),
        &[("CAIRN_PORT", port.to_string())],
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(program.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let status = program.wait().unwrap();
    assert!(status.success(), "the program exits 0: {status}\n{stdout}");
    let ms: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("shutdown took ").map(|(_, t)| t))
        .and_then(|l| l.strip_suffix(" ms"))
        .unwrap_or_else(|| panic!("no shutdown time in {stdout}"))
        .parse()
        .unwrap();
    assert!(ms < 2_000, "shutdown took {ms} ms");
    common::wait_for("the spans", Duration::from_secs(30), || async {
        spans(&spans_file).len() >= 6
    })
    .await;
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    let got = spans(&spans_file);
    let _ = std::fs::remove_file(&spans_file);
    let span = |name: &str| -> &Value {
        got.iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no span {name:?} in {got:#?}"))
    };
    let (producer, run, step, user) = (
        span("producer"),
        span("workflow nested"),
        span("step charge"),
        span("charge card"),
    );
    let (task, mail) = (span("task notify"), span("send mail"));
    assert!(
        got.iter().all(|s| s["trace_id"] == producer["trace_id"]),
        "one trace, the producer's: {got:#?}"
    );
    assert_eq!(run["parent_span_id"], producer["span_id"]);
    assert_eq!(step["parent_span_id"], run["span_id"]);
    assert_eq!(
        user["parent_span_id"], step["span_id"],
        "the user's span nests under the step"
    );
    assert_eq!(user["attributes"]["card"], "visa");
    // (sqlx's own query events land there too: no level filter here.)
    let events = |s: &Value| -> Vec<String> {
        s["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(events(user).contains(&"card accepted".into()), "{user}");
    assert!(
        events(step).contains(&"talking to the bank".into()),
        "an event outside the user's spans lands on the step: {step}"
    );
    assert_eq!(
        task["parent_span_id"], user["span_id"],
        "a job enqueued inside the user's span continues it"
    );
    assert_eq!(mail["parent_span_id"], task["span_id"]);
    assert!(events(mail).contains(&"sent".into()), "{mail}");
    assert!(
        !got.iter()
            .any(|s| s["name"].as_str().unwrap().starts_with("cairn.")),
        "cairn's own tracing spans are not exported twice: {got:#?}"
    );
}
