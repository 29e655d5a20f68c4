-- cairn: what an operator reads and does — workers, workflows, dead letters.
--
-- Locks: worker_hello/seen/bye touch only the worker's own row (and hello
-- deletes rows unseen for a day). The list_ functions only read.
-- requeue_dead takes, for each dead letter in id order, what cairn.requeue
-- takes (for a failed run's job: the run engine's order, see
-- sql/20_run_engine.sql), one at a time in one transaction.

-- How long a worker may go unseen before it is reported lost (its row is
-- deleted by the next hello after a day).
create or replace function cairn.worker_alive_for()
returns interval
language sql immutable
set search_path = pg_catalog, pg_temp
as $$ select interval '30 seconds' $$;

create or replace function cairn.worker_hello(id uuid, host text, pid integer, queues text[],
                                              handlers text[], concurrency integer)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now timestamptz := pg_catalog.clock_timestamp();
begin
    perform cairn.check_not_null(id, 'id');
    perform cairn.check_not_null(host, 'host');
    perform cairn.check_not_null(pid, 'pid');
    perform cairn.check_not_null(queues, 'queues');
    perform cairn.check_not_null(handlers, 'handlers');
    perform cairn.check_not_null(concurrency, 'concurrency');
    if pg_catalog.length(host) > 255 then
        raise exception 'cairn: host is % characters long; at most 255', pg_catalog.length(host)
            using errcode = 'invalid_parameter_value';
    end if;
    -- Workers that died long ago.
    delete from cairn.workers w where w.seen_at < v_now - interval '1 day';
    insert into cairn.workers as w (id, host, pid, queues, handlers, concurrency, started_at, seen_at)
    values (worker_hello.id, worker_hello.host, worker_hello.pid, worker_hello.queues,
            worker_hello.handlers, worker_hello.concurrency, v_now, v_now)
    on conflict on constraint workers_pkey do update
       set seen_at = excluded.seen_at, queues = excluded.queues,
           handlers = excluded.handlers, concurrency = excluded.concurrency;
end $$;
comment on function cairn.worker_hello(uuid, text, integer, text[], text[], integer) is
    'A worker announces itself: its host, pid, queues, handlers and concurrency.';

create or replace function cairn.worker_seen(id uuid)
returns boolean
language sql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
    with u as (
        update cairn.workers w set seen_at = pg_catalog.clock_timestamp()
         where w.id = worker_seen.id
        returning 1
    )
    select exists (select from u)
$$;
comment on function cairn.worker_seen(uuid) is
    'A worker is still alive. False if its row is gone (it says hello again).';

create or replace function cairn.worker_bye(id uuid)
returns void
language sql volatile security definer
set search_path = pg_catalog, pg_temp
as $$ delete from cairn.workers w where w.id = worker_bye.id $$;
comment on function cairn.worker_bye(uuid) is
    'A worker stops.';

create or replace function cairn.list_workers()
returns table (id uuid, host text, pid integer, queues text[], handlers text[],
               concurrency integer, started_at timestamptz, seen_at timestamptz, alive boolean)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select w.id, w.host, w.pid, w.queues, w.handlers, w.concurrency, w.started_at, w.seen_at,
           w.seen_at > pg_catalog.clock_timestamp() - cairn.worker_alive_for()
      from cairn.workers w
     order by w.started_at, w.id
$$;
comment on function cairn.list_workers() is
    'Workers that are running (alive: seen in the last 30 s) or stopped without saying so in the last day.';

create or replace function cairn.list_workflows()
returns table (name text, kind text, queue text, registered_at timestamptz,
               active bigint, failed bigint, completed bigint)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select d.name, d.kind, d.queue, d.registered_at,
           coalesce(c.active, 0), coalesce(c.failed, 0), coalesce(c.completed, 0)
      from (select w.name, 'workflow'::text as kind, q.name as queue, w.registered_at
              from cairn.workflows w
              left join cairn.queues q on q.id = w.queue_id
            union all
            select f.name, 'flow', null, f.created_at
              from cairn.flows f) d
      -- One pass over the runs for all workflows, not one per workflow.
      left join (
          select r.workflow,
                 count(*) filter (where r.status not in ('completed', 'failed', 'cancelled')) as active,
                 count(*) filter (where r.status = 'failed') as failed,
                 count(*) filter (where r.status = 'completed') as completed
            from cairn.runs r
           group by r.workflow
      ) c on c.workflow = d.name
     order by d.name
$$;
comment on function cairn.list_workflows() is
    'Code-first workflows the workers announced and stored flows, with how many of their runs are active, failed and completed (runs not yet pruned).';

create or replace function cairn.list_dead(queue text default null, lim integer default 100)
returns table (id bigint, queue_name text, task text, payload jsonb, attempts integer,
               last_error text, enqueued_at timestamptz, died_at timestamptz,
               run_id uuid, parent_run uuid)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if list_dead.queue is not null then
        perform cairn.queue_id(list_dead.queue);
    end if;
    if lim is null or lim < 1 or lim > 10000 then
        raise exception 'cairn: lim must be between 1 and 10000, got %', coalesce(lim::text, 'null')
            using errcode = 'invalid_parameter_value';
    end if;
    return query
    select a.id, a.queue, a.task, a.payload, a.attempts, a.last_error, a.enqueued_at,
           a.archived_at, a.run_id, a.parent_run
      from cairn.archive a
     where a.outcome = 'dead'
       and (list_dead.queue is null or a.queue = list_dead.queue)
     order by a.archived_at desc, a.id desc
     limit lim;
end $$;
comment on function cairn.list_dead(text, integer) is
    'Dead letters, newest first: what failed for good, with its last error. Put one back with cairn.requeue, all of a queue with cairn.requeue_dead.';

create or replace function cairn.requeue_dead(queue text)
returns table (requeued bigint, skipped bigint)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_id bigint;
    v_requeued bigint := 0;
    v_skipped bigint := 0;
begin
    perform cairn.queue_id(requeue_dead.queue);
    for v_id in
        select a.id from cairn.archive a
         where a.queue = requeue_dead.queue and a.outcome = 'dead'
         order by a.id
    loop
        begin
            if cairn.requeue(requeue_dead.queue, v_id) then
                v_requeued := v_requeued + 1;
            end if;
        exception when object_not_in_prerequisite_state then
            -- A step's job (retry its run) or a run that is not failed.
            v_skipped := v_skipped + 1;
        end;
    end loop;
    return query select v_requeued, v_skipped;
end $$;
comment on function cairn.requeue_dead(text) is
    'Every dead letter of a queue back on it (cairn.requeue for each); a step''s job, which only its run''s retry can put back, is skipped and counted.';
