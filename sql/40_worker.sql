-- cairn: the worker's side of the run engine.
--
-- Who calls it: workers (cairn_worker), one call per durable fact. A worker
-- that claims a run's job calls load_run, then replays the workflow function
-- from the start: each durable call it reaches is looked up in the
-- checkpoints load_run returned; a completed one returns its recorded output,
-- a new one is recorded here. A step is begun with begin_step (recorded
-- before its handler runs, so a step cut short by a crash is counted and no
-- step starts after a cancel) and its outcome rides on the execution's next
-- call (its outbox, `done`): the next begin_step, or the suspend, completion
-- or failure of the run — one round trip per step. record_steps flushes the
-- outbox when nothing else is about to.
--
-- Every call names the run, its job and the job's lease (fencing): hold_run
-- refuses a job that is not the run's job, or a lease that has run out or
-- passed to another worker, and the call then changes nothing (no row, or
-- false). Outcomes in `done` that conflict with what another writer
-- recorded raise CA001: the worker must replay. Lock order: see
-- 20_run_engine.sql.
--
-- Batches. The three calls every run makes, load_run, begin_step and
-- complete_run, also come as load_runs, begin_steps and complete_runs: the
-- same calls for several runs (parallel arrays, the n-th element of each
-- one call) in one transaction, so the runs a worker executes at once share
-- one round trip, one commit and one WAL flush. Each call is answered as it
-- would be alone, in rows tagged with its position n. The common case is
-- done for all calls at once, a statement each (lock the runs, write the
-- outboxes, insert the steps, end the runs); the rest one by one. A batch
-- never waits for a run's lock: it takes the runs' rows with SKIP LOCKED,
-- and answers 'busy' for a run that another transaction holds (a cancel, a
-- signal, a child's end) and for what needs more than the run's own row (a
-- child run's completion locks its ancestors first); the worker makes those
-- calls alone, and they wait as they always did. So a batch keeps rank 1 of
-- the lock order by never waiting there, whatever order its runs come in.
-- The jobs it locks it locks in id order (complete_runs deletes them in one
-- statement; a job load_runs refuses is taken in the order given, and the
-- worker sends calls in job id order). A conflict (CA001) rolls back the
-- whole batch: the worker then makes its calls alone, to learn which.

create or replace function cairn.register_workflow(workflow text, queue text)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
begin
    perform cairn.check_not_null(workflow, 'workflow name');
    perform cairn.check_task_name(workflow);
    if exists (select from cairn.flows f where f.name = register_workflow.workflow) then
        raise exception 'cairn: "%" is a flow; a code-first workflow needs another name', workflow
            using errcode = 'duplicate_object';
    end if;
    if exists (select from cairn.step_handlers h where h.name = register_workflow.workflow) then
        raise exception 'cairn: "%" is a step handler; a workflow needs another name', workflow
            using errcode = 'duplicate_object';
    end if;
    insert into cairn.workflows (name, queue_id)
    values (register_workflow.workflow, cairn.queue_id(queue))
    on conflict (name) do update set queue_id = excluded.queue_id, registered_at = pg_catalog.now();
end $$;
comment on function cairn.register_workflow(text, text) is
    'Announce a workflow and its default queue (App::initialize and workers do this).';

-- The run's state for a replay: a first row with the run (refused, workflow,
-- input, the database time, created_at, traceparent), then a row per
-- checkpoint. No row if the lease no longer holds the job. A job that is not
-- the run's job (sent by hand with a workflow's name, or left over) is
-- dead-lettered, and the row says why in `refused`. Locks: the run (rank 1),
-- then the job if it is dead-lettered (rank 2).
create or replace function cairn.load_run(run_id uuid, job_id bigint, lease bigint)
returns table (refused text, workflow text, input jsonb, db_now timestamptz,
               created_at timestamptz, traceparent text, key text, seq integer, kind text,
               status text, output jsonb, error text, attempts integer, wake_at timestamptz,
               fingerprint text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_run cairn.runs;
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    select * into v_run from cairn.runs r where r.id = load_run.run_id for no key update;
    return query select * from cairn.load_held(run_id, v_run, job_id, lease, cairn.now());
end $$;
comment on function cairn.load_run(uuid, bigint, bigint) is
    'Worker: begin an execution of a run: its input, the database time and its checkpoints.';

-- load_run for several runs at once (see "Batches" above): the rows of each
-- call tagged with its position n, or a single 'busy' row (in `refused`)
-- for a run another transaction holds locked. Locks: each run FOR NO KEY
-- UPDATE SKIP LOCKED, then, for a job it refuses, that job.
create or replace function cairn.load_runs(run_ids uuid[], job_ids bigint[], leases bigint[])
returns table (n integer, refused text, workflow text, input jsonb, db_now timestamptz,
               created_at timestamptz, traceparent text, key text, seq integer, kind text,
               status text, output jsonb, error text, attempts integer, wake_at timestamptz,
               fingerprint text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now    timestamptz := cairn.now();
    v_n      integer := cairn.check_calls(run_ids, job_ids, leases);
    v_locked integer[];
    v_plain  integer[];
    v_run    cairn.runs;
    i        integer;
begin
    -- Every run FOR NO KEY UPDATE SKIP LOCKED, in one statement; plain: the
    -- run's own job, leased to the caller, and the run not ended.
    select coalesce(array_agg(u.n), '{}'),
           coalesce(array_agg(u.n) filter (
               where r.job_id = u.job and r.status not in ('completed', 'failed', 'cancelled')
                 and exists (select from cairn.jobs j
                              where j.id = u.job and j.lease = u.lease and j.run_id = u.run
                                and j.leased_until > v_now)), '{}')
      into v_locked, v_plain
      from unnest(run_ids, job_ids, leases) with ordinality as u(run, job, lease, n)
     cross join lateral (select r.job_id, r.status from cairn.runs r
                          where r.id = u.run
                            for no key update of r skip locked) r;
    return query
    select o.* from cairn.open_runs(run_ids, v_plain, v_now) o;
    -- The rest one by one: busy, refused or lost.
    for i in select u.n from generate_series(1, v_n) as u(n) where u.n <> all (v_plain) loop
        if i <> all (v_locked) and exists (select from cairn.runs r where r.id = run_ids[i]) then
            return query select i, 'busy', null::text, null::jsonb, null::timestamptz,
                                null::timestamptz, null::text, null::text, null::integer,
                                null::text, null::text, null::jsonb, null::text, null::integer,
                                null::timestamptz, null::text;
            continue;
        end if;
        -- Locked by this transaction already, if it exists.
        select * into v_run from cairn.runs r where r.id = run_ids[i];
        return query select i, l.* from cairn.load_held(run_ids[i], v_run, job_ids[i], leases[i], v_now) l;
    end loop;
end $$;
comment on function cairn.load_runs(uuid[], bigint[], bigint[]) is
    'Worker: load_run for several runs in one transaction; rows tagged with each call''s position, ''busy'' in refused for a run locked elsewhere (call load_run for it).';

-- Internal: load_run once the run's row is locked FOR NO KEY UPDATE
-- (`locked`; NULLs if there is no such run).
create or replace function cairn.load_held(run_id uuid, locked cairn.runs, job_id bigint,
                                           lease bigint, at timestamptz)
returns table (refused text, workflow text, input jsonb, db_now timestamptz,
               created_at timestamptz, traceparent text, key text, seq integer, kind text,
               status text, output jsonb, error text, attempts integer, wake_at timestamptz,
               fingerprint text)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_job    record;
    v_reason text;
begin
    select j.lease, j.run_id, j.leased_until into v_job from cairn.jobs j where j.id = load_held.job_id;
    if not found or v_job.lease is distinct from load_held.lease
       or v_job.leased_until is null or v_job.leased_until <= at then
        return;
    end if;
    if v_job.run_id is distinct from load_held.run_id or locked.id is null then
        v_reason := format('job %s is not the job of run %s: a run''s job is made by the run engine only',
                           job_id, run_id);
    elsif locked.job_id is distinct from load_held.job_id then
        v_reason := format('job %s no longer drives run %s', job_id, run_id);
    elsif locked.status in ('completed', 'failed', 'cancelled') then
        v_reason := format('run %s is already %s', run_id, locked.status);
    end if;
    if v_reason is not null then
        -- Not the run's job: dead-letter it alone (the run is not its to move).
        with d as (
            delete from cairn.jobs j where j.id = load_held.job_id and j.lease = load_held.lease
            returning j.*
        )
        insert into cairn.archive (id, queue, task, payload, priority, attempts, enqueued_at,
                                   archived_at, outcome, last_error, run_id, parent_run, parent_step)
        select d.id, q.name, d.task, d.payload, d.priority, d.attempts, d.enqueued_at, at,
               'dead', v_reason, d.run_id, d.parent_run, d.parent_step
          from d join cairn.queues q on q.id = d.queue_id;
        return query select v_reason, null::text, null::jsonb, at, null::timestamptz, null::text,
                            null::text, null::integer, null::text, null::text, null::jsonb,
                            null::text, null::integer, null::timestamptz, null::text;
        return;
    end if;
    return query
    select o.refused, o.workflow, o.input, o.db_now, o.created_at, o.traceparent, o.key, o.seq,
           o.kind, o.status, o.output, o.error, o.attempts, o.wake_at, o.fingerprint
      from cairn.open_runs(array[run_id], '{1}', at) o;
end $$;

-- Internal: an execution of each run at `positions` (of `run_ids`) begins:
-- runs that are held FOR NO KEY UPDATE, driven by the caller's job and not
-- ended. Each becomes 'running' (a 'resumed' event when it was waiting,
-- sleeping, or running in an execution that never reported back), and its
-- rows are returned tagged with its position: the run's (workflow, input,
-- the database time, created_at, traceparent), then a row per checkpoint.
create or replace function cairn.open_runs(run_ids uuid[], positions integer[], at timestamptz)
returns table (n integer, refused text, workflow text, input jsonb, db_now timestamptz,
               created_at timestamptz, traceparent text, key text, seq integer, kind text,
               status text, output jsonb, error text, attempts integer, wake_at timestamptz,
               fingerprint text)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set plan_cache_mode = force_generic_plan
as $$
begin
    if cardinality(positions) = 0 then
        return;
    end if;
    -- Each lookup is a lateral subquery kept apart (offset 0), so that it
    -- is a probe per position, whatever the statistics say: planned on
    -- empty tables, a plain join read every run.
    insert into cairn.run_events (run_id, at, event, detail)
    select r.id, open_runs.at, 'resumed', jsonb_build_object('from', r.status)
      from unnest(positions) as p(n)
     cross join lateral (select r.id, r.status from cairn.runs r
                          where r.id = run_ids[p.n] offset 0) r
     where r.status in ('sleeping', 'waiting', 'running');
    return query
    with o as (
        update cairn.runs r
           set status = 'running', started_at = coalesce(r.started_at, open_runs.at),
               updated_at = open_runs.at, wake_pending = false
          from (select p.n, x.ctid
                  from unnest(positions) as p(n)
                 cross join lateral (select r.ctid from cairn.runs r
                                      where r.id = run_ids[p.n] offset 0) x) t
         where r.ctid = t.ctid
        returning t.n, r.id, r.workflow, r.input, r.created_at, r.traceparent
    )
    select x.n::integer, null::text, x.workflow, x.input, x.db_now, x.created_at, x.traceparent,
           x.key, x.seq, x.kind, x.status, x.output, x.error, x.attempts, x.wake_at, x.fingerprint
      from (select o.n, -1 as seq_order, o.workflow, o.input, open_runs.at as db_now,
                   o.created_at, o.traceparent, null::text as key, null::integer as seq,
                   null::text as kind, null::text as status, null::jsonb as output,
                   null::text as error, null::integer as attempts, null::timestamptz as wake_at,
                   null::text as fingerprint
              from o
            union all
            select o.n, s.seq, null, null, null, null, null, s.key, s.seq, s.kind, s.status,
                   s.output, s.error, s.attempts, s.wake_at, s.fingerprint
              from o cross join lateral (select s.* from cairn.steps s
                                          where s.run_id = o.id offset 0) s) x
     order by x.n, x.seq_order;
end $$;

-- Begin an attempt of the inline step `key`, after writing the outbox.
-- Returns (outcome, attempt, output, error): 'started' with the attempt's
-- number; 'completed' or 'failed' with the recorded outcome (another writer
-- settled it: use that, run nothing); 'mismatch' if the key was recorded
-- with another input fingerprint. No row if the lease no longer holds. The
-- run is held FOR SHARE until commit, so a cancel_run either commits first
-- (and this finds no job) or waits for the attempt to be recorded.
create or replace function cairn.begin_step(
    run_id      uuid,
    job_id      bigint,
    lease       bigint,
    done        jsonb,
    key         text,
    seq         integer,
    fingerprint text,
    input       jsonb)
returns table (outcome text, attempt integer, output jsonb, error text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now timestamptz := cairn.now();
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    -- hold_run(.., 'share'), inline on this hot path: the run FOR SHARE,
    -- then the lease.
    perform from cairn.runs r
     where r.id = begin_step.run_id and r.job_id = begin_step.job_id
       for share;
    if not found or not exists (select from cairn.jobs j
                                 where j.id = begin_step.job_id and j.lease = begin_step.lease
                                   and j.leased_until > v_now) then
        return;
    end if;
    return query
    select b.outcome, b.attempt, b.output, b.error
      from cairn.begin_held(run_id, done, key, seq, fingerprint, input, v_now) b;
end $$;
comment on function cairn.begin_step(uuid, bigint, bigint, jsonb, text, integer, text, jsonb) is
    'Worker: record the outbox, then begin an attempt of an inline step (or learn its recorded outcome).';

-- begin_step for several runs at once, in one transaction: the n-th element
-- of each array is one call. A worker sends the begins its executions make
-- at the same moment together, so they share one round trip, one commit and
-- one flush (see "Batches" above). Returns a row per call that began or
-- learned its outcome, tagged with its position n; none for a call whose
-- lease no longer holds; 'busy' for a call whose run another transaction
-- holds locked. Locks: each run FOR SHARE SKIP LOCKED.
create or replace function cairn.begin_steps(
    run_ids      uuid[],
    job_ids      bigint[],
    leases       bigint[],
    dones        jsonb[],
    keys         text[],
    seqs         integer[],
    fingerprints text[],
    inputs       jsonb[])
returns table (n integer, outcome text, attempt integer, output jsonb, error text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now    timestamptz := cairn.now();
    v_n      integer := cairn.check_calls(run_ids, job_ids, leases);
    v_locked   integer[];
    v_held     integer[];
    v_fresh    integer[];
    v_new      integer[];
    v_count    integer;
    v_inserted text[];
    i          integer;
begin
    if dones is null or array_position(dones, null) is not null
       or keys is null or array_position(keys, null) is not null
       or seqs is null or array_position(seqs, null) is not null
       or fingerprints is null or inputs is null or array_position(inputs, null) is not null then
        raise exception 'cairn: outboxes, keys, positions and inputs must not be NULL (nor hold NULLs)'
            using errcode = 'null_value_not_allowed';
    end if;
    if cardinality(dones) <> v_n or cardinality(keys) <> v_n or cardinality(seqs) <> v_n
       or cardinality(fingerprints) <> v_n or cardinality(inputs) <> v_n then
        raise exception 'cairn: the arrays of begin_steps must all have % elements, one per call', v_n
            using errcode = 'invalid_parameter_value';
    end if;
    -- Every run FOR SHARE SKIP LOCKED, and the leases, in one statement.
    select coalesce(array_agg(u.n), '{}'),
           coalesce(array_agg(u.n) filter (where exists (
               select from cairn.jobs j
                where j.id = u.job and j.lease = u.lease and j.leased_until > v_now)), '{}')
      into v_locked, v_held
      from unnest(run_ids, job_ids, leases) with ordinality as u(run, job, lease, n)
     cross join lateral (select from cairn.runs r
                          where r.id = u.run and r.job_id = u.job
                            for share of r skip locked) r;
    if cardinality(v_locked) < v_n then
        -- Held elsewhere: busy. (A probe per position, kept apart.)
        return query
        select u.n::integer, 'busy'::text, null::integer, null::jsonb, null::text
          from unnest(run_ids, job_ids) with ordinality as u(run, job, n)
         cross join lateral (select from cairn.runs r
                              where r.id = u.run and r.job_id = u.job offset 0) r
         where u.n <> all (v_locked);
    end if;
    if cardinality(v_held) = 0 then
        return;
    end if;
    perform cairn.record_batch_outcomes(run_ids, dones, v_held, v_now);
    -- First attempts, the common case: one insert for all.
    select coalesce(array_agg(u.n), '{}') into v_fresh
      from unnest(v_held) as u(n)
     where pg_column_size(inputs[u.n]) <= 1048576;
    with i as (
        insert into cairn.steps (run_id, key, seq, kind, status, input, fingerprint, attempts,
                                 started_at)
        select run_ids[f.n], keys[f.n], seqs[f.n], 'step', 'running', inputs[f.n],
               fingerprints[f.n], 1, v_now
          from unnest(v_fresh) as f(n)
        on conflict on constraint steps_pkey do nothing
        returning run_id, key
    )
    select count(*), array_agg(i.run_id::text || ' ' || i.key) into v_count, v_inserted from i;
    if v_count = cardinality(v_fresh) then
        v_new := v_fresh;
    else
        select coalesce(array_agg(f.n), '{}') into v_new
          from unnest(v_fresh) as f(n)
         where run_ids[f.n]::text || ' ' || keys[f.n] = any (v_inserted);
    end if;
    return query
    select u.n, 'started'::text, 1, null::jsonb, null::text
      from unnest(v_new) as u(n);
    -- The rest one by one: a retry, a replay, an input too large.
    for i in select u.n from unnest(v_held) as u(n) where u.n <> all (v_new) loop
        return query
        select i, b.outcome, b.attempt, b.output, b.error
          from cairn.begin_held(run_ids[i], '[]', keys[i], seqs[i], fingerprints[i], inputs[i],
                                v_now) b;
    end loop;
end $$;
comment on function cairn.begin_steps(uuid[], bigint[], bigint[], jsonb[], text[], integer[], text[], jsonb[]) is
    'Worker: begin_step for several runs in one transaction; rows tagged with each call''s position, ''busy'' for a run locked elsewhere (call begin_step for it).';

-- Internal: begin_step once its run is held FOR SHARE and its lease checked:
-- write the outbox, then record the attempt (or return the recorded outcome).
create or replace function cairn.begin_held(
    run_id      uuid,
    done        jsonb,
    key         text,
    seq         integer,
    fingerprint text,
    input       jsonb,
    at          timestamptz)
returns table (outcome text, attempt integer, output jsonb, error text)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_step    record;
    v_problem text;
begin
    if done <> '[]' then
        perform cairn.record_outcomes(run_id, done, at);
    end if;
    -- The first attempt, the common case: one insert.
    if pg_column_size(input) > 1048576 then
        v_problem := format('the input is %s bytes, above the 1 MiB limit', pg_column_size(input));
    end if;
    insert into cairn.steps (run_id, key, seq, kind, status, input, fingerprint, attempts,
                             started_at, error, finished_at)
    values (begin_held.run_id, begin_held.key, begin_held.seq, 'step',
            case when v_problem is null then 'running' else 'failed' end,
            case when v_problem is null then begin_held.input end,
            begin_held.fingerprint, 1, at, v_problem,
            case when v_problem is not null then at end)
    on conflict on constraint steps_pkey do nothing;
    if found then
        if v_problem is null then
            return query select 'started', 1, null::jsonb, null::text;
            return;
        end if;
        insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error)
        values (begin_held.run_id, at, at, 'attempt', begin_held.key, 1, 'failed', v_problem);
        return query select 'failed', 1, null::jsonb, v_problem;
        return;
    end if;
    -- Recorded before: a retry, a replay after a crash, or another writer.
    select s.status, s.attempts, s.started_at, s.output, s.error, s.fingerprint into v_step
      from cairn.steps s
     where s.run_id = begin_held.run_id and s.key = begin_held.key
       for update;
    -- Checkpoints recorded before fingerprints existed (NULL) are trusted.
    if v_step.fingerprint <> begin_held.fingerprint then
        return query select 'mismatch', v_step.attempts, null::jsonb, null::text;
        return;
    end if;
    if v_step.status in ('completed', 'failed') then
        return query select v_step.status, v_step.attempts, v_step.output, v_step.error;
        return;
    end if;
    if v_step.status = 'running' then
        -- The attempt that began it never ended: its worker was lost.
        insert into cairn.run_events (run_id, at, event, step, attempt, outcome, error)
        values (begin_held.run_id, v_step.started_at, 'attempt', begin_held.key, v_step.attempts,
                'lost', 'cut short: the worker running it was lost');
    end if;
    update cairn.steps s
       set status = 'running', attempts = s.attempts + 1, started_at = at,
           finished_at = null, error = null, wake_at = null
     where s.run_id = begin_held.run_id and s.key = begin_held.key;
    return query select 'started', v_step.attempts + 1, null::jsonb, null::text;
end $$;

-- Write the outbox when no other call is about to carry it. True if written;
-- false if the lease no longer holds.
create or replace function cairn.record_steps(run_id uuid, job_id bigint, lease bigint, done jsonb)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now timestamptz := cairn.now();
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    if cairn.hold_run(run_id, job_id, lease, 'share', v_now) is null then
        return false;
    end if;
    if done <> '[]' then
        perform cairn.record_outcomes(run_id, done, v_now);
    end if;
    return true;
end $$;
comment on function cairn.record_steps(uuid, bigint, bigint, jsonb) is
    'Worker: record the outcomes of finished steps.';

-- A durable sleep (or a timestamp recorded once): the first call records the
-- wake time; returns it, and whether it has passed.
create or replace function cairn.sleep_step(
    run_id  uuid,
    job_id  bigint,
    lease   bigint,
    done    jsonb,
    key     text,
    seq     integer,
    seconds double precision)
returns table (wake_at timestamptz, passed boolean)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now  timestamptz := cairn.now();
    v_wake timestamptz;
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    perform cairn.check_seconds(seconds, 'sleep', 0, 315360000);
    if cairn.hold_run(run_id, job_id, lease, 'share', v_now) is null then
        return;
    end if;
    if sleep_step.done <> '[]' then
        perform cairn.record_outcomes(run_id, sleep_step.done, v_now);
    end if;
    insert into cairn.steps as s (run_id, key, seq, kind, status, wake_at, started_at)
    values (sleep_step.run_id, sleep_step.key, sleep_step.seq, 'sleep', 'waiting',
            v_now + make_interval(secs => sleep_step.seconds), v_now)
    on conflict on constraint steps_pkey do nothing;
    select s.wake_at into v_wake from cairn.steps s
     where s.run_id = sleep_step.run_id and s.key = sleep_step.key;
    if v_wake <= v_now then
        update cairn.steps s set status = 'completed', finished_at = coalesce(s.finished_at, v_now)
         where s.run_id = sleep_step.run_id and s.key = sleep_step.key;
        return query select v_wake, true;
    else
        return query select v_wake, false;
    end if;
end $$;
comment on function cairn.sleep_step(uuid, bigint, bigint, jsonb, text, integer, double precision) is
    'Worker: record a durable sleep; returns its wake time and whether it has passed.';

-- Wait for a signal: consume the oldest pending one with that name, or record
-- the wait (with its deadline). Output: {"payload": …} or {"timeout": true};
-- settled is false while the run must wait.
create or replace function cairn.await_signal(
    run_id  uuid,
    job_id  bigint,
    lease   bigint,
    done    jsonb,
    key     text,
    seq     integer,
    name    text,
    timeout double precision)
returns table (settled boolean, output jsonb, wake_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now    timestamptz := cairn.now();
    v_step   record;
    v_signal record;
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    if timeout is not null then
        perform cairn.check_seconds(timeout, 'signal timeout', 0, 315360000);
    end if;
    if cairn.hold_run(run_id, job_id, lease, 'share', v_now) is null then
        return;
    end if;
    if await_signal.done <> '[]' then
        perform cairn.record_outcomes(run_id, await_signal.done, v_now);
    end if;
    select s.status, s.output, s.wake_at into v_step from cairn.steps s
     where s.run_id = await_signal.run_id and s.key = await_signal.key;
    if found and v_step.status = 'completed' then
        return query select true, v_step.output, v_step.wake_at;
        return;
    end if;

    select g.id, g.payload into v_signal from cairn.signals g
     where g.run_id = await_signal.run_id and g.name = await_signal.name and g.consumed_by is null
     order by g.id limit 1
       for update;
    if found then
        update cairn.signals g set consumed_by = await_signal.key where g.id = v_signal.id;
        insert into cairn.steps as s (run_id, key, seq, kind, status, input, output,
                                      started_at, finished_at, attempts)
        values (await_signal.run_id, await_signal.key, await_signal.seq, 'signal', 'completed',
                to_jsonb(await_signal.name), jsonb_build_object('payload', v_signal.payload),
                v_now, v_now, 1)
        on conflict on constraint steps_pkey do update
           set status = 'completed', output = excluded.output, finished_at = v_now;
        return query select true, jsonb_build_object('payload', v_signal.payload), null::timestamptz;
        return;
    end if;

    if v_step is null then
        insert into cairn.steps (run_id, key, seq, kind, status, input, wake_at, started_at, attempts)
        values (await_signal.run_id, await_signal.key, await_signal.seq, 'signal', 'waiting',
                to_jsonb(await_signal.name),
                v_now + make_interval(secs => await_signal.timeout), v_now, 1);
        select s.status, s.output, s.wake_at into v_step from cairn.steps s
         where s.run_id = await_signal.run_id and s.key = await_signal.key;
    end if;
    if v_step.wake_at is not null and v_step.wake_at <= v_now then
        update cairn.steps s
           set status = 'completed', output = '{"timeout": true}', finished_at = v_now
         where s.run_id = await_signal.run_id and s.key = await_signal.key;
        return query select true, '{"timeout": true}'::jsonb, v_step.wake_at;
        return;
    end if;
    return query select false, null::jsonb, v_step.wake_at;
end $$;
comment on function cairn.await_signal(uuid, bigint, bigint, jsonb, text, integer, text, double precision) is
    'Worker: consume a pending signal of that name, or record the wait.';

-- Internal: the recorded outcome of a step that starts something once (a
-- child run, a step job): (outcome, output, error), outcome 'completed',
-- 'failed', 'waiting' or 'mismatch' (recorded with another input
-- fingerprint); no row if the step is not recorded.
create or replace function cairn.recorded_outcome(run_id uuid, key text, fingerprint text)
returns table (outcome text, output jsonb, error text)
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
begin
    return query
    select case when s.fingerprint <> recorded_outcome.fingerprint then 'mismatch'
                else s.status end,
           s.output, s.error
      from cairn.steps s
     where s.run_id = recorded_outcome.run_id and s.key = recorded_outcome.key;
end $$;

-- Internal: record the step `key` that starts a child run or a step job:
-- 'waiting' while that runs, or 'failed' at once with `problem` (its attempt
-- goes to the history). Returns (outcome, output, error) for the worker.
create or replace function cairn.open_step(
    run_id      uuid,
    key         text,
    seq         integer,
    kind        text,
    input       jsonb,
    fingerprint text,
    at          timestamptz,
    problem     text)
returns table (outcome text, output jsonb, error text)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    insert into cairn.steps (run_id, key, seq, kind, status, input, error, fingerprint, attempts,
                             started_at, finished_at)
    values (open_step.run_id, open_step.key, open_step.seq, open_step.kind,
            case when problem is null then 'waiting' else 'failed' end, open_step.input, problem,
            open_step.fingerprint, 1, open_step.at,
            case when problem is not null then open_step.at end);
    if problem is null then
        return query select 'waiting', null::jsonb, null::text;
        return;
    end if;
    insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error)
    values (open_step.run_id, open_step.at, open_step.at, 'attempt', open_step.key, 1, 'failed',
            problem);
    return query select 'failed', null::jsonb, problem;
end $$;

-- Start a child run for the parent's step `key` (once: a replay finds the
-- step and reports it). Returns (outcome, output, error), outcome as for
-- recorded_outcome; 'waiting' while the child runs. An unknown workflow
-- fails the step, not the call.
create or replace function cairn.start_child(
    run_id      uuid,
    job_id      bigint,
    lease       bigint,
    done        jsonb,
    key         text,
    seq         integer,
    fingerprint text,
    workflow    text,
    input       jsonb)
returns table (outcome text, output jsonb, error text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_parent  cairn.runs;
    v_qid     integer;
    v_child   uuid;
    v_problem text;
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    v_parent := cairn.hold_run(run_id, job_id, lease, 'share', v_now);
    if v_parent is null then
        return;
    end if;
    if start_child.done <> '[]' then
        perform cairn.record_outcomes(run_id, start_child.done, v_now);
    end if;
    return query select * from cairn.recorded_outcome(run_id, key, fingerprint);
    if found then
        return;
    end if;
    select w.queue_id into v_qid from cairn.workflows w where w.name = start_child.workflow;
    v_problem := case when not found then format('unknown workflow "%s"', workflow)
                      else 'the child''s input ' || cairn.json_problem(coalesce(input, 'null')) end;
    if v_problem is null then
        v_child := cairn.create_run(workflow, v_qid, input, null, v_parent.priority, v_now,
                                    v_parent.traceparent, run_id, key);
    end if;
    return query
    select * from cairn.open_step(
        run_id, key, seq, 'child',
        jsonb_strip_nulls(jsonb_build_object('workflow', start_child.workflow, 'run', v_child,
                                             'input', case when v_problem is null then input end)),
        fingerprint, v_now, v_problem);
end $$;
comment on function cairn.start_child(uuid, bigint, bigint, jsonb, text, integer, text, text, jsonb) is
    'Worker: start a child run for a step (once), or report the step''s recorded outcome.';

-- Run the parent's step `key` as a job of `task` on `queue`, on any worker
-- serving it; its ack (with the output) or dead letter settles the step. The
-- queue is created if it does not exist yet: the job waits for its workers.
create or replace function cairn.start_task_step(
    run_id      uuid,
    job_id      bigint,
    lease       bigint,
    done        jsonb,
    key         text,
    seq         integer,
    fingerprint text,
    queue       text,
    task        text,
    payload     jsonb)
returns table (outcome text, output jsonb, error text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_run     cairn.runs;
    v_problem text;
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    v_run := cairn.hold_run(run_id, job_id, lease, 'share', v_now);
    if v_run is null then
        return;
    end if;
    if start_task_step.done <> '[]' then
        perform cairn.record_outcomes(run_id, start_task_step.done, v_now);
    end if;
    return query select * from cairn.recorded_outcome(run_id, key, fingerprint);
    if found then
        return;
    end if;
    v_problem := case
        when queue is null or queue !~ '^[a-z_][a-z0-9_]{0,62}$' then format('invalid queue name "%s"', queue)
        when task is null or task !~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$' then format('invalid task name "%s"', task)
        when exists (select from cairn.workflows w where w.name = start_task_step.task)
            then format('"%s" is a workflow: start it as a child run', task)
        else 'the step''s input ' || cairn.json_problem(coalesce(payload, 'null')) end;
    if v_problem is not null then
        return query
        select * from cairn.open_step(run_id, key, seq, 'task', null, fingerprint, v_now, v_problem);
        return;
    end if;
    insert into cairn.jobs (queue_id, task, payload, priority, visible_at, enqueued_at, parent_run,
                            parent_step, traceparent)
    values (cairn.ensure_queue(start_task_step.queue), start_task_step.task, start_task_step.payload,
            v_run.priority, v_now, v_now, start_task_step.run_id, start_task_step.key,
            v_run.traceparent);
    perform pg_notify('cairn', start_task_step.queue);
    return query
    select * from cairn.open_step(run_id, key, seq, 'task', payload, fingerprint, v_now, null);
end $$;
comment on function cairn.start_task_step(uuid, bigint, bigint, jsonb, text, integer, text, text, text, jsonb) is
    'Worker: enqueue a step as a job of a task on its queue (once), or report the step''s recorded outcome.';

-- Park the run until the earlier of wake_at and now + wake_in (both NULL:
-- until something wakes it). If a signal, a child's end or a step job's end
-- arrived while it ran (wake_pending), it is woken at once: this and the
-- wakers hold the run FOR NO KEY UPDATE, so one of them always sees the
-- other. Locks: the run (rank 1), then its job (rank 2).
create or replace function cairn.suspend_run(
    run_id  uuid,
    job_id  bigint,
    lease   bigint,
    done    jsonb,
    wake_at timestamptz,
    wake_in double precision,
    status  text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now  timestamptz := cairn.now();
    v_run  cairn.runs;
    v_wake timestamptz := least(coalesce(suspend_run.wake_at, 'infinity'),
                                case when wake_in is null then 'infinity'::timestamptz
                                     else v_now + make_interval(secs => greatest(wake_in, 0)) end);
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    if suspend_run.status is null or suspend_run.status not in ('sleeping', 'waiting') then
        raise exception 'cairn: cannot suspend a run as "%"', suspend_run.status
            using errcode = 'invalid_parameter_value';
    end if;
    v_run := cairn.hold_run(run_id, job_id, lease, 'update', v_now);
    if v_run is null then
        return false;
    end if;
    if suspend_run.done <> '[]' then
        perform cairn.record_outcomes(run_id, suspend_run.done, v_now);
    end if;
    if v_run.wake_pending then
        v_wake := least(v_wake, v_now);
    end if;
    update cairn.jobs j
       set visible_at = greatest(v_wake, v_now), lease = null, leased_until = null, attempts = 0
     where j.id = suspend_run.job_id;
    update cairn.runs r
       set status = suspend_run.status, updated_at = v_now,
           wake_at = case when v_wake = 'infinity' then null else v_wake end
     where r.id = suspend_run.run_id;
    insert into cairn.run_events (run_id, at, event, detail)
    values (suspend_run.run_id, v_now, 'suspended',
            jsonb_strip_nulls(jsonb_build_object(
                'status', suspend_run.status,
                'until', case when v_wake = 'infinity' then null else v_wake end)));
    return true;
end $$;
comment on function cairn.suspend_run(uuid, bigint, bigint, jsonb, timestamptz, double precision, text) is
    'Worker: record the outbox and park the run until its wait ends.';

-- The run completed with `output`. Returns 'completed', or 'failed' if the
-- output breaks the JSON limits (the run fails saying so), or NULL if the
-- lease no longer holds. Locks: the run's parent and the run (rank 1), the
-- run's job and the parent's job (rank 2).
create or replace function cairn.complete_run(
    run_id uuid,
    job_id bigint,
    lease  bigint,
    done   jsonb,
    output jsonb)
returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_problem text := case when output is null or pg_column_size(output) > 1048576
                           then cairn.json_problem(coalesce(output, 'null')) end;
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    if cairn.hold_run(run_id, job_id, lease, 'family', v_now) is null then
        return null;
    end if;
    if complete_run.done <> '[]' then
        perform cairn.record_outcomes(run_id, complete_run.done, v_now);
    end if;
    if v_problem is not null then
        perform cairn.finish_run(run_id, 'failed', null, 'the run''s output ' || v_problem);
        perform cairn.settle_jobs(array[job_id], array[lease], null, 'dead',
                                  'the run''s output ' || v_problem, true);
        return 'failed';
    end if;
    perform cairn.finish_run(run_id, 'completed', coalesce(output, 'null'), null);
    delete from cairn.jobs j where j.id = complete_run.job_id;
    return 'completed';
end $$;
comment on function cairn.complete_run(uuid, bigint, bigint, jsonb, jsonb) is
    'Worker: record the outbox and complete the run with its output.';

-- complete_run for several runs at once (see "Batches" above): a row per
-- call that completed its run, tagged with its position n; none for a call
-- whose lease no longer holds; 'busy' for a run another transaction holds
-- locked, a child run (its ancestors must be locked first) and an output
-- beyond the JSON limits (it fails the run): call complete_run for those.
-- Locks: each root run FOR NO KEY UPDATE SKIP LOCKED, then the steps its
-- outbox settles, then the jobs, all in one statement in id order.
create or replace function cairn.complete_runs(
    run_ids uuid[],
    job_ids bigint[],
    leases  bigint[],
    dones   jsonb[],
    outputs jsonb[])
returns table (n integer, status text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now    timestamptz := cairn.now();
    v_n      integer := cairn.check_calls(run_ids, job_ids, leases);
    v_locked integer[];
    v_held   integer[];
    v_plain  integer[];
begin
    if dones is null or array_position(dones, null) is not null or outputs is null then
        raise exception 'cairn: outboxes and outputs must not be NULL (nor hold NULLs)'
            using errcode = 'null_value_not_allowed';
    end if;
    if cardinality(dones) <> v_n or cardinality(outputs) <> v_n then
        raise exception 'cairn: the arrays of complete_runs must all have % elements, one per call', v_n
            using errcode = 'invalid_parameter_value';
    end if;
    -- Every root run FOR NO KEY UPDATE SKIP LOCKED, and the leases, in one
    -- statement. A child run is left alone: its ancestors come first.
    select coalesce(array_agg(u.n), '{}'),
           coalesce(array_agg(u.n) filter (where exists (
               select from cairn.jobs j
                where j.id = u.job and j.lease = u.lease and j.run_id = u.run
                  and j.leased_until > v_now)), '{}')
      into v_locked, v_held
      from unnest(run_ids, job_ids, leases) with ordinality as u(run, job, lease, n)
     cross join lateral (select from cairn.runs r
                          where r.id = u.run and r.job_id = u.job and r.parent_run is null
                            for no key update of r skip locked) r;
    if cardinality(v_locked) < v_n then
        -- Held elsewhere, or a child run: busy. (A probe per position, kept
        -- apart.)
        return query
        select u.n::integer, 'busy'::text
          from unnest(run_ids, job_ids) with ordinality as u(run, job, n)
         cross join lateral (select from cairn.runs r
                              where r.id = u.run and r.job_id = u.job offset 0) r
         where u.n <> all (v_locked);
    end if;
    if cardinality(v_held) = 0 then
        return;
    end if;
    -- An output beyond the JSON limits fails its run instead: that is for
    -- complete_run alone.
    select coalesce(array_agg(h.n), '{}') into v_plain
      from unnest(v_held) as h(n)
     where outputs[h.n] is not null and pg_column_size(outputs[h.n]) <= 1048576;
    return query
    select h.n, 'busy'::text from unnest(v_held) as h(n) where h.n <> all (v_plain);
    perform cairn.record_batch_outcomes(run_ids, dones, v_plain, v_now);
    -- finish_run(.., 'completed', ..) of root runs, for all of them: they
    -- end with their output, and notify (trigger runs_ended).
    update cairn.runs r
       set status = 'completed', output = outputs[t.n], error = null, wake_at = null,
           wake_pending = false, finished_at = v_now, updated_at = v_now, job_id = null
      from (select p.n, x.ctid
              from unnest(v_plain) as p(n)
             cross join lateral (select r.ctid from cairn.runs r
                                  where r.id = run_ids[p.n] offset 0) x) t
     where r.ctid = t.ctid;
    -- The jobs in id order (an index scan of the array, sorted).
    delete from cairn.jobs j
     where j.id = any (array(select job_ids[p.n] from unnest(v_plain) as p(n)));
    return query select p.n, 'completed'::text from unnest(v_plain) as p(n);
end $$;
comment on function cairn.complete_runs(uuid[], bigint[], bigint[], jsonb[], jsonb[]) is
    'Worker: complete_run for several root runs in one transaction; rows tagged with each call''s position, ''busy'' for a run locked elsewhere or a child run (call complete_run for it).';


-- The run failed: it ends with `error` and its job is dead-lettered, so
-- cairn.retry_run (or cairn.requeue of that job) can revive it. Locks as
-- complete_run.
create or replace function cairn.fail_run(
    run_id uuid,
    job_id bigint,
    lease  bigint,
    done   jsonb,
    error  text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now timestamptz := cairn.now();
begin
    if run_id is null or job_id is null or lease is null then
        perform cairn.check_held(run_id, job_id, lease);
    end if;
    if cairn.hold_run(run_id, job_id, lease, 'family', v_now) is null then
        return false;
    end if;
    if fail_run.done <> '[]' then
        perform cairn.record_outcomes(run_id, fail_run.done, v_now);
    end if;
    perform cairn.finish_run(run_id, 'failed', null, coalesce(error, 'failed'));
    perform cairn.settle_jobs(array[job_id], array[lease], null, 'dead', coalesce(error, 'failed'), true);
    return true;
end $$;
comment on function cairn.fail_run(uuid, bigint, bigint, jsonb, text) is
    'Worker: record the outbox and fail the run; its job is dead-lettered.';
