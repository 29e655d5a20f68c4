-- cairn: the queue API.
--
-- Who calls it: producers send (send, send_batch, metrics); workers lease
-- and settle (claim/read/pop, ack, archive, retry, fail, extend, set_vt,
-- release); admins repair (purge_queue, drop_queue, delete, requeue). See
-- 90_grants.sql.
--
-- The model, pgmq's with fencing added:
--   * send() inserts a job, visible at now() + delay, and NOTIFYs channel
--     'cairn' with the queue name (a wake-up hint only; workers also poll).
--   * claim()/read() lease up to qty visible jobs: one statement, a
--     materialized CTE with FOR UPDATE SKIP LOCKED, so two claimers never get
--     the same row and a claim never returns more than qty rows. Each claim
--     draws a new lease token and counts an attempt on every job it returns.
--     The lease ends at leased_until: if the worker dies, the job becomes
--     claimable again when the lease runs out. No reaper is needed. A claim
--     leaves visible_at (the job's place in the claim index) as it was, so
--     its update writes no index entry and can be heap-only (0012).
--   * Every call that settles or extends a job names (id, lease). Once the job
--     has been re-leased (or settled), the old lease matches no row and the
--     call changes nothing: it returns false / omits that id.
--   * ack deletes; archive keeps the job and its output in cairn.archive;
--     retry makes it visible again later; fail dead-letters it (kept in
--     cairn.archive, outcome 'dead', and cairn.requeue() brings it back).
--
-- Jobs of workflow runs. A job whose run_id is set drives that run; only the
-- run engine (20_run_engine.sql) creates one, and only it completes one:
-- ack, archive, retry, set_vt and pop leave such jobs alone. A job whose
-- parent_run is set runs one step of that run; settling it settles the step
-- and wakes the run. Whenever a run's job leaves the table by another way
-- (dead-lettered, deleted, purged, dropped with its queue), the run fails
-- with the reason: nothing is left waiting for ever. These paths go through
-- cairn.settle_jobs, which takes its locks in the engine's lock order.
--
-- Lock order (see 20_run_engine.sql): runs, then jobs in id order. Calls
-- that settle several jobs take them in id order, so two of them never wait
-- for each other in a cycle. A claim never waits (SKIP LOCKED).
--
-- Durability: every function here commits as the caller's transaction
-- does. The Rust worker turns off synchronous commit for its own claim and
-- extend transactions (losing one in a crash only lets the job be claimed
-- again); nothing here lowers the durability of a caller's transaction.
--
-- Plans that do not depend on statistics. The jobs table swings between
-- empty and full, and autovacuum often analyzes it empty; planned from such
-- statistics, an ack of 256 ids became a nested loop over a sequential scan
-- (0.7 s instead of 1 ms) and a claim a bitmap scan that sorts the whole
-- backlog (11 ms instead of 0.1 ms). So the hot functions leave the planner
-- no choice to get wrong: they find and lock their rows first (the claim
-- index read in order; or one primary-key probe per (id, lease) pair,
-- cairn.lock_held), then update or delete them by row address (`ctid = any
-- (array)`, a TID scan). A SET clause pins the rest: enable_seqscan = off,
-- and enable_sort = off for the claim.
--
-- Functions are SECURITY DEFINER so callers need no table privileges.

create or replace function cairn.create_queue(queue text)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_queue_name(queue);
    insert into cairn.queues (name) values (queue) on conflict do nothing;
end $$;
comment on function cairn.create_queue(text) is
    'Create a queue; a no-op if it exists.';

-- Internal: delete a queue's live jobs — the workflow's jobs through
-- settle_jobs (their runs fail, their steps fail), plain jobs in one
-- statement: all of them, or (lim) the lim with the lowest ids. Returns how
-- many. Locks, in the engine's order: the runs those jobs concern and their
-- parents (rank 1), then those jobs and the jobs of those runs, in id order
-- (rank 2).
create or replace function cairn.remove_queue_jobs(queue_id integer, reason text, lim integer)
returns bigint
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_upto   bigint;
    v_jobs   bigint[];
    v_runs   uuid[];
    v_locked uuid[];
    v_count  bigint;
    v_plain  bigint;
begin
    if lim is not null then
        -- The lim-th job by id; NULL when there are fewer: then all of them.
        select j.id into v_upto
          from cairn.jobs j
         where j.queue_id = remove_queue_jobs.queue_id
         order by j.id offset lim - 1 limit 1;
    end if;
    select array_agg(j.id), array_agg(distinct coalesce(j.parent_run, j.run_id)) into v_jobs, v_runs
      from cairn.jobs j
     where j.queue_id = remove_queue_jobs.queue_id
       and (v_upto is null or j.id <= v_upto)
       and (j.run_id is not null or j.parent_run is not null);
    if v_runs is not null then
        select array_agg(l) into v_locked from cairn.lock_runs(v_runs) l;
    end if;
    perform 1 from cairn.jobs j
     where (j.queue_id = remove_queue_jobs.queue_id and (v_upto is null or j.id <= v_upto))
        or j.id in (select r.job_id from cairn.runs r
                     where r.id = any (coalesce(v_locked, '{}')) and r.job_id is not null)
     order by j.id
       for update;
    v_count := (select count(*)
                  from cairn.settle_jobs(coalesce(v_jobs, '{}'), null, null, 'removed', reason, false));
    delete from cairn.jobs j
     where j.queue_id = remove_queue_jobs.queue_id and (v_upto is null or j.id <= v_upto)
       and j.run_id is null and j.parent_run is null;
    get diagnostics v_plain = row_count;
    return v_count + v_plain;
end $$;

-- Drop a queue. Locks: the queue row, then (through settle_jobs) the runs of
-- its workflow jobs, then its jobs in id order.
create or replace function cairn.drop_queue(queue text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_qid integer;
begin
    perform cairn.check_queue_name(queue);
    select q.id into v_qid from cairn.queues q where q.name = drop_queue.queue for update;
    if not found then
        return false;
    end if;
    perform cairn.remove_queue_jobs(v_qid, format('its queue %s was dropped', queue), null);
    delete from cairn.archive a where a.queue = drop_queue.queue;
    delete from cairn.queues q where q.id = v_qid;
    return true;
end $$;
comment on function cairn.drop_queue(text) is
    'Drop a queue with its live jobs, archive and dead letters; workflow runs driven by its jobs fail. Returns false if it did not exist.';

create or replace function cairn.purge_queue(queue text)
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return cairn.remove_queue_jobs(cairn.queue_id(queue), format('its queue %s was purged', queue), null);
end $$;
comment on function cairn.purge_queue(text) is
    'Delete every live job (ready, delayed or leased) of a queue; returns how many. Workflow runs driven by those jobs fail, and steps run as those jobs fail.';

-- A purge in steps, for a queue too big for one transaction: each call
-- deletes the lim oldest live jobs (by id) and returns how many (fewer than
-- lim: the queue is empty).
create or replace function cairn.purge_queue(queue text, lim integer)
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_batch(lim, 'lim', 100000);
    return cairn.remove_queue_jobs(cairn.queue_id(queue), format('its queue %s was purged', queue), lim);
end $$;
comment on function cairn.purge_queue(text, integer) is
    'Delete the lim (1 to 100,000) oldest live jobs of a queue, as purge_queue(queue) does all of them; returns how many.';

create or replace function cairn.send(
    queue       text,
    payload     jsonb,
    delay       double precision default 0,
    priority    integer default 0,
    task        text default null,
    traceparent text default null)
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_now  timestamptz := cairn.now();
    v_qid  integer;
    v_task text := coalesce(task, queue);
    v_id   bigint;
begin
    -- The hot path tests inline and calls the checks (which raise) only when
    -- a value is wrong: each call of a function with a SET clause costs.
    select q.id into v_qid from cairn.queues q where q.name = send.queue;
    if not found then
        perform cairn.queue_id(queue);
    end if;
    if payload is null or pg_column_size(payload) > 1048576
       or pg_column_compression(payload) is not null
       or (pg_column_size(payload) >= 512
           and jsonb_path_exists(payload, 'strict $.**{64} ? (@.type() == "object" || @.type() == "array")'))
       or jsonb_path_exists(payload,
              'strict $.** ? (@ > 1.7976931348623157e308 || @ < -1.7976931348623157e308)') then
        perform cairn.check_payload(payload);
    end if;
    if delay is null or not (delay >= 0 and delay <= 315360000) then
        perform cairn.check_seconds(delay, 'delay', 0, 315360000);
    end if;
    if priority is null or priority not between -32768 and 32767 then
        perform cairn.check_priority(priority);
    end if;
    if task is not null then
        perform cairn.check_task_name(task);
    end if;
    if traceparent is not null then
        perform cairn.check_traceparent(traceparent);
    end if;
    if exists (select from cairn.workflows w where w.name = v_task) then
        perform cairn.check_not_workflow(v_task);
    end if;

    insert into cairn.jobs (queue_id, task, payload, priority, visible_at, enqueued_at, traceparent)
    values (v_qid, v_task, send.payload, send.priority,
            v_now + make_interval(secs => send.delay), v_now, send.traceparent)
    returning id into v_id;

    if send.delay = 0 then
        perform pg_notify('cairn', send.queue);
    end if;
    return v_id;
end $$;
comment on function cairn.send(text, jsonb, double precision, integer, text, text) is
    'Enqueue one job; delay in seconds (0 to 10 years); lower priority runs first; task defaults to the queue name (a workflow''s name is refused: start runs with start_workflow); traceparent (W3C) continues the producer''s trace. Returns the job id.';

create or replace function cairn.send_batch(
    queue    text,
    payloads jsonb[],
    delay    double precision default 0,
    priority integer default 0,
    task     text default null)
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_now timestamptz := cairn.now();
    v_qid integer := cairn.queue_id(queue);
    v_bad integer;
begin
    if payloads is null then
        raise exception 'cairn: payloads must not be NULL'
            using errcode = 'null_value_not_allowed';
    end if;
    perform cairn.check_batch(cardinality(payloads), 'batch size', 100000);
    -- Size and depth, inline (a function call per row would cost a third of
    -- the batch's rate). Numbers out of range are not scanned for here: the
    -- scan would cost as much again; such a job is dead-lettered at its
    -- first delivery with serde's message (docs/design.md).
    select u.n into v_bad
      from unnest(payloads) with ordinality as u(p, n)
     where u.p is null or pg_column_size(u.p) > 1048576
        or pg_column_compression(u.p) is not null
        or (pg_column_size(u.p) >= 512
            and jsonb_path_exists(u.p, 'strict $.**{64} ? (@.type() == "object" || @.type() == "array")'))
     limit 1;
    if found then
        perform cairn.check_payload(payloads[v_bad], format('payloads[%s]', v_bad));
    end if;
    perform cairn.check_seconds(delay, 'delay', 0, 315360000);
    perform cairn.check_priority(priority);
    perform cairn.check_task_name(task);
    perform cairn.check_not_workflow(coalesce(task, queue));

    return query
    insert into cairn.jobs (queue_id, task, payload, priority, visible_at, enqueued_at)
    select v_qid, coalesce(send_batch.task, send_batch.queue), u.p,
           send_batch.priority, v_now + make_interval(secs => send_batch.delay), v_now
      from unnest(payloads) with ordinality as u(p, n)
     order by u.n
    returning id;

    if send_batch.delay = 0 then
        perform pg_notify('cairn', send_batch.queue);
    end if;
end $$;
comment on function cairn.send_batch(text, jsonb[], double precision, integer, text) is
    'Enqueue up to 100,000 jobs in one call; returns their ids in payload order.';

-- The claim. Locks: the claimed job rows (SKIP LOCKED: never waits on another
-- claimer). Not idempotent: each call is a new delivery.
-- Two statements, so that no statistics can spoil the plan (see the header):
-- lock the rows (the claim index read in order), then update them by address.
--
-- Where the scan starts. Jobs in flight keep their entries in the claim
-- index, and every ack leaves a dead one; they sit where the queue's order
-- begins, and a scan from the head walks them all (the dead ones until
-- vacuum may remove them: never, while some transaction holds an old
-- snapshot). claim_from resumes where the caller's last claim stopped
-- instead: from (from_priority, from_at), the position of the last job it
-- took, plus the jobs of a higher priority (a lower number), which sort
-- before it. A job can be claimable behind that position only in corner
-- cases: a send whose transaction began before the claim and committed
-- after it, a lease that ran out or was given back with set_vt (the job
-- keeps its place), a run started with run_at in the past. The
-- caller therefore claims from the head (from_* NULL) now and then: the
-- worker does so once a second per queue, so such a job waits a second at
-- most. Each returned row carries next_priority/next_at, where the next
-- call should resume (the same on every row).
create or replace function cairn.claim_from(
    queue         text,
    vt            double precision,
    qty           integer,
    tasks         text[],
    from_priority integer,
    from_at       timestamptz)
returns table (id bigint, task text, payload jsonb, attempts integer, lease bigint,
               enqueued_at timestamptz, visible_at timestamptz, parent_run uuid,
               traceparent text, run_id uuid, next_priority integer, next_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_sort = off
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now   timestamptz := cairn.now();
    v_qid   integer;
    v_lease bigint;
    v_rows  tid[];
    v_more  tid[];
    v_from_p  integer;
    v_from_at timestamptz;
    v_prio  integer;
    v_at    timestamptz;
    v_n     integer;
begin
    -- The hot path: checks are inline expressions, not calls.
    select q.id into v_qid from cairn.queues q where q.name = claim_from.queue;
    if not found then
        perform cairn.queue_id(queue);
    end if;
    if vt is null or vt <> vt or vt < 0.001 or vt > 86400 then
        perform cairn.check_seconds(vt, 'visibility timeout', 0.001, 86400);
    end if;
    if qty is null or qty < 1 or qty > 10000 then
        perform cairn.check_batch(qty, 'qty', 10000);
    end if;
    v_lease := pg_catalog.floor(pg_catalog.random() * 9007199254740992)::bigint;

    if from_priority is null or from_at is null then
        -- From the head: the lowest position there is.
        v_from_p := -32768;
        v_from_at := '-infinity';
    else
        v_from_p := from_priority;
        v_from_at := from_at;
        -- Jobs of a higher priority first: that range ends before the
        -- resume position, so it holds few dead entries.
        select array_agg(c.ctid) into v_rows
          from (select j.ctid
                  from cairn.jobs j
                 where j.queue_id = v_qid
                   and j.priority < v_from_p
                   and j.visible_at <= v_now
                   and (j.leased_until is null or j.leased_until <= v_now)
                   and (claim_from.tasks is null or j.task = any (claim_from.tasks))
                 order by j.priority, j.visible_at
                 limit claim_from.qty
                   for update skip locked) c;
    end if;
    v_n := coalesce(cardinality(v_rows), 0);
    v_prio := v_from_p;
    v_at := v_from_at;
    if v_n < qty then
        -- From the position on. The rows come in queue order: the last is
        -- where the next claim resumes.
        select array_agg(c.ctid), (array_agg(c.priority))[count(*)],
               (array_agg(c.visible_at))[count(*)]
          into v_more, v_prio, v_at
          from (select j.ctid, j.priority, j.visible_at
                  from cairn.jobs j
                 where j.queue_id = v_qid
                   and (j.priority, j.visible_at) >= (v_from_p, v_from_at)
                   and j.visible_at <= v_now
                   and (j.leased_until is null or j.leased_until <= v_now)
                   and (claim_from.tasks is null or j.task = any (claim_from.tasks))
                 order by j.priority, j.visible_at
                 limit claim_from.qty - v_n
                   for update skip locked) c;
        if v_more is null then
            v_prio := v_from_p;
            v_at := v_from_at;
        end if;
        v_rows := coalesce(v_rows, '{}') || coalesce(v_more, '{}');
    end if;
    if v_rows is null or cardinality(v_rows) = 0 then
        return;
    end if;
    return query
    update cairn.jobs j
       set leased_until = v_now + make_interval(secs => claim_from.vt),
           attempts     = j.attempts + 1,
           lease        = v_lease
     where j.ctid = any (v_rows)
    returning j.id, j.task, j.payload, j.attempts, j.lease, j.enqueued_at, j.leased_until,
              j.parent_run, j.traceparent, j.run_id, v_prio, v_at;
end $$;
comment on function cairn.claim_from(text, double precision, integer, text[], integer, timestamptz) is
    'claim, resuming at (from_priority, from_at) (NULL: from the head of the queue): pass the next_priority and next_at of the last call''s rows. A job behind that position (a send committed late, a lease that ran out behind it) is found by the next claim from the head: make one now and then.';

create or replace function cairn.claim(
    queue text,
    vt    double precision,
    qty   integer,
    tasks text[] default null)
returns table (id bigint, task text, payload jsonb, attempts integer, lease bigint,
               enqueued_at timestamptz, visible_at timestamptz, parent_run uuid,
               traceparent text, run_id uuid)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return query
    select c.id, c.task, c.payload, c.attempts, c.lease, c.enqueued_at, c.visible_at,
           c.parent_run, c.traceparent, c.run_id
      from cairn.claim_from(queue, vt, qty, tasks, null, null) c;
end $$;
comment on function cairn.claim(text, double precision, integer, text[]) is
    'Lease up to qty visible jobs for vt seconds (optionally only the given tasks). Each returned row carries the lease token that fenced calls must name, the workflow run waiting for it (parent_run) and the run it drives (run_id), if any.';

create or replace function cairn.read(queue text, vt integer, qty integer default 1)
returns table (id bigint, task text, payload jsonb, attempts integer, lease bigint,
               enqueued_at timestamptz, visible_at timestamptz, parent_run uuid,
               traceparent text, run_id uuid)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return query select * from cairn.claim(queue, vt, qty);
end $$;
comment on function cairn.read(text, integer, integer) is
    'pgmq-style read: lease up to qty jobs for vt seconds.';

-- Read and delete at once: at-most-once delivery, no lease. Takes plain jobs
-- only: a workflow's jobs must be settled, never just dropped.
create or replace function cairn.pop(queue text, qty integer default 1)
returns table (id bigint, task text, payload jsonb, attempts integer,
               enqueued_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_sort = off  -- the claim index, read in order (see claim)
set enable_seqscan = off
as $$
declare
    v_now timestamptz := cairn.now();
    v_qid integer := cairn.queue_id(queue);
    v_rows tid[];
begin
    perform cairn.check_batch(qty, 'qty', 10000);
    select array_agg(c.ctid) into v_rows
      from (select j.ctid
              from cairn.jobs j
             where j.queue_id = v_qid
               and j.visible_at <= v_now
               and (j.leased_until is null or j.leased_until <= v_now)
               and j.run_id is null and j.parent_run is null
             order by j.priority, j.visible_at
             limit pop.qty
               for update skip locked) c;
    return query
    delete from cairn.jobs j
     where j.ctid = any (v_rows)
    returning j.id, j.task, j.payload, j.attempts + 1, j.enqueued_at;
end $$;
comment on function cairn.pop(text, integer) is
    'Take up to qty visible plain jobs and delete them in the same statement (at-most-once). Jobs of workflow runs are left for claim.';

-- Internal: locks the jobs of these (id, lease) pairs that still hold that
-- lease (only plain jobs when plain_only), in id order, and returns their row
-- addresses. One primary-key probe per pair, driven from the pairs: the
-- LATERAL subquery with FOR UPDATE cannot be flattened into a join whose
-- order the planner would pick from the table's statistics. The caller then
-- updates or deletes `where ctid = any (...)`, a TID scan: the locked rows
-- cannot move meanwhile. PL/pgSQL, not SQL, so that the plan is kept
-- between calls: a SQL function with SET clauses is planned on every call,
-- which cost more than the rest of an ack.
create or replace function cairn.lock_held(ids bigint[], leases bigint[], plain_only boolean)
returns tid[]
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    return (select coalesce(array_agg(h.ctid), '{}')
              from (select u.id, u.lease from unnest(ids, leases) as u(id, lease) order by u.id) u
             cross join lateral (select j.ctid from cairn.jobs j
                                  where j.id = u.id and j.lease = u.lease
                                    and not (plain_only and (j.run_id is not null or j.parent_run is not null))
                                    for update of j) h);
end $$;

-- Complete leased jobs. The hot path deletes plain jobs in one statement, in
-- id order; a workflow's step jobs go through settle_jobs (their run is
-- locked first). Jobs that drive a run are never acked: the run engine
-- completes them.
create or replace function cairn.ack(ids bigint[], leases bigint[], outputs jsonb[])
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off  -- a TID scan, whatever the statistics say (header)
as $$
declare
    v_rows tid[];
    v_done bigint;
begin
    if ids is null or leases is null or cardinality(ids) <> cardinality(leases)
       or array_position(ids, null) is not null or array_position(leases, null) is not null then
        perform cairn.check_pairs(ids, leases);
    end if;
    if outputs is not null then
        perform cairn.check_outputs(ids, outputs);
    end if;
    v_rows := cairn.lock_held(ids, leases, true);
    return query
    delete from cairn.jobs j where j.ctid = any (v_rows)
    returning j.id;
    get diagnostics v_done = row_count;
    if v_done < cardinality(ids) then
        -- Some were not plain jobs (or their lease was lost): settle the
        -- workflow steps among them.
        return query
        select s.id from cairn.settle_jobs(ids, leases, outputs, 'completed', null, false) s;
    end if;
end $$;
comment on function cairn.ack(bigint[], bigint[], jsonb[]) is
    'Complete leased jobs; outputs, when given, pair up with the ids and go to the workflow steps the jobs were run for. Returns the ids whose lease still matched; the others were re-leased or settled and are left alone.';

create or replace function cairn.ack(ids bigint[], leases bigint[])
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return query select * from cairn.ack(ids, leases, null::jsonb[]);
end $$;
comment on function cairn.ack(bigint[], bigint[]) is
    'Complete (delete) leased jobs. Returns the ids whose lease still matched; the others were re-leased or settled and are left alone.';

create or replace function cairn.ack(id bigint, lease bigint)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_pairs(array[id], array[lease]);
    return exists (select from cairn.ack(array[id], array[lease], null));
end $$;
comment on function cairn.ack(bigint, bigint) is
    'Complete (delete) one leased job; false if the lease no longer matches.';

create or replace function cairn.archive(ids bigint[], leases bigint[], outputs jsonb[] default null)
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_bad integer;
begin
    perform cairn.check_pairs(ids, leases);
    perform cairn.check_outputs(ids, outputs);
    select u.n into v_bad
      from unnest(outputs) with ordinality as u(o, n)
     where u.o is not null and cairn.json_problem(u.o) is not null
     limit 1;
    if found then
        perform cairn.check_payload(outputs[v_bad], format('outputs[%s]', v_bad));
    end if;
    return query select s.id from cairn.settle_jobs(ids, leases, outputs, 'completed', null, true) s;
end $$;
comment on function cairn.archive(bigint[], bigint[], jsonb[]) is
    'Complete leased jobs and keep them, with their outputs, in cairn.archive. Returns the ids whose lease still matched.';

create or replace function cairn.archive(id bigint, lease bigint, output jsonb default null)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
begin
    perform cairn.check_pairs(array[id], array[lease]);
    return exists (select from cairn.archive(array[id], array[lease], array[output]));
end $$;
comment on function cairn.archive(bigint, bigint, jsonb) is
    'Complete one leased job and keep it in cairn.archive; false if the lease no longer matches.';

create or replace function cairn.retry(id bigint, lease bigint, delay double precision, error text default null)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
begin
    perform cairn.check_pairs(array[id], array[lease]);
    perform cairn.check_seconds(delay, 'delay', 0, 315360000);
    update cairn.jobs j
       set visible_at   = cairn.now() + make_interval(secs => retry.delay),
           lease        = null,
           leased_until = null,
           last_error   = left(retry.error, 4096)
     where j.id = retry.id and j.lease = retry.lease and j.run_id is null;
    return found;
end $$;
comment on function cairn.retry(bigint, bigint, double precision, text) is
    'Give a leased job back to be delivered again after delay seconds, recording the error. False if the lease no longer matches (or the job drives a workflow run: the engine schedules those).';

create or replace function cairn.fail(id bigint, lease bigint, error text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_pairs(array[id], array[lease]);
    return exists (select from cairn.settle_jobs(array[id], array[lease], null, 'dead',
                                                 coalesce(error, 'failed'), true));
end $$;
comment on function cairn.fail(bigint, bigint, text) is
    'Dead-letter a leased job with an error: it moves to cairn.archive (outcome dead), where cairn.requeue() can bring it back. A job that drives a workflow run fails the run; a job run as a step fails the step. False if the lease no longer matches.';

create or replace function cairn.extend(ids bigint[], leases bigint[], vt double precision)
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off  -- a TID scan, whatever the statistics say (header)
as $$
declare
    v_rows tid[];
begin
    perform cairn.check_pairs(ids, leases);
    perform cairn.check_seconds(vt, 'visibility timeout', 0.001, 86400);
    v_rows := cairn.lock_held(ids, leases, false);
    return query
    update cairn.jobs j
       set leased_until = cairn.now() + make_interval(secs => extend.vt)
     where j.ctid = any (v_rows)
    returning j.id;
end $$;
comment on function cairn.extend(bigint[], bigint[], double precision) is
    'Extend leases to now + vt seconds. Returns the ids still held; a missing id means the lease was lost.';

create or replace function cairn.set_vt(id bigint, lease bigint, vt double precision)
returns timestamptz
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_visible timestamptz;
begin
    perform cairn.check_pairs(array[id], array[lease]);
    perform cairn.check_seconds(vt, 'visibility timeout', 0, 86400);
    update cairn.jobs j
       set leased_until = cairn.now() + make_interval(secs => set_vt.vt)
     where j.id = set_vt.id and j.lease = set_vt.lease and j.run_id is null
    returning j.leased_until into v_visible;
    return v_visible;
end $$;
comment on function cairn.set_vt(bigint, bigint, double precision) is
    'Set a leased job''s lease to end vt seconds from now (0 gives it back at once, in its place in the queue). Returns the new end of the lease, or NULL if the lease no longer matches (or the job drives a workflow run).';

-- Give jobs back without counting the delivery (graceful shutdown). A run's
-- job may be released too: the run is picked up again from its checkpoints.
create or replace function cairn.release(ids bigint[], leases bigint[])
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off  -- a TID scan, whatever the statistics say (header)
as $$
declare
    v_rows   tid[];
    v_ids    bigint[];
    v_queues text[];
    v_queue  text;
begin
    perform cairn.check_pairs(ids, leases);
    v_rows := cairn.lock_held(ids, leases, false);
    with r as (
        update cairn.jobs j
           set visible_at   = cairn.now(),
               lease        = null,
               leased_until = null,
               attempts     = greatest(j.attempts - 1, 0)
         where j.ctid = any (v_rows)
        returning j.id, j.queue_id
    )
    select array_agg(r.id), array_agg(distinct q.name) into v_ids, v_queues
      from r join cairn.queues q on q.id = r.queue_id;
    foreach v_queue in array coalesce(v_queues, '{}') loop
        perform pg_notify('cairn', v_queue);
    end loop;
    return query select unnest(coalesce(v_ids, '{}'));
end $$;
comment on function cairn.release(bigint[], bigint[]) is
    'Make leased jobs visible again at once, uncounting the delivery. Returns the ids released.';

create or replace function cairn.delete(queue text, id bigint)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_qid integer := cairn.queue_id(queue);
begin
    perform cairn.check_not_null(id, 'id');
    if not exists (select from cairn.jobs j where j.queue_id = v_qid and j.id = delete.id) then
        return false;
    end if;
    return exists (select from cairn.settle_jobs(array[id], null, null, 'removed',
                                                 'its job was deleted by an operator', false));
end $$;
comment on function cairn.delete(text, bigint) is
    'Operator delete of a live job, leased or not (unfenced, like pgmq.delete). A workflow run driven by it fails; a step run as it fails.';

-- Put a dead letter back. A run's dead driver job revives the run (the
-- retry_run protocol); a dead step job is refused: retry its run instead.
create or replace function cairn.requeue(queue text, id bigint)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_now  timestamptz := cairn.now();
    v_qid  integer := cairn.queue_id(queue);
    v_dead record;
    v_run  record;
begin
    perform cairn.check_not_null(id, 'id');
    select a.run_id, a.parent_run, a.parent_step into v_dead
      from cairn.archive a
     where a.queue = requeue.queue and a.id = requeue.id and a.outcome = 'dead';
    if not found then
        return false;
    end if;
    if v_dead.parent_run is not null then
        raise exception 'cairn: job % ran step % of run %; requeueing it alone would not reach the run',
                        id, v_dead.parent_step, v_dead.parent_run
            using errcode = 'object_not_in_prerequisite_state',
                  hint = format('retry the run: select cairn.retry_run(%L)', v_dead.parent_run);
    end if;
    if v_dead.run_id is not null then
        select r.status, r.job_id into v_run from cairn.runs r where r.id = v_dead.run_id;
        if found and v_run.status = 'failed' and v_run.job_id = requeue.id then
            return cairn.retry_run(v_dead.run_id);
        end if;
        raise exception 'cairn: job % drove run %, which is %; there is nothing to requeue',
                        id, v_dead.run_id, coalesce(v_run.status, 'gone')
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'only the dead job of a failed run can be requeued (it revives the run, as cairn.retry_run does)';
    end if;
    with d as (
        delete from cairn.archive a
         where a.queue = requeue.queue and a.id = requeue.id and a.outcome = 'dead'
        returning a.*
    )
    insert into cairn.jobs (id, queue_id, task, payload, priority, visible_at, attempts,
                            enqueued_at, last_error)
    overriding system value
    select d.id, v_qid, d.task, d.payload, d.priority, v_now, 0, d.enqueued_at, d.last_error
      from d;
    if found then
        perform pg_notify('cairn', requeue.queue);
    end if;
    return found;
end $$;
comment on function cairn.requeue(text, bigint) is
    'Put a dead-lettered job back on its queue with a fresh attempt count. The dead job of a failed workflow run revives the run (like retry_run); a dead step job is refused (retry its run). False if no such dead letter.';

create or replace function cairn.metrics_all()
returns table (queue_name text, ready bigint, delayed bigint, in_flight bigint, dead bigint,
               completed bigint, oldest_ready_age double precision, measured_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
begin
    return query
    select q.name,
           coalesce(l.ready, 0), coalesce(l.delayed, 0), coalesce(l.in_flight, 0),
           coalesce(a.dead, 0), coalesce(a.completed, 0),
           coalesce(extract(epoch from v_now - l.oldest_ready)::double precision, 0),
           v_now
      from cairn.queues q
      left join lateral (
          -- A job is ready from the later of visible_at and the end of
          -- its lease (greatest ignores NULL).
          select count(*) filter (where greatest(j.visible_at, j.leased_until) <= v_now) as ready,
                 count(*) filter (where j.visible_at > v_now
                                    and (j.leased_until is null or j.leased_until <= v_now)) as delayed,
                 count(*) filter (where j.leased_until > v_now) as in_flight,
                 min(greatest(j.visible_at, j.leased_until))
                     filter (where greatest(j.visible_at, j.leased_until) <= v_now) as oldest_ready
            from cairn.jobs j
           where j.queue_id = q.id
      ) l on true
      left join lateral (
          select count(*) filter (where x.outcome = 'dead') as dead,
                 count(*) filter (where x.outcome = 'completed') as completed
            from cairn.archive x
           where x.queue = q.name
      ) a on true
     order by q.name;
end $$;
comment on function cairn.metrics_all() is
    'Per queue: ready, delayed, in-flight, dead-lettered and archived counts, and how long the oldest ready job has waited (seconds).';

create or replace function cairn.metrics(queue text)
returns table (queue_name text, ready bigint, delayed bigint, in_flight bigint, dead bigint,
               completed bigint, oldest_ready_age double precision, measured_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.queue_id(metrics.queue);
    return query select m.* from cairn.metrics_all() m where m.queue_name = metrics.queue;
end $$;
comment on function cairn.metrics(text) is
    'cairn.metrics_all() for one queue.';
