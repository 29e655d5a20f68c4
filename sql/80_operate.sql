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
-- Planned for the filter given, on every call: a plan kept from calls made
-- while the archive was empty scanned every completed job kept in it.
set plan_cache_mode = force_custom_plan
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

-- The installation's health as the database sees it, one row per check:
-- status 'ok', 'warn' or 'fail' and what was found. `warn_after` is how
-- old (seconds) a ready job, an expired lease, a running step, an open
-- transaction or a late schedule may get before it is reported. The schema
-- itself (migrations, functions, drift) is checked by the binary, which
-- knows what it would install (App::doctor, `cairn doctor`). Only reads.
create or replace function cairn.doctor(warn_after double precision default 300)
returns table (check_name text, status text, detail text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now   timestamptz := cairn.now();                 -- the queue's clock
    v_wall  timestamptz := pg_catalog.clock_timestamp();  -- workers' and sessions' clock
    v_limit interval;
    v_n     bigint;
    v_text  text;
    v_row   record;
begin
    perform cairn.check_seconds(warn_after, 'warn_after', 0, 31536000);
    v_limit := warn_after * interval '1 second';

    -- Roles: the three exist, and PUBLIC can reach nothing of cairn's.
    select pg_catalog.string_agg(r, ', ' order by r) into v_text
      from pg_catalog.unnest(array['cairn_producer', 'cairn_worker', 'cairn_admin']) r
     where not exists (select from pg_catalog.pg_roles x where x.rolname = r);
    select count(*) into v_n
      from pg_catalog.pg_proc p
     where p.pronamespace = 'cairn'::regnamespace
       and pg_catalog.has_function_privilege('public', p.oid, 'execute');
    select v_n + count(*) into v_n
      from pg_catalog.pg_class c
     where c.relnamespace = 'cairn'::regnamespace and c.relkind in ('r', 'S', 'v')
       and pg_catalog.has_table_privilege('public', c.oid, 'select, insert, update, delete');
    check_name := 'roles';
    if v_n > 0 then
        status := 'fail';
        detail := pg_catalog.format('PUBLIC may use %s of cairn''s functions or tables: run cairn migrate to revoke it', v_n);
    elsif v_text is not null then
        status := 'warn';
        detail := pg_catalog.format('missing role(s) %s: initialize as a role that may create roles', v_text);
    else
        status := 'ok';
        select 'cairn_producer, cairn_worker and cairn_admin exist; members: '
               || coalesce(pg_catalog.string_agg(pg_catalog.format('%s in %s', m.member::regrole, m.roleid::regrole),
                                                  ', ' order by m.roleid::regrole::text, m.member::regrole::text),
                           'none yet')
          into detail
          from pg_catalog.pg_auth_members m
         where m.roleid::regrole::text in ('cairn_producer', 'cairn_worker', 'cairn_admin');
    end if;
    return next;

    -- The oldest ready job: a queue nobody drains, or one falling behind.
    select q.name, v_now - min(greatest(j.visible_at, j.leased_until)) as age, count(*) as n into v_row
      from cairn.jobs j join cairn.queues q on q.id = j.queue_id
     where greatest(j.visible_at, j.leased_until) <= v_now
     group by q.name order by min(greatest(j.visible_at, j.leased_until)) limit 1;
    check_name := 'oldest ready job';
    if v_row.name is null then
        status := 'ok';
        detail := 'no job is waiting';
    else
        status := case when v_row.age > v_limit then 'warn' else 'ok' end;
        detail := pg_catalog.format('%s s in queue %s (%s ready there)',
                                    pg_catalog.round(extract(epoch from v_row.age)::numeric, 1),
                                    v_row.name, v_row.n);
    end if;
    return next;

    -- Queues with ready jobs and no live worker serving them.
    select pg_catalog.string_agg(d.name, ', ' order by d.name) into v_text
      from (select distinct q.name
              from cairn.jobs j join cairn.queues q on q.id = j.queue_id
             where greatest(j.visible_at, j.leased_until) <= v_now) d
     where not exists (select from cairn.workers w
                        where d.name = any (w.queues)
                          and w.seen_at > v_wall - cairn.worker_alive_for());
    select count(*) filter (where w.seen_at > v_wall - cairn.worker_alive_for()) as alive,
           count(*) filter (where w.seen_at <= v_wall - cairn.worker_alive_for()) as lost
      into v_row
      from cairn.workers w;
    check_name := 'workers';
    status := case when v_text is null then 'ok' else 'warn' end;
    detail := pg_catalog.format('%s alive, %s lost in the last day', v_row.alive, v_row.lost)
              || coalesce('; no live worker serves ' || v_text, '');
    return next;

    -- Leases that ran out with no worker taking the job back.
    select count(*) as n, max(v_now - j.leased_until) as age,
           pg_catalog.string_agg(distinct q.name, ', ') as queues
      into v_row
      from cairn.jobs j join cairn.queues q on q.id = j.queue_id
     where j.lease is not null and j.leased_until < v_now - v_limit;
    check_name := 'expired leases';
    if v_row.n = 0 then
        status := 'ok';
        select pg_catalog.format('%s job(s) leased, none expired over %s s ago', count(*), warn_after)
          into detail from cairn.jobs j where j.lease is not null;
    else
        status := 'warn';
        detail := pg_catalog.format('%s job(s) in %s: lease expired up to %s s ago and nobody reclaimed it',
                                    v_row.n, v_row.queues,
                                    pg_catalog.round(extract(epoch from v_row.age)::numeric));
    end if;
    return next;

    -- Steps that have been running a long time.
    select count(*) as n, max(v_now - s.started_at) as age into v_row
      from cairn.steps s
     where s.status = 'running' and s.started_at < v_now - v_limit;
    check_name := 'long-running steps';
    status := case when v_row.n = 0 then 'ok' else 'warn' end;
    detail := case when v_row.n = 0
                   then pg_catalog.format('none running over %s s', warn_after)
                   else pg_catalog.format('%s step(s) running, the longest for %s s', v_row.n,
                                          pg_catalog.round(extract(epoch from v_row.age)::numeric))
              end;
    return next;

    -- A code-first run that is not over is driven by its job (parked while it
    -- sleeps or waits); without one, nothing will ever move it.
    select count(*) as n, pg_catalog.string_agg(x.id::text, ', ') as ids into v_row
      from (select r.id
              from cairn.runs r
             where r.status in ('pending', 'running', 'sleeping', 'waiting')
               and r.flow_version is null
               and not exists (select from cairn.jobs j where j.id = r.job_id)
             order by r.created_at limit 5) x;
    check_name := 'orphaned runs';
    status := case when v_row.n = 0 then 'ok' else 'fail' end;
    detail := case when v_row.n = 0 then 'every unfinished run has its job'
                   else pg_catalog.format('run(s) %s are unfinished and have no job: cancel them',
                                          v_row.ids)
              end;
    return next;

    -- Dead letters.
    select count(*) as n,
           pg_catalog.string_agg(pg_catalog.format('%s in %s', d.n, d.queue), ', ' order by d.queue) as queues
      into v_row
      from (select a.queue, count(*) as n from cairn.archive a where a.outcome = 'dead' group by a.queue) d;
    check_name := 'dead letters';
    status := case when v_row.n = 0 then 'ok' else 'warn' end;
    detail := coalesce(v_row.queues || ' (cairn dead list)', 'none');
    return next;

    -- Schedules that should have fired and did not: no worker ticks them.
    select count(*) as n, pg_catalog.string_agg(s.name, ', ' order by s.name) as names into v_row
      from cairn.schedules s
     where not s.paused and s.next_fire < v_now - v_limit;
    check_name := 'schedules';
    status := case when v_row.n = 0 then 'ok' else 'warn' end;
    detail := case when v_row.n = 0 then 'none late'
                   else pg_catalog.format('%s late by over %s s: %s (no worker is ticking them)',
                                          v_row.n, warn_after, v_row.names)
              end;
    return next;

    -- Flow signal waits past their timeout: no worker fires timers.
    select count(*) as n into v_row
      from cairn.steps s join cairn.runs r on r.id = s.run_id
     where s.kind = 'signal' and s.status = 'waiting' and s.wake_at < v_now - v_limit
       and r.flow_version is not null and r.status in ('pending', 'running', 'sleeping', 'waiting');
    check_name := 'timers';
    status := case when v_row.n = 0 then 'ok' else 'warn' end;
    detail := case when v_row.n = 0 then 'none late'
                   else pg_catalog.format('%s flow signal wait(s) timed out over %s s ago and were not fired (no worker is firing timers)',
                                          v_row.n, warn_after)
              end;
    return next;

    -- Dead rows on the hot tables: vacuum falling behind.
    for v_row in
        select t.relname, t.n_live_tup, t.n_dead_tup,
               pg_catalog.pg_size_pretty(pg_catalog.pg_total_relation_size(t.relid)) as size,
               greatest(t.last_autovacuum, t.last_vacuum) as vacuumed
          from pg_catalog.pg_stat_user_tables t
         where t.schemaname = 'cairn' and t.relname in ('jobs', 'runs', 'steps', 'archive', 'run_events')
         order by t.relname
    loop
        check_name := 'dead rows in ' || v_row.relname;
        status := case when v_row.n_dead_tup > 10000
                        and v_row.n_dead_tup > 0.2 * greatest(v_row.n_live_tup, 1)
                       then 'warn' else 'ok' end;
        detail := pg_catalog.format('%s live, %s dead, %s on disk; last vacuumed %s',
                                    v_row.n_live_tup, v_row.n_dead_tup, v_row.size,
                                    coalesce(pg_catalog.to_char(v_row.vacuumed, 'YYYY-MM-DD HH24:MI:SS TZ'), 'never'));
        return next;
    end loop;

    -- The oldest snapshot holding back vacuum: an open transaction, a
    -- replication slot or a prepared transaction.
    select h.what, h.age into v_row
      from (select pg_catalog.format('a transaction of %s (pid %s, %s)', a.usename, a.pid, a.state) as what,
                   v_wall - a.xact_start as age
              from pg_catalog.pg_stat_activity a
             where (a.backend_xmin is not null or a.backend_xid is not null)
               and a.pid <> pg_catalog.pg_backend_pid()
               and a.xact_start is not null
            union all
            select pg_catalog.format('prepared transaction %s', p.gid), v_wall - p.prepared
              from pg_catalog.pg_prepared_xacts p
            union all
            select pg_catalog.format('replication slot %s (xmin age %s)', s.slot_name,
                                     pg_catalog.age(coalesce(s.xmin, s.catalog_xmin))),
                   null::interval
              from pg_catalog.pg_replication_slots s
             where s.xmin is not null or s.catalog_xmin is not null) h
     order by h.age desc nulls first limit 1;
    check_name := 'xmin horizon';
    if v_row.what is null then
        status := 'ok';
        detail := 'no other transaction or slot holds back vacuum';
    elsif v_row.age is null or v_row.age > v_limit then
        status := 'warn';
        detail := v_row.what || coalesce(pg_catalog.format(', open for %s s',
                      pg_catalog.round(extract(epoch from v_row.age)::numeric)), '')
                  || ': vacuum cannot remove rows dead since it began';
    else
        status := 'ok';
        detail := pg_catalog.format('the oldest is %s, open for %s s', v_row.what,
                                    pg_catalog.round(extract(epoch from v_row.age)::numeric, 1));
    end if;
    return next;
end $$;
comment on function cairn.doctor(double precision) is
    'The installation''s health, one row per check (ok, warn or fail): roles, the oldest ready job, queues no worker serves, expired leases, long-running steps, orphaned runs, dead letters, late schedules, late flow timers, dead rows on the hot tables, the xmin horizon. Reads only.';
