-- cairn: the queue API.
--
-- The model, pgmq's with fencing added:
--   * send() inserts a job, visible at now() + delay, and NOTIFYs channel
--     'cairn' with the queue name (a wake-up hint only; workers also poll).
--   * claim()/read() lease up to qty visible jobs: one statement, a
--     materialized CTE with FOR UPDATE SKIP LOCKED, so two claimers never get
--     the same row and a claim never returns more than qty rows. Each claim
--     draws a new lease token and counts an attempt on every job it returns.
--     The lease is visible_at itself: if the worker dies, the job becomes
--     claimable again when the lease runs out. No reaper is needed.
--   * Every call that settles or extends a job names (id, lease). Once the job
--     has been re-leased (or settled), the old lease matches no row and the
--     call changes nothing: it returns false / omits that id.
--   * ack deletes; archive keeps the job and its output in cairn.archive;
--     retry makes it visible again later; fail dead-letters it (kept in
--     cairn.archive, outcome 'dead', and cairn.requeue() brings it back).
--
-- Functions are SECURITY DEFINER so callers need no table privileges; see
-- 90_grants.sql for who may call what.

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

create or replace function cairn.drop_queue(queue text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_qid integer;
begin
    perform cairn.check_queue_name(queue);
    -- Lock the queue row first so a concurrent drop serializes on it.
    select q.id into v_qid from cairn.queues q where q.name = drop_queue.queue for update;
    if not found then
        return false;
    end if;
    delete from cairn.jobs j where j.queue_id = v_qid;
    delete from cairn.archive a where a.queue = drop_queue.queue;
    delete from cairn.queues q where q.id = v_qid;
    return true;
end $$;
comment on function cairn.drop_queue(text) is
    'Drop a queue with its live jobs, archive and dead letters. Returns false if it did not exist.';

create or replace function cairn.purge_queue(queue text)
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_qid   integer := cairn.queue_id(queue);
    v_count bigint;
begin
    delete from cairn.jobs j where j.queue_id = v_qid;
    get diagnostics v_count = row_count;
    return v_count;
end $$;
comment on function cairn.purge_queue(text) is
    'Delete every live job (ready, delayed or leased) of a queue; returns how many.';

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
as $$
declare
    v_now timestamptz := cairn.now();
    v_qid integer;
    v_id  bigint;
begin
    -- The hot path tests inline and calls the checks (which raise) only when
    -- a value is wrong: each call of a function with a SET clause costs.
    select q.id into v_qid from cairn.queues q where q.name = send.queue;
    if not found then
        perform cairn.queue_id(queue);
    end if;
    if payload is null or pg_column_size(payload) > 1048576 then
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

    insert into cairn.jobs (queue_id, task, payload, priority, visible_at, enqueued_at, traceparent)
    values (v_qid, coalesce(send.task, send.queue), send.payload, send.priority,
            v_now + make_interval(secs => send.delay), v_now, send.traceparent)
    returning id into v_id;

    if send.delay = 0 then
        perform pg_notify('cairn', send.queue);
    end if;
    return v_id;
end $$;
comment on function cairn.send(text, jsonb, double precision, integer, text, text) is
    'Enqueue one job; delay in seconds (0 to 10 years); lower priority runs first; task defaults to the queue name; traceparent (W3C) continues the producer''s trace. Returns the job id.';

create or replace function cairn.send_batch(
    queue    text,
    payloads jsonb[],
    delay    double precision default 0,
    priority integer default 0,
    task     text default null)
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
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
    select u.n into v_bad
      from unnest(payloads) with ordinality as u(p, n)
     where u.p is null or pg_column_size(u.p) > 1048576
     limit 1;
    if found then
        perform cairn.check_payload(payloads[v_bad], format('payloads[%s]', v_bad));
    end if;
    perform cairn.check_seconds(delay, 'delay', 0, 315360000);
    perform cairn.check_priority(priority);
    perform cairn.check_task_name(task);

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
create or replace function cairn.claim(
    queue text,
    vt    double precision,
    qty   integer,
    tasks text[] default null)
returns table (id bigint, task text, payload jsonb, attempts integer, lease bigint,
               enqueued_at timestamptz, visible_at timestamptz, parent_run uuid,
               traceparent text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now   timestamptz := cairn.now();
    v_qid   integer;
    v_lease bigint;
begin
    -- The hot path: checks are inline expressions, not calls.
    select q.id into v_qid from cairn.queues q where q.name = claim.queue;
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
    -- A claim need not survive a crash (the job would simply be claimable
    -- again), so its commit does not wait for the WAL flush.
    perform pg_catalog.set_config('synchronous_commit', 'off', true);

    return query
    with c as materialized (
        select j.id
          from cairn.jobs j
         where j.queue_id = v_qid
           and j.visible_at <= v_now
           and (claim.tasks is null or j.task = any (claim.tasks))
         order by j.priority, j.visible_at, j.id
         limit claim.qty
           for update skip locked
    )
    update cairn.jobs j
       set visible_at = v_now + make_interval(secs => claim.vt),
           attempts   = j.attempts + 1,
           lease      = v_lease
      from c
     where j.id = c.id
    returning j.id, j.task, j.payload, j.attempts, j.lease, j.enqueued_at, j.visible_at,
              j.parent_run, j.traceparent;
end $$;
comment on function cairn.claim(text, double precision, integer, text[]) is
    'Lease up to qty visible jobs for vt seconds (optionally only the given tasks). Each returned row carries the lease token that fenced calls must name, and the workflow run waiting for it, if any.';

create or replace function cairn.read(queue text, vt integer, qty integer default 1)
returns table (id bigint, task text, payload jsonb, attempts integer, lease bigint,
               enqueued_at timestamptz, visible_at timestamptz, parent_run uuid,
               traceparent text)
language sql volatile security definer
set search_path = pg_catalog, pg_temp
as $$ select * from cairn.claim(queue, vt, qty) $$;
comment on function cairn.read(text, integer, integer) is
    'pgmq-style read: lease up to qty jobs for vt seconds.';

-- Read and delete at once: at-most-once delivery, no lease.
create or replace function cairn.pop(queue text, qty integer default 1)
returns table (id bigint, task text, payload jsonb, attempts integer,
               enqueued_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
    v_qid integer := cairn.queue_id(queue);
begin
    perform cairn.check_batch(qty, 'qty', 10000);
    return query
    with c as materialized (
        select j.id
          from cairn.jobs j
         where j.queue_id = v_qid
           and j.visible_at <= v_now
         order by j.priority, j.visible_at, j.id
         limit pop.qty
           for update skip locked
    )
    delete from cairn.jobs j
     using c
     where j.id = c.id
       and (j.parent_run is null
            or cairn.settle_parent(j.parent_run, j.parent_step, 'completed', null, null))
    returning j.id, j.task, j.payload, j.attempts + 1, j.enqueued_at;
end $$;
comment on function cairn.pop(text, integer) is
    'Take up to qty visible jobs and delete them in the same statement (at-most-once).';

create or replace function cairn.ack(ids bigint[], leases bigint[])
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if ids is null or leases is null or cardinality(ids) <> cardinality(leases) then
        perform cairn.check_pairs(ids, leases);
    end if;
    return query
    delete from cairn.jobs j
     using unnest(ids, leases) as u(id, lease)
     where j.id = u.id and j.lease = u.lease
       and (j.parent_run is null
            or cairn.settle_parent(j.parent_run, j.parent_step, 'completed', null, null))
    returning j.id;
end $$;
comment on function cairn.ack(bigint[], bigint[]) is
    'Complete (delete) leased jobs. Returns the ids whose lease still matched; the others were re-leased or settled and are left alone.';

-- With outputs: a job run as a workflow step hands its output to the step.
create or replace function cairn.ack(ids bigint[], leases bigint[], outputs jsonb[])
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_pairs(ids, leases);
    perform cairn.check_outputs(ids, coalesce(outputs, '{}'));
    return query
    delete from cairn.jobs j
     using unnest(ids, leases, outputs) as u(id, lease, output)
     where j.id = u.id and j.lease = u.lease
       and (j.parent_run is null
            or cairn.settle_parent(j.parent_run, j.parent_step, 'completed', u.output, null))
    returning j.id;
end $$;
comment on function cairn.ack(bigint[], bigint[], jsonb[]) is
    'Complete leased jobs with their outputs, which go to the workflow step a job was run for.';

create or replace function cairn.ack(id bigint, lease bigint)
returns boolean
language sql volatile security definer
set search_path = pg_catalog, pg_temp
as $$ select exists (select from cairn.ack(array[id], array[lease])) $$;
comment on function cairn.ack(bigint, bigint) is
    'Complete (delete) one leased job; false if the lease no longer matches.';

create or replace function cairn.archive(ids bigint[], leases bigint[], outputs jsonb[] default null)
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
begin
    perform cairn.check_pairs(ids, leases);
    perform cairn.check_outputs(ids, outputs);
    return query
    with d as (
        delete from cairn.jobs j
         using unnest(ids, leases, coalesce(outputs, array_fill(null::jsonb, array[cardinality(ids)])))
               as u(id, lease, output)
         where j.id = u.id and j.lease = u.lease
           and (j.parent_run is null
                or cairn.settle_parent(j.parent_run, j.parent_step, 'completed', u.output, null))
        returning j.*, u.output
    )
    insert into cairn.archive as a (id, queue, task, payload, priority, attempts, enqueued_at,
                                    archived_at, outcome, output, last_error)
    select d.id, q.name, d.task, d.payload, d.priority, d.attempts, d.enqueued_at,
           v_now, 'completed', d.output, d.last_error
      from d join cairn.queues q on q.id = d.queue_id
    returning a.id;
end $$;
comment on function cairn.archive(bigint[], bigint[], jsonb[]) is
    'Complete leased jobs and keep them, with their outputs, in cairn.archive. Returns the ids whose lease still matched.';

create or replace function cairn.archive(id bigint, lease bigint, output jsonb default null)
returns boolean
language sql volatile security definer
set search_path = pg_catalog, pg_temp
as $$ select exists (select from cairn.archive(array[id], array[lease], array[output])) $$;
comment on function cairn.archive(bigint, bigint, jsonb) is
    'Complete one leased job and keep it in cairn.archive; false if the lease no longer matches.';

create or replace function cairn.retry(id bigint, lease bigint, delay double precision, error text default null)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_seconds(delay, 'delay', 0, 315360000);
    update cairn.jobs j
       set visible_at = cairn.now() + make_interval(secs => retry.delay),
           lease      = null,
           last_error = left(retry.error, 4096)
     where j.id = retry.id and j.lease = retry.lease;
    return found;
end $$;
comment on function cairn.retry(bigint, bigint, double precision, text) is
    'Give a leased job back to be delivered again after delay seconds, recording the error. False if the lease no longer matches.';

create or replace function cairn.fail(id bigint, lease bigint, error text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    with d as (
        delete from cairn.jobs j
         where j.id = fail.id and j.lease = fail.lease
           and (j.parent_run is null
                or cairn.settle_parent(j.parent_run, j.parent_step, 'failed', null, fail.error))
        returning j.*
    )
    insert into cairn.archive (id, queue, task, payload, priority, attempts, enqueued_at,
                               archived_at, outcome, last_error)
    select d.id, q.name, d.task, d.payload, d.priority, d.attempts, d.enqueued_at,
           cairn.now(), 'dead', left(fail.error, 4096)
      from d join cairn.queues q on q.id = d.queue_id;
    return found;
end $$;
comment on function cairn.fail(bigint, bigint, text) is
    'Dead-letter a leased job with an error: it moves to cairn.archive (outcome dead), where cairn.requeue() can bring it back. False if the lease no longer matches.';

create or replace function cairn.extend(ids bigint[], leases bigint[], vt double precision)
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_pairs(ids, leases);
    perform cairn.check_seconds(vt, 'visibility timeout', 0.001, 86400);
    -- Losing an extension in a crash is harmless: the crash ended the lease.
    perform pg_catalog.set_config('synchronous_commit', 'off', true);
    return query
    update cairn.jobs j
       set visible_at = cairn.now() + make_interval(secs => extend.vt)
      from unnest(ids, leases) as u(id, lease)
     where j.id = u.id and j.lease = u.lease
    returning j.id;
end $$;
comment on function cairn.extend(bigint[], bigint[], double precision) is
    'Extend leases to now + vt seconds. Returns the ids still held; a missing id means the lease was lost.';

create or replace function cairn.set_vt(id bigint, lease bigint, vt double precision)
returns timestamptz
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_visible timestamptz;
begin
    perform cairn.check_seconds(vt, 'visibility timeout', 0, 86400);
    update cairn.jobs j
       set visible_at = cairn.now() + make_interval(secs => set_vt.vt)
     where j.id = set_vt.id and j.lease = set_vt.lease
    returning j.visible_at into v_visible;
    return v_visible;
end $$;
comment on function cairn.set_vt(bigint, bigint, double precision) is
    'Set a leased job to become visible vt seconds from now (0 gives it back at once). Returns the new visible_at, or NULL if the lease no longer matches.';

-- Give jobs back without counting the delivery (graceful shutdown).
create or replace function cairn.release(ids bigint[], leases bigint[])
returns setof bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_ids    bigint[];
    v_queues text[];
    v_queue  text;
begin
    perform cairn.check_pairs(ids, leases);
    with r as (
        update cairn.jobs j
           set visible_at = cairn.now(),
               lease      = null,
               attempts   = greatest(j.attempts - 1, 0)
          from unnest(ids, leases) as u(id, lease)
         where j.id = u.id and j.lease = u.lease
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
as $$
declare
    v_qid integer := cairn.queue_id(queue);
    v_id  bigint := id;
begin
    delete from cairn.jobs j where j.queue_id = v_qid and j.id = v_id;
    return found;
end $$;
comment on function cairn.delete(text, bigint) is
    'Operator delete of a live job, leased or not (unfenced, like pgmq.delete).';

create or replace function cairn.requeue(queue text, id bigint)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
    v_qid integer := cairn.queue_id(queue);
begin
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
    'Put a dead-lettered job back on its queue with a fresh attempt count. False if no such dead letter.';

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
          select count(*) filter (where j.visible_at <= v_now) as ready,
                 count(*) filter (where j.visible_at > v_now and j.lease is null) as delayed,
                 count(*) filter (where j.visible_at > v_now and j.lease is not null) as in_flight,
                 min(j.visible_at) filter (where j.visible_at <= v_now) as oldest_ready
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
