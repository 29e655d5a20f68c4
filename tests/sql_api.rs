//! The SQL API as any client sees it: argument checks, fencing, claims,
//! dead letters, metrics and roles.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cairn::Error;
use sqlx::PgPool;

async fn setup(pool: &PgPool) -> cairn::App {
    let app = common::app(pool).await;
    app.create_queue("q").await.unwrap();
    app
}

#[sqlx::test(migrations = false)]
async fn bad_arguments_are_rejected_before_anything_is_written(pool: PgPool) {
    setup(&pool).await;
    let big = format!(
        "select cairn.send('q', jsonb_build_object('x', repeat('a', {})))",
        1_100_000
    );
    let cases: &[(&str, &str, &str)] = &[
        (
            "select cairn.send('nope', '{}')",
            "42704",
            "unknown queue \"nope\"",
        ),
        (
            "select cairn.send(null, '{}')",
            "22004",
            "queue name must not be NULL",
        ),
        (
            "select cairn.send('q', null)",
            "22004",
            "payload must not be NULL",
        ),
        (
            "select cairn.send('q', '{\"a\":')",
            "22P02",
            "invalid input syntax for type json",
        ),
        (
            "select cairn.send('q', '\"\\ud800\"')",
            "22P02",
            "invalid input syntax for type json",
        ),
        (
            "select cairn.send('q', '{}', delay => -1)",
            "22023",
            "delay must be between",
        ),
        (
            "select cairn.send('q', '{}', delay => 'NaN')",
            "22023",
            "delay must be between",
        ),
        (
            "select cairn.send('q', '{}', delay => 'infinity')",
            "22023",
            "delay must be between",
        ),
        (
            "select cairn.send('q', '{}', delay => 1e10)",
            "22023",
            "delay must be between",
        ),
        (
            "select cairn.send('q', '{}', delay => null)",
            "22004",
            "delay must not be NULL",
        ),
        (
            "select cairn.send('q', '{}', priority => 40000)",
            "22023",
            "priority must be between",
        ),
        (
            "select cairn.send('q', '{}', task => '9 lives')",
            "22023",
            "invalid task name",
        ),
        (&big, "54000", "above the 1 MiB limit"),
        (
            "select cairn.create_queue('')",
            "22023",
            "invalid queue name \"\"",
        ),
        (
            "select cairn.create_queue('a;drop table x')",
            "22023",
            "invalid queue name",
        ),
        (
            "select cairn.create_queue('Emails')",
            "22023",
            "invalid queue name",
        ),
        (
            "select cairn.create_queue(repeat('a', 64))",
            "22023",
            "invalid queue name",
        ),
        (
            "select cairn.send_batch('q', array['1', null]::jsonb[])",
            "22004",
            "payloads[2] must not be NULL",
        ),
        (
            "select cairn.send_batch('q', '{}'::jsonb[])",
            "22023",
            "batch size must be between",
        ),
        (
            "select cairn.send_batch('q', null)",
            "22004",
            "payloads must not be NULL",
        ),
        (
            "select * from cairn.read('q', 0, 1)",
            "22023",
            "visibility timeout must be between",
        ),
        (
            "select * from cairn.read('q', 30, 0)",
            "22023",
            "qty must be between",
        ),
        (
            "select * from cairn.read('q', 30, 1000000)",
            "22023",
            "qty must be between",
        ),
        ("select * from cairn.pop('nope')", "42704", "unknown queue"),
        (
            "select cairn.ack(array[1,2]::bigint[], array[1]::bigint[])",
            "22023",
            "must pair up",
        ),
        (
            "select cairn.ack(null::bigint[], null::bigint[])",
            "22004",
            "must not be NULL",
        ),
        (
            "select cairn.ack(array[1,2]::bigint[], array[1,1]::bigint[], array['1']::jsonb[])",
            "22023",
            "2 ids but 1 outputs",
        ),
        (
            "select cairn.archive(array[1,2]::bigint[], array[1,1]::bigint[], array['1']::jsonb[])",
            "22023",
            "2 ids but 1 outputs",
        ),
        (
            "select cairn.retry(1, 1, -5)",
            "22023",
            "delay must be between",
        ),
        ("select cairn.purge_queue('nope')", "42704", "unknown queue"),
        ("select cairn.requeue('nope', 1)", "42704", "unknown queue"),
    ];
    sqlx::query("select cairn.send('q', '{\"kept\": true}')")
        .execute(&pool)
        .await
        .unwrap();
    for (sql, code, fragment) in cases {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&pool)
            .await
            .expect_err(sql);
        let db = err
            .as_database_error()
            .unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().as_deref(), Some(*code), "{sql}: {}", db.message());
        assert!(db.message().contains(fragment), "{sql}: {}", db.message());
    }
    // Nothing was written, and the job stored before is untouched.
    let jobs: Vec<String> = sqlx::query_scalar("select payload::text from cairn.jobs")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(jobs, vec![r#"{"kept": true}"#]);
    let queues = common::scalar_i64(&pool, "select count(*) from cairn.queues").await;
    assert_eq!(queues, 1);
}

#[sqlx::test(migrations = false)]
async fn rust_boundary_gives_typed_errors(pool: PgPool) {
    let app = setup(&pool).await;
    let err = app.create_queue("Not A Name").await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = app.metrics("missing").await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("missing")),
        "{err}"
    );

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Orphan;
    impl cairn::Task for Orphan {
        const QUEUE: &'static str = "not_created";
        type Output = ();
    }
    let err = app.enqueue(&Orphan).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let err = app
        .enqueue(&Orphan)
        .delay(Duration::from_secs(400_000_000))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound(_) | Error::InvalidArgument(_)),
        "{err}"
    );
    assert!(
        app.worker().run_until(async {}).await.is_err(),
        "a worker without queues is refused"
    );
}

#[derive(sqlx::FromRow, Debug)]
struct Claimed {
    id: i64,
    attempts: i32,
    lease: i64,
}

async fn claim(pool: &PgPool, vt: f64, qty: i32) -> Vec<Claimed> {
    sqlx::query_as("select id, attempts, lease from cairn.claim('q', $1, $2)")
        .bind(vt)
        .bind(qty)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn call_bool(pool: &PgPool, sql: &'static str, id: i64, lease: i64) -> bool {
    sqlx::query_scalar(sql)
        .bind(id)
        .bind(lease)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_stale_lease_can_neither_settle_nor_extend(pool: PgPool) {
    setup(&pool).await;
    sqlx::query("select cairn.send('q', '{}')")
        .execute(&pool)
        .await
        .unwrap();
    let first = claim(&pool, 0.05, 1).await.remove(0);
    assert_eq!(first.attempts, 1);
    assert!(
        claim(&pool, 30.0, 1).await.is_empty(),
        "leased jobs are invisible"
    );
    tokio::time::sleep(Duration::from_millis(80)).await; // the lease runs out
    let second = claim(&pool, 30.0, 1).await.remove(0);
    assert_eq!(
        (second.id, second.attempts),
        (first.id, 2),
        "redelivered, attempt counted"
    );
    assert_ne!(second.lease, first.lease);

    let (id, stale) = (first.id, first.lease);
    assert!(!call_bool(&pool, "select cairn.ack($1, $2)", id, stale).await);
    assert!(!call_bool(&pool, "select cairn.archive($1, $2)", id, stale).await);
    assert!(!call_bool(&pool, "select cairn.retry($1, $2, 0)", id, stale).await);
    assert!(!call_bool(&pool, "select cairn.fail($1, $2, 'late')", id, stale).await);
    let vt: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select cairn.set_vt($1, $2, 0)")
            .bind(id)
            .bind(stale)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(vt, None);
    let extended: Vec<i64> = sqlx::query_scalar("select cairn.extend(array[$1], array[$2], 60)")
        .bind(id)
        .bind(stale)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(extended.is_empty());
    // The current holder is unaffected and completes.
    assert!(call_bool(&pool, "select cairn.ack($1, $2)", id, second.lease).await);
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        0
    );
}

#[sqlx::test(migrations = false)]
async fn concurrent_claimers_never_share_a_job_or_exceed_qty(pool: PgPool) {
    setup(&pool).await;
    sqlx::query(
        "select cairn.send_batch('q', array_agg(to_jsonb(g))) from generate_series(1, 2000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut claimers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let pool = pool.clone();
        claimers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = claim(&pool, 300.0, 7).await;
                assert!(
                    got.len() <= 7,
                    "a claim returned {} rows for qty 7",
                    got.len()
                );
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|c| c.id));
            }
        });
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    while let Some(ids) = claimers.join_next().await {
        for id in ids.unwrap() {
            total += 1;
            assert!(seen.insert(id), "job {id} claimed twice");
        }
    }
    assert_eq!((total, seen.len()), (2000, 2000));
}

#[sqlx::test(migrations = false)]
async fn dead_letters_are_kept_and_requeued(pool: PgPool) {
    setup(&pool).await;
    let id: i64 = sqlx::query_scalar("select cairn.send('q', '{\"n\": 1}')")
        .fetch_one(&pool)
        .await
        .unwrap();
    let c = claim(&pool, 30.0, 1).await.remove(0);
    assert!(call_bool(&pool, "select cairn.fail($1, $2, 'boom')", c.id, c.lease).await);
    let m = cairn::App::builder()
        .pool(pool.clone())
        .build()
        .await
        .unwrap()
        .metrics("q")
        .await
        .unwrap();
    assert_eq!((m.ready, m.in_flight, m.dead), (0, 0, 1));
    let (outcome, error): (String, String) =
        sqlx::query_as("select outcome, last_error from cairn.archive where id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((outcome.as_str(), error.as_str()), ("dead", "boom"));

    let requeued: bool = sqlx::query_scalar("select cairn.requeue('q', $1)")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(requeued);
    let again = claim(&pool, 30.0, 1).await.remove(0);
    assert_eq!(
        (again.id, again.attempts),
        (id, 1),
        "same job, fresh attempt count"
    );
    // Archive keeps the output of a completed job.
    let archived: bool = sqlx::query_scalar("select cairn.archive($1, $2, '{\"sent\": true}')")
        .bind(again.id)
        .bind(again.lease)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(archived);
    let output: String = sqlx::query_scalar(
        "select output::text from cairn.archive where id = $1 and outcome = 'completed'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(output, r#"{"sent": true}"#);
}

#[sqlx::test(migrations = false)]
async fn delays_priorities_pop_and_purge(pool: PgPool) {
    setup(&pool).await;
    sqlx::query("select cairn.send('q', '\"later\"', delay => 3600)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("select cairn.send('q', '\"low\"', priority => 5)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("select cairn.send('q', '\"high\"', priority => -5)")
        .execute(&pool)
        .await
        .unwrap();
    let popped: Vec<String> = sqlx::query_scalar("select payload::text from cairn.pop('q', 10)")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(popped.len(), 2, "the delayed job is not visible yet");
    assert!(popped.contains(&r#""high""#.to_string()) && popped.contains(&r#""low""#.to_string()));
    sqlx::query("select cairn.send('q', '\"a\"', priority => 1)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("select cairn.send('q', '\"b\"', priority => -1)")
        .execute(&pool)
        .await
        .unwrap();
    let first: String = sqlx::query_scalar("select payload::text from cairn.read('q', 30, 1)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(first, r#""b""#, "lower priority value runs first");
    let m: (i64, i64, i64) =
        sqlx::query_as("select ready, delayed, in_flight from cairn.metrics('q')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(m, (1, 1, 1));
    let purged: i64 = sqlx::query_scalar("select cairn.purge_queue('q')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(purged, 3);
    let dropped: bool = sqlx::query_scalar("select cairn.drop_queue('q')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(dropped);
}

#[sqlx::test(migrations = false)]
async fn purge_in_batches_takes_the_oldest_first_and_refuses_bad_limits(pool: PgPool) {
    setup(&pool).await;
    sqlx::query("select cairn.send_batch('q', array_fill('{}'::jsonb, array[25]))")
        .execute(&pool)
        .await
        .unwrap();
    let newest: i64 = sqlx::query_scalar("select max(id) from cairn.jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut batches = Vec::new();
    for _ in 0..4 {
        let n: i64 = sqlx::query_scalar("select cairn.purge_queue('q', 10)")
            .fetch_one(&pool)
            .await
            .unwrap();
        let left: Vec<i64> = sqlx::query_scalar("select id from cairn.jobs order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
        batches.push((n, left.len(), left.first().copied()));
    }
    assert_eq!(
        batches,
        [
            (10, 15, Some(newest - 14)),
            (10, 5, Some(newest - 4)),
            (5, 0, None),
            (0, 0, None)
        ],
        "the oldest ten each time"
    );
    for (sql, code) in [
        ("select cairn.purge_queue('q', 0)", "22023"),
        ("select cairn.purge_queue('q', 100001)", "22023"),
        ("select cairn.purge_queue('q', null)", "22004"),
        ("select cairn.purge_queue('nope', 10)", "42704"),
    ] {
        let (got, message) = common::refused(&pool, sql).await;
        assert_eq!(got, code, "{sql}: {message}");
    }
}

#[sqlx::test(migrations = false)]
async fn the_doctor_answers_an_admin_and_no_one_else(pool: PgPool) {
    setup(&pool).await;
    let admin = common::Login::create(&pool, "cairn_admin", "doctor_a").await;
    let worker = common::Login::create(&pool, "cairn_worker", "doctor_w").await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("select check_name, status from cairn.doctor()")
            .fetch_all(&admin.pool)
            .await
            .unwrap();
    let refused = sqlx::query("select * from cairn.doctor()")
        .execute(&worker.pool)
        .await
        .unwrap_err();
    // The whole doctor, schema half included, from Rust as that admin.
    let as_admin = cairn::App::builder()
        .database_url(common::url_of(&admin.pool))
        .max_connections(1)
        .build()
        .await
        .unwrap();
    let checks = as_admin.doctor(Duration::from_secs(300)).await.unwrap();
    as_admin.pool().close().await;
    admin.drop(&pool).await;
    worker.drop(&pool).await;
    assert!(
        rows.iter()
            .any(|(name, status)| name == "roles" && status == "ok"),
        "{rows:?}"
    );
    assert_eq!(common::sqlstate(&refused).as_deref(), Some("42501"));
    let schema: Vec<_> = checks
        .iter()
        .take(3)
        .map(|c| (c.name.as_str(), c.status))
        .collect();
    assert_eq!(
        schema,
        [
            ("migrations", cairn::Health::Ok),
            ("functions", cairn::Health::Ok),
            ("drift", cairn::Health::Ok)
        ],
        "{checks:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn producer_role_can_send_but_not_claim_or_read_tables(pool: PgPool) {
    setup(&pool).await;
    let login = common::Login::create(&pool, "cairn_producer", "producer").await;
    let producer = login.pool.clone();
    let sent: Result<i64, _> = sqlx::query_scalar("select cairn.send('q', '{}')")
        .fetch_one(&producer)
        .await;
    let denied = [
        "select * from cairn.read('q', 30, 1)",
        "select * from cairn.jobs",
        "select cairn.purge_queue('q')",
        "select cairn.check_queue_name('q')",
    ];
    let mut codes = Vec::new();
    for sql in denied {
        let err = sqlx::query(sql).execute(&producer).await.unwrap_err();
        codes.push(common::sqlstate(&err));
    }
    login.drop(&pool).await;
    assert!(sent.is_ok(), "{sent:?}");
    assert_eq!(codes, vec![Some("42501".to_string()); denied.len()]);
}

/// A queue table is often analyzed while empty. Planned from such
/// statistics, claims once sorted the whole backlog and acks scanned the
/// whole table: the work per job grew with the backlog. Claims, acks and
/// extends of 2,000 jobs from a backlog of 20,000 must read a bounded number
/// of rows per job, whatever the statistics say.
#[sqlx::test(migrations = false)]
async fn claim_and_ack_work_per_job_does_not_grow_with_the_backlog(pool: PgPool) {
    setup(&pool).await;
    let send = "select cairn.send_batch('q', array(select jsonb_build_object('n', g)
                                                    from generate_series(1, $1) g))";
    // The statistics of a table whose pages are all but empty: 20,000 jobs
    // purged, one left on the last page (vacuum cannot truncate the file).
    for (n, then) in [
        (20_000, "select cairn.purge_queue('q')"),
        (1, "vacuum analyze cairn.jobs"),
        (20_000, "select 1"),
    ] {
        sqlx::query(send).bind(n).execute(&pool).await.unwrap();
        sqlx::query(then).execute(&pool).await.unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    // Warm the plan caches (PL/pgSQL switches to generic plans after five
    // calls) before counting.
    for _ in 0..6 {
        let got: Vec<(i64, i64)> = sqlx::query_as("select id, lease from cairn.claim('q', 30, 5)")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let (ids, leases): (Vec<i64>, Vec<i64>) = got.into_iter().unzip();
        sqlx::query("select cairn.ack($1, $2)")
            .bind(&ids)
            .bind(&leases)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let before = common::rows_read(&mut conn, &["jobs"]).await;
    let mut jobs = 0;
    for _ in 0..20 {
        let got: Vec<(i64, i64)> =
            sqlx::query_as("select id, lease from cairn.claim('q', 30, 100)")
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        assert_eq!(got.len(), 100);
        let (ids, leases): (Vec<i64>, Vec<i64>) = got.into_iter().unzip();
        let held: Vec<i64> = sqlx::query_scalar("select cairn.extend($1, $2, 30)")
            .bind(&ids)
            .bind(&leases)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        assert_eq!(held.len(), 100);
        let acked: Vec<i64> = sqlx::query_scalar("select cairn.ack($1, $2)")
            .bind(&ids)
            .bind(&leases)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        assert_eq!(acked.len(), 100);
        jobs += 100;
    }
    let per_job = (common::rows_read(&mut conn, &["jobs"]).await - before) / jobs;
    // About 15 with good plans; a plan that scans the backlog costs 100s.
    assert!(per_job < 40, "{per_job} block accesses per job");
}

/// Heap-only updates of cairn.jobs so far, and all its updates, as seen
/// from this connection.
async fn job_updates(conn: &mut sqlx::PgConnection) -> (i64, i64) {
    common::fresh_stats(conn).await;
    sqlx::query_as(
        "select n_tup_hot_upd, n_tup_upd from pg_stat_user_tables
          where schemaname = 'cairn' and relname = 'jobs'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// A claim changes no indexed column (the lease ends at `leased_until`, in
/// no index), and the table leaves room in each page for the new row
/// versions: nearly all claims are heap-only updates, which add no entry to
/// any index. Claims of 500, as the worker makes them. (Lease extensions
/// change no indexed column either, but right after a claim the page has
/// room for them only once pruning has removed the claim's old versions,
/// which a snapshot held anywhere in the database prevents.)
#[sqlx::test(migrations = false)]
async fn claims_are_heap_only_updates(pool: PgPool) {
    setup(&pool).await;
    sqlx::query(
        "select cairn.send_batch('q', array(select jsonb_build_object('n', g)
                                              from generate_series(1, 2000) g))",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let (hot0, all0) = job_updates(&mut conn).await;
    for _ in 0..4 {
        let got: i64 = sqlx::query_scalar("select count(*) from cairn.claim('q', 30, 500)")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(got, 500);
    }
    let (hot, all) = job_updates(&mut conn).await;
    let (hot, all) = (hot - hot0, all - all0);
    println!("heap-only claims: {hot} of {all}");
    assert_eq!(all, 2000);
    assert!(hot * 20 >= all * 19, "{hot} of {all} claims heap-only");
}

/// A claim leaves a job's place in the queue (`visible_at`) alone: a job
/// given back with `set_vt(.., 0)`, or whose lease ran out, is claimable
/// again in its old place, ahead of the jobs sent after it; while leased it
/// is neither popped nor counted ready.
#[sqlx::test(migrations = false)]
async fn a_job_given_back_keeps_its_place(pool: PgPool) {
    setup(&pool).await;
    let mut sent = Vec::new();
    for payload in ["a", "b", "c"] {
        let id: i64 = sqlx::query_scalar("select cairn.send('q', to_jsonb($1::text))")
            .bind(payload)
            .fetch_one(&pool)
            .await
            .unwrap();
        sent.push(id);
    }
    let metrics = || async {
        sqlx::query_as::<_, (i64, i64, i64)>(
            "select ready, delayed, in_flight from cairn.metrics('q')",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let a = claim(&pool, 30.0, 1).await.remove(0);
    assert_eq!(a.id, sent[0]);
    let popped: Vec<i64> = sqlx::query_scalar("select id from cairn.pop('q', 1)")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(popped, [sent[1]], "a leased job is not popped");
    assert_eq!(metrics().await, (1, 0, 1));

    let ends: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select cairn.set_vt($1, $2, 0)")
            .bind(a.id)
            .bind(a.lease)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(ends.is_some());
    assert_eq!(metrics().await, (2, 0, 0), "given back: ready again");
    let again = claim(&pool, 0.05, 1).await.remove(0);
    assert_eq!(
        (again.id, again.attempts),
        (sent[0], 2),
        "in its place, ahead of c"
    );
    tokio::time::sleep(Duration::from_millis(80)).await; // the lease runs out
    assert_eq!(metrics().await, (2, 0, 0), "a lease that ran out is ready");
    let mut left: Vec<i64> = claim(&pool, 30.0, 5).await.iter().map(|c| c.id).collect();
    left.sort();
    assert_eq!(left, [sent[0], sent[2]]);
}

/// One run of the flow `flow3` (three chained `inc` steps), driven by hand on
/// `conn`: start, claim the first step, then ack each step taking the next.
async fn drive_flow(conn: &mut sqlx::PgConnection) {
    sqlx::query("select cairn.start_flow('flow3', '1')")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (mut id, mut lease): (i64, i64) =
        sqlx::query_as("select id, lease from cairn.claim('workflows', 30, 1, '{inc}')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    for n in 2..=4 {
        let next: Option<(i64, i64)> = sqlx::query_as(
            "select id, lease from cairn.ack_and_take(array[$1], array[$2], array[$3::jsonb],
                                                      30, 1, '{workflows}', '{inc}')
              where taken",
        )
        .bind(id)
        .bind(lease)
        .bind(n.to_string())
        .fetch_optional(&mut *conn)
        .await
        .unwrap();
        match next {
            Some(next) => (id, lease) = next,
            None => assert_eq!(n, 4, "step {n} was not taken"),
        }
    }
}

/// One run of the code-first workflow `code3`, as a worker drives it:
/// claim, load_run, three begin_step calls, complete_run.
async fn drive_code(conn: &mut sqlx::PgConnection) {
    sqlx::query("select cairn.start_workflow('code3', '1')")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (id, lease, run): (i64, i64, cairn::Uuid) =
        sqlx::query_as("select id, lease, run_id from cairn.claim('workflows', 30, 1, '{code3}')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    sqlx::query("select count(*) from cairn.load_run($1, $2, $3)")
        .bind(run)
        .bind(id)
        .bind(lease)
        .execute(&mut *conn)
        .await
        .unwrap();
    let done = |key: &str, seq: i32| {
        format!(
            r#"[{{"key":"{key}","seq":{seq},"kind":"step","attempt":1,"status":"completed","output":{seq}}}]"#
        )
    };
    for (seq, key, before) in [
        (1, "one", "[]".to_owned()),
        (2, "two", done("one", 1)),
        (3, "three", done("two", 2)),
    ] {
        let outcome: String = sqlx::query_scalar(
            "select outcome from cairn.begin_step($1, $2, $3, $4::jsonb, $5, $6, null, '1')",
        )
        .bind(run)
        .bind(id)
        .bind(lease)
        .bind(before)
        .bind(key)
        .bind(seq)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(outcome, "started");
    }
    sqlx::query("select cairn.complete_run($1, $2, $3, $4::jsonb, '3')")
        .bind(run)
        .bind(id)
        .bind(lease)
        .bind(done("three", 3))
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Two runs of `code3` at once, as a worker drives them in batches:
/// claim, load_runs, three begin_steps calls, complete_runs.
async fn drive_code_batched(conn: &mut sqlx::PgConnection) {
    sqlx::query("select cairn.start_workflow('code3', '1') from generate_series(1, 2)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let held: Vec<(i64, i64, cairn::Uuid)> = sqlx::query_as(
        "select id, lease, run_id from cairn.claim('workflows', 30, 2, '{code3}') order by id",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(held.len(), 2);
    let jobs: Vec<i64> = held.iter().map(|h| h.0).collect();
    let leases: Vec<i64> = held.iter().map(|h| h.1).collect();
    let runs: Vec<cairn::Uuid> = held.iter().map(|h| h.2).collect();
    sqlx::query("select count(*) from cairn.load_runs($1, $2, $3)")
        .bind(&runs)
        .bind(&jobs)
        .bind(&leases)
        .execute(&mut *conn)
        .await
        .unwrap();
    let done = |key: &str, seq: i32| {
        format!(
            r#"[{{"key":"{key}","seq":{seq},"kind":"step","attempt":1,"status":"completed","output":{seq}}}]"#
        )
    };
    for (seq, key, before) in [
        (1, "one", "[]".to_owned()),
        (2, "two", done("one", 1)),
        (3, "three", done("two", 2)),
    ] {
        let started: i64 = sqlx::query_scalar(
            "select count(*) from cairn.begin_steps($1, $2, $3, array[$4, $4]::jsonb[],
                                                    array[$5, $5], array[$6, $6],
                                                    array[null, null]::text[], array['1', '1']::jsonb[])
              where outcome = 'started'",
        )
        .bind(&runs)
        .bind(&jobs)
        .bind(&leases)
        .bind(before)
        .bind(key)
        .bind(seq)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(started, 2);
    }
    let completed: i64 = sqlx::query_scalar(
        "select count(*) from cairn.complete_runs($1, $2, $3, array[$4, $4]::jsonb[],
                                                  array['3', '3']::jsonb[])
          where status = 'completed'",
    )
    .bind(&runs)
    .bind(&jobs)
    .bind(&leases)
    .bind(done("three", 3))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(completed, 2);
}

/// The runs and steps tables are planned empty too: a worker's connection
/// opened on a new database plans the engine's statements then and keeps
/// those plans. Planned so, every step read every step ever recorded (a
/// sequential scan) and a worker slowed down as the history grew (to half
/// its rate within a minute of pgbench). Flow steps and code-first steps,
/// alone and in batches, after 20,000 finished runs were added must read a
/// bounded number of rows per step, with plans made while the tables were
/// empty.
#[sqlx::test(migrations = false)]
async fn step_work_does_not_grow_with_the_history(pool: PgPool) {
    setup(&pool).await;
    sqlx::raw_sql(
        "select cairn.create_queue('workflows');
         select cairn.register_step_handler('inc');
         select cairn.register_workflow('code3', 'workflows');
         select cairn.create_flow('flow3', '{\"steps\": [
             {\"name\": \"one\", \"handler\": \"inc\", \"input\": \"$.input\"},
             {\"name\": \"two\", \"handler\": \"inc\", \"after\": [\"one\"], \"input\": \"$.one\"},
             {\"name\": \"three\", \"handler\": \"inc\", \"after\": [\"two\"], \"input\": \"$.two\"}]}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("vacuum analyze cairn.runs, cairn.steps, cairn.jobs")
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    // Plans made now, from the statistics of empty tables (PL/pgSQL
    // switches to generic plans after five calls, and keeps them).
    for _ in 0..6 {
        drive_flow(&mut conn).await;
        drive_code(&mut conn).await;
        drive_code_batched(&mut conn).await;
    }
    // The history, from another connection: 20,000 finished runs of three
    // steps each.
    common::finished_history(&pool, 20_000, 0.0).await;
    let tables = ["runs", "steps"];
    let before = common::rows_read(&mut conn, &tables).await;
    for _ in 0..10 {
        drive_flow(&mut conn).await;
        drive_code(&mut conn).await;
        drive_code_batched(&mut conn).await;
    }
    // Ten times a flow run, a code-first run and two batched ones.
    let per_step = (common::rows_read(&mut conn, &tables).await - before) / 120;
    let completed: i64 = sqlx::query_scalar(
        "select count(*) from cairn.runs where workflow in ('flow3', 'code3') and status = 'completed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(completed, 64);
    // A handful with good plans; a sequential scan reads 60,000.
    assert!(
        per_step < 40,
        "{per_step} rows of runs and steps read per step"
    );
}

/// The newest runs come from an index, not from a sort of every run kept
/// (130–470 ms over a million runs): with 20,000 runs stored, listing the
/// newest 100 reads about those.
#[sqlx::test(migrations = false)]
async fn listing_the_newest_runs_reads_only_those(pool: PgPool) {
    setup(&pool).await;
    common::finished_history(&pool, 20_000, 0.0).await;
    sqlx::query("analyze cairn.runs")
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let before = common::rows_read(&mut conn, &["runs"]).await;
    let listed: Vec<cairn::Uuid> = sqlx::query_scalar("select run_id from cairn.list_runs()")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(listed.len(), 100);
    let read = common::rows_read(&mut conn, &["runs"]).await - before;
    assert!(read < 500, "{read} runs read to list the newest 100");
}

/// The dead letters come from their index, however the archive looked when
/// a session first listed them: with 20,000 completed jobs archived beside
/// 5 dead letters, listing those reads about those.
#[sqlx::test(migrations = false)]
async fn listing_dead_letters_reads_only_those(pool: PgPool) {
    setup(&pool).await;
    let mut conn = common::planned_on_empty(
        &pool,
        "vacuum analyze cairn.archive",
        "select * from cairn.list_dead()",
    )
    .await;
    common::written_apart(
        &pool,
        "insert into cairn.archive (id, queue, task, payload, priority, attempts, enqueued_at,
                                    archived_at, outcome)
         select g, 'q', 'q', '{}', 0, 1, now(), now(),
                case when g % 4000 = 0 then 'dead' else 'completed' end
           from generate_series(1, 20000) g",
    )
    .await;
    let before = common::rows_read(&mut conn, &["archive"]).await;
    let dead: Vec<i64> = sqlx::query_scalar("select id from cairn.list_dead()")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(dead.len(), 5);
    let read = common::rows_read(&mut conn, &["archive"]).await - before;
    assert!(
        read < 100,
        "{read} archived jobs read to list 5 dead letters"
    );
}

/// Entries of the claim index handed out by index scans so far, as seen
/// from this connection: dead entries a scan walks past count too.
async fn claim_index_reads(conn: &mut sqlx::PgConnection) -> i64 {
    common::fresh_stats(conn).await;
    sqlx::query_scalar(
        "select idx_tup_read from pg_stat_user_indexes
          where schemaname = 'cairn' and indexrelname = 'jobs_claim_idx'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

type Position = (Option<i32>, Option<chrono::DateTime<chrono::Utc>>);

/// Claims up to 10 jobs with `claim_from` (from the head when `from` is
/// NULLs), acks them, and returns how many and where to resume.
async fn claim_ack_10(conn: &mut sqlx::PgConnection, from: Position) -> (usize, Position) {
    let got: Vec<(i64, i64, i32, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "select id, lease, next_priority, next_at from cairn.claim_from('q', 30, 10, null, $1, $2)",
    )
    .bind(from.0)
    .bind(from.1)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let next = got.first().map_or(from, |g| (Some(g.2), Some(g.3)));
    let ids: Vec<i64> = got.iter().map(|g| g.0).collect();
    let leases: Vec<i64> = got.iter().map(|g| g.1).collect();
    let acked: Vec<i64> = sqlx::query_scalar("select cairn.ack($1, $2)")
        .bind(&ids)
        .bind(&leases)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(acked.len(), ids.len());
    (ids.len(), next)
}

/// While another transaction holds an old snapshot, vacuum can remove
/// nothing: every claimed job leaves a dead entry where the queue's order
/// begins. A claim from the head walks all of them, more with every job;
/// `claim_from`, resuming where the last claim stopped, walks about one
/// entry per job.
#[sqlx::test(migrations = false)]
async fn claim_from_walks_past_what_a_held_snapshot_keeps(pool: PgPool) {
    setup(&pool).await;
    let mut holder = pool.acquire().await.unwrap();
    sqlx::raw_sql("begin isolation level repeatable read; select count(*) from cairn.queues")
        .execute(&mut *holder)
        .await
        .unwrap();
    // One send per transaction: each job has a visibility time of its own.
    for n in 0..700 {
        sqlx::query("select cairn.send('q', jsonb_build_object('n', $1::int))")
            .bind(n)
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    let mut at: Position = (None, None);
    // Warm the plan caches (generic plans after five calls) before counting.
    for _ in 0..6 {
        claim_ack_10(&mut conn, (None, None)).await;
    }
    let mut reads = Vec::new();
    for resume in [false, true] {
        let before = claim_index_reads(&mut conn).await;
        let mut jobs = 0;
        for _ in 0..30 {
            let (n, next) = claim_ack_10(&mut conn, if resume { at } else { (None, None) }).await;
            assert_eq!(n, 10);
            jobs += n;
            at = next;
        }
        reads.push((claim_index_reads(&mut conn).await - before) as f64 / jobs as f64);
    }
    sqlx::query("rollback").execute(&mut *holder).await.unwrap();
    let (from_head, resumed) = (reads[0], reads[1]);
    println!(
        "claim index entries read per job: {from_head:.1} from the head, {resumed:.1} resumed"
    );
    // From the head: 60 to 360 dead entries walked per claim of 10 jobs.
    assert!(
        from_head > 15.0,
        "from the head: {from_head:.1} entries per job"
    );
    assert!(resumed < 3.0, "resumed: {resumed:.1} entries per job");
}

/// `claim_from` takes the jobs of a higher priority sent after its
/// position first; it does not see a job committed late behind its
/// position, which a claim from the head then finds.
#[sqlx::test(migrations = false)]
async fn claim_from_resumes_at_its_position(pool: PgPool) {
    setup(&pool).await;
    let send = "select cairn.send('q', '{}', priority => $1)";
    let claim = |from: Position| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i32, chrono::DateTime<chrono::Utc>)>(
                "select id, next_priority, next_at from cairn.claim_from('q', 30, 1, null, $1, $2)",
            )
            .bind(from.0)
            .bind(from.1)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    // A send whose transaction began before the others' and commits last:
    // its job is visible from a time the claims below have passed.
    let mut late = pool.begin().await.unwrap();
    let straggler: i64 = sqlx::query_scalar(send)
        .bind(0)
        .fetch_one(&mut *late)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let first: i64 = sqlx::query_scalar(send)
        .bind(0)
        .fetch_one(&pool)
        .await
        .unwrap();
    let (id, p, at) = claim((None, None)).await.expect("the first job");
    assert_eq!(id, first);
    late.commit().await.unwrap();
    let urgent: i64 = sqlx::query_scalar(send)
        .bind(-1)
        .fetch_one(&pool)
        .await
        .unwrap();
    let got = claim((Some(p), Some(at))).await.expect("the urgent job");
    assert_eq!(got.0, urgent, "a higher priority comes first");
    assert_eq!((got.1, got.2), (p, at), "and does not move the position");
    assert_eq!(
        claim((Some(p), Some(at))).await,
        None,
        "the straggler is behind"
    );
    let got = claim((None, None)).await.map(|g| g.0);
    assert_eq!(got, Some(straggler), "a claim from the head finds it");
}

/// The operator's functions refuse bad arguments with a SQLSTATE and a
/// message that names the argument; a worker's row is cleaned up.
#[sqlx::test(migrations = false)]
async fn operator_functions_refuse_bad_arguments(pool: PgPool) {
    setup(&pool).await;
    for (sql, code, says) in [
        ("select * from cairn.list_dead('q', 0)", "22023", "lim"),
        ("select * from cairn.list_dead('q', null)", "22023", "lim"),
        ("select * from cairn.list_dead('nope', 10)", "42704", "nope"),
        ("select * from cairn.requeue_dead('nope')", "42704", "nope"),
        ("select * from cairn.requeue_dead(null)", "22004", "queue"),
        ("select * from cairn.doctor(-1)", "22023", "warn_after"),
        ("select * from cairn.doctor('NaN')", "22023", "warn_after"),
        ("select * from cairn.doctor(null)", "22004", "warn_after"),
        ("select cairn.fire_timers(0)", "22023", "lim"),
        ("select cairn.fire_timers(null)", "22004", "lim"),
        (
            "select cairn.worker_hello(gen_random_uuid(), null, 1, '{}', '{}', 1)",
            "22004",
            "host",
        ),
        (
            "select cairn.worker_hello(gen_random_uuid(), repeat('h', 300), 1, '{}', '{}', 1)",
            "22023",
            "host",
        ),
    ] {
        let (got, message) = common::refused(&pool, sql).await;
        assert_eq!(got, code, "{sql}: {message}");
        assert!(message.contains(says), "{sql}: {message}");
    }
    sqlx::raw_sql(
        "select cairn.worker_hello('00000000-0000-0000-0000-000000000001', 'h', 7, '{q}', '{t}', 2);
         update cairn.workers set seen_at = now() - interval '2 minutes'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let alive: bool = sqlx::query_scalar("select alive from cairn.list_workers()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!alive, "unseen for 2 minutes: lost");
    let back: bool =
        sqlx::query_scalar("select cairn.worker_seen('00000000-0000-0000-0000-000000000001')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(back);
    sqlx::query("select cairn.worker_bye('00000000-0000-0000-0000-000000000001')")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.workers").await,
        0
    );
}

/// The batched worker calls (`load_runs`, `begin_steps`, `complete_runs`)
/// answer each call as it would be answered alone, tagged with its
/// position; a lost lease gets no row, and a run another transaction holds
/// is answered 'busy' at once instead of waited for.
#[sqlx::test(migrations = false)]
async fn batched_run_calls_answer_each_call_as_alone(pool: PgPool) {
    setup(&pool).await;
    sqlx::raw_sql(
        "select cairn.create_queue('workflows');
         select cairn.register_workflow('code3', 'workflows');
         select cairn.start_workflow('code3', to_jsonb(g)) from generate_series(1, 3) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let held: Vec<(i64, i64, cairn::Uuid)> =
        sqlx::query_as("select id, lease, run_id from cairn.claim('workflows', 30, 3) order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let jobs: Vec<i64> = held.iter().map(|h| h.0).collect();
    let leases: Vec<i64> = held.iter().map(|h| h.1).collect();
    let runs: Vec<cairn::Uuid> = held.iter().map(|h| h.2).collect();

    // Loaded: one row per run (no checkpoints yet), with its input.
    let loaded: Vec<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "select n, refused, input::text from cairn.load_runs($1, $2, $3) order by n",
    )
    .bind(&runs)
    .bind(&jobs)
    .bind(&leases)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(loaded.len(), 3, "{loaded:?}");
    for (n, refused, input) in &loaded {
        assert_eq!(refused, &None);
        let start: i64 =
            sqlx::query_scalar("select (input::text)::bigint from cairn.runs where id = $1")
                .bind(runs[usize::try_from(*n - 1).unwrap()])
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(input.as_deref(), Some(start.to_string().as_str()));
    }

    // Run 2 is held by another transaction (as a cancel would hold it); run
    // 3's lease is stale.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("select from cairn.runs where id = $1 for no key update")
        .bind(runs[1])
        .execute(&mut *other)
        .await
        .unwrap();
    let stale = vec![leases[0], leases[1], leases[2] + 1];
    let begun: Vec<(i32, String, Option<i32>)> = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query_as(
            "select n, outcome, attempt
               from cairn.begin_steps($1, $2, $3, array['[]', '[]', '[]']::jsonb[],
                                      array['one', 'one', 'one'], array[1, 1, 1],
                                      array[null, null, null]::text[], array['1', '1', '1']::jsonb[])
              order by n",
        )
        .bind(&runs)
        .bind(&jobs)
        .bind(&stale)
        .fetch_all(&pool),
    )
    .await
    .expect("a batch never waits for a run held elsewhere")
    .unwrap();
    assert_eq!(
        begun,
        vec![(1, "started".into(), Some(1)), (2, "busy".into(), None)],
        "run 3's lease is stale: no row"
    );
    // Alone, the busy call waits for the holder, then begins.
    other.rollback().await.unwrap();
    let alone: String = sqlx::query_scalar(
        "select outcome from cairn.begin_step($1, $2, $3, '[]', 'one', 1, null, '1')",
    )
    .bind(runs[1])
    .bind(jobs[1])
    .bind(leases[1])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(alone, "started");

    // The same begin again learns the recorded attempt as it would alone;
    // an outcome carried in the outbox is written first.
    let done =
        r#"[{"key":"one","seq":1,"kind":"step","attempt":1,"status":"completed","output":7}]"#;
    let again: Vec<(i32, String, i32)> = sqlx::query_as(
        "select n, outcome, attempt from cairn.begin_steps($1, $2, $3, array[$4, '[]']::jsonb[],
                                                 array['two', 'one'], array[2, 1],
                                                 array[null, null]::text[], array['1', '1']::jsonb[])
          order by n",
    )
    .bind(&runs[..2])
    .bind(&jobs[..2])
    .bind(&leases[..2])
    .bind(done)
    .fetch_all(&pool)
    .await
    .unwrap();
    // Run 2's step was begun and never ended: that attempt was lost, and
    // this is the second.
    assert_eq!(
        again,
        vec![(1, "started".into(), 1), (2, "started".into(), 2)]
    );
    let output: String = sqlx::query_scalar(
        "select output::text from cairn.steps where run_id = $1 and key = 'one'",
    )
    .bind(runs[0])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(output, "7");

    // Completed together; a stale lease completes nothing.
    let done2 =
        r#"[{"key":"two","seq":2,"kind":"step","attempt":1,"status":"completed","output":8}]"#;
    let completed: Vec<(i32, String)> = sqlx::query_as(
        "select n, status from cairn.complete_runs($1, $2, $3, array[$4, '[]', '[]']::jsonb[],
                                                  array['\"a\"', '\"b\"', '\"c\"']::jsonb[])
          order by n",
    )
    .bind(&runs)
    .bind(&jobs)
    .bind(&stale)
    .bind(done2)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        completed,
        vec![(1, "completed".into()), (2, "completed".into())]
    );
    let states: Vec<(String, Option<String>)> = sqlx::query_as(
        "select r.status, r.output::text from unnest($1::uuid[]) with ordinality u(id, n)
           join cairn.runs r on r.id = u.id order by u.n",
    )
    .bind(&runs)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        states,
        vec![
            ("completed".into(), Some("\"a\"".into())),
            ("completed".into(), Some("\"b\"".into())),
            ("running".into(), None),
        ]
    );
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        1,
        "the completed runs' jobs are gone; run 3 keeps its job"
    );

    // Loading a run held elsewhere is busy too; a completed run's job is
    // gone, so its call gets no row.
    let mut other = pool.begin().await.unwrap();
    sqlx::query("select from cairn.runs where id = $1 for share")
        .bind(runs[2])
        .execute(&mut *other)
        .await
        .unwrap();
    let reloaded: Vec<(i32, Option<String>)> = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query_as("select n, refused from cairn.load_runs($1, $2, $3) order by n")
            .bind(&runs)
            .bind(&jobs)
            .bind(&leases)
            .fetch_all(&pool),
    )
    .await
    .expect("a batch never waits for a run held elsewhere")
    .unwrap();
    assert_eq!(reloaded, vec![(3, Some("busy".into()))]);
    other.rollback().await.unwrap();
}

/// A batch refuses bad arrays before anything is written: NULLs (22004),
/// arrays that do not line up or more than 1,000 calls (22023).
#[sqlx::test(migrations = false)]
async fn batched_run_calls_refuse_bad_arrays(pool: PgPool) {
    setup(&pool).await;
    for (sql, state) in [
        ("select * from cairn.load_runs(null, '{1}', '{1}')", "22004"),
        ("select * from cairn.load_runs(array[gen_random_uuid()], '{1,2}', '{1}')", "22023"),
        (
            "select * from cairn.load_runs(array[null::uuid], '{1}', '{1}')",
            "22004",
        ),
        (
            "select * from cairn.load_runs(array_fill(gen_random_uuid(), array[1001]),
                                           array_fill(1::bigint, array[1001]),
                                           array_fill(1::bigint, array[1001]))",
            "22023",
        ),
        (
            "select * from cairn.begin_steps(array[gen_random_uuid()], '{1}', '{1}', null,
                                             '{k}', '{1}', '{null}', '{1}')",
            "22004",
        ),
        (
            "select * from cairn.begin_steps(array[gen_random_uuid()], '{1}', '{1}', array['[]']::jsonb[],
                                             '{k,l}', '{1}', '{null}', '{1}')",
            "22023",
        ),
        (
            "select * from cairn.complete_runs(array[gen_random_uuid()], '{1}', '{1}', array['[]']::jsonb[], null)",
            "22004",
        ),
        (
            "select * from cairn.complete_runs(array[gen_random_uuid()], '{1}', '{1}', array['[]']::jsonb[], '{}')",
            "22023",
        ),
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert_eq!(common::sqlstate(&err).as_deref(), Some(state), "{sql}: {err}");
    }
}
