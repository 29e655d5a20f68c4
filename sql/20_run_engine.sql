-- cairn: the run engine's protocols.
--
-- Who calls them: only other cairn functions (no role is granted these).
--
-- A workflow run is a row in cairn.runs, driven by at most one job at a
-- time: runs.job_id names the job, jobs.run_id names the run. Only
-- create_run and enqueue_run_job make such a job; cairn.send cannot (it
-- refuses a workflow's name as its task), so nothing a producer sends can
-- drive or move a run. A step that runs elsewhere (ctx.task) is a job whose
-- parent_run and parent_step name the run and step waiting for it.
--
-- One function per protocol:
--   create_run       a run and its job, with its idempotency key
--   wake_run         a parked run's job becomes visible now
--   settle_step      a child run or step job ended: record it, wake the run
--   finish_run       a run ends (completed, failed, cancelled) and its
--                    parent's step learns how
--   settle_jobs      jobs leave the queue (acked, archived, dead-lettered,
--                    deleted, purged): their runs and steps learn how
--   record_outcomes  the steps an execution finished are written
--   hold_run         a worker's call is fenced: its job must be the run's
--                    job and its lease must still hold
--
-- LOCK ORDER. Every function that locks more than one row takes the locks
-- in this order, and no function waits for a lock of an earlier rank while
-- holding one of a later rank:
--   0. a schedules row (60_schedules.sql: a tick, or a change of one
--      schedule), the retention row (50_retention.sql: a prune) or a flows
--      row (70_flows.sql: a new version); never
--      waited for while a lock of a later rank is held.
--   1. runs rows: ancestors before descendants (by depth, then id), so a
--      run's parent before the run; lock_runs takes a run with all its
--      ancestors (a flow step's end may end its run and, through its
--      parent's step, the runs above it). Changes of a run's state
--      take FOR NO KEY UPDATE; a step's begin and a flush of finished steps
--      take FOR SHARE, so the steps of one run begin together but never
--      while its state changes (a cancel waits for them, they wait for it).
--   2. jobs rows, in id order: a run's job and its step jobs alike, and the
--      job of a parent that is woken.
--   3. steps, signals and run_events rows, only of runs locked in rank 1.
-- A function that learns from a job which run it concerns reads
-- jobs.run_id or jobs.parent_run (never changed after insert) without a
-- lock, locks the runs, then the jobs. Calls that touch only plain jobs
-- (claim, extend, release, and ack/archive/retry/fail of plain jobs) start
-- at rank 2; a claim never waits (SKIP LOCKED). Foreign-key checks take KEY
-- SHARE on a runs row the caller has already locked.
--
-- The history (cairn.run_events) is append-only: every step attempt that
-- did not complete (failed, retried, cut short by a lost worker,
-- cancelled), and the run's suspends, resumes, signals, failures, retries
-- and cancellations. The attempt in progress or completed is its steps row.
-- cairn.run_history() joins them.
--
-- Plans: the functions here and in 30_run_api.sql and 40_worker.sql pin
-- plan_cache_mode = force_generic_plan. Their statements are simple index
-- lookups; left to choose, PL/pgSQL would plan them afresh on every call
-- (a NULL parent run makes a custom plan look cheaper), which doubled the
-- cost of a step. Those that run per run or per step (here, in 30, 40 and
-- 70_flows.sql) also pin enable_seqscan = off: a session keeps the plans
-- it made first, and a worker connected to a new database made them while
-- runs and steps were empty, so every step read every step ever recorded
-- (a sequential scan), slower with each run finished.

-- Internal: raise if `task` names a workflow. Only the run engine makes a
-- workflow's jobs (start_workflow, start_child, retry_run).
create or replace function cairn.check_not_workflow(task text)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
begin
    if exists (select from cairn.workflows w where w.name = task) then
        raise exception 'cairn: "%" is a workflow; its jobs are made by the run engine only', task
            using errcode = 'invalid_parameter_value',
                  hint = format('start a run with: select cairn.start_workflow(%L, ''{...}'')', task);
    end if;
end $$;

-- Internal: a run's ancestors, its parent first.
create or replace function cairn.run_ancestors(run_id uuid)
returns uuid[]
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    return (with recursive up(id, n) as (
                select r.parent_run, 1 from cairn.runs r
                 where r.id = run_ancestors.run_id and r.parent_run is not null
                union all
                select r.parent_run, up.n + 1 from up join cairn.runs r on r.id = up.id
                 where r.parent_run is not null
            )
            select coalesce(array_agg(up.id order by up.n), '{}') from up);
end $$;

-- Internal: lock runs and all their ancestors FOR NO KEY UPDATE, ancestors
-- first (by depth, then id): rank 1 of the lock order. All of them, not
-- only the parents: a flow's step that ends may end its run, which settles
-- its parent's step, which may end the parent, and so on up. Returns the
-- runs locked.
create or replace function cairn.lock_runs(ids uuid[])
returns setof uuid
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off  -- by primary key, whatever the statistics say
set plan_cache_mode = force_generic_plan
as $$
declare
    v_parents uuid[];
begin
    -- The common case: runs that are roots or children of roots. Depth 0
    -- (the roots, and the parents) comes before depth 1, each by id: two
    -- index probes and no recursion, however many runs.
    select array_agg(r.parent_run) filter (where r.parent_run is not null) into v_parents
      from cairn.runs r where r.id = any (ids);
    if v_parents is null
       or not exists (select from cairn.runs p where p.id = any (v_parents) and p.parent_run is not null) then
        return query
        select r.id from cairn.runs r
         where r.id = any (ids || coalesce(v_parents, '{}'))
         order by r.parent_run is not null, r.id
           for no key update;
        return;
    end if;
    return query
    with recursive targets(id) as (
        select unnest(ids)
        union
        select r.parent_run from cairn.runs r join targets t on t.id = r.id where r.parent_run is not null
    ), up(id, ancestor) as (
        select r.id, r.parent_run from cairn.runs r join targets t on t.id = r.id
        union all
        select up.id, p.parent_run from up join cairn.runs p on p.id = up.ancestor
    ), depth as (
        select up.id, count(up.ancestor) as n from up group by up.id
    )
    select r.id
      from cairn.runs r join depth d on d.id = r.id
     order by d.n, r.id
       for no key update of r;
end $$;

-- Internal: the run a worker's call concerns, if the caller's job is the
-- run's job and its lease still holds (not expired, not re-leased, not
-- deleted by a cancel); NULL otherwise, and the caller changes nothing.
-- mode 'share' locks the run FOR SHARE (a step's begin, a flush); 'update'
-- FOR NO KEY UPDATE (a change of the run's state); 'family' the run and its
-- parent, ancestors first (the run ends and its parent's step settles).
-- `at` is the caller's reading of cairn.now().
create or replace function cairn.hold_run(run_id uuid, job_id bigint, lease bigint, mode text,
                                          at timestamptz)
returns cairn.runs
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_run cairn.runs;
begin
    if mode = 'family' and exists (select from cairn.runs r
                                    where r.id = hold_run.run_id and r.parent_run is not null) then
        perform from cairn.lock_runs(array[run_id]);
        select * into v_run from cairn.runs r where r.id = hold_run.run_id;
    elsif mode = 'share' then
        select * into v_run from cairn.runs r where r.id = hold_run.run_id for share;
    else
        select * into v_run from cairn.runs r where r.id = hold_run.run_id for no key update;
    end if;
    if v_run.id is null or v_run.job_id is distinct from hold_run.job_id then
        return null;
    end if;
    if not exists (select from cairn.jobs j
                    where j.id = hold_run.job_id and j.lease = hold_run.lease
                      and j.run_id = hold_run.run_id and j.leased_until > hold_run.at) then
        return null;
    end if;
    return v_run;
end $$;

-- Internal: the job that drives run `run_id`, visible at `visible_at`.
-- Locks nothing (the row is new).
create or replace function cairn.enqueue_run_job(
    run_id      uuid,
    queue_id    integer,
    workflow    text,
    priority    integer,
    traceparent text,
    visible_at  timestamptz,
    job_id      bigint default null)
returns bigint
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now timestamptz := cairn.now();
    v_job bigint := coalesce(job_id, pg_catalog.nextval('cairn.jobs_id_seq'));
begin
    insert into cairn.jobs (id, queue_id, task, payload, priority, visible_at, enqueued_at,
                            run_id, traceparent)
    overriding system value
    values (v_job, queue_id, workflow, jsonb_build_object('run_id', run_id), priority,
            greatest(visible_at, v_now), v_now, run_id, traceparent);
    if visible_at <= v_now then
        perform pg_notify('cairn', (select q.name from cairn.queues q where q.id = enqueue_run_job.queue_id));
    end if;
    return v_job;
end $$;

-- Internal: create a run with its job: the one way a run comes to be. With
-- an idempotency key already taken, creates nothing and returns NULL (the
-- caller decides what the existing run means). Locks nothing new; a child's
-- parent is held by the caller (the foreign key takes KEY SHARE on it).
create or replace function cairn.create_run(
    workflow        text,
    queue_id        integer,
    input           jsonb,
    idempotency_key text,
    priority        integer,
    visible_at      timestamptz,
    traceparent     text,
    parent_run      uuid,
    parent_step     text)
returns uuid
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
#variable_conflict use_column
declare
    v_now timestamptz := cairn.now();
    v_run uuid := gen_random_uuid();
    v_job bigint := pg_catalog.nextval('cairn.jobs_id_seq');
begin
    insert into cairn.runs (id, workflow, queue_id, input, idempotency_key, priority, parent_run,
                            parent_step, job_id, created_at, updated_at, traceparent)
    values (v_run, create_run.workflow, create_run.queue_id, create_run.input,
            create_run.idempotency_key, create_run.priority, create_run.parent_run,
            create_run.parent_step, v_job, v_now, v_now, create_run.traceparent)
    on conflict (workflow, idempotency_key) where idempotency_key is not null do nothing;
    if not found then
        return null;
    end if;
    perform cairn.enqueue_run_job(v_run, create_run.queue_id, create_run.workflow,
                                  create_run.priority, create_run.traceparent, visible_at, v_job);
    return v_run;
end $$;

-- Internal: wake a run that waits for something that has now happened (a
-- signal, a child's end, a step job's end). The caller holds the run (rank
-- 1) and its job (rank 2). If the run is executing, wake_pending makes its
-- coming suspend_run park it for no time at all (suspend_run holds the same
-- run lock, so one of the two always sees the other); if it is parked, its
-- job becomes visible now.
create or replace function cairn.wake_run(run_id uuid)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now   timestamptz := cairn.now();
    v_job   bigint;
    v_queue text;
begin
    update cairn.runs r set wake_pending = true where r.id = wake_run.run_id
    returning r.job_id into v_job;
    update cairn.jobs j set visible_at = v_now
     where j.id = v_job and j.lease is null and j.visible_at > v_now
    returning (select q.name from cairn.queues q where q.id = j.queue_id) into v_queue;
    if v_queue is not null then
        perform pg_notify('cairn', v_queue);
    end if;
end $$;

-- Internal: a child run or a step job ended: record the outcome in the step
-- `key` that waits for it, and wake the run (a flow run moves on instead). The caller holds the run and
-- its job. A step that no longer waits (the run was retried, cancelled) is
-- left as it is.
create or replace function cairn.settle_step(
    run_id uuid,
    key    text,
    status text,
    output jsonb,
    error  text)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_started timestamptz;
    v_attempt integer;
    v_flow    record;
begin
    update cairn.steps s
       set status = settle_step.status, output = settle_step.output,
           error = left(settle_step.error, 4096), finished_at = v_now
     where s.run_id = settle_step.run_id and s.key = settle_step.key and s.status = 'waiting'
    returning s.started_at, s.attempts into v_started, v_attempt;
    if not found then
        return;
    end if;
    if settle_step.status = 'failed' then
        insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error)
        values (settle_step.run_id, v_started, v_now, 'attempt', settle_step.key, v_attempt,
                'failed', left(settle_step.error, 4096));
    end if;
    -- The run and, for a flow run, its definition: one query.
    select r as run, v.definition into v_flow
      from cairn.runs r
      left join cairn.flow_versions v on v.flow = r.workflow and v.version = r.flow_version
     where r.id = settle_step.run_id;
    if (v_flow.run).flow_version is not null then
        -- A flow run has no job to wake: the database moves it on.
        perform cairn.flow_step_settled(v_flow.run, settle_step.key, settle_step.status,
                                        settle_step.error, v_flow.definition);
    else
        perform cairn.wake_run(settle_step.run_id);
    end if;
end $$;

-- Internal: the run ends as `status` (completed, failed or cancelled). The
-- caller holds the run and its parent (rank 1); this locks the run's job
-- and the parent's job in id order (rank 2), records the end, and settles
-- the parent's step. The run's job is the caller's to delete or archive.
-- A failed run keeps job_id: its dead job is how retry_run and requeue
-- find it. complete_runs (40_worker.sql) does the 'completed' case of root
-- runs for a batch in one statement: keep the two alike.
create or replace function cairn.finish_run(
    run_id uuid,
    status text,
    output jsonb,
    error  text)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now    timestamptz := cairn.now();
    v_run    record;
begin
    select r.job_id, r.parent_run, r.parent_step into v_run
      from cairn.runs r where r.id = finish_run.run_id;
    if v_run.parent_run is not null then
        -- The run's job and its ancestors' jobs (the parent is woken, and a
        -- flow parent may end and wake its own), in id order (rank 2).
        perform 1 from cairn.jobs j
         where j.id = v_run.job_id
            or j.id in (select r.job_id from cairn.runs r
                         where r.id = any (cairn.run_ancestors(finish_run.run_id)))
         order by j.id
           for update;
    end if;
    update cairn.runs r
       set status = finish_run.status, output = finish_run.output,
           error = left(finish_run.error, 4096), wake_at = null, wake_pending = false,
           finished_at = v_now, updated_at = v_now,
           job_id = case when finish_run.status = 'failed' then r.job_id end
     where r.id = finish_run.run_id;
    if finish_run.status <> 'completed' then
        insert into cairn.run_events (run_id, at, event, error)
        values (finish_run.run_id, v_now, finish_run.status, left(finish_run.error, 4096));
    end if;
    if v_run.parent_run is not null then
        perform cairn.settle_step(
            v_run.parent_run, v_run.parent_step,
            case when finish_run.status = 'completed' then 'completed' else 'failed' end,
            finish_run.output,
            case finish_run.status
                when 'completed' then null
                when 'cancelled' then format('child run %s was cancelled', finish_run.run_id)
                else format('child run %s failed: %s', finish_run.run_id, finish_run.error)
            end);
    end if;
end $$;

-- A run that ends (completes, fails or is cancelled, by whatever path)
-- notifies channel 'cairn_run' with its id, at commit: App::result waits on
-- it instead of polling. Like every NOTIFY here, a hint: a waiter that
-- misses it reads the run's status on a timer.
create or replace function cairn.notify_run_ended()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_notify('cairn_run', new.id::text);
    return null;
end $$;

create or replace trigger runs_ended
    after update of status on cairn.runs
    for each row
    when (new.status in ('completed', 'failed', 'cancelled') and old.status is distinct from new.status)
    execute function cairn.notify_run_ended();

-- Internal: jobs leave the live table — acked or archived ('completed'),
-- dead-lettered ('dead'), or deleted by an operator, a purge or a queue
-- drop ('removed') — and whatever waits on them learns how: a step job
-- settles its step (completed with its output, or failed with `error`); a
-- run's job that leaves without the run ending fails the run with `error`.
-- A run's job is never 'completed' here (the engine completes runs). With
-- leases NULL the call is unfenced (operators). `keep` archives the jobs.
-- Returns the ids that left. Locks: the runs concerned and their parents
-- (rank 1), then these jobs and the jobs of those runs, in id order (rank 2).
create or replace function cairn.settle_jobs(
    ids     bigint[],
    leases  bigint[],
    outputs jsonb[],
    outcome text,
    error   text,
    keep    boolean)
returns table (id bigint)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off  -- by primary key, whatever the statistics say
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_runs    uuid[];
    v_locked  uuid[];
    v_ids     bigint[];
    -- The workflow's jobs among those that left, as parallel arrays.
    v_jobs    bigint[];
    v_run_ids uuid[];
    v_parents uuid[];
    v_steps   text[];
    v_outputs jsonb[];
    v_run     record;
    v_why     text;
begin
    -- Rank 1: the runs these jobs concern (run_id and parent_run never change).
    select array_agg(distinct coalesce(j.parent_run, j.run_id)) into v_runs
      from cairn.jobs j
     where j.id = any (ids)
       and (j.parent_run is not null or (j.run_id is not null and outcome <> 'completed'));
    if v_runs is not null then
        select array_agg(l) into v_locked from cairn.lock_runs(v_runs) l;
    end if;
    -- Rank 2: these jobs and the jobs of the locked runs, in id order.
    perform 1 from cairn.jobs j
     where j.id = any (ids || coalesce((select array_agg(r.job_id) from cairn.runs r
                                         where r.id = any (v_locked) and r.job_id is not null),
                                        '{}'))
     order by j.id
       for update;

    with d as (
        delete from cairn.jobs j
         using unnest(ids, leases, outputs) as u(id, lease, output)
         where j.id = u.id and (u.lease is null or j.lease = u.lease)
           and (outcome <> 'completed' or j.run_id is null)
        returning j.*, u.output
    ), a as (
        insert into cairn.archive (id, queue, task, payload, priority, attempts, enqueued_at,
                                   archived_at, outcome, output, last_error, run_id, parent_run,
                                   parent_step)
        select d.id, q.name, d.task, d.payload, d.priority, d.attempts, d.enqueued_at, v_now,
               case when outcome = 'completed' then 'completed' else 'dead' end,
               d.output, left(coalesce(settle_jobs.error, d.last_error), 4096),
               d.run_id, d.parent_run, d.parent_step
          from d join cairn.queues q on q.id = d.queue_id
         where keep
    )
    -- Plain jobs need nothing more; the workflow's jobs are settled below
    -- (the same filter on every array keeps them aligned).
    select array_agg(d.id),
           array_agg(d.id) filter (where d.run_id is not null or d.parent_run is not null),
           array_agg(d.run_id) filter (where d.run_id is not null or d.parent_run is not null),
           array_agg(d.parent_run) filter (where d.run_id is not null or d.parent_run is not null),
           array_agg(d.parent_step) filter (where d.run_id is not null or d.parent_run is not null),
           array_agg(d.output) filter (where d.run_id is not null or d.parent_run is not null)
      into v_ids, v_jobs, v_run_ids, v_parents, v_steps, v_outputs
      from d;
    return query select unnest(coalesce(v_ids, '{}'));

    for i in 1 .. coalesce(cardinality(v_jobs), 0) loop
        if v_parents[i] is not null then
            v_why := case when v_outputs[i] is not null then cairn.json_problem(v_outputs[i]) end;
            if outcome = 'completed' and v_why is null then
                perform cairn.settle_step(v_parents[i], v_steps[i], 'completed', v_outputs[i], null);
            else
                perform cairn.settle_step(
                    v_parents[i], v_steps[i], 'failed', null,
                    coalesce('the step''s output ' || v_why,
                             format('step job %s: %s', v_jobs[i], settle_jobs.error)));
            end if;
        else
            select r.status, r.job_id into v_run from cairn.runs r where r.id = v_run_ids[i];
            if found and v_run.job_id = v_jobs[i]
               and v_run.status not in ('completed', 'failed', 'cancelled') then
                perform cairn.finish_run(v_run_ids[i], 'failed', null, settle_jobs.error);
            end if;
        end if;
    end loop;
end $$;

-- Internal: write the outcomes of the steps an execution finished since its
-- last call (its outbox): a JSON array of {key, seq, kind, attempt, status,
-- output, error, fingerprint, retry_in}. The caller holds the run (rank 1)
-- and passes its clock reading (`at`). A step's outcome lands on the attempt that
-- began it while that attempt is still running; a value (kind 'value') is
-- written once. If another writer settled a key first with another outcome,
-- raises CA001: this execution saw an outcome the run did not record, and
-- must replay. An output above 1 MiB fails the step (the worker checks
-- outputs before sending them; an error raised here would meet the worker
-- again on every replay). One statement in the common case.
-- Internal: record_outcomes for the calls of a batch at `positions` (of
-- parallel arrays of runs and outboxes), runs already held. The common
-- outbox, one completed step, is written for all of them in one statement;
-- the rest go through record_outcomes one by one (and raise as it does).
create or replace function cairn.record_batch_outcomes(run_ids uuid[], dones jsonb[],
                                                       positions integer[], at timestamptz)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_written integer[];
    i         integer;
begin
    with o as (
        select u.n, x.ctid as row, u.done->0->'output' as output
          from unnest(run_ids, dones) with ordinality as u(run, done, n)
         cross join lateral (
               select s.ctid from cairn.steps s
                where s.run_id = u.run and s.key = u.done->0->>'key'
                  and s.attempts = (u.done->0->>'attempt')::integer and s.status = 'running'
                  for update of s) x
         where u.n = any (positions) and jsonb_array_length(u.done) = 1
           and u.done->0->>'kind' = 'step' and u.done->0->>'status' = 'completed'
           and pg_column_size(u.done->0->'output') <= 1048576
    ), w as (
        update cairn.steps s
           set status = 'completed', output = o.output, error = null,
               finished_at = record_batch_outcomes.at, wake_at = null
          from o
         where s.ctid = o.row
        returning o.n
    )
    select coalesce(array_agg(w.n), '{}') into v_written from w;
    for i in select u.n from unnest(positions) as u(n)
              where u.n <> all (v_written) and dones[u.n] <> '[]' loop
        perform cairn.record_outcomes(run_ids[i], dones[i], at);
    end loop;
end $$;

create or replace function cairn.record_outcomes(run_id uuid, done jsonb, at timestamptz)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    e         record;
    v_started timestamptz;
begin
    -- One completed step, the common case: a single update, no loop.
    if jsonb_array_length(done) = 1 and done->0->>'kind' = 'step'
       and done->0->>'status' = 'completed' and pg_column_size(done->0->'output') <= 1048576 then
        update cairn.steps s
           set status = 'completed', output = done->0->'output', error = null,
               finished_at = record_outcomes.at, wake_at = null
         where s.run_id = record_outcomes.run_id and s.key = done->0->>'key'
           and s.attempts = (done->0->>'attempt')::integer and s.status = 'running';
        if found then
            return;
        end if;
    end if;
    for e in
        select x.key, x.seq, x.kind, x.attempt, x.status, x.output, left(x.error, 4096) as error,
               x.retry_in
          from jsonb_to_recordset(done)
               as x(key text, seq integer, kind text, attempt integer, status text, output jsonb,
                    error text, retry_in double precision)
    loop
        if pg_column_size(e.output) > 1048576 then
            e.status := 'failed';
            e.error := format('the output is %s bytes, above the 1 MiB limit', pg_column_size(e.output));
            e.output := null;
        end if;
        if e.kind = 'value' then
            insert into cairn.steps (run_id, key, seq, kind, status, output, attempts, started_at,
                                     finished_at)
            values (record_outcomes.run_id, e.key, e.seq, 'value', 'completed', e.output, 1,
                    record_outcomes.at, record_outcomes.at)
            on conflict on constraint steps_pkey do nothing;
        else
            update cairn.steps s
               set status = e.status, output = e.output, error = e.error,
                   finished_at = record_outcomes.at,
                   wake_at = case when e.status = 'retrying'
                                  then record_outcomes.at + make_interval(secs => coalesce(e.retry_in, 0)) end
             where s.run_id = record_outcomes.run_id and s.key = e.key
               and s.attempts = e.attempt and s.status = 'running'
            returning s.started_at into v_started;
            if found and e.status <> 'completed' then
                insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error)
                values (record_outcomes.run_id, v_started, record_outcomes.at, 'attempt', e.key,
                        e.attempt, e.status, e.error);
            end if;
        end if;
        -- Not written: fine if the same outcome is recorded already (a call
        -- that was retried), a conflict otherwise.
        if not found and not exists (
               select from cairn.steps s
                where s.run_id = record_outcomes.run_id and s.key = e.key
                  and s.status = 'completed' and e.status = 'completed'
                  and s.output is not distinct from e.output) then
            raise exception 'cairn: step % of run % was settled by another worker', e.key, run_id
                using errcode = 'CA001';
        end if;
    end loop;
end $$;
