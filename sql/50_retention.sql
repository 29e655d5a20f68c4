-- cairn: retention — finished runs and archived jobs are deleted once they
-- are older than the window cairn.retention sets (7 days for completed and
-- cancelled work, 30 days for failures and dead letters, by default).
--
-- Who calls it: every worker calls cairn.prune() in the background (once a
-- minute, and again at once while a call finds a full batch); an operator may
-- call it too. A call deletes at most `batch` runs and `batch` archived jobs
-- in one short transaction, so pruning a large backlog is many small steps,
-- never one long lock. Only one prune runs at a time: a call that finds
-- another under way (the retention row locked) returns at once with zeros.
-- Nothing here waits for the hot path: the runs and archived jobs it deletes
-- are taken with SKIP LOCKED, and no live job is touched.
--
-- A run is deleted with its whole family: the root run is the unit (its
-- finished_at decides), and it is pruned only when every run under it has
-- ended too. Its steps, history and signals go with it. Once a run is gone,
-- its idempotency key names no run, and starting the workflow with that key
-- again starts a new run.
--
-- Lock order (see 20_run_engine.sql): the retention row, then runs (roots
-- before their children), then archive rows (SKIP LOCKED); steps, history and
-- signals only of the runs locked.

create or replace function cairn.set_retention(completed interval, failed interval)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if completed < interval '0' or failed < interval '0' then
        raise exception 'cairn: a retention window must not be negative (completed %, failed %)',
                        completed, failed
            using errcode = 'invalid_parameter_value',
                  hint = 'give an interval such as ''7 days'', or NULL to keep for ever';
    end if;
    update cairn.retention r
       set completed = set_retention.completed, failed = set_retention.failed;
end $$;
comment on function cairn.set_retention(interval, interval) is
    'Set how long finished work is kept: completed (completed and cancelled runs, completed archived jobs) and failed (failed runs, dead letters). NULL keeps for ever.';

create or replace function cairn.prune(batch integer default 500)
returns table (runs integer, archived integer)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off  -- by index, whatever the statistics said when it was planned
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now   timestamptz := cairn.now();
    v_keep  record;
    v_roots uuid[];
    v_tree  uuid[];
begin
    if batch is null or batch < 1 or batch > 10000 then
        raise exception 'cairn: prune batch must be between 1 and 10000, got %', batch
            using errcode = 'invalid_parameter_value';
    end if;
    runs := 0;
    archived := 0;
    select r.completed, r.failed into v_keep from cairn.retention r for update skip locked;
    if not found then
        return next;
        return;
    end if;

    -- Root runs past their window whose children have all ended (a root whose
    -- child still runs, a sibling of a failed child in a join say, waits).
    select array_agg(c.id) into v_roots
      from ((select r.id from cairn.runs r
              where r.parent_run is null and r.status in ('completed', 'cancelled')
                and r.finished_at < v_now - v_keep.completed
                and not exists (select from cairn.runs k
                                 where k.parent_run = r.id and k.status not in
                                       ('completed', 'failed', 'cancelled'))
              order by r.finished_at limit batch)
            union all
            (select r.id from cairn.runs r
              where r.parent_run is null and r.status = 'failed'
                and r.finished_at < v_now - v_keep.failed
                and not exists (select from cairn.runs k
                                 where k.parent_run = r.id and k.status not in
                                       ('completed', 'failed', 'cancelled'))
              order by r.finished_at limit batch)) c;
    if v_roots is not null then
        with recursive tree (root, id, status) as (
            select r.id, r.id, r.status from cairn.runs r where r.id = any (v_roots)
            union all
            select t.root, r.id, r.status
              from tree t join cairn.runs r on r.parent_run = t.id
        ), ripe as (
            select t.root from tree t group by t.root
            having bool_and(t.status in ('completed', 'failed', 'cancelled'))
            limit batch
        ), locked as (
            select r.id from cairn.runs r
             where r.id in (select x.root from ripe x)
             for update skip locked
        )
        select array_agg(t.id) into v_tree
          from tree t where t.root in (select l.id from locked l);
    end if;
    if v_tree is not null then
        delete from cairn.steps s where s.run_id = any (v_tree);
        delete from cairn.run_events e where e.run_id = any (v_tree);
        delete from cairn.signals g where g.run_id = any (v_tree);
        delete from cairn.runs r where r.id = any (v_tree);
        runs := cardinality(v_tree);
    end if;

    with gone as (
        delete from cairn.archive a
         where a.id in (select x.id from cairn.archive x
                         where x.id in ((select y.id from cairn.archive y
                                          where y.outcome = 'completed'
                                            and y.archived_at < v_now - v_keep.completed
                                          order by y.archived_at limit batch)
                                        union all
                                        (select y.id from cairn.archive y
                                          where y.outcome = 'dead'
                                            and y.archived_at < v_now - v_keep.failed
                                          order by y.archived_at limit batch))
                           for update skip locked)
        returning 1)
    select count(*) into archived from gone;

    update cairn.retention r set pruned_at = v_now;
    return next;
end $$;
comment on function cairn.prune(integer) is
    'Delete up to `batch` finished runs (with their steps, history, signals and child runs) and `batch` archived jobs older than the retention window. Returns how many of each; zeros while another prune runs.';
