-- cairn: the run API — starting runs, signalling them, reading them, and
-- (admins) cancelling and retrying them.
--
-- Who calls it: producers start_workflow, send_signal, run_status,
-- get_run, list_runs, run_steps and run_history; admins also cancel_run and
-- retry_run. See 90_grants.sql. The engine's protocols (and the lock order
-- every function here keeps) are in 20_run_engine.sql.

-- Internal: the checks every start makes of its arguments.
create or replace function cairn.check_start(input jsonb, priority integer, delay double precision,
                                             traceparent text, conflict text, idempotency_key text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_payload(input, 'input');
    perform cairn.check_seconds(delay, 'delay', 0, 315360000);
    perform cairn.check_not_null(priority, 'priority');
    perform cairn.check_priority(priority);
    perform cairn.check_traceparent(traceparent);
    perform cairn.check_not_null(conflict, 'conflict');
    if conflict not in ('reject', 'return') then
        raise exception 'cairn: conflict must be ''reject'' or ''return'', got %', quote_literal(conflict)
            using errcode = 'invalid_parameter_value';
    end if;
    if idempotency_key is not null and length(idempotency_key) not between 1 and 512 then
        raise exception 'cairn: idempotency key must be 1 to 512 characters'
            using errcode = 'invalid_parameter_value';
    end if;
end $$;

-- Internal: a start found its idempotency key taken (maybe by a concurrent
-- start): the run it names if this start is a retry of that one (same
-- input, queue and priority) or conflict is 'return'; 23505 otherwise.
-- `queue_id` NULL: not compared (a flow's queue is its definition's).
create or replace function cairn.existing_run(workflow text, idempotency_key text, input jsonb,
                                              queue_id integer, priority integer, conflict text)
returns uuid
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_old  record;
    v_diff text[];
begin
    select r.id, r.input, r.queue_id, r.priority into v_old
      from cairn.runs r
     where r.workflow = existing_run.workflow and r.idempotency_key = existing_run.idempotency_key;
    if conflict = 'return' then
        return v_old.id;
    end if;
    v_diff := array_remove(array[
        case when v_old.input is distinct from existing_run.input then 'input' end,
        case when existing_run.queue_id is not null
              and v_old.queue_id is distinct from existing_run.queue_id then 'queue' end,
        case when v_old.priority is distinct from existing_run.priority then 'priority' end], null);
    if cardinality(v_diff) = 0 then
        return v_old.id;
    end if;
    raise exception 'cairn: idempotency key "%" of workflow % already names run %, started with another %',
                    idempotency_key, workflow, v_old.id, array_to_string(v_diff, ', ')
        using errcode = 'unique_violation',
              detail = format('run %s differs in: %s', v_old.id, array_to_string(v_diff, ', ')),
              hint = 'use a new key for a new run, or pass conflict => ''return'' to get the existing run whatever its input';
end $$;

-- Starts a code-first workflow's run, or a flow's (see start_flow).
create or replace function cairn.start_workflow(
    workflow        text,
    input           jsonb,
    idempotency_key text default null,
    queue           text default null,
    priority        integer default 0,
    delay           double precision default 0,
    traceparent     text default null,
    conflict        text default 'reject')
returns uuid
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now timestamptz := cairn.now();
    v_qid integer;
    v_run uuid;
begin
    perform cairn.check_not_null(workflow, 'workflow name');
    select w.queue_id into v_qid from cairn.workflows w where w.name = start_workflow.workflow;
    if not found then
        if exists (select from cairn.flows f where f.name = start_workflow.workflow) then
            if queue is not null then
                raise exception 'cairn: "%" is a flow: its steps go to the queues its definition names', workflow
                    using errcode = 'invalid_parameter_value', hint = 'start it without a queue';
            end if;
            return cairn.start_flow(workflow, input, idempotency_key, priority, delay, traceparent,
                                    conflict);
        end if;
        perform cairn.check_task_name(workflow);
        raise exception 'cairn: unknown workflow "%"', workflow
            using errcode = 'undefined_object',
                  hint = 'a workflow is known once it is registered: by App::initialize or a worker of an app that defines it, or by select cairn.register_workflow(name, queue); a flow once it is stored with cairn.create_flow';
    end if;
    perform cairn.check_start(input, priority, delay, traceparent, conflict, idempotency_key);
    if queue is not null then
        v_qid := cairn.queue_id(queue);
    end if;
    v_run := cairn.create_run(workflow, v_qid, input, idempotency_key, priority,
                              v_now + make_interval(secs => delay), traceparent, null, null);
    if v_run is not null then
        return v_run;
    end if;
    return cairn.existing_run(workflow, idempotency_key, input, v_qid, priority, conflict);
end $$;
comment on function cairn.start_workflow(text, jsonb, text, text, integer, double precision, text, text) is
    'Start a run of a workflow or a flow; returns its id. An idempotency key names one run per workflow: starting again with the same input, queue and priority returns that run; with others it is refused (23505) unless conflict => ''return''.';

create or replace function cairn.send_signal(run_id uuid, name text, payload jsonb default 'null')
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now    timestamptz := cairn.now();
    v_status text;
    v_flow   integer;
    v_id     bigint;
begin
    perform cairn.check_not_null(run_id, 'run id');
    perform cairn.check_not_null(name, 'signal name');
    if length(name) not between 1 and 128 then
        raise exception 'cairn: signal name must be 1 to 128 characters'
            using errcode = 'invalid_parameter_value';
    end if;
    perform cairn.check_payload(payload, 'signal payload');
    -- Lock order: the run (rank 1; a flow run with its ancestors, since the
    -- signal may end it), then its job in wake_run (rank 2).
    select r.flow_version into v_flow from cairn.runs r where r.id = send_signal.run_id;
    if v_flow is not null then
        perform from cairn.lock_runs(array[run_id]);
    end if;
    select r.status into v_status from cairn.runs r where r.id = send_signal.run_id
       for no key update;
    if not found then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    if v_status in ('completed', 'failed', 'cancelled') then
        raise exception 'cairn: run % is %; it takes no more signals', run_id, v_status
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    insert into cairn.signals (run_id, name, payload, sent_at)
    values (send_signal.run_id, send_signal.name, send_signal.payload, v_now)
    returning id into v_id;
    insert into cairn.run_events (run_id, at, event, detail)
    values (send_signal.run_id, v_now, 'signal',
            jsonb_build_object('name', send_signal.name, 'signal_id', v_id));
    if v_flow is not null then
        perform cairn.flow_signal(send_signal.run_id, send_signal.name);
    else
        perform cairn.wake_run(send_signal.run_id);
    end if;
    return v_id;
end $$;
comment on function cairn.send_signal(uuid, text, jsonb) is
    'Deliver a named signal to a run; kept until the run waits for that name.';

-- Cancel a run and its descendants. Lock order: the run's parent and the
-- run, then the descendants level by level (each level in id order), then
-- all their jobs in id order. Their jobs (and step jobs) are deleted, so no
-- step of theirs starts after this commits: a step's begin holds the run
-- FOR SHARE and checks the job. A worker in the middle of one loses its
-- lease and stops within a heartbeat.
create or replace function cairn.cancel_run(run_id uuid)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now    timestamptz := cairn.now();
    v_parent record;
    v_level  uuid[] := array[run_id];
    v_next   uuid[];
    v_tree   uuid[] := array[run_id];
    v_live   uuid[];
begin
    perform cairn.check_not_null(run_id, 'run id');
    select r.parent_run, r.parent_step into v_parent from cairn.runs r where r.id = cancel_run.run_id;
    if not found then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    perform from cairn.lock_runs(array[run_id]);
    loop
        select array_agg(r.id order by r.id) into v_next
          from cairn.runs r where r.parent_run = any (v_level);
        exit when v_next is null;
        perform 1 from cairn.runs r where r.id = any (v_next) order by r.id for no key update;
        v_tree := v_tree || v_next;
        v_level := v_next;
    end loop;
    select array_agg(r.id) into v_live
      from cairn.runs r
     where r.id = any (v_tree) and r.status not in ('completed', 'failed', 'cancelled');
    if v_live is null then
        return 0;
    end if;
    perform 1 from cairn.jobs j
     where j.id in (select r.job_id from cairn.runs r where r.id = any (v_live))
        or j.parent_run = any (v_live)
        or j.id in (select r.job_id from cairn.runs r
                     where r.id = any (cairn.run_ancestors(cancel_run.run_id)))
     order by j.id
       for update;

    -- A step whose begin committed just before this cancel took the run's
    -- lock has not had time to call its handler: give it a moment, so that
    -- no handler is called after this commits (unless its worker stalls for
    -- longer than that).
    if exists (select from cairn.steps s
                where s.run_id = any (v_live) and s.status = 'running'
                  and s.started_at > v_now - interval '50 milliseconds') then
        perform pg_sleep(0.05);
    end if;
    -- Attempts in flight are cut short.
    insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error)
    select s.run_id, s.started_at, v_now, 'attempt', s.key, s.attempts, 'cancelled', 'the run was cancelled'
      from cairn.steps s
     where s.run_id = any (v_live) and s.status = 'running';
    update cairn.steps s
       set status = 'failed', error = 'the run was cancelled', finished_at = v_now
     where s.run_id = any (v_live) and s.status = 'running';
    delete from cairn.jobs j
     where j.id in (select r.job_id from cairn.runs r where r.id = any (v_live))
        or j.parent_run = any (v_live);
    update cairn.runs r
       set status = 'cancelled', finished_at = v_now, updated_at = v_now, wake_at = null,
           wake_pending = false, job_id = null
     where r.id = any (v_live);
    insert into cairn.run_events (run_id, at, event, detail)
    select l, v_now, 'cancelled',
           case when l <> cancel_run.run_id then jsonb_build_object('with', cancel_run.run_id) end
      from unnest(v_live) l;
    -- A child cancelled on its own fails the step its parent waits on.
    if v_parent.parent_run is not null and cancel_run.run_id = any (v_live) then
        perform cairn.settle_step(v_parent.parent_run, v_parent.parent_step, 'failed', null,
                                  format('child run %s was cancelled', cancel_run.run_id));
    end if;
    return cardinality(v_live);
end $$;
comment on function cairn.cancel_run(uuid) is
    'Cancel a run and its child runs; returns how many were still active. No step of theirs starts once this commits.';

-- Revive a failed run: its failed steps run again (completed checkpoints are
-- kept; the failed attempts stay in the history), driven by a new job.
-- Locks: the run and its parent (rank 1), then its old job (rank 2).
create or replace function cairn.retry_run(run_id uuid)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now timestamptz := cairn.now();
    v_run record;
    v_job bigint;
begin
    perform cairn.check_not_null(run_id, 'run id');
    perform from cairn.lock_runs(array[run_id]);
    select r.status, r.job_id, r.queue_id, r.workflow, r.priority, r.traceparent, r.flow_version into v_run
      from cairn.runs r where r.id = retry_run.run_id;
    if not found then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    if v_run.status <> 'failed' then
        return false;
    end if;
    if v_run.flow_version is not null then
        -- No job drives a flow run: its failed steps (and failed elements
        -- of maps) start again; completed ones are kept.
        delete from cairn.steps s where s.run_id = retry_run.run_id and s.status = 'failed';
        update cairn.runs r
           set status = 'running', error = null, finished_at = null, wake_at = null,
               wake_pending = false, updated_at = v_now
         where r.id = retry_run.run_id;
        insert into cairn.run_events (run_id, at, event) values (retry_run.run_id, v_now, 'retried');
        perform cairn.advance_flow((select r from cairn.runs r where r.id = retry_run.run_id));
        return true;
    end if;
    perform 1 from cairn.jobs j where j.id = v_run.job_id for update;
    delete from cairn.jobs j where j.id = v_run.job_id;
    delete from cairn.archive a where a.id = v_run.job_id and a.run_id = retry_run.run_id;
    delete from cairn.steps s where s.run_id = retry_run.run_id and s.status = 'failed';
    v_job := cairn.enqueue_run_job(retry_run.run_id, v_run.queue_id, v_run.workflow,
                                   v_run.priority, v_run.traceparent, v_now);
    update cairn.runs r
       set status = 'pending', error = null, finished_at = null, wake_at = null,
           wake_pending = false, updated_at = v_now, job_id = v_job
     where r.id = retry_run.run_id;
    insert into cairn.run_events (run_id, at, event) values (retry_run.run_id, v_now, 'retried');
    return true;
end $$;
comment on function cairn.retry_run(uuid) is
    'Run a failed run again from its failed step; completed steps are not repeated, and the failure stays in its history. False if it is not failed.';

create or replace function cairn.run_status(run_id uuid)
returns table (id uuid, workflow text, status text, output jsonb, error text,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz,
               wake_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    perform cairn.check_not_null(run_id, 'run id');
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
    lim      integer default 100,
    since    timestamptz default null)
returns table (run_id uuid, run_workflow text, run_status text, created_at timestamptz,
               finished_at timestamptz, error text, parent_run uuid)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
-- Planned for the filters given (an operator's call, not the hot path): the
-- newest runs by runs_created_idx, a workflow's by runs_status_idx, a rare
-- status by whatever the statistics say finds it soonest.
set plan_cache_mode = force_custom_plan
as $$
begin
    perform cairn.check_batch(lim, 'lim', 10000);
    if status is not null and status not in ('pending', 'running', 'sleeping', 'waiting',
                                              'completed', 'failed', 'cancelled') then
        raise exception 'cairn: unknown run status %', quote_literal(status)
            using errcode = 'invalid_parameter_value',
                  hint = 'one of pending, running, sleeping, waiting, completed, failed, cancelled';
    end if;
    return query
    select r.id, r.workflow, r.status, r.created_at, r.finished_at, r.error, r.parent_run
      from cairn.runs r
     where (list_runs.workflow is null or r.workflow = list_runs.workflow)
       and (list_runs.status is null or r.status = list_runs.status)
       and (list_runs.since is null or r.created_at >= list_runs.since)
     order by r.created_at desc
     limit lim;
end $$;
comment on function cairn.list_runs(text, text, integer, timestamptz) is 'Recent runs, newest first, optionally of one workflow and status, created since a time.';

create or replace function cairn.get_run(run_id uuid)
returns table (id uuid, workflow text, status text, input jsonb, output jsonb, error text,
               idempotency_key text, queue text, priority integer, parent_run uuid,
               parent_step text, children uuid[], created_at timestamptz,
               started_at timestamptz, finished_at timestamptz, wake_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    perform cairn.check_not_null(run_id, 'run id');
    return query
    select r.id, r.workflow, r.status, r.input, r.output, r.error, r.idempotency_key, q.name,
           r.priority::integer, r.parent_run, r.parent_step,
           array(select c.id from cairn.runs c where c.parent_run = r.id order by c.created_at, c.id),
           r.created_at, r.started_at, r.finished_at, r.wake_at
      from cairn.runs r
      left join cairn.queues q on q.id = r.queue_id
     where r.id = get_run.run_id;
    if not found then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
end $$;
comment on function cairn.get_run(uuid) is 'Everything about one run: status, input, output, error, key, queue, parent and children, timings.';
create or replace function cairn.run_steps(run_id uuid)
returns table (seq integer, key text, kind text, status text, input jsonb, output jsonb,
               error text, attempts integer, started_at timestamptz, finished_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    perform cairn.check_not_null(run_id, 'run id');
    if not exists (select from cairn.runs r where r.id = run_steps.run_id) then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    return query
    select s.seq, s.key, s.kind, s.status, s.input, s.output, s.error, s.attempts,
           s.started_at, s.finished_at
      from cairn.steps s where s.run_id = run_steps.run_id
     order by s.seq;
end $$;
comment on function cairn.run_steps(uuid) is 'A run''s steps as they stand: per step its input, output, error, attempts, and the timing of its latest attempt.';

-- The run's history, oldest first: its creation and first start, every
-- step attempt (those that did not complete from cairn.run_events, the one
-- completed or in progress from cairn.steps), suspends, resumes, signals,
-- failures, retries, cancellation, and its completion. Nothing is erased by
-- a retry.
create or replace function cairn.run_history(run_id uuid)
returns table (at timestamptz, ended_at timestamptz, event text, step text, attempt integer,
               outcome text, error text, detail jsonb)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    perform cairn.check_not_null(run_id, 'run id');
    if not exists (select from cairn.runs r where r.id = run_history.run_id) then
        raise exception 'cairn: unknown run %', run_id using errcode = 'undefined_object';
    end if;
    return query
    select h.at, h.ended_at, h.event, h.step, h.attempt, h.outcome, h.error, h.detail
      from (
        select r.created_at as at, null::timestamptz as ended_at, 'created' as event,
               null::text as step, null::integer as attempt, null::text as outcome,
               null::text as error,
               jsonb_strip_nulls(jsonb_build_object('workflow', r.workflow,
                                                    'parent_run', r.parent_run)) as detail,
               0 as ord, 0::bigint as id
          from cairn.runs r where r.id = run_history.run_id
        union all
        select r.started_at, null, 'started', null, null, null, null, null, 1, 0
          from cairn.runs r where r.id = run_history.run_id and r.started_at is not null
        union all
        select e.at, e.ended_at, e.event, e.step, e.attempt, e.outcome, e.error, e.detail, 2, e.id
          from cairn.run_events e where e.run_id = run_history.run_id
        union all
        select s.started_at, s.finished_at,
               case when s.kind = 'step' then 'attempt' else s.kind end,
               s.key, s.attempts, s.status, s.error, null, 2, 0
          from cairn.steps s
         where s.run_id = run_history.run_id and s.status not in ('failed', 'retrying')
        union all
        select r.finished_at, null, 'completed', null, null, null, null, null, 3, 0
          from cairn.runs r where r.id = run_history.run_id and r.status = 'completed'
      ) h
     order by h.at, h.ord, h.id;
end $$;
comment on function cairn.run_history(uuid) is
    'A run''s history, oldest first: created, started, every step attempt with its start, end, outcome and error, suspends, resumes, signals, failures, retries, cancellation, completion.';
