//! The web dashboard in a real headless Chromium (Debian's `chromium`,
//! driven through `chromedriver`), against a real worker and the API served
//! on a real socket: signing in, the run list showing the runs this test
//! started, a run's page with its steps on a timeline, an error full of
//! markup shown as text, dead letters requeued with a click (and refused for
//! a read-only token), queues and workers. Screenshots are saved under the
//! test's target directory (`CARGO_TARGET_TMPDIR/dashboard/`).
//!
//! If Chromium or ChromeDriver is missing, the set-up installs them with
//! `scripts/ensure-chromium.sh`, as `ensure-postgres.sh` does for Postgres.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cairn::{Backoff, HandlerError, RetryPolicy, WorkflowContext};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const FULL: &str = "dashboard-full-token";
const READ: &str = "dashboard-read-token";
/// How long the page gets to show something (it refreshes every 2 s).
const PATIENCE: Duration = Duration::from_secs(20);

/// The mail job's dead letter (the failed run's job is one too).
const DEAD: &str = "select count(*) from cairn.archive where outcome = 'dead' and task = 'mail'";
/// Mail jobs still live or dead: none once the requeued one has run.
const MAIL_LEFT: &str = "select (select count(*) from cairn.jobs j join cairn.queues q on q.id = j.queue_id \
     where q.name = 'mail') + (select count(*) from cairn.archive where outcome = 'dead' and task = 'mail')";

/// The Requeue button on the mail job's row.
const MAIL_REQUEUE: Locator<'static> =
    Locator::XPath("//tr[td[contains(., 'mail server down')]]//button[. = 'Requeue']");
/// The bank times out on the first charge only.
static CHARGES: AtomicU32 = AtomicU32::new(0);
/// The mail server is down until the test brings it up.
static MAIL_UP: AtomicBool = AtomicBool::new(false);

#[derive(serde::Serialize, serde::Deserialize)]
struct Mail {
    to: String,
}
impl cairn::Task for Mail {
    const QUEUE: &'static str = "mail";
    type Output = ();
}

/// Chromedriver on a free port, killed with the test.
struct Driver {
    _process: common::ChildGuard,
    url: String,
}

fn start_chromedriver() -> Driver {
    if !(PathBuf::from("/usr/bin/chromium").exists()
        && PathBuf::from("/usr/bin/chromedriver").exists())
    {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ensure-chromium.sh");
        let ok = Command::new("bash").arg(script).status().expect(script);
        assert!(ok.success(), "{script} could not install Chromium");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let process = Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    Driver {
        _process: common::ChildGuard(process),
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver) -> Client {
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            // Headless, and quiet: this machine's network is closed, and
            // Chromium's background calls would only fail.
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
            ],
        },
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&driver.url)
            .await
        {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no browser session from chromedriver: {e}"),
        }
    }
}

/// The page's data area as text, once it shows `page` and holds every one
/// of `wanted`.
async fn shows(browser: &Client, page: &str, wanted: &[&str]) -> String {
    shows_without(browser, page, wanted, &[]).await
}

/// Like [`shows`], and also waits until none of `unwanted` is on the page:
/// the page redraws a moment after an action, so text it held before may
/// still be there when the action's notice appears.
async fn shows_without(browser: &Client, page: &str, wanted: &[&str], unwanted: &[&str]) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = browser
            .execute(
                "const d = document.getElementById('data'); \
                 return d && d.dataset.page === arguments[0] && d.dataset.loaded ? d.innerText : null;",
                vec![json!(page)],
            )
            .await
            .unwrap();
        if let Value::String(text) = &text
            && wanted.iter().all(|w| text.contains(w))
            && !unwanted.iter().any(|u| text.contains(u))
        {
            return text.clone();
        }
        assert!(
            Instant::now() < deadline,
            "page {page} never showed all of {wanted:?} without any of {unwanted:?}; it shows: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The notice the page shows after an action.
async fn notice(browser: &Client, wanted: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = browser
            .execute(
                "const n = document.getElementById('notice'); return n.hidden ? '' : n.innerText;",
                vec![],
            )
            .await
            .unwrap();
        let text = text.as_str().unwrap_or_default().to_owned();
        if text.contains(wanted) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no notice saying {wanted:?}; last: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the first element matching `css`; the page may redraw between
/// finding and clicking, so a stale element is looked up again.
async fn click(browser: &Client, at: Locator<'_>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let clicked = match browser.find(at).await {
            Ok(element) => element.click().await.is_ok(),
            Err(_) => false,
        };
        if clicked {
            return;
        }
        assert!(Instant::now() < deadline, "nothing to click at {at:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(browser: &Client, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    path
}

async fn sign_in(browser: &Client, token: &str) {
    let field = browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#signin:not([hidden]) #token"))
        .await
        .expect("the sign-in form");
    field.clear().await.unwrap();
    field.send_keys(token).await.unwrap();
    click(browser, Locator::Css("#signin button[type=submit]")).await;
}

#[sqlx::test(migrations = false)]
async fn the_dashboard_in_headless_chromium(pool: PgPool) {
    let driver = start_chromedriver();
    let app = common::app(&pool).await;
    app.workflow("order", |ctx: WorkflowContext, item: String| async move {
        let reserved: String = ctx
            .step(
                "reserve",
                item,
                |i| async move { Ok(format!("{i} reserved")) },
            )
            .await?;
        let charged: u32 = ctx
            .step("charge", (), |_| async move {
                if CHARGES.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(HandlerError::retryable("the bank timed out"))
                } else {
                    Ok(42)
                }
            })
            .retry(
                RetryPolicy::default()
                    .max_attempts(3)
                    .backoff(Backoff::Fixed(Duration::from_millis(200)))
                    .jitter(0.0),
            )
            .await?;
        ctx.sleep(Duration::from_millis(300)).await;
        let shipped: String = ctx
            .step(
                "ship",
                reserved,
                |r| async move { Ok(format!("{r}, shipped")) },
            )
            .await?;
        Ok(json!({ "charged": charged, "shipped": shipped }))
    })
    .unwrap();
    // An error full of markup: the page must show it as text, never run it.
    app.workflow("evil", |ctx: WorkflowContext, _: ()| async move {
        ctx.step("break", (), |_| async move {
            Err::<(), _>(HandlerError::fatal(
                "<img src=x onerror=\"window.pwned=1\"><b>bold</b>",
            ))
        })
        .await?;
        Ok(())
    })
    .unwrap();
    app.task(|m: Mail, _ctx| async move {
        if MAIL_UP.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(HandlerError::fatal(format!(
                "mail server down for {}",
                m.to
            )))
        }
    })
    .unwrap();
    app.initialize().await.unwrap();
    app.create_queue("mail").await.unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["workflows", "mail"])
            .poll_interval(Duration::from_millis(50))
            .run_until(stop.clone().cancelled_owned()),
    );

    let order = app.start("order", &"a lamp").await.unwrap();
    let evil = app.start("evil", &()).await.unwrap();
    let mail = app
        .enqueue(&Mail {
            to: "ann@example.com".into(),
        })
        .await
        .unwrap();
    let output: Value = app.result(order).await.unwrap();
    assert_eq!(output["shipped"], "a lamp reserved, shipped");
    assert!(app.result::<()>(evil).await.is_err());
    common::wait_for("the mail job to die", PATIENCE, || async {
        common::scalar_i64(&pool, DEAD).await == 1
    })
    .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(cairn::http::serve(
        app.clone(),
        cairn::http::Tokens::new().full(FULL).read_only(READ),
        listener,
        stop.clone().cancelled_owned(),
    ));
    let browser = browser(&driver).await;

    // No token yet: the sign-in form. A wrong token is refused.
    browser.goto(&format!("{base}/")).await.unwrap();
    sign_in(&browser, "not-a-token").await;
    browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::XPath(
            "//p[@id='signin-error' and contains(., 'That token was refused.')]",
        ))
        .await
        .expect("a wrong token is refused");

    // The read-only token: the run list shows both runs.
    sign_in(&browser, READ).await;
    let order_id = order.to_string();
    let evil_id = evil.to_string();
    let runs = shows(&browser, "runs", &[&order_id[..8], &evil_id[..8]]).await;
    assert!(
        runs.contains("order") && runs.contains("completed"),
        "{runs}"
    );
    assert!(runs.contains("evil") && runs.contains("failed"), "{runs}");
    // The markup in the error is text on the page, and nothing of it ran.
    assert!(runs.contains("<img src=x"), "{runs}");
    let injected = browser
        .execute(
            "return [window.pwned === undefined, document.querySelectorAll('#data img, #data b').length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(injected, json!([true, 0]), "markup from an error was run");
    screenshot(&browser, "runs").await;

    // Filters: only failed runs.
    browser
        .goto(&format!("{base}/#/runs?status=failed"))
        .await
        .unwrap();
    // The page was showing every run; it redraws with the failed one alone.
    shows_without(&browser, "runs", &[&evil_id[..8]], &[&order_id[..8]]).await;

    // The order's page: its steps on a timeline, the retried attempt, the
    // sleep, its input and output.
    browser.goto(&format!("{base}/#/runs")).await.unwrap();
    shows(&browser, "runs", &[&order_id[..8]]).await;
    click(
        &browser,
        Locator::Css(&format!("a[href='#/runs/{order_id}']")),
    )
    .await;
    let page = shows(
        &browser,
        "run",
        &[
            "reserve#1",
            "charge#1",
            "ship#1",
            "the bank timed out",
            "attempt 2",
            "a lamp reserved, shipped",
        ],
    )
    .await;
    assert!(page.contains(&order_id), "{page}");
    let lanes = browser
        .execute(
            "return [...document.querySelectorAll('.timeline .lane .label')].map(l => l.innerText);",
            vec![],
        )
        .await
        .unwrap();
    let lanes: Vec<String> = serde_json::from_value(lanes).unwrap();
    for step in ["reserve#1", "charge#1", "charge#1 (attempt 2)", "ship#1"] {
        assert!(
            lanes.iter().any(|l| l.ends_with(step)),
            "no timeline lane for {step}: {lanes:?}"
        );
    }
    assert!(
        lanes.iter().any(|l| l == "sleep#1"),
        "no lane for the sleep: {lanes:?}"
    );
    let failed_bars = browser
        .execute(
            "return document.querySelectorAll('.timeline .bar.retrying').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        failed_bars,
        json!(1),
        "the first charge, failed and retried"
    );
    screenshot(&browser, "run").await;

    // Dead letters: a read-only token may look but not requeue.
    browser.goto(&format!("{base}/#/dead")).await.unwrap();
    shows(&browser, "dead", &["mail server down for ann@example.com"]).await;
    click(&browser, MAIL_REQUEUE).await;
    notice(&browser, "this token is read-only").await;
    assert_eq!(
        common::scalar_i64(&pool, DEAD).await,
        1,
        "a read-only token requeued nothing"
    );

    // Sign out, come back with the full token (handed over in the address,
    // which the page takes out of it at once), and requeue with a click.
    click(&browser, Locator::Css("#signout")).await;
    browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#signin:not([hidden])"))
        .await
        .expect("signed out");
    browser
        .goto(&format!("{base}/#token={FULL}"))
        .await
        .unwrap();
    shows(&browser, "runs", &[&order_id[..8]]).await;
    let address = browser.current_url().await.unwrap();
    assert!(!address.as_str().contains(FULL), "{address}");
    MAIL_UP.store(true, Ordering::SeqCst);
    browser.goto(&format!("{base}/#/dead")).await.unwrap();
    shows(&browser, "dead", &["mail server down"]).await;
    click(&browser, MAIL_REQUEUE).await;
    notice(&browser, &format!("Requeued job {mail}.")).await;
    shows_without(&browser, "dead", &[&evil_id[..8]], &["mail server down"]).await;
    common::wait_for("the requeued mail to be done", PATIENCE, || async {
        common::scalar_i64(&pool, MAIL_LEFT).await == 0
    })
    .await;

    // Queues and workers.
    browser.goto(&format!("{base}/#/queues")).await.unwrap();
    let queues = shows(&browser, "queues", &["mail", "workflows"]).await;
    assert!(queues.contains("Sampled every 2 s"), "{queues}");
    // A second sample draws each queue's depth line.
    browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("svg.spark polyline.ready"))
        .await
        .expect("a queue's depth over time");
    browser
        .find(Locator::Css("svg.spark polyline.age"))
        .await
        .expect("a queue's oldest job age over time");
    screenshot(&browser, "queues").await;
    browser.goto(&format!("{base}/#/workers")).await.unwrap();
    let workers = shows(&browser, "workers", &["alive", "mail"]).await;
    assert!(
        workers.contains(&std::process::id().to_string()),
        "{workers}"
    );
    browser.goto(&format!("{base}/#/health")).await.unwrap();
    shows(
        &browser,
        "health",
        &["migrations", "xmin horizon", "dead letters"],
    )
    .await;
    browser.goto(&format!("{base}/#/workflows")).await.unwrap();
    shows(&browser, "workflows", &["order", "evil"]).await;
    screenshot(&browser, "workflows").await;

    browser.close().await.unwrap();
    drop(driver);
    stop.cancel();
    worker.await.unwrap().unwrap();
}
