//! The HTTP API over a real socket: every endpoint, bearer tokens (none,
//! unknown, read-only on a write), bad input answered with a 4xx carrying
//! the SQL function's own text, the OpenAPI document matching the routes,
//! and `cairn serve` as a process.

mod common;

use std::time::Duration;

use cairn::{HandlerError, WorkflowContext};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const FULL: &str = "full-token";
const READ: &str = "read-token";

struct Api {
    base: String,
    http: Client,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, Some(READ), None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(FULL), Some(body)).await
    }
}

async fn serve(app: &cairn::App, stop: &CancellationToken) -> Api {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let tokens = cairn::http::Tokens::new().full(FULL).read_only(READ);
    tokio::spawn(cairn::http::serve(
        app.clone(),
        tokens,
        listener,
        stop.clone().cancelled_owned(),
    ));
    Api {
        base,
        http: Client::new(),
    }
}

#[sqlx::test(migrations = false)]
async fn every_endpoint_with_tokens_and_bad_input(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("greet", |ctx: WorkflowContext, name: String| async move {
        let text: String = ctx
            .step("compose", name, |n| async move {
                if n.is_empty() {
                    Err(HandlerError::fatal("nobody to greet"))
                } else {
                    Ok(format!("hello {n}"))
                }
            })
            .await?;
        Ok(text)
    })
    .unwrap();
    app.workflow("waiter", |ctx: WorkflowContext, _: ()| async move {
        let got: Option<i64> = ctx.wait_for_signal("go", None).await?;
        Ok(got.unwrap_or(0))
    })
    .unwrap();
    common::mail_task(&app);
    app.initialize().await.unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["workflows", "mail"])
            .poll_interval(Duration::from_millis(50))
            .run_until(stop.clone().cancelled_owned()),
    );
    let api = serve(&app, &stop).await;

    // Health needs no token; everything else does.
    let (status, health) = api.call(Method::GET, "/api/health", None, None).await;
    assert_eq!((status, &health["status"]), (StatusCode::OK, &json!("ok")));
    let (status, body) = api.call(Method::GET, "/api/runs", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = api
        .call(Method::GET, "/api/runs", Some("wrong"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = api
        .call(
            Method::POST,
            "/api/runs",
            Some(READ),
            Some(json!({"workflow": "greet", "input": "ann"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.runs").await,
        0,
        "a refused write wrote nothing"
    );
    // The scheme is case-insensitive; another scheme is no token.
    for (header, expected) in [
        (format!("bearer {READ}"), StatusCode::OK),
        (format!("BEARER {READ}"), StatusCode::OK),
        (format!("Basic {READ}"), StatusCode::UNAUTHORIZED),
        (READ.to_owned(), StatusCode::UNAUTHORIZED),
    ] {
        let res = api
            .http
            .get(format!("{}/api/runs", api.base))
            .header("authorization", &header)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), expected, "{header}");
    }

    // Start, await, show, history.
    let (status, started) = api
        .post(
            "/api/runs",
            json!({"workflow": "greet", "input": "ann", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let run = started["id"].as_str().unwrap().to_owned();
    let result = api.get(&format!("/api/runs/{run}/result?wait=10")).await;
    assert_eq!(
        result,
        json!({"status": "completed", "output": "hello ann"})
    );
    let (_, again) = api
        .post(
            "/api/runs",
            json!({"workflow": "greet", "input": "ann", "idempotency_key": "k1"}),
        )
        .await;
    assert_eq!(
        again["id"], started["id"],
        "the same key names the same run"
    );
    let shown = api.get(&format!("/api/runs/{run}")).await;
    assert_eq!(shown["input"], "ann");
    assert_eq!(shown["status"], "completed");
    assert_eq!(shown["idempotency_key"], "k1");
    let history = api.get(&format!("/api/runs/{run}/history")).await;
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["step"] == "compose#1"),
        "{history}"
    );
    let steps = api.get(&format!("/api/runs/{run}/steps")).await;
    assert_eq!(steps[0]["key"], "compose#1", "{steps}");
    assert_eq!(
        (&steps[0]["status"], &steps[0]["output"]),
        (&json!("completed"), &json!("hello ann"))
    );
    let listed = api
        .get("/api/runs?workflow=greet&status=completed&limit=5")
        .await;
    assert_eq!(listed[0]["id"], started["id"]);

    // A failed run: 409 with its error; retry; cancel; signal.
    let (_, bad) = api
        .post("/api/runs", json!({"workflow": "greet", "input": ""}))
        .await;
    let bad = bad["id"].as_str().unwrap().to_owned();
    let (status, failed) = api
        .call(
            Method::GET,
            &format!("/api/runs/{bad}/result?wait=10"),
            Some(READ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("nobody to greet"),
        "{failed}"
    );
    let (status, retried) = api
        .post(&format!("/api/runs/{bad}/retry"), json!(null))
        .await;
    assert_eq!(
        (status, &retried["retried"]),
        (StatusCode::OK, &json!(true)),
        "{retried}"
    );

    let (_, w) = api.post("/api/runs", json!({"workflow": "waiter"})).await;
    let waiter = w["id"].as_str().unwrap().to_owned();
    let (status, pending) = api
        .call(
            Method::GET,
            &format!("/api/runs/{waiter}/result"),
            Some(READ),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{pending}");
    let (status, sent) = api
        .post(
            &format!("/api/runs/{waiter}/signal"),
            json!({"name": "go", "payload": 7}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(
        api.get(&format!("/api/runs/{waiter}/result?wait=10")).await["output"],
        7
    );
    let (_, w2) = api.post("/api/runs", json!({"workflow": "waiter"})).await;
    let w2 = w2["id"].as_str().unwrap().to_owned();
    let (status, cancelled) = api
        .post(&format!("/api/runs/{w2}/cancel"), json!(null))
        .await;
    assert_eq!(
        (status, &cancelled["cancelled"]),
        (StatusCode::OK, &json!(1))
    );

    // Bad input: 4xx with the SQL function's text, nothing written.
    let runs_before = common::scalar_i64(&pool, "select count(*) from cairn.runs").await;
    for (method, path, body, want, says) in [
        (
            Method::POST,
            "/api/runs",
            json!({"workflow": "nope"}),
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            Method::POST,
            "/api/runs",
            json!({"workflow": "greet", "priority": 99999}),
            StatusCode::BAD_REQUEST,
            "priority",
        ),
        (
            Method::POST,
            "/api/runs",
            json!({"workflow": "greet", "bogus": 1}),
            StatusCode::BAD_REQUEST,
            "bogus",
        ),
        (
            Method::POST,
            "/api/runs",
            json!({"workflow": "greet", "delay": -1}),
            StatusCode::BAD_REQUEST,
            "delay",
        ),
        (
            Method::POST,
            "/api/runs",
            json!({"workflow": "greet", "queue": "Bad Queue"}),
            StatusCode::BAD_REQUEST,
            "queue",
        ),
        (
            Method::POST,
            &format!("/api/runs/{run}/signal"),
            json!({"name": "go"}),
            StatusCode::CONFLICT,
            "completed",
        ),
        (
            Method::GET,
            "/api/runs/not-a-uuid",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "not-a-uuid",
        ),
        (
            Method::GET,
            "/api/runs/00000000-0000-0000-0000-000000000000",
            Value::Null,
            StatusCode::NOT_FOUND,
            "00000000",
        ),
        (
            Method::GET,
            "/api/runs?status=sleepy",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "sleepy",
        ),
        (
            Method::GET,
            "/api/runs?limit=-1",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            Method::GET,
            &format!("/api/runs/{run}/result?wait=600"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "wait",
        ),
        (
            Method::GET,
            "/api/dead?queue=nope",
            Value::Null,
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            Method::GET,
            "/api/dead?limit=0",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "lim",
        ),
        (
            Method::GET,
            "/api/nowhere",
            Value::Null,
            StatusCode::NOT_FOUND,
            "no such endpoint",
        ),
    ] {
        let body = (method == Method::POST).then_some(body);
        let (status, got) = api.call(method.clone(), path, Some(FULL), body).await;
        assert_eq!(status, want, "{method} {path}: {got}");
        let text = got["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: {got}"));
        assert!(text.contains(says), "{method} {path}: {text}");
    }
    let (status, raw) = api
        .http
        .post(format!("{}/api/runs", api.base))
        .bearer_auth(FULL)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .map(|r| r.status())
        .map(|s| (s, ()))
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{raw:?}");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.runs").await,
        runs_before,
        "bad input wrote nothing"
    );

    // Catalog, queues, workers, dead letters.
    app.enqueue(&common::Mail { to: String::new() })
        .await
        .unwrap();
    common::wait_for("the dead mail", Duration::from_secs(10), || async {
        app.metrics("mail").await.unwrap().dead == 1
    })
    .await;
    let workflows = api.get("/api/workflows").await;
    assert!(
        workflows
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "greet")
    );
    let queues = api.get("/api/queues").await;
    assert!(
        queues
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["queue"] == "mail" && q["dead"] == 1)
    );
    let health = api.get("/api/doctor?warn_after=600").await;
    let names: Vec<&str> = health
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names[..4],
        ["migrations", "functions", "drift", "roles"],
        "{health}"
    );
    assert!(
        health
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] != "fail"),
        "{health}"
    );
    let (status, body) = api
        .call(Method::GET, "/api/doctor?warn_after=-1", Some(READ), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let workers = api.get("/api/workers").await;
    assert_eq!(workers[0]["alive"], true, "{workers}");
    assert_eq!(api.get("/api/schedules").await, json!([]));
    assert_eq!(api.get("/api/flows").await, json!([]));
    let dead = api.get("/api/dead?queue=mail").await;
    assert_eq!(dead[0]["payload"], json!({"to": ""}));
    assert_eq!(dead[0]["last_error"], "no address");
    let (status, requeued) = api.post("/api/dead/mail/requeue", json!({})).await;
    assert_eq!(
        (status, &requeued["requeued"]),
        (StatusCode::OK, &json!(1)),
        "{requeued}"
    );
    let (status, _) = api
        .call(Method::POST, "/api/dead/mail/requeue", Some(READ), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The body is optional whatever the Content-Type; a bad one is a 400
    // in the API's own shape.
    for (content_type, body, expected) in [
        ("application/json", "", StatusCode::OK),
        ("text/plain", "", StatusCode::OK),
        ("application/json", "[1]", StatusCode::BAD_REQUEST),
        (
            "application/json",
            r#"{"id": "x"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "application/json",
            r#"{"id": 1, "more": 2}"#,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let res = api
            .http
            .post(format!("{}/api/dead/mail/requeue", api.base))
            .bearer_auth(FULL)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let answer: Value = res.json().await.unwrap();
        assert_eq!(status, expected, "{content_type} {body:?}: {answer}");
        if expected == StatusCode::OK {
            // (The requeued mail fails again: there may be one to requeue.)
            assert!(answer["requeued"].is_i64(), "{answer}");
        } else {
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap()
                    .contains("the body must be"),
                "{answer}"
            );
        }
    }

    // The dashboard's page and assets need no token (they hold no data),
    // and may load only themselves.
    for (path, kind) in [
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ] {
        let res = api
            .http
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let header = |name: &str| res.headers()[name].to_str().unwrap().to_owned();
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(header("content-security-policy").contains("script-src 'self'"));
        assert_eq!(header("x-content-type-options"), "nosniff");
    }

    // The OpenAPI document lists exactly the routes that answer.
    let doc = api.get("/api/openapi.json").await;
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 18, "{:?}", paths.keys());
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", &run).replace("{queue}", "mail");
            let method: Method = method.to_uppercase().parse().unwrap();
            let body = (method == Method::POST).then(|| json!({"workflow": "greet", "name": "go"}));
            let (status, got) = api.call(method.clone(), &concrete, Some(FULL), body).await;
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED && got["error"] != "no such endpoint",
                "{method} {path} is documented but not routed: {status} {got}"
            );
        }
    }

    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// `cairn serve` as a process: refuses to start without a token, answers
/// with one, and stops on SIGINT.
#[sqlx::test(migrations = false)]
async fn cairn_serve_runs_as_a_process(pool: PgPool) {
    common::app(&pool).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", common::url_of(&pool))
        .env_remove("CAIRN_API_TOKEN")
        .env_remove("CAIRN_API_READ_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CAIRN_API_TOKEN"));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = common::ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", common::url_of(&pool))
            .env("CAIRN_API_TOKEN", "t1,t2")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: Client::new(),
    };
    common::wait_for("the server", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    for token in ["t1", "t2"] {
        let (status, body) = api
            .call(Method::GET, "/api/queues", Some(token), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, _) = api.call(Method::GET, "/api/queues", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    sigint(server.id());
    let code = server.wait().unwrap();
    assert!(code.success(), "{code}");
}

fn sigint(pid: u32) {
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
}
