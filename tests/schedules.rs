//! Schedules: cron read and refused in SQL with the reason, daylight-saving
//! days fire by the stated rule, every tick fires exactly once across worker
//! processes one of which is SIGKILLed, missed ticks coalesce or catch up in
//! bounded batches, overlap policies wait for the previous run, and the
//! whole life of a schedule from Rust and under least-privilege roles.

mod common;

use std::process::Command;
use std::time::Duration;

use cairn::{App, Error, Fired, Missed, Overlap, Schedule, ScheduleChange, Task, WorkflowContext};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

async fn advance_clock(pool: &PgPool, seconds: f64) {
    sqlx::query("select cairn.advance_test_clock($1)")
        .bind(seconds)
        .execute(pool)
        .await
        .unwrap();
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    common::scalar_i64(pool, sql).await
}

/// A workflow that returns the tick it was started for.
fn register_beat(app: &App) {
    app.workflow("beat", |_ctx: WorkflowContext, input: Beat| async move {
        Ok(input.scheduled_at)
    })
    .unwrap();
}

#[derive(Serialize, Deserialize)]
struct Beat {
    scheduled_at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct Sweep {
    room: String,
}
impl Task for Sweep {
    const QUEUE: &'static str = "chores";
    const NAME: &'static str = "sweep";
    type Output = String;
}

/// Every worker ticks about once a second, with the plans it made on its
/// first ticks, often while no schedule existed. Planned so, a tick read
/// every schedule (a sequential scan) to find the due ones. With 5,000
/// schedules stored and none due, a tick must read next to nothing.
#[sqlx::test(migrations = false)]
async fn an_idle_tick_reads_no_schedule_that_is_not_due(pool: PgPool) {
    let app = common::app(&pool).await;
    app.create_queue("chores").await.unwrap();
    let tick = "select cairn.tick_schedules()";
    let mut conn = common::planned_on_empty(&pool, "vacuum analyze cairn.schedules", tick).await;
    // Written straight into the table (create_schedule is slow in bulk),
    // from another connection whose statistics are sent before counting.
    common::written_apart(
        &pool,
        "insert into cairn.schedules (name, cron, timezone, queue, task, input, missed, overlap,
                                      next_fire, created_at, updated_at)
         select 's' || g, '@yearly', 'UTC', 'chores', 'sweep', '{}', 'coalesce', 'allow',
                now() + interval '300 days', now(), now()
           from generate_series(1, 5000) g",
    )
    .await;
    let before = common::rows_read(&mut conn, &["schedules"]).await;
    for _ in 0..10 {
        let fired: i32 = sqlx::query_scalar(tick)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(fired, 0);
    }
    let per_tick = (common::rows_read(&mut conn, &["schedules"]).await - before) / 10;
    assert!(per_tick < 5, "{per_tick} schedules read per idle tick");
}

#[sqlx::test(migrations = false)]
async fn bad_schedules_are_refused_with_the_reason_and_nothing_is_stored(pool: PgPool) {
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    sqlx::raw_sql("select cairn.create_schedule('taken', '@hourly', workflow => 'beat')")
        .execute(&pool)
        .await
        .unwrap();
    let cases = [
        (
            "select cairn.create_schedule('a', '61 * * * *', workflow => 'beat')",
            "22023",
            r#"invalid cron expression "61 * * * *" at character 1: minute 61 is out of range 0-59"#,
        ),
        (
            "select cairn.create_schedule('a', '* * * *', workflow => 'beat')",
            "22023",
            r#"invalid cron expression "* * * *": 4 fields, expected 5"#,
        ),
        (
            "select cairn.create_schedule('a', '*/0 * * * *', workflow => 'beat')",
            "22023",
            "at character 1: step /0: a step must be at least 1",
        ),
        (
            "select cairn.create_schedule('a', '0 0 31 2 *', workflow => 'beat')",
            "22023",
            r#"cron expression "0 0 31 2 *" never fires: no month it names has day 31"#,
        ),
        (
            "select cairn.create_schedule('a', '0 25 * * *', workflow => 'beat')",
            "22023",
            "at character 3: hour 25 is out of range 0-23",
        ),
        (
            "select cairn.create_schedule('a', '0 0 * * 1,,5', workflow => 'beat')",
            "22023",
            r#"at character 11: cannot read day of week """#,
        ),
        (
            "select cairn.create_schedule('a', '0 0 * foo *', workflow => 'beat')",
            "22023",
            r#"at character 7: "foo" is not a month"#,
        ),
        (
            "select cairn.create_schedule('a', '@reboot', workflow => 'beat')",
            "22023",
            r#"unknown shorthand "@reboot""#,
        ),
        (
            "select cairn.create_schedule('a', '@daily', workflow => 'beat', timezone => 'Mars/Olympus')",
            "22023",
            r#"unknown time zone "Mars/Olympus""#,
        ),
        (
            "select cairn.create_schedule('a', '@daily', workflow => 'nope')",
            "42704",
            r#"unknown workflow "nope""#,
        ),
        (
            "select cairn.create_schedule('a', '@daily', queue => 'nope')",
            "42704",
            r#"unknown queue "nope""#,
        ),
        (
            "select cairn.create_schedule('a', '@daily')",
            "22023",
            "give exactly one of workflow => and queue =>",
        ),
        (
            "select cairn.create_schedule('a', '@daily', workflow => 'beat', input => '[1]')",
            "22023",
            "input must be a JSON object, got array",
        ),
        (
            "select cairn.create_schedule('a', '@daily', workflow => 'beat', missed => 'later')",
            "22023",
            "missed must be 'coalesce' or 'catch_up'",
        ),
        (
            "select cairn.create_schedule('taken', '@daily', workflow => 'beat')",
            "23505",
            r#"a schedule named "taken" exists already"#,
        ),
        (
            "select cairn.create_schedule(null, '@daily', workflow => 'beat')",
            "22004",
            "schedule name must not be NULL",
        ),
        (
            "select cairn.create_schedule('a', null, workflow => 'beat')",
            "22004",
            "cron expression must not be NULL",
        ),
        (
            "select cairn.update_schedule('taken', cron => '0 0 30 2 *')",
            "22023",
            "never fires",
        ),
        (
            "select cairn.pause_schedule('ghost')",
            "42704",
            r#"unknown schedule "ghost""#,
        ),
        (
            "select cairn.next_fires('* * * * *', 'UTC', 0)",
            "22023",
            "n must be",
        ),
        (
            "select cairn.tick_schedules(0)",
            "22023",
            "batch must be between 1 and 10000, got 0",
        ),
        (
            "select cairn.tick_schedules(null)",
            "22004",
            "batch must not be NULL",
        ),
    ];
    for (sql, code, message) in cases {
        let (got_code, got) = common::refused(&pool, sql).await;
        assert_eq!(got_code, code, "{sql}: {got}");
        assert!(got.contains(message), "{sql}: {got:?} lacks {message:?}");
    }
    let stored: Vec<(String, String)> =
        sqlx::query_as("select name, cron from cairn.list_schedules()")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored, [("taken".to_owned(), "@hourly".to_owned())]);

    // The same refusals from Rust, typed.
    let err = app
        .create_schedule(Schedule::workflow("b", "61 * * * *", "beat"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("at character 1: minute 61")),
        "{err}"
    );
    let err = app
        .create_schedule(Schedule::workflow("b", "@daily", "nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let err = app
        .create_schedule(Schedule::workflow("taken", "@daily", "beat"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    let err = app
        .create_schedule(Schedule::workflow("b", "@daily", "beat").input(&[1, 2]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(app.list_schedules().await.unwrap().len(), 1);
}

/// Fire times of `cron` in `tz` from local midnight of `day` to the next.
async fn fires_on(pool: &PgPool, cron: &str, tz: &str, day: &str) -> Vec<String> {
    sqlx::query_scalar(
        "select to_char(f at time zone $2, 'HH24:MI') || ' ' ||
                to_char(f at time zone 'UTC', 'HH24:MI\"Z\"')
           from cairn.next_fires($1, $2, 30, ($3::date::timestamp at time zone $2) - interval '1 second') f
          where f < (($3::date + 1)::timestamp at time zone $2)",
    )
    .bind(cron)
    .bind(tz)
    .bind(day)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn daylight_saving_days_fire_by_the_stated_rule(pool: PgPool) {
    let _app = common::app(&pool).await;
    // 2026: New York springs forward 8 March 02:00 -> 03:00 and falls back
    // 1 November 02:00 -> 01:00; London 29 March 01:00 -> 02:00 and
    // 25 October 02:00 -> 01:00.
    for (tz, spring, autumn) in [
        ("America/New_York", "2026-03-08", "2026-11-01"),
        ("Europe/London", "2026-03-29", "2026-10-25"),
    ] {
        let hourly = fires_on(&pool, "0 * * * *", tz, spring).await;
        assert_eq!(hourly.len(), 23, "{tz} {spring}: {hourly:?}");
        let hourly = fires_on(&pool, "0 * * * *", tz, autumn).await;
        assert_eq!(hourly.len(), 24, "{tz} {autumn}: {hourly:?}");
        // Once per distinct wall-clock hour: the repeated 01:00 fires once.
        let mut hours: Vec<&str> = hourly.iter().map(|f| &f[..5]).collect();
        hours.dedup();
        assert_eq!(hours.len(), 24, "{tz} {autumn}: {hourly:?}");
    }
    // 02:30 falls in New York's gap: it fires once, when the gap ends.
    assert_eq!(
        fires_on(&pool, "30 2 * * *", "America/New_York", "2026-03-08").await,
        ["03:00 07:00Z"]
    );
    // 01:30 happens twice in New York's autumn night: the first one fires.
    assert_eq!(
        fires_on(&pool, "30 1 * * *", "America/New_York", "2026-11-01").await,
        ["01:30 05:30Z"]
    );
    assert_eq!(
        fires_on(&pool, "30 2 * * *", "America/New_York", "2026-11-01").await,
        ["02:30 07:30Z"]
    );
    // London's gap is 01:00-02:00: 02:30 exists on both days.
    assert_eq!(
        fires_on(&pool, "30 2 * * *", "Europe/London", "2026-03-29").await,
        ["02:30 01:30Z"]
    );
    assert_eq!(
        fires_on(&pool, "30 2 * * *", "Europe/London", "2026-10-25").await,
        ["02:30 02:30Z"]
    );
    assert_eq!(
        fires_on(&pool, "30 1 * * *", "Europe/London", "2026-10-25").await,
        ["01:30 00:30Z"]
    );
    // Quarter hours across the repeated hour: 01:00-01:45 once, in EDT.
    let quarters = fires_on(&pool, "*/15 1-2 * * *", "America/New_York", "2026-11-01").await;
    assert_eq!(
        quarters,
        [
            "01:00 05:00Z",
            "01:15 05:15Z",
            "01:30 05:30Z",
            "01:45 05:45Z",
            "02:00 07:00Z",
            "02:15 07:15Z",
            "02:30 07:30Z",
            "02:45 07:45Z"
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn the_next_daylight_saving_day_fires_by_the_rule_on_the_test_clock(pool: PgPool) {
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    // The next day, from the database's clock on, whose length in New York
    // is not 24 hours, and whether it is 23 (spring) or 25 (autumn).
    let (day, hours): (chrono::NaiveDate, f64) = sqlx::query_as(
        "select d::date, extract(epoch from
                    ((d + interval '1 day') at time zone 'America/New_York')
                  - (d at time zone 'America/New_York'))::float8 / 3600
           from generate_series(date_trunc('day', cairn.now() at time zone 'America/New_York')
                                  + interval '1 day',
                                date_trunc('day', cairn.now() at time zone 'America/New_York')
                                  + interval '400 days', interval '1 day') d
          where ((d + interval '1 day') at time zone 'America/New_York')
              - (d at time zone 'America/New_York') <> interval '24 hours'
          order by d limit 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // Move the clock to 23:30 the evening before, in New York.
    let to: f64 = sqlx::query_scalar(
        "select extract(epoch from ((($1::date)::timestamp - interval '30 minutes')
                                    at time zone 'America/New_York') - cairn.now())::float8",
    )
    .bind(day)
    .fetch_one(&pool)
    .await
    .unwrap();
    advance_clock(&pool, to).await;
    for (name, cron) in [("hourly", "0 * * * *"), ("night", "30 2 * * *")] {
        app.create_schedule(Schedule::workflow(name, cron, "beat").timezone("America/New_York"))
            .await
            .unwrap();
    }
    // Walk through the day a quarter hour at a time, ticking as a worker would.
    for _ in 0..(4 * 26) {
        advance_clock(&pool, 900.0).await;
        app.tick_schedules().await.unwrap();
    }
    let on_day = |name: &'static str| {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from cairn.runs
                  where idempotency_key like $1 || '@%'
                    and ((input->>'scheduled_at')::timestamptz at time zone 'America/New_York')::date = $2",
            )
            .bind(format!("schedule:{name}"))
            .bind(day)
            .fetch_one(&pool)
            .await
            .unwrap();
            n
        }
    };
    let expected_hourly = if hours < 24.0 { 23 } else { 24 };
    assert_eq!(
        on_day("hourly").await,
        expected_hourly,
        "{day} has {hours} hours"
    );
    assert_eq!(on_day("night").await, 1, "{day}");
    let keys = count(
        &pool,
        "select count(*) - count(distinct idempotency_key) from cairn.runs",
    )
    .await;
    assert_eq!(keys, 0, "one run per tick");
}

/// Child entry: a worker process that serves workflows and fires ticks.
#[test]
#[ignore = "run as a child process by the tests in this file"]
fn child_ticker() {
    let Some((_mode, url)) = common::child_mode() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = common::builder(&url)
            .max_connections(4)
            .build()
            .await
            .unwrap();
        register_beat(&app);
        app.worker()
            .queues(["workflows"])
            .lease(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(200))
            .schedule_interval(Duration::from_millis(100))
            .run()
            .await
            .unwrap();
    });
}

#[sqlx::test(migrations = false)]
async fn thirty_minutes_of_ticks_fire_thirty_runs_across_three_processes_one_killed(pool: PgPool) {
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    app.create_schedule(Schedule::workflow("minutely", "*/1 * * * *", "beat"))
        .await
        .unwrap();
    let url = common::url_of(&pool);
    let mut workers: Vec<_> = (0..3)
        .map(|_| common::spawn_child("child_ticker", "tick", &url, &[]))
        .collect();
    for minute in 1..=30_i64 {
        advance_clock(&pool, 60.0).await;
        common::wait_for("the minute's run", Duration::from_secs(30), || async {
            count(&pool, "select count(*) from cairn.runs").await >= minute
        })
        .await;
        if minute == 10 {
            let killed = Command::new("kill")
                .args(["-KILL", &workers[0].id().to_string()])
                .status()
                .unwrap();
            assert!(killed.success());
            workers[0].wait().unwrap();
        }
    }
    // Give the survivors time to fire a duplicate if they ever would.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (runs, ticks, keys): (i64, i64, i64) = sqlx::query_as(
        "select count(*), count(distinct input->>'scheduled_at'), count(distinct idempotency_key)
           from cairn.runs",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((runs, ticks, keys), (30, 30, 30));
    // Every run completes (those the killed worker held, after their lease)
    // and returns its own tick.
    common::wait_for("every run to complete", Duration::from_secs(60), || async {
        count(
            &pool,
            "select count(*) from cairn.runs where status = 'completed'",
        )
        .await
            == 30
    })
    .await;
    let mismatched = count(
        &pool,
        "select count(*) from cairn.runs
          where (output #>> '{}')::timestamptz <> (input->>'scheduled_at')::timestamptz",
    )
    .await;
    assert_eq!(mismatched, 0);
    let info = &app.list_schedules().await.unwrap()[0];
    assert_eq!(info.fired, 30);
    for worker in &mut workers[1..] {
        let _ = Command::new("kill")
            .args(["-TERM", &worker.id().to_string()])
            .status();
        assert!(worker.wait().unwrap().success());
    }
}

/// Waits, if need be, until the real clock is at least 30 s before the next
/// minute. The test clock moves with the real one, so a minute boundary
/// crossed while a test ticks makes the next tick of a `* * * * *` schedule
/// due, and fires it once more.
async fn away_from_a_minute_boundary() {
    let second = Utc::now().timestamp().rem_euclid(60);
    if second >= 30 {
        tokio::time::sleep(Duration::from_secs((61 - second) as u64)).await;
    }
}

#[sqlx::test(migrations = false)]
async fn missed_ticks_coalesce_into_one_or_catch_up_in_bounded_batches(pool: PgPool) {
    away_from_a_minute_boundary().await;
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    app.create_queue("chores").await.unwrap();
    let coalesced_first = app
        .create_schedule(Schedule::workflow("coalesced", "*/1 * * * *", "beat"))
        .await
        .unwrap();
    let first = app
        .create_schedule(
            Schedule::task(
                "caught_up",
                "*/1 * * * *",
                &Sweep {
                    room: "hall".into(),
                },
            )
            .missed(Missed::CatchUp),
        )
        .await
        .unwrap();
    // Three hours with no worker.
    advance_clock(&pool, 3.0 * 3600.0).await;
    let mut calls = Vec::new();
    loop {
        let fired = app.tick_schedules().await.unwrap();
        if fired == 0 {
            break;
        }
        calls.push(fired);
    }
    // 180 minutes of catch-up plus the coalesced run, at most 100 a call.
    let total = calls.iter().map(|n| *n as usize).sum::<usize>();
    assert_eq!(total, 181, "{calls:?}");
    assert_eq!(calls.len(), 2, "batches of at most 100: {calls:?}");
    assert_eq!(calls[0], 100);
    assert_eq!(count(&pool, "select count(*) from cairn.runs").await, 1);
    let scheduled: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "select (payload->>'scheduled_at')::timestamptz from cairn.jobs
          where task = 'sweep' and payload->>'room' = 'hall' order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(scheduled.len(), total - 1);
    for (i, at) in scheduled.iter().enumerate() {
        assert_eq!(
            *at,
            first + chrono::Duration::minutes(i as i64),
            "in tick order"
        );
    }
    // The coalesced run is the first tick missed; both schedules' next tick
    // is the first one after now.
    let run_tick: DateTime<Utc> =
        sqlx::query_scalar("select (input->>'scheduled_at')::timestamptz from cairn.runs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(run_tick, coalesced_first);
    let now: DateTime<Utc> = sqlx::query_scalar("select cairn.now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    for s in app.list_schedules().await.unwrap() {
        assert!(s.next_fire > now && s.next_fire <= now + chrono::Duration::minutes(1));
    }
}

#[sqlx::test(migrations = false)]
async fn overlap_skip_drops_ticks_and_queue_holds_one_until_the_run_ends(pool: PgPool) {
    away_from_a_minute_boundary().await;
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    // No worker runs: a run stays pending, live, until cancelled.
    for (name, overlap) in [("skipper", Overlap::Skip), ("queuer", Overlap::Queue)] {
        app.create_schedule(Schedule::workflow(name, "*/1 * * * *", "beat").overlap(overlap))
            .await
            .unwrap();
    }
    let runs_of = |name: &'static str| {
        let pool = pool.clone();
        async move {
            let ticks: Vec<String> = sqlx::query_scalar(
                "select input->>'scheduled_at' from cairn.runs
                  where idempotency_key like $1 || '@%' order by created_at, id",
            )
            .bind(format!("schedule:{name}"))
            .fetch_all(&pool)
            .await
            .unwrap();
            ticks
        }
    };
    advance_clock(&pool, 60.0).await;
    assert_eq!(app.tick_schedules().await.unwrap(), 2);
    // Two more minutes while the first runs are live.
    for _ in 0..2 {
        advance_clock(&pool, 60.0).await;
        assert_eq!(app.tick_schedules().await.unwrap(), 0);
    }
    assert_eq!(runs_of("skipper").await.len(), 1);
    assert_eq!(runs_of("queuer").await.len(), 1);
    let infos = app.list_schedules().await.unwrap();
    let skipper = infos.iter().find(|s| s.name == "skipper").unwrap();
    let queuer = infos.iter().find(|s| s.name == "queuer").unwrap();
    assert_eq!(skipper.skipped, 2);
    assert_eq!(queuer.skipped, 0);
    // The held tick is the second minute's; it fires as soon as the first
    // run ends, without waiting for the next tick.
    let held = queuer.next_fire;
    let first_tick = runs_of("queuer").await[0].clone();
    for s in [skipper, queuer] {
        app.cancel_run(s.last_run.unwrap()).await.unwrap();
    }
    assert_eq!(app.tick_schedules().await.unwrap(), 1, "the held tick");
    let queued = runs_of("queuer").await;
    assert_eq!(queued.len(), 2);
    assert_ne!(queued[1], first_tick);
    let held_at: DateTime<Utc> = queued[1].parse().unwrap();
    assert_eq!(held_at, held);
    // The skipper fires again at its next tick.
    advance_clock(&pool, 60.0).await;
    app.tick_schedules().await.unwrap();
    assert_eq!(runs_of("skipper").await.len(), 2);
}

#[sqlx::test(migrations = false)]
async fn a_schedule_is_managed_from_rust_and_its_jobs_reach_a_worker(pool: PgPool) {
    let app = common::app(&pool).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    app.task(move |job: Sweep, _ctx| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(job.room.clone());
            Ok(job.room)
        }
    })
    .unwrap();
    app.create_queue("chores").await.unwrap();

    let fires = app
        .next_fires("0 9 * * mon-fri", "Europe/London", 5)
        .await
        .unwrap();
    assert_eq!(fires.len(), 5);
    assert!(fires.windows(2).all(|w| w[0] < w[1]));
    let first = app
        .create_schedule(
            Schedule::task(
                "sweep",
                "0 9 * * mon-fri",
                &Sweep {
                    room: "hall".into(),
                },
            )
            .timezone("Europe/London")
            .overlap(Overlap::Skip),
        )
        .await
        .unwrap();
    assert_eq!(first, fires[0]);
    let info = &app.list_schedules().await.unwrap()[0];
    assert_eq!(
        (
            info.queue.as_deref(),
            info.task.as_deref(),
            info.overlap.as_str()
        ),
        (Some("chores"), Some("sweep"), "skip")
    );
    assert_eq!(info.input, r#"{"room": "hall"}"#);

    // Paused: its ticks pass unfired; resumed: from the next tick on.
    app.pause_schedule("sweep").await.unwrap();
    advance_clock(&pool, 8.0 * 86_400.0).await;
    assert_eq!(app.tick_schedules().await.unwrap(), 0);
    let next = app.resume_schedule("sweep").await.unwrap();
    let now: DateTime<Utc> = sqlx::query_scalar("select cairn.now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(next > now);
    assert_eq!(app.tick_schedules().await.unwrap(), 0);

    // A trigger fires now, and a worker runs the job.
    let Fired::Job(job) = app.trigger_schedule("sweep").await.unwrap() else {
        panic!("a task schedule enqueues a job");
    };
    let scheduled: String =
        sqlx::query_scalar("select payload->>'scheduled_at' from cairn.jobs where id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(scheduled.parse::<DateTime<Utc>>().is_ok(), "{scheduled}");
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["chores"])
            .poll_interval(Duration::from_millis(50))
            .run_until(stop.clone().cancelled_owned()),
    );
    common::wait_for("the triggered job", Duration::from_secs(10), || async {
        seen.lock().unwrap().len() == 1
    })
    .await;

    // A new cron and input take effect from now.
    let next = app
        .update_schedule(
            "sweep",
            ScheduleChange::default().cron("*/5 * * * *").input(&Sweep {
                room: "attic".into(),
            }),
        )
        .await
        .unwrap();
    assert!(next > now && next <= now + chrono::Duration::minutes(5));
    advance_clock(&pool, 300.0).await;
    common::wait_for(
        "the worker to fire the new tick",
        Duration::from_secs(10),
        || async { seen.lock().unwrap().len() == 2 },
    )
    .await;
    assert_eq!(seen.lock().unwrap()[1], "attic");

    assert!(app.delete_schedule("sweep").await.unwrap());
    assert!(!app.delete_schedule("sweep").await.unwrap());
    assert!(matches!(
        app.trigger_schedule("sweep").await,
        Err(Error::NotFound(_))
    ));
    stop.cancel();
    worker.await.unwrap().unwrap();
}

#[sqlx::test(migrations = false)]
async fn roles_producers_read_workers_tick_admins_manage(pool: PgPool) {
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    let producer = common::Login::create(&pool, "cairn_producer", "sched_p").await;
    let worker = common::Login::create(&pool, "cairn_worker", "sched_w").await;
    let admin = common::Login::create(&pool, "cairn_admin", "sched_a").await;
    let create = "select cairn.create_schedule('beats', '@hourly', workflow => 'beat')";
    for login in [&producer, &worker] {
        let (code, _) = common::refused(&login.pool, create).await;
        assert_eq!(code, "42501", "{}", login.name);
        let (code, _) =
            common::refused(&login.pool, "select cairn.trigger_schedule('beats')").await;
        assert_eq!(code, "42501");
    }
    sqlx::raw_sql(create).execute(&admin.pool).await.unwrap();
    for login in [&producer, &worker, &admin] {
        let n: i64 = sqlx::query_scalar("select count(*) from cairn.list_schedules()")
            .fetch_one(&login.pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
        sqlx::query("select cairn.next_fires('@daily')")
            .execute(&login.pool)
            .await
            .unwrap();
    }
    let (code, _) = common::refused(&producer.pool, "select cairn.tick_schedules()").await;
    assert_eq!(code, "42501");
    advance_clock(&pool, 3600.0).await;
    let fired: i32 = sqlx::query_scalar("select cairn.tick_schedules()")
        .fetch_one(&worker.pool)
        .await
        .unwrap();
    assert_eq!(fired, 1);
    // Nobody but the owner touches the table itself (admins may read it).
    let (code, _) =
        common::refused(&admin.pool, "update cairn.schedules set next_fire = now()").await;
    assert_eq!(code, "42501");
    for login in [producer, worker, admin] {
        login.drop(&pool).await;
    }
}

#[sqlx::test(migrations = false)]
async fn the_cli_manages_schedules(pool: PgPool) {
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    let (code, out, err) = common::cli(
        &pool,
        &[
            "schedules",
            "create",
            "nightly",
            "30 2 * * *",
            "--workflow",
            "beat",
            "--timezone",
            "Europe/London",
            "--input",
            r#"{"team": "ops"}"#,
            "--overlap",
            "skip",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("schedule nightly created; first fire"),
        "{out}"
    );
    let (code, out, err) = common::cli(
        &pool,
        &[
            "schedules",
            "create",
            "bad",
            "61 * * * *",
            "--workflow",
            "beat",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("at character 1: minute 61 is out of range 0-59"),
        "{out}{err}"
    );
    let (code, out, _) = common::cli(&pool, &["schedules", "list", "--json"]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "nightly");
    assert_eq!(list[0]["input"]["team"], "ops");
    assert_eq!(list[0]["overlap"], "skip");
    let (code, out, _) = common::cli(&pool, &["schedules", "list"]);
    assert!(
        code == 0 && out.contains("nightly") && out.contains("workflow beat"),
        "{out}"
    );
    let (code, out, _) = common::cli(&pool, &["schedules", "next", "@hourly", "-n", "3"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
    let (code, out, _) = common::cli(&pool, &["schedules", "trigger", "nightly"]);
    assert!(code == 0 && out.starts_with("started run "), "{out}");
    assert_eq!(count(&pool, "select count(*) from cairn.runs").await, 1);
    let (code, out, _) = common::cli(&pool, &["schedules", "pause", "nightly"]);
    assert_eq!(code, 0, "{out}");
    assert!(app.list_schedules().await.unwrap()[0].paused);
    let (code, out, err) = common::cli(
        &pool,
        &["schedules", "update", "nightly", "--cron", "@daily"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(app.list_schedules().await.unwrap()[0].cron, "@daily");
    let (code, _, _) = common::cli(&pool, &["schedules", "delete", "nightly"]);
    assert_eq!(code, 0);
    let (code, _, err) = common::cli(&pool, &["schedules", "delete", "nightly"]);
    assert!(code == 3 && err.contains("unknown schedule"), "{err}");
}

#[sqlx::test(migrations = false)]
async fn a_tick_that_cannot_fire_is_dropped_with_its_reason_and_blocks_nothing(pool: PgPool) {
    let app = common::app(&pool).await;
    register_beat(&app);
    app.register_workflows().await.unwrap();
    app.create_queue("doomed").await.unwrap();
    app.create_schedule(Schedule::queue("orphan", "*/1 * * * *", "doomed"))
        .await
        .unwrap();
    app.create_schedule(Schedule::workflow("healthy", "*/1 * * * *", "beat"))
        .await
        .unwrap();
    // The queue goes away under the schedule.
    assert!(app.drop_queue("doomed").await.unwrap());
    advance_clock(&pool, 60.0).await;
    assert_eq!(
        app.tick_schedules().await.unwrap(),
        1,
        "the healthy one fires"
    );
    let infos = app.list_schedules().await.unwrap();
    let orphan = infos.iter().find(|s| s.name == "orphan").unwrap();
    let error = orphan.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains(r#"unknown queue "doomed""#) && error.contains("SQLSTATE 42704"),
        "{error}"
    );
    assert_eq!((orphan.fired, orphan.last_fire), (0, None));
    // The tick was dropped, not retried for ever: the next is a minute on.
    let now: DateTime<Utc> = sqlx::query_scalar("select cairn.now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(orphan.next_fire > now);
    assert_eq!(app.tick_schedules().await.unwrap(), 0);
    // Once the queue is back, the schedule fires again and the error clears.
    app.create_queue("doomed").await.unwrap();
    advance_clock(&pool, 60.0).await;
    assert_eq!(app.tick_schedules().await.unwrap(), 2);
    let infos = app.list_schedules().await.unwrap();
    let orphan = infos.iter().find(|s| s.name == "orphan").unwrap();
    assert_eq!((orphan.fired, orphan.last_error.as_deref()), (1, None));
    assert_eq!(
        count(
            &pool,
            "select count(*) from cairn.jobs where task = 'doomed'"
        )
        .await,
        1
    );
}
