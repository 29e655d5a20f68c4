-- cairn: who may call what.
--
-- Postgres lets PUBLIC execute every new function; cairn takes that away and
-- grants its functions to three NOLOGIN group roles. Give an application's
-- login role membership of the one it needs:
--   cairn_producer  send, send_batch, metrics, start_workflow, send_signal,
--                   run_status, get_run, list_runs, run_steps, run_history,
--                   list_schedules, next_fires, start_flow, list_flows,
--                   plan_flow, export_flow(s), list_workers, list_workflows
--   cairn_worker    producer + claim/claim_from/read/pop, the fenced ack/ack_and_take/archive/retry/
--                   fail/extend/set_vt/release, create_queue, and the run
--                   engine's worker calls (40_worker.sql), prune,
--                   tick_schedules, fire_timers, register_step_handler, worker_hello,
--                   worker_seen, worker_bye
--   cairn_admin     worker + drop_queue, purge_queue, delete, requeue,
--                   cancel_run, retry_run, set_retention, create_,
--                   update_, pause_, resume_, trigger_ and delete_schedule,
--                   create_flow, compose_flow, list_dead, requeue_dead, doctor,
--                   and SELECT on the tables
-- The engine's internal functions (00_base.sql checks, 20_run_engine.sql)
-- are granted to no one: only cairn's SECURITY DEFINER functions call them.
-- Every install starts from nothing: whatever was granted on cairn's objects
-- to anyone else (PUBLIC, other roles, or the three roles beyond their
-- lists) is revoked first.
-- None of them can read or write cairn's tables directly (admin can read):
-- the functions are SECURITY DEFINER, owned by the role that ran initialize().
-- Roles are cluster-wide; they are created when the initializing role may
-- create roles, and the grants are skipped with a notice otherwise.

revoke all on all functions in schema cairn from public;
revoke all on all tables in schema cairn from public;
revoke all on all sequences in schema cairn from public;
revoke all on schema cairn from public;
alter default privileges in schema cairn revoke execute on functions from public;

-- Revoke what any other role holds on cairn's objects (the owner keeps its
-- rights; the three roles are granted their lists again below).
do $$
declare
    v_role text;
begin
    for v_role in
        select distinct pg_catalog.pg_get_userbyid(a.grantee)
          from (select p.proacl as acl, p.proowner as owner
                  from pg_catalog.pg_proc p where p.pronamespace = 'cairn'::regnamespace
                union all
                select c.relacl, c.relowner
                  from pg_catalog.pg_class c where c.relnamespace = 'cairn'::regnamespace
                union all
                select n.nspacl, n.nspowner
                  from pg_catalog.pg_namespace n where n.nspname = 'cairn') o,
               lateral pg_catalog.aclexplode(o.acl) a
         where a.grantee <> 0 and a.grantee <> o.owner
    loop
        execute format('revoke all on all functions in schema cairn from %I', v_role);
        execute format('revoke all on all tables in schema cairn from %I', v_role);
        execute format('revoke all on all sequences in schema cairn from %I', v_role);
        execute format('revoke all on schema cairn from %I', v_role);
    end loop;
end $$;

do $$
declare
    v_role text;
begin
    foreach v_role in array array['cairn_producer', 'cairn_worker', 'cairn_admin'] loop
        if not exists (select from pg_catalog.pg_roles r where r.rolname = v_role) then
            begin
                execute format('create role %I nologin', v_role);
            exception
                -- Another database of this cluster created it at the same moment.
                when duplicate_object or unique_violation then null;
                when insufficient_privilege then
                    raise notice 'cairn: cannot create role %; create it and re-run initialize() to grant it', v_role;
            end;
        end if;
    end loop;
end $$;

do $$
declare
    v_producer constant text[] := array[
        'cairn.now()',
        'cairn.send(text, jsonb, double precision, integer, text, text)',
        'cairn.send_batch(text, jsonb[], double precision, integer, text)',
        'cairn.metrics(text)',
        'cairn.metrics_all()',
        'cairn.start_workflow(text, jsonb, text, text, integer, double precision, text, text)',
        'cairn.send_signal(uuid, text, jsonb)',
        'cairn.run_status(uuid)',
        'cairn.list_runs(text, text, integer, timestamptz)',
        'cairn.get_run(uuid)',
        'cairn.run_steps(uuid)',
        'cairn.run_history(uuid)',
        'cairn.list_schedules()',
        'cairn.next_fires(text, text, integer, timestamptz)',
        'cairn.start_flow(text, jsonb, text, integer, double precision, text, text)',
        'cairn.list_flows()',
        'cairn.plan_flow(jsonb)',
        'cairn.plan_flow(text, integer)',
        'cairn.export_flow(text)',
        'cairn.export_flows()',
        'cairn.list_workers()',
        'cairn.list_workflows()'];
    v_worker constant text[] := v_producer || array[
        'cairn.create_queue(text)',
        'cairn.claim(text, double precision, integer, text[])',
        'cairn.claim_from(text, double precision, integer, text[], integer, timestamptz)',
        'cairn.read(text, integer, integer)',
        'cairn.pop(text, integer)',
        'cairn.ack(bigint[], bigint[])',
        'cairn.ack(bigint[], bigint[], jsonb[])',
        'cairn.ack(bigint, bigint)',
        'cairn.ack_and_take(bigint[], bigint[], jsonb[], double precision, integer, text[], text[])',
        'cairn.archive(bigint[], bigint[], jsonb[])',
        'cairn.archive(bigint, bigint, jsonb)',
        'cairn.retry(bigint, bigint, double precision, text)',
        'cairn.fail(bigint, bigint, text)',
        'cairn.extend(bigint[], bigint[], double precision)',
        'cairn.set_vt(bigint, bigint, double precision)',
        'cairn.release(bigint[], bigint[])',
        'cairn.register_workflow(text, text)',
        'cairn.load_run(uuid, bigint, bigint)',
        'cairn.load_runs(uuid[], bigint[], bigint[])',
        'cairn.begin_step(uuid, bigint, bigint, jsonb, text, integer, text, jsonb)',
        'cairn.begin_steps(uuid[], bigint[], bigint[], jsonb[], text[], integer[], text[], jsonb[])',
        'cairn.record_steps(uuid, bigint, bigint, jsonb)',
        'cairn.sleep_step(uuid, bigint, bigint, jsonb, text, integer, double precision)',
        'cairn.await_signal(uuid, bigint, bigint, jsonb, text, integer, text, double precision)',
        'cairn.start_child(uuid, bigint, bigint, jsonb, text, integer, text, text, jsonb)',
        'cairn.start_task_step(uuid, bigint, bigint, jsonb, text, integer, text, text, text, jsonb)',
        'cairn.suspend_run(uuid, bigint, bigint, jsonb, timestamptz, double precision, text)',
        'cairn.complete_run(uuid, bigint, bigint, jsonb, jsonb)',
        'cairn.complete_runs(uuid[], bigint[], bigint[], jsonb[], jsonb[])',
        'cairn.fail_run(uuid, bigint, bigint, jsonb, text)',
        'cairn.prune(integer)',
        'cairn.tick_schedules(integer)',
        'cairn.fire_timers(integer)',
        'cairn.register_step_handler(text)',
        'cairn.worker_hello(uuid, text, integer, text[], text[], integer)',
        'cairn.worker_seen(uuid)',
        'cairn.worker_bye(uuid)'];
    v_admin constant text[] := v_worker || array[
        'cairn.drop_queue(text)',
        'cairn.purge_queue(text)',
        'cairn.purge_queue(text, integer)',
        'cairn.delete(text, bigint)',
        'cairn.requeue(text, bigint)',
        'cairn.cancel_run(uuid)',
        'cairn.retry_run(uuid)',
        'cairn.set_retention(interval, interval)',
        'cairn.create_schedule(text, text, text, jsonb, text, text, text, text, text, integer, boolean)',
        'cairn.update_schedule(text, text, text, jsonb, text, text, integer)',
        'cairn.pause_schedule(text)',
        'cairn.resume_schedule(text)',
        'cairn.delete_schedule(text)',
        'cairn.trigger_schedule(text)',
        'cairn.create_flow(text, jsonb)',
        'cairn.compose_flow(text, text[], text)',
        'cairn.list_dead(text, integer)',
        'cairn.requeue_dead(text)',
        'cairn.doctor(double precision)'];
    v_grant record;
begin
    for v_grant in
        select g.role, g.fns
          from (values ('cairn_producer', v_producer),
                       ('cairn_worker', v_worker),
                       ('cairn_admin', v_admin)) as g(role, fns)
         where exists (select from pg_catalog.pg_roles r where r.rolname = g.role)
    loop
        execute format('grant usage on schema cairn to %I', v_grant.role);
        execute format('grant execute on function %s to %I',
                       array_to_string(v_grant.fns, ', '), v_grant.role);
    end loop;
    if exists (select from pg_catalog.pg_roles r where r.rolname = 'cairn_admin') then
        grant select on all tables in schema cairn to cairn_admin;
    end if;
end $$;
