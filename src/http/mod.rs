//! The HTTP API (feature `http`): runs, workflows, queues, dead letters,
//! workers, schedules and flows as JSON under `/api/`, for any client.
//!
//! Every endpoint but `GET /api/health` needs `Authorization: Bearer
//! <token>`. A token is full (reads and writes) or read-only (`GET` only).
//! Bad input gets a 4xx whose `error` is the text the SQL function gave;
//! nothing is written. `GET /api/openapi.json` describes it all.
//!
//! ```no_run
//! # async fn demo(app: cairn::App) -> Result<(), Box<dyn std::error::Error>> {
//! let tokens = cairn::http::Tokens::new().full("s3cret").read_only("peek");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! cairn::http::serve(app, tokens, listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{App, Error, RunFilter, RunStatus, Uuid};

mod ui;

/// The longest `GET /api/runs/{id}/result?wait=` may wait, in seconds.
const MAX_WAIT: f64 = 60.0;

/// The bearer tokens the API accepts, kept as SHA-256 digests.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    full: Vec<[u8; 32]>,
    read_only: Vec<[u8; 32]>,
}

impl Tokens {
    /// No tokens yet: add at least one, or nothing but the health check is
    /// reachable.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token that may read and write.
    pub fn full(mut self, token: &str) -> Self {
        self.full.push(digest(token));
        self
    }

    /// A token that may only read (`GET`).
    pub fn read_only(mut self, token: &str) -> Self {
        self.read_only.push(digest(token));
        self
    }

    /// Whether no token was given.
    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.read_only.is_empty()
    }

    /// What a presented token may do.
    fn access(&self, token: &str) -> Option<Access> {
        // Digests are compared, not the tokens: the time a comparison takes
        // says nothing about the token.
        let d = digest(token);
        if self.full.contains(&d) {
            Some(Access::Full)
        } else if self.read_only.contains(&d) {
            Some(Access::ReadOnly)
        } else {
            None
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Full,
    ReadOnly,
}

#[derive(Clone)]
struct Api {
    app: App,
    tokens: std::sync::Arc<Tokens>,
}

/// The API as an axum router, to serve alone ([`serve`]) or nest in your
/// own.
pub fn router(app: App, tokens: Tokens) -> axum::Router {
    let api = Api {
        app,
        tokens: std::sync::Arc::new(tokens),
    };
    let guarded = axum::Router::new()
        .route("/api/runs", get(list_runs).post(start_run))
        .route("/api/runs/{id}", get(show_run))
        .route("/api/runs/{id}/result", get(run_result))
        .route("/api/runs/{id}/history", get(run_history))
        .route("/api/runs/{id}/steps", get(run_steps))
        .route("/api/runs/{id}/cancel", post(cancel_run))
        .route("/api/runs/{id}/retry", post(retry_run))
        .route("/api/runs/{id}/signal", post(signal_run))
        .route("/api/workflows", get(workflows))
        .route("/api/queues", get(queues))
        .route("/api/workers", get(workers))
        .route("/api/doctor", get(doctor))
        .route("/api/dead", get(dead))
        .route("/api/dead/{queue}/requeue", post(requeue_dead))
        .route("/api/schedules", get(schedules))
        .route("/api/flows", get(flows))
        .route("/api/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(api.clone(), authorize));
    axum::Router::new()
        .route("/api/health", get(health))
        .merge(guarded)
        .merge(ui::routes())
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(api)
}

/// Serves the API on `listener` until `shutdown` completes. Refuses to
/// start without a token.
pub async fn serve(
    app: App,
    tokens: Tokens,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    if tokens.is_empty() {
        return Err(Error::InvalidArgument(
            "the HTTP API needs at least one token (full or read-only)".into(),
        ));
    }
    axum::serve(listener, router(app, tokens))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::InvalidArgument(format!("the HTTP server stopped: {e}")))
}

async fn authorize(
    State(api): State<Api>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    // The scheme is case-insensitive (RFC 9110): "bearer x" is "Bearer x".
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match token.and_then(|t| api.tokens.access(t.trim())) {
        None => {
            let mut refused = ApiError(
                StatusCode::UNAUTHORIZED,
                "a bearer token is needed: Authorization: Bearer <token>".into(),
            )
            .into_response();
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("a header value"),
            );
            refused
        }
        Some(Access::ReadOnly) if request.method() != Method::GET => {
            ApiError(StatusCode::FORBIDDEN, "this token is read-only".into()).into_response()
        }
        Some(_) => next.run(request).await,
    }
}

/// An error as the API answers it: a status and `{"error": "…"}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument(_) | Error::Deserialize { .. } | Error::Serialize { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::InvalidState(_) | Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Database { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // The SQL function's own text, without the Rust prefix.
        let text = match e {
            Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::InvalidState(m)
            | Error::Conflict(m) => m,
            other => other.to_string(),
        };
        ApiError(status, text)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, r.body_text())
    }
}

type Answer = std::result::Result<Response, ApiError>;

fn ok(value: impl serde::Serialize) -> Answer {
    Ok(Json(value).into_response())
}

fn run_id(text: &str) -> std::result::Result<Uuid, ApiError> {
    text.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{text:?} is not a run id (a UUID)"),
        )
    })
}

/// A number of seconds given as `name`, as a duration: 400 unless ≥ 0.
fn seconds(name: &str, value: f64) -> std::result::Result<Duration, ApiError> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{name} must be a number of seconds ≥ 0, got {value}"),
        )
    })
}

async fn health(State(api): State<Api>) -> Answer {
    sqlx::query("select 1")
        .execute(api.app.db())
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}")))?;
    ok(json!({ "status": "ok", "schema": crate::latest_version() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    workflow: Option<String>,
    status: Option<String>,
    since: Option<DateTime<Utc>>,
    limit: Option<u32>,
}

async fn list_runs(State(api): State<Api>, q: Result<Query<RunsQuery>, QueryRejection>) -> Answer {
    let Query(q) = q?;
    let mut filter = RunFilter::default().limit(q.limit.unwrap_or(100));
    if let Some(w) = &q.workflow {
        filter = filter.workflow(w);
    }
    if let Some(s) = &q.status {
        filter = filter.status(s.parse::<RunStatus>()?);
    }
    if let Some(t) = q.since {
        filter = filter.since(t);
    }
    ok(api.app.list_runs(filter).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    workflow: String,
    #[serde(default)]
    input: Value,
    idempotency_key: Option<String>,
    queue: Option<String>,
    priority: Option<i16>,
    /// Seconds before the run may start.
    delay: Option<f64>,
}

async fn start_run(State(api): State<Api>, body: Result<Json<StartBody>, JsonRejection>) -> Answer {
    let Json(b) = body?;
    let mut start = api.app.start(&b.workflow, &b.input);
    if let Some(k) = &b.idempotency_key {
        start = start.idempotency_key(k);
    }
    if let Some(q) = &b.queue {
        start = start.queue(q);
    }
    if let Some(p) = b.priority {
        start = start.priority(p);
    }
    if let Some(d) = b.delay {
        start = start.delay(seconds("delay", d)?);
    }
    let run = start.await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": run }))).into_response())
}

async fn show_run(State(api): State<Api>, Path(id): Path<String>) -> Answer {
    ok(api.app.run(run_id(&id)?).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Seconds to wait for the end (0 to 60; default 0).
    wait: Option<f64>,
}

/// 200 with the output once completed; 409 with the error once failed or
/// cancelled; 202 with the status while it goes on.
async fn run_result(
    State(api): State<Api>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> Answer {
    let Query(q) = q?;
    let run = run_id(&id)?;
    let wait = q.wait.unwrap_or(0.0);
    if !(0.0..=MAX_WAIT).contains(&wait) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("wait must be between 0 and {MAX_WAIT} seconds, got {wait}"),
        ));
    }
    match api
        .app
        .result_within::<Value>(run, Duration::from_secs_f64(wait))
        .await
    {
        Ok(output) => ok(json!({ "status": "completed", "output": output })),
        Err(Error::RunFailed { error, .. }) => Ok((
            StatusCode::CONFLICT,
            Json(json!({ "status": "failed", "error": error })),
        )
            .into_response()),
        Err(Error::RunCancelled(_)) => Ok((
            StatusCode::CONFLICT,
            Json(json!({ "status": "cancelled", "error": "the run was cancelled" })),
        )
            .into_response()),
        Err(Error::NotEnded { .. }) => {
            let status = api.app.run_status(run).await?.status;
            Ok((StatusCode::ACCEPTED, Json(json!({ "status": status }))).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

async fn run_history(State(api): State<Api>, Path(id): Path<String>) -> Answer {
    ok(api.app.run_history(run_id(&id)?).await?)
}

async fn run_steps(State(api): State<Api>, Path(id): Path<String>) -> Answer {
    ok(api.app.run_steps(run_id(&id)?).await?)
}

async fn cancel_run(State(api): State<Api>, Path(id): Path<String>) -> Answer {
    ok(json!({ "cancelled": api.app.cancel_run(run_id(&id)?).await? }))
}

async fn retry_run(State(api): State<Api>, Path(id): Path<String>) -> Answer {
    ok(json!({ "retried": api.app.retry_run(run_id(&id)?).await? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    name: String,
    #[serde(default)]
    payload: Value,
}

async fn signal_run(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: Result<Json<SignalBody>, JsonRejection>,
) -> Answer {
    let Json(b) = body?;
    let signal = api
        .app
        .send_signal(run_id(&id)?, &b.name, &b.payload)
        .await?;
    ok(json!({ "signal_id": signal }))
}

async fn workflows(State(api): State<Api>) -> Answer {
    ok(api.app.list_workflows().await?)
}

async fn queues(State(api): State<Api>) -> Answer {
    ok(api.app.metrics_all().await?)
}

async fn workers(State(api): State<Api>) -> Answer {
    ok(api.app.list_workers().await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DoctorQuery {
    /// Seconds a waiting job, lease, step, transaction or schedule may age
    /// before it is reported (default 300).
    warn_after: Option<f64>,
}

async fn doctor(State(api): State<Api>, q: Result<Query<DoctorQuery>, QueryRejection>) -> Answer {
    let Query(q) = q?;
    let warn_after = seconds("warn_after", q.warn_after.unwrap_or(300.0))?;
    ok(api.app.doctor(warn_after).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadQuery {
    queue: Option<String>,
    limit: Option<u32>,
}

async fn dead(State(api): State<Api>, q: Result<Query<DeadQuery>, QueryRejection>) -> Answer {
    let Query(q) = q?;
    ok(api
        .app
        .list_dead(q.queue.as_deref(), q.limit.unwrap_or(100))
        .await?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RequeueBody {
    /// Only this job.
    id: Option<i64>,
}

async fn requeue_dead(
    State(api): State<Api>,
    Path(queue): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    // The body is optional: none (or only whitespace) means every dead
    // letter of the queue, whatever the Content-Type says.
    let body: RequeueBody = if body.iter().all(u8::is_ascii_whitespace) {
        RequeueBody::default()
    } else {
        let refuse = |why: String| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("the body must be {{}} or {{\"id\": <job id>}}: {why}"),
            )
        };
        // An object only (serde would read a struct from an array too).
        match serde_json::from_slice::<Value>(&body).map_err(|e| refuse(e.to_string()))? {
            object @ Value::Object(_) => {
                RequeueBody::deserialize(object).map_err(|e| refuse(e.to_string()))?
            }
            other => return Err(refuse(format!("got {other}"))),
        }
    };
    match body.id {
        Some(id) => {
            if api.app.requeue(&queue, id).await? {
                ok(json!({ "requeued": 1, "skipped": 0 }))
            } else {
                Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("no dead letter {id} in queue {queue}"),
                ))
            }
        }
        None => ok(api.app.requeue_dead(&queue).await?),
    }
}

async fn schedules(State(api): State<Api>) -> Answer {
    ok(api.app.list_schedules().await?)
}

async fn flows(State(api): State<Api>) -> Answer {
    ok(api.app.list_flows().await?)
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}
