-- cairn: durable workflows.
--
-- A run is a row in cairn.runs, driven by one job (task = workflow name,
-- payload {"run_id": …}). A worker that claims the job calls load_run, then
-- replays the workflow function: each step it reaches is looked up in the
-- checkpoints load_run returned; a completed one returns its stored output,
-- a new one runs and is recorded with checkpoint() — one round trip per step.
-- When the run must wait (sleep, signal, a step's retry backoff) the worker
-- calls suspend_run: the job becomes invisible until the wait ends (or until
-- send_signal wakes it), holding no worker and no connection.
--
-- Every worker-side call names the run's job and its lease, and locks the job
-- row: a worker whose lease ran out cannot write to a run someone else holds.

-- Internal: lock the run's job if this lease still holds it.
create or replace function cairn.hold_run(run_id uuid, job_id bigint, lease bigint)
returns boolean
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
begin
    perform 1 from cairn.jobs j
     where j.id = hold_run.job_id and j.lease = hold_run.lease
       and j.payload ->> 'run_id' = hold_run.run_id::text
       for update;
    return found;
end $$;

-- Internal: a child run or a step job ended; record the outcome in the
-- parent's waiting step and wake the parent. Locks the parent's job row
-- first, like send_signal, so a parent about to park sees wake_pending.
-- Returns true (it is used inside WHERE clauses).
create or replace function cairn.settle_parent(
    parent_run  uuid,
    parent_step text,
    status      text,
    output      jsonb,
    error       text)
returns boolean
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
    v_job bigint;
    v_queue text;
begin
    select r.job_id, q.name into v_job, v_queue
      from cairn.runs r join cairn.queues q on q.id = r.queue_id
     where r.id = settle_parent.parent_run;
    if not found then
        return true;
    end if;
    perform 1 from cairn.jobs j where j.id = v_job for update;
    update cairn.steps s
       set status = settle_parent.status, output = settle_parent.output,
           error = left(settle_parent.error, 4096), finished_at = v_now
     where s.run_id = settle_parent.parent_run and s.key = settle_parent.parent_step
       and s.status = 'waiting';
    update cairn.runs r set wake_pending = true where r.id = settle_parent.parent_run;
    update cairn.jobs j set visible_at = v_now
     where j.id = v_job and j.lease is null and j.visible_at > v_now;
    if found then
        perform pg_notify('cairn', v_queue);
    end if;
    return true;
end $$;

create or replace function cairn.register_workflow(workflow text, queue text)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_task_name(workflow);
    if workflow is null then
        raise exception 'cairn: workflow name must not be NULL' using errcode = 'null_value_not_allowed';
    end if;
    insert into cairn.workflows (name, queue_id)
    values (register_workflow.workflow, cairn.queue_id(queue))
    on conflict (name) do update set queue_id = excluded.queue_id, registered_at = pg_catalog.now();
end $$;
comment on function cairn.register_workflow(text, text) is
    'Announce a workflow and its default queue (workers do this when they start).';

create or replace function cairn.start_workflow(
    workflow        text,
    input           jsonb,
    idempotency_key text default null,
    queue           text default null,
    priority        integer default 0,
    delay           double precision default 0,
    traceparent     text default null)
returns uuid
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_now timestamptz := cairn.now();
    v_qid integer;
    v_run uuid;
    v_job bigint;
begin
    if workflow is null then
        raise exception 'cairn: workflow name must not be NULL' using errcode = 'null_value_not_allowed';
    end if;
    select w.queue_id into v_qid from cairn.workflows w where w.name = start_workflow.workflow;
    if not found then
        raise exception 'cairn: unknown workflow "%"', workflow
            using errcode = 'undefined_object',
                  hint = 'a workflow is known once a worker that registers it has started';
    end if;
    perform cairn.check_payload(input, 'input');
    perform cairn.check_seconds(delay, 'delay', 0, 315360000);
    perform cairn.check_priority(priority);
    perform cairn.check_traceparent(traceparent);
    if queue is not null then
        v_qid := cairn.queue_id(queue);
    end if;
    if idempotency_key is not null then
        if length(idempotency_key) not between 1 and 512 then
            raise exception 'cairn: idempotency key must be 1 to 512 characters'
                using errcode = 'invalid_parameter_value';
        end if;
        select r.id into v_run from cairn.runs r
         where r.workflow = start_workflow.workflow and r.idempotency_key = start_workflow.idempotency_key;
        if found then
            return v_run;
        end if;
    end if;

    insert into cairn.runs (workflow, queue_id, input, idempotency_key, created_at, updated_at,
                            traceparent)
    values (start_workflow.workflow, v_qid, start_workflow.input, start_workflow.idempotency_key,
            v_now, v_now, start_workflow.traceparent)
    on conflict (workflow, idempotency_key) where idempotency_key is not null do nothing
    returning id into v_run;
    if v_run is null then
        -- A concurrent start with the same key won; return its run.
        select r.id into v_run from cairn.runs r
         where r.workflow = start_workflow.workflow and r.idempotency_key = start_workflow.idempotency_key;
        return v_run;
    end if;

    insert into cairn.jobs (queue_id, task, payload, priority, visible_at, enqueued_at)
    values (v_qid, start_workflow.workflow, jsonb_build_object('run_id', v_run),
            start_workflow.priority, v_now + make_interval(secs => start_workflow.delay), v_now)
    returning id into v_job;
    update cairn.runs r set job_id = v_job where r.id = v_run;
    if start_workflow.delay = 0 then
        perform pg_notify('cairn', (select q.name from cairn.queues q where q.id = v_qid));
    end if;
    return v_run;
end $$;
comment on function cairn.start_workflow(text, jsonb, text, text, integer, double precision, text) is
    'Start a run; returns its id. The same idempotency key always returns the same run and never starts a second.';

-- The run's state for a replay: input, database time, and every checkpoint.
-- Empty if the lease no longer holds the run's job.
create or replace function cairn.load_run(run_id uuid, job_id bigint, lease bigint)
returns table (workflow text, status text, input jsonb, db_now timestamptz, steps jsonb,
               created_at timestamptz, traceparent text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
begin
    if not cairn.hold_run(run_id, job_id, lease) then
        return;
    end if;
    -- Only a status change: losing it in a crash is harmless.
    perform pg_catalog.set_config('synchronous_commit', 'off', true);
    update cairn.runs r
       set status = 'running', started_at = coalesce(r.started_at, v_now), updated_at = v_now,
           wake_pending = false
     where r.id = load_run.run_id and r.status in ('pending', 'running', 'sleeping', 'waiting');
    return query
    select r.workflow, r.status, r.input, v_now,
           coalesce((select jsonb_agg(jsonb_build_object(
                         'key', s.key, 'seq', s.seq, 'kind', s.kind,
                         'status', s.status, 'output', s.output, 'error', s.error,
                         'attempts', s.attempts, 'wake_at', s.wake_at)
                         order by s.seq)
                       from cairn.steps s where s.run_id = r.id), '[]'::jsonb),
           r.created_at, r.traceparent
      from cairn.runs r where r.id = load_run.run_id;
end $$;

-- Record a step's outcome. A completed step is never overwritten: if one is
-- already recorded (a worker that lost its lease got there first), the
-- recorded outcome is returned and the caller must use it. Returns
-- (database time, recorded status, recorded output, recorded error); no row
-- if the lease no longer holds the run.
create or replace function cairn.checkpoint(
    run_id   uuid,
    job_id   bigint,
    lease    bigint,
    key      text,
    seq      integer,
    kind     text,
    status   text,
    input    jsonb,
    output   jsonb,
    error    text,
    attempts integer)
returns table (db_now timestamptz, status_now text, output_now jsonb, error_now text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
begin
    -- One statement in the common case. The lease is checked with a read,
    -- not hold_run's row lock (a WAL-logged write on every step): completed
    -- steps are immutable and the first writer wins, so a worker that loses
    -- its lease between the check and the insert can only record what the
    -- new holder then adopts; every state change after a step (suspend,
    -- complete, fail) is locked and fenced.
    return query
    insert into cairn.steps as s (run_id, key, seq, kind, status, input, output, error,
                                  attempts, started_at, finished_at)
    select checkpoint.run_id, checkpoint.key, checkpoint.seq, checkpoint.kind, checkpoint.status,
           checkpoint.input, checkpoint.output, left(checkpoint.error, 4096), checkpoint.attempts,
           v_now, case when checkpoint.status in ('completed', 'failed') then v_now end
     where exists (select from cairn.jobs j
                    where j.id = checkpoint.job_id and j.lease = checkpoint.lease
                      and j.payload ->> 'run_id' = checkpoint.run_id::text)
    on conflict on constraint steps_pkey do update
       set status = excluded.status, output = excluded.output, error = excluded.error,
           attempts = excluded.attempts, finished_at = excluded.finished_at
     where s.status <> 'completed'
    returning v_now, s.status, s.output, s.error;
    if found then
        return;
    end if;
    -- Nothing written: the lease is lost, or the step was already completed
    -- (by a worker that lost its lease); report the recorded outcome.
    if exists (select from cairn.jobs j
                where j.id = checkpoint.job_id and j.lease = checkpoint.lease) then
        return query
        select v_now, s.status, s.output, s.error from cairn.steps s
         where s.run_id = checkpoint.run_id and s.key = checkpoint.key;
    end if;
end $$;

-- A durable sleep (or a timestamp recorded once): the first call records the
-- wake time; returns it, and whether it has passed.
create or replace function cairn.sleep_step(
    run_id   uuid,
    job_id   bigint,
    lease    bigint,
    key      text,
    seq integer,
    seconds  double precision)
returns table (wake_at timestamptz, done boolean)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now  timestamptz := cairn.now();
    v_wake timestamptz;
begin
    if not cairn.hold_run(run_id, job_id, lease) then
        return;
    end if;
    perform cairn.check_seconds(seconds, 'sleep', 0, 315360000);
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

-- Wait for a signal: consume the oldest pending one with that name, or record
-- the wait (with its deadline). Output: {"payload": …} or {"timeout": true}.
create or replace function cairn.await_signal(
    run_id   uuid,
    job_id   bigint,
    lease    bigint,
    key      text,
    seq integer,
    name     text,
    timeout  double precision)
returns table (done boolean, output jsonb, wake_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now    timestamptz := cairn.now();
    v_step   record;
    v_signal record;
begin
    if not cairn.hold_run(run_id, job_id, lease) then
        return;
    end if;
    if timeout is not null then
        perform cairn.check_seconds(timeout, 'signal timeout', 0, 315360000);
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
                                      started_at, finished_at)
        values (await_signal.run_id, await_signal.key, await_signal.seq, 'signal', 'completed',
                to_jsonb(await_signal.name), jsonb_build_object('payload', v_signal.payload), v_now, v_now)
        on conflict on constraint steps_pkey do update
           set status = 'completed', output = excluded.output, finished_at = v_now;
        return query select true, jsonb_build_object('payload', v_signal.payload), null::timestamptz;
        return;
    end if;

    if v_step is null then
        insert into cairn.steps (run_id, key, seq, kind, status, input, wake_at, started_at)
        values (await_signal.run_id, await_signal.key, await_signal.seq, 'signal', 'waiting',
                to_jsonb(await_signal.name),
                v_now + make_interval(secs => await_signal.timeout), v_now);
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

-- Internal: a recorded step's outcome as (done, output, error); no row if the
-- step is not recorded. Shared by the calls that start something once.
create or replace function cairn.recorded_outcome(run_id uuid, key text)
returns table (done boolean, output jsonb, error text)
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select s.status in ('completed', 'failed'), s.output, s.error
      from cairn.steps s
     where s.run_id = recorded_outcome.run_id and s.key = recorded_outcome.key
$$;

-- Start a child run for the parent's step `key` (once: a replay finds the
-- step and reports it). Returns (done, output, error); done = false while the
-- child runs. An unknown workflow fails the step, not the database call.
create or replace function cairn.start_child(
    run_id   uuid,
    job_id   bigint,
    lease    bigint,
    key      text,
    seq      integer,
    workflow text,
    input    jsonb)
returns table (done boolean, output jsonb, error text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now   timestamptz := cairn.now();
    v_qid   integer;
    v_child uuid;
    v_job   bigint;
begin
    if not cairn.hold_run(run_id, job_id, lease) then
        return;
    end if;
    return query select * from cairn.recorded_outcome(start_child.run_id, start_child.key);
    if found then
        return;
    end if;
    perform cairn.check_payload(input, 'child input');
    select w.queue_id into v_qid from cairn.workflows w where w.name = start_child.workflow;
    if not found then
        insert into cairn.steps (run_id, key, seq, kind, status, input, error, started_at, finished_at)
        values (start_child.run_id, start_child.key, start_child.seq, 'child', 'failed',
                jsonb_build_object('workflow', start_child.workflow, 'input', start_child.input),
                format('unknown workflow "%s"', start_child.workflow), v_now, v_now);
        return query select true, null::jsonb, format('unknown workflow "%s"', start_child.workflow);
        return;
    end if;
    insert into cairn.runs (workflow, queue_id, input, parent_run, parent_step, created_at, updated_at,
                            traceparent)
    values (start_child.workflow, v_qid, start_child.input, start_child.run_id, start_child.key,
            v_now, v_now, (select r.traceparent from cairn.runs r where r.id = start_child.run_id))
    returning id into v_child;
    insert into cairn.jobs (queue_id, task, payload, visible_at, enqueued_at)
    values (v_qid, start_child.workflow, jsonb_build_object('run_id', v_child), v_now, v_now)
    returning id into v_job;
    update cairn.runs r set job_id = v_job where r.id = v_child;
    insert into cairn.steps (run_id, key, seq, kind, status, input, started_at)
    values (start_child.run_id, start_child.key, start_child.seq, 'child', 'waiting',
            jsonb_build_object('workflow', start_child.workflow, 'run', v_child,
                               'input', start_child.input), v_now);
    perform pg_notify('cairn', (select q.name from cairn.queues q where q.id = v_qid));
    return query select false, null::jsonb, null::text;
end $$;

-- Run the parent's step `key` as a job of `task` on `queue`, on any worker
-- serving it; its ack (with the output) or dead letter settles the step.
create or replace function cairn.start_task_step(
    run_id   uuid,
    job_id   bigint,
    lease    bigint,
    key      text,
    seq      integer,
    queue    text,
    task     text,
    payload  jsonb)
returns table (done boolean, output jsonb, error text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now  timestamptz := cairn.now();
begin
    if not cairn.hold_run(run_id, job_id, lease) then
        return;
    end if;
    return query select * from cairn.recorded_outcome(start_task_step.run_id, start_task_step.key);
    if found then
        return;
    end if;
    perform cairn.check_payload(payload, 'step input');
    perform cairn.check_task_name(task);
    insert into cairn.jobs (queue_id, task, payload, visible_at, enqueued_at, parent_run, parent_step,
                            traceparent)
    values (cairn.queue_id(queue), start_task_step.task, start_task_step.payload, v_now, v_now,
            start_task_step.run_id, start_task_step.key,
            (select r.traceparent from cairn.runs r where r.id = start_task_step.run_id));
    insert into cairn.steps (run_id, key, seq, kind, status, input, started_at)
    values (start_task_step.run_id, start_task_step.key, start_task_step.seq, 'task', 'waiting',
            start_task_step.payload, v_now);
    perform pg_notify('cairn', start_task_step.queue);
    return query select false, null::jsonb, null::text;
end $$;

-- Park the run until wake_at (NULL: until something wakes it). If a signal,
-- a child's end or a step job's end arrived while it ran (wake_pending), it
-- is woken at once: this and the wakers all lock the job row first, so one
-- of them always sees the other.
create or replace function cairn.suspend_run(
    run_id  uuid,
    job_id  bigint,
    lease   bigint,
    wake_at timestamptz,
    status  text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now  timestamptz := cairn.now();
    v_wake timestamptz := coalesce(suspend_run.wake_at, 'infinity');
begin
    if suspend_run.status not in ('sleeping', 'waiting') then
        raise exception 'cairn: cannot suspend a run as "%"', suspend_run.status
            using errcode = 'invalid_parameter_value';
    end if;
    if not cairn.hold_run(run_id, job_id, lease) then
        return false;
    end if;
    if (select r.wake_pending from cairn.runs r where r.id = suspend_run.run_id) then
        v_wake := least(v_wake, v_now);
    end if;
    update cairn.jobs j
       set visible_at = greatest(v_wake, v_now), lease = null, attempts = 0
     where j.id = suspend_run.job_id;
    update cairn.runs r
       set status = suspend_run.status, wake_at = suspend_run.wake_at, updated_at = v_now
     where r.id = suspend_run.run_id;
    return true;
end $$;

create or replace function cairn.complete_run(run_id uuid, job_id bigint, lease bigint, output jsonb)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now    timestamptz := cairn.now();
    v_parent record;
begin
    if not cairn.hold_run(run_id, job_id, lease) then
        return false;
    end if;
    delete from cairn.jobs j where j.id = complete_run.job_id;
    update cairn.runs r
       set status = 'completed', output = complete_run.output, error = null, wake_at = null,
           finished_at = v_now, updated_at = v_now, job_id = null
     where r.id = complete_run.run_id
    returning r.parent_run, r.parent_step into v_parent;
    if v_parent.parent_run is not null then
        perform cairn.settle_parent(v_parent.parent_run, v_parent.parent_step, 'completed',
                                    complete_run.output, null);
    end if;
    return true;
end $$;

-- The run fails; its job is dead-lettered, so cairn.retry_run can revive it.
create or replace function cairn.fail_run(run_id uuid, job_id bigint, lease bigint, error text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now    timestamptz := cairn.now();
    v_parent record;
begin
    if not cairn.fail(job_id, lease, error) then
        return false;
    end if;
    update cairn.runs r
       set status = 'failed', error = left(fail_run.error, 4096), wake_at = null,
           finished_at = v_now, updated_at = v_now
     where r.id = fail_run.run_id
    returning r.parent_run, r.parent_step into v_parent;
    if v_parent.parent_run is not null then
        perform cairn.settle_parent(v_parent.parent_run, v_parent.parent_step, 'failed', null,
                                    format('child run %s failed: %s', fail_run.run_id, fail_run.error));
    end if;
    return true;
end $$;

create or replace function cairn.send_signal(run_id uuid, name text, payload jsonb default 'null')
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now    timestamptz := cairn.now();
    v_run    record;
    v_id     bigint;
begin
    if run_id is null then
        raise exception 'cairn: run id must not be NULL' using errcode = 'null_value_not_allowed';
    end if;
    if name is null or length(name) not between 1 and 128 then
        raise exception 'cairn: signal name must be 1 to 128 characters'
            using errcode = 'invalid_parameter_value';
    end if;
    perform cairn.check_payload(payload, 'signal payload');
    select r.status, r.job_id, q.name as queue into v_run
      from cairn.runs r join cairn.queues q on q.id = r.queue_id
     where r.id = send_signal.run_id;
    if not found then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    if v_run.status in ('completed', 'failed', 'cancelled') then
        raise exception 'cairn: run % is %; it takes no more signals', run_id, v_run.status
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    -- Lock the job before deciding whether it is parked (see suspend_run).
    perform 1 from cairn.jobs j where j.id = v_run.job_id for update;
    insert into cairn.signals (run_id, name, payload, sent_at)
    values (send_signal.run_id, send_signal.name, send_signal.payload, v_now)
    returning id into v_id;
    update cairn.runs r set wake_pending = true where r.id = send_signal.run_id;
    update cairn.jobs j set visible_at = v_now
     where j.id = v_run.job_id and j.lease is null and j.visible_at > v_now;
    if found then
        perform pg_notify('cairn', v_run.queue);
    end if;
    return v_id;
end $$;
comment on function cairn.send_signal(uuid, text, jsonb) is
    'Deliver a named signal to a run; kept until the run waits for that name.';

-- Cancel a run and all its descendants; their jobs are deleted. A worker in
-- the middle of one loses its lease and stops at its next checkpoint.
create or replace function cairn.cancel_run(run_id uuid)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now   timestamptz := cairn.now();
    v_count integer;
begin
    if run_id is null then
        raise exception 'cairn: run id must not be NULL' using errcode = 'null_value_not_allowed';
    end if;
    if not exists (select from cairn.runs r where r.id = cancel_run.run_id) then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    with recursive tree as (
        select r.id from cairn.runs r where r.id = cancel_run.run_id
        union all
        select c.id from cairn.runs c join tree t on c.parent_run = t.id
    ), cancelled as (
        update cairn.runs r
           set status = 'cancelled', finished_at = v_now, updated_at = v_now, wake_at = null
          from tree
         where r.id = tree.id and r.status not in ('completed', 'failed', 'cancelled')
        returning r.job_id
    ), gone as (
        delete from cairn.jobs j using cancelled c where j.id = c.job_id
    )
    select count(*) into v_count from cancelled;
    -- A child cancelled on its own fails the step its parent waits on.
    perform cairn.settle_parent(r.parent_run, r.parent_step, 'failed', null,
                                format('child run %s was cancelled', r.id))
       from cairn.runs r
      where r.id = cancel_run.run_id and r.parent_run is not null and v_count > 0;
    return v_count;
end $$;
comment on function cairn.cancel_run(uuid) is
    'Cancel a run and its child runs; returns how many were still active.';

-- Revive a failed run: its failed steps run again (completed checkpoints are
-- kept), starting from its dead-lettered job.
create or replace function cairn.retry_run(run_id uuid)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := cairn.now();
    v_run record;
begin
    select r.status, r.job_id, r.queue_id, r.workflow into v_run
      from cairn.runs r where r.id = retry_run.run_id for update;
    if not found then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    if v_run.status <> 'failed' then
        return false;
    end if;
    delete from cairn.steps s where s.run_id = retry_run.run_id and s.status = 'failed';
    delete from cairn.archive a where a.id = v_run.job_id;
    delete from cairn.jobs j where j.id = v_run.job_id;
    insert into cairn.jobs (queue_id, task, payload, visible_at, enqueued_at)
    values (v_run.queue_id, v_run.workflow, jsonb_build_object('run_id', retry_run.run_id), v_now, v_now)
    returning id into v_run.job_id;
    update cairn.runs r
       set status = 'pending', error = null, finished_at = null, updated_at = v_now,
           job_id = v_run.job_id
     where r.id = retry_run.run_id;
    perform pg_notify('cairn', (select q.name from cairn.queues q where q.id = v_run.queue_id));
    return true;
end $$;
comment on function cairn.retry_run(uuid) is
    'Run a failed run again from its failed step; completed steps are not repeated. False if it is not failed.';

create or replace function cairn.run_status(run_id uuid)
returns table (id uuid, workflow text, status text, output jsonb, error text,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz,
               wake_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return query
    select r.id, r.workflow, r.status, r.output, r.error, r.created_at, r.started_at,
           r.finished_at, r.wake_at
      from cairn.runs r where r.id = run_status.run_id;
    if not found then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
end $$;
comment on function cairn.run_status(uuid) is 'A run''s status, output or error, and timings.';

create or replace function cairn.list_runs(
    workflow text default null,
    status   text default null,
    lim      integer default 100)
returns table (run_id uuid, run_workflow text, run_status text, created_at timestamptz,
               finished_at timestamptz, error text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_batch(lim, 'lim', 10000);
    return query
    select r.id, r.workflow, r.status, r.created_at, r.finished_at, r.error
      from cairn.runs r
     where (list_runs.workflow is null or r.workflow = list_runs.workflow)
       and (list_runs.status is null or r.status = list_runs.status)
     order by r.created_at desc
     limit lim;
end $$;
comment on function cairn.list_runs(text, text, integer) is 'Recent runs, newest first, optionally of one workflow and status.';

create or replace function cairn.run_steps(run_id uuid)
returns table (seq integer, key text, kind text, status text, input jsonb, output jsonb,
               error text, attempts integer, started_at timestamptz, finished_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return query
    select s.seq, s.key, s.kind, s.status, s.input, s.output, s.error, s.attempts,
           s.started_at, s.finished_at
      from cairn.steps s where s.run_id = run_steps.run_id
     order by s.seq;
end $$;
comment on function cairn.run_steps(uuid) is 'A run''s step trace: per step its input, output, error, attempts and timings.';

-- Tests only: move cairn's clock forward. Only the schema owner may call it
-- (no role is granted it); once called, cairn.now() adds the offset.
create or replace function cairn.advance_test_clock(seconds double precision)
returns timestamptz
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_queue text;
begin
    perform cairn.check_seconds(seconds, 'clock advance', 0, 315360000);
    insert into cairn.test_clock (offset_s) values (seconds)
    on conflict (singleton) do update set offset_s = cairn.test_clock.offset_s + excluded.offset_s;
    execute $def$
        create or replace function cairn.now()
        returns timestamptz
        language plpgsql stable
        set search_path = pg_catalog, pg_temp
        as $body$
        begin
            return pg_catalog.now()
                 + make_interval(secs => coalesce((select t.offset_s from cairn.test_clock t), 0));
        end $body$
    $def$;
    -- Wake every queue: jobs whose time has now come need no poll to run.
    for v_queue in select q.name from cairn.queues q loop
        perform pg_notify('cairn', v_queue);
    end loop;
    return cairn.now();
end $$;
comment on function cairn.advance_test_clock(double precision) is
    'TESTS ONLY: advance cairn.now() by seconds. Not granted to any role.';
