-- cairn: flows — workflows defined as data, driven by Postgres.
--
-- Who calls it: admins create_flow and compose_flow; producers start_flow,
-- plan_flow, list_flows and export_flow(s); workers register_step_handler.
-- The rest is the engine's (no role is granted it).
--
-- A definition is a JSON object:
--   {"queue": "workflows", "output": "<path>", "description": "...",
--    "steps": [{"name": "pay",
--               "handler": "pay" | "flow": "sub" | "workflow": "wf" | "signal": "approval",
--               "after": ["get_product"],        -- runs when these are done
--               "when": "<path predicate>",      -- else skipped
--               "input": "<path>" | {"field": "<path>", ...},
--               "map": "<path to an array>",     -- one job per element
--               "queue": "payments",
--               "retry": {"max_attempts": 5, "backoff": 1, "max_backoff": 60},
--               "timeout": 30,                 -- a handler's attempt; a signal's wait
--               "goto": {"step": "review", "when": "<path predicate>", "max": 3}}]}
-- Paths are Postgres's SQL/JSON path language, read against the run's
-- context: {"input": <the run's input>, "<step>": <its output>, ...} for
-- every completed step; in a map, $item and $index are the element and its
-- position. A step with none of handler/flow/workflow/signal runs the
-- handler of its own name. check_flow refuses a bad definition with the
-- step and the reason; the stored definition is the checked one, with its
-- defaults filled in (so storing it again is a no-op).
--
-- How a run moves (all in the transaction that settles a step, so no Rust
-- process replays anything): a step job's ack settles its step
-- (settle_jobs → settle_step → flow_step_settled), a loop goes back if its
-- goto holds (flow_loop), and advance_flow starts every step whose `after`
-- are all completed or skipped: it evaluates the step's `when` (false:
-- skipped, recorded) and starts it (flow_start_step): a job of its handler
-- on its queue, whose payload is {"input": ..., "policy": {...}} and whose
-- parent_run/parent_step name the run and step; a child run; or a wait for
-- a signal. When every step is completed or skipped the run completes with
-- `output` (default: every step's output by name); a step that fails for
-- good fails the run, and retry_run starts the failed steps again.
-- Lock order: as 20_run_engine.sql; a flow run's ancestors are locked with
-- it (lock_runs), since a step's end may end the run and its parent's step.

-- Internal: raise a definition error naming the flow and step.
create or replace function cairn.flow_error(flow text, step text, reason text,
                                            code text default '22023', hint text default null)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_message text := format('cairn: flow "%s"%s: %s', flow,
                                     case when step is not null then format(': step "%s"', step) else '' end,
                                     reason);
begin
    if hint is null then
        raise exception using message = v_message, errcode = code;
    end if;
    raise exception using message = v_message, errcode = code, hint = hint;
end $$;

-- Internal: raise unless `expr` is a JSON path string that parses and can
-- be evaluated with `vars`.
create or replace function cairn.check_flow_path(flow text, step text, what text, expr jsonb,
                                                 vars jsonb)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_error text;
begin
    if jsonb_typeof(expr) is distinct from 'string' then
        perform cairn.flow_error(flow, step, format('%s must be a JSON path string, got %s', what, expr));
    end if;
    begin
        perform jsonb_path_query_first('{}'::jsonb, (expr #>> '{}')::jsonpath, vars, true);
    exception when others then
        v_error := sqlerrm;
    end;
    if v_error is not null then
        perform cairn.flow_error(flow, step, format('%s %s does not parse: %s', what, expr, v_error),
                                 '22023', 'paths use Postgres''s SQL/JSON path language, e.g. $.get_product.price > 10');
    end if;
end $$;

-- Internal: the steps reachable from `name` along "after" edges: upwards
-- (what it waits for, directly or not) or downwards (what waits for it).
create or replace function cairn.flow_reach(steps jsonb, name text, up boolean)
returns text[]
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
    with recursive edges(step, dep) as (
        select s->>'name', d
          from jsonb_array_elements(steps) s, jsonb_array_elements_text(coalesce(s->'after', '[]')) d
    ), walk(name) as (
        select case when up then e.dep else e.step end
          from edges e where (case when up then e.step else e.dep end) = flow_reach.name
        union
        select case when up then e.dep else e.step end
          from edges e join walk w on (case when up then e.step else e.dep end) = w.name
    )
    select coalesce(array_agg(w.name), '{}') from walk w
$$;

-- Internal: each step's stage (1 for steps that wait for nothing, else one
-- more than the latest stage it waits for), in definition order. NULL for
-- steps on a cycle of "after".
create or replace function cairn.flow_stages(steps jsonb)
returns table (name text, stage integer, ord integer)
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_stage   jsonb := '{}';
    v_changed boolean := true;
    v_step    jsonb;
    v_max     integer;
    v_missing boolean;
begin
    while v_changed loop
        v_changed := false;
        for v_step in select value from jsonb_array_elements(steps) loop
            continue when v_stage ? (v_step->>'name');
            select max((v_stage->>d)::integer), bool_or(not v_stage ? d) into v_max, v_missing
              from jsonb_array_elements_text(coalesce(v_step->'after', '[]')) d;
            continue when coalesce(v_missing, false);
            v_stage := v_stage || jsonb_build_object(v_step->>'name', coalesce(v_max, 0) + 1);
            v_changed := true;
        end loop;
    end loop;
    return query
    select e.s->>'name', (v_stage->>(e.s->>'name'))::integer, e.o::integer
      from jsonb_array_elements(steps) with ordinality e(s, o);
end $$;

-- Internal: check a definition; returns it with its defaults filled in.
create or replace function cairn.check_flow(flow text, definition jsonb)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_steps  jsonb;
    v_step   jsonb;
    v_out    jsonb := '[]';
    v_name   text;
    v_names  text[] := '{}';
    v_key    text;
    v_kinds  text[];
    v_target text;
    v_dep    text;
    v_vars   jsonb;
    v_value  jsonb;
    v_path   text[];
    v_n      integer := 0;
    v_result jsonb;
begin
    if definition is null or jsonb_typeof(definition) <> 'object' then
        perform cairn.flow_error(flow, null, 'the definition must be a JSON object with "steps"');
    end if;
    perform cairn.check_payload(definition, 'flow definition');
    for v_key in select jsonb_object_keys(definition) loop
        if v_key not in ('steps', 'queue', 'output', 'description') then
            perform cairn.flow_error(flow, null,
                format('unknown key "%s" (a flow has steps, queue, output and description)', v_key));
        end if;
    end loop;
    v_steps := definition->'steps';
    if jsonb_typeof(v_steps) is distinct from 'array' or jsonb_array_length(v_steps) = 0 then
        perform cairn.flow_error(flow, null, '"steps" must be a non-empty array of steps');
    end if;
    if jsonb_array_length(v_steps) > 1000 then
        perform cairn.flow_error(flow, null, 'at most 1000 steps');
    end if;
    v_result := jsonb_build_object('queue', coalesce(definition->'queue', '"workflows"'));
    if jsonb_typeof(v_result->'queue') <> 'string'
       or v_result->>'queue' !~ '^[a-z_][a-z0-9_]{0,62}$' then
        perform cairn.flow_error(flow, null, format('invalid queue %s (a lowercase identifier)', v_result->'queue'));
    end if;
    if definition ? 'output' then
        perform cairn.check_flow_path(flow, null, 'output', definition->'output', '{}');
        v_result := v_result || jsonb_build_object('output', definition->'output');
    end if;
    if definition ? 'description' then
        if jsonb_typeof(definition->'description') <> 'string' then
            perform cairn.flow_error(flow, null, 'description must be a string');
        end if;
        v_result := v_result || jsonb_build_object('description', definition->'description');
    end if;

    -- The names first: "after" and "goto" may name later steps.
    for v_step in select value from jsonb_array_elements(v_steps) loop
        v_n := v_n + 1;
        if jsonb_typeof(v_step) <> 'object' or jsonb_typeof(v_step->'name') is distinct from 'string' then
            perform cairn.flow_error(flow, null, format('step %s must be an object with a "name"', v_n));
        end if;
        v_name := v_step->>'name';
        if v_name !~ '^[A-Za-z_][A-Za-z0-9_]{0,62}$' then
            perform cairn.flow_error(flow, v_name,
                'invalid step name: use 1 to 63 letters, digits and _, not starting with a digit (it is a key of the context)');
        end if;
        if v_name = 'input' then
            perform cairn.flow_error(flow, v_name, '"input" is reserved: the context holds the run''s input under it');
        end if;
        if v_name = any (v_names) then
            perform cairn.flow_error(flow, v_name, 'duplicate step name');
        end if;
        v_names := v_names || v_name;
    end loop;

    for v_step in select value from jsonb_array_elements(v_steps) loop
        v_name := v_step->>'name';
        for v_key in select jsonb_object_keys(v_step) loop
            if v_key not in ('name', 'handler', 'flow', 'workflow', 'signal', 'after', 'when', 'input',
                             'map', 'queue', 'retry', 'timeout', 'goto', 'description') then
                perform cairn.flow_error(flow, v_name, format('unknown key "%s"', v_key), '22023',
                    'a step has name, one of handler/flow/workflow/signal, after, when, input, map, queue, retry, timeout, goto, description');
            end if;
        end loop;
        v_kinds := array_remove(array[
            case when v_step ? 'handler' then 'handler' end,
            case when v_step ? 'flow' then 'flow' end,
            case when v_step ? 'workflow' then 'workflow' end,
            case when v_step ? 'signal' then 'signal' end], null);
        if cardinality(v_kinds) > 1 then
            perform cairn.flow_error(flow, v_name,
                format('names both a %s and a %s: a step runs one thing', v_kinds[1], v_kinds[2]));
        end if;
        if cardinality(v_kinds) = 0 then
            v_step := v_step || jsonb_build_object('handler', v_name);
            v_kinds := array['handler'];
        end if;
        if jsonb_typeof(v_step->v_kinds[1]) <> 'string' then
            perform cairn.flow_error(flow, v_name, format('%s must be a name (a string)', v_kinds[1]));
        end if;
        v_target := v_step->>v_kinds[1];
        case v_kinds[1]
        when 'handler' then
            if not exists (select from cairn.step_handlers h where h.name = v_target) then
                perform cairn.flow_error(flow, v_name, format('unknown handler "%s"', v_target), '42704',
                    'a handler is known once a worker that has it starts, or App::initialize of an app that registers it runs (select name from cairn.step_handlers lists them)');
            end if;
        when 'flow' then
            if v_target = flow then
                perform cairn.flow_error(flow, v_name, 'a flow cannot run itself as a step');
            end if;
            if not exists (select from cairn.flows f where f.name = v_target) then
                perform cairn.flow_error(flow, v_name, format('unknown flow "%s"', v_target), '42704');
            end if;
            if exists (
                with recursive refs(name) as (
                    select v_target
                    union
                    select s->>'flow'
                      from refs r
                      join cairn.flows f on f.name = r.name
                      join cairn.flow_versions v on v.flow = f.name and v.version = f.version,
                           jsonb_array_elements(v.definition->'steps') s
                     where s ? 'flow')
                select from refs where refs.name = flow) then
                perform cairn.flow_error(flow, v_name,
                    format('flow "%s" runs this flow as a step, directly or not: that recursion has no end', v_target));
            end if;
        when 'workflow' then
            if not exists (select from cairn.workflows w where w.name = v_target) then
                perform cairn.flow_error(flow, v_name, format('unknown workflow "%s"', v_target), '42704');
            end if;
        else
            if length(v_target) not between 1 and 128 then
                perform cairn.flow_error(flow, v_name, 'a signal name is 1 to 128 characters');
            end if;
            if v_step ? 'map' then
                perform cairn.flow_error(flow, v_name, 'a signal step cannot map');
            end if;
        end case;
        if v_kinds[1] <> 'handler' then
            foreach v_key in array array['queue', 'retry', 'timeout'] loop
                -- A signal step's timeout bounds its wait.
                continue when v_kinds[1] = 'signal' and v_key = 'timeout';
                if v_step ? v_key then
                    perform cairn.flow_error(flow, v_name,
                        format('"%s" applies to handler steps%s only; this step runs a %s', v_key,
                               case when v_key = 'timeout' then ' and signal steps' else '' end,
                               v_kinds[1]));
                end if;
            end loop;
        end if;

        if v_step ? 'after' then
            if jsonb_typeof(v_step->'after') <> 'array' then
                perform cairn.flow_error(flow, v_name, '"after" must be an array of step names');
            end if;
            for v_value in select value from jsonb_array_elements(v_step->'after') loop
                if jsonb_typeof(v_value) <> 'string' then
                    perform cairn.flow_error(flow, v_name, format('"after" holds %s, not a step name', v_value));
                end if;
                v_dep := v_value #>> '{}';
                if v_dep = v_name then
                    perform cairn.flow_error(flow, v_name, 'a step cannot wait for itself (loops go back with "goto")');
                end if;
                if not v_dep = any (v_names) then
                    perform cairn.flow_error(flow, v_name,
                        format('"after" names "%s", which is not a step of this flow', v_dep), '42704');
                end if;
            end loop;
            -- Each name once, in the order first given.
            select jsonb_agg(to_jsonb(a.d) order by a.o) into v_value
              from (select t.d, min(t.o) as o
                      from jsonb_array_elements_text(v_step->'after') with ordinality as t(d, o)
                     group by t.d) a;
            v_step := v_step - 'after';
            if v_value is not null then
                v_step := v_step || jsonb_build_object('after', v_value);
            end if;
        end if;

        v_vars := case when v_step ? 'map' then '{"item": null, "index": 0}'::jsonb else '{}'::jsonb end;
        if v_step ? 'when' then
            perform cairn.check_flow_path(flow, v_name, 'condition', v_step->'when', v_vars);
        end if;
        if v_step ? 'map' then
            perform cairn.check_flow_path(flow, v_name, 'map', v_step->'map', '{}');
        end if;
        if v_step ? 'input' then
            if jsonb_typeof(v_step->'input') = 'object' then
                for v_key, v_value in select * from jsonb_each(v_step->'input') loop
                    perform cairn.check_flow_path(flow, v_name, format('input field "%s"', v_key), v_value, v_vars);
                end loop;
            else
                perform cairn.check_flow_path(flow, v_name, 'input', v_step->'input', v_vars);
            end if;
        end if;
        if v_step ? 'queue' and (jsonb_typeof(v_step->'queue') <> 'string'
                                 or v_step->>'queue' !~ '^[a-z_][a-z0-9_]{0,62}$') then
            perform cairn.flow_error(flow, v_name, format('invalid queue %s (a lowercase identifier)', v_step->'queue'));
        end if;
        if v_step ? 'retry' then
            if jsonb_typeof(v_step->'retry') <> 'object' then
                perform cairn.flow_error(flow, v_name, '"retry" must be an object: {"max_attempts": n, "backoff": seconds, "max_backoff": seconds}');
            end if;
            for v_key, v_value in select * from jsonb_each(v_step->'retry') loop
                if v_key not in ('max_attempts', 'backoff', 'max_backoff') then
                    perform cairn.flow_error(flow, v_name, format('unknown retry key "%s" (max_attempts, backoff, max_backoff)', v_key));
                end if;
                if jsonb_typeof(v_value) <> 'number'
                   or (v_key = 'max_attempts' and ((v_value::numeric) <> trunc(v_value::numeric)
                                                   or v_value::numeric not between 1 and 1000))
                   or (v_key <> 'max_attempts' and v_value::numeric not between 0 and 315360000) then
                    perform cairn.flow_error(flow, v_name, format('retry.%s = %s is out of range (%s)', v_key, v_value,
                        case when v_key = 'max_attempts' then 'a whole number from 1 to 1000'
                             else 'seconds from 0 to 315360000' end));
                end if;
            end loop;
        end if;
        if v_step ? 'timeout' and (jsonb_typeof(v_step->'timeout') <> 'number'
                                   or (v_step->>'timeout')::numeric <= 0
                                   or (v_step->>'timeout')::numeric > 315360000) then
            perform cairn.flow_error(flow, v_name, format('timeout = %s: seconds above 0, at most 315360000', v_step->'timeout'));
        end if;
        if v_step ? 'goto' then
            if jsonb_typeof(v_step->'goto') <> 'object' then
                perform cairn.flow_error(flow, v_name, '"goto" must be an object: {"step": ..., "when": ..., "max": n}');
            end if;
            for v_key in select jsonb_object_keys(v_step->'goto') loop
                if v_key not in ('step', 'when', 'max') then
                    perform cairn.flow_error(flow, v_name, format('unknown goto key "%s" (step, when, max)', v_key));
                end if;
            end loop;
            if jsonb_typeof(v_step->'goto'->'step') is distinct from 'string'
               or not (v_step->'goto'->>'step') = any (v_names) then
                perform cairn.flow_error(flow, v_name,
                    format('goto names %s, which is not a step of this flow', coalesce(v_step->'goto'->'step', 'no step')), '42704');
            end if;
            if not v_step->'goto' ? 'max' then
                perform cairn.flow_error(flow, v_name, 'a loop without a bound: goto needs "max", the most times it goes back');
            end if;
            if jsonb_typeof(v_step->'goto'->'max') <> 'number'
               or (v_step->'goto'->>'max')::numeric <> trunc((v_step->'goto'->>'max')::numeric)
               or (v_step->'goto'->>'max')::numeric not between 1 and 10000 then
                perform cairn.flow_error(flow, v_name, format('goto.max = %s: a whole number from 1 to 10000', v_step->'goto'->'max'));
            end if;
            if v_step->'goto' ? 'when' then
                perform cairn.check_flow_path(flow, v_name, 'goto condition', v_step->'goto'->'when', '{}');
            end if;
        end if;
        if v_step ? 'description' and jsonb_typeof(v_step->'description') <> 'string' then
            perform cairn.flow_error(flow, v_name, 'description must be a string');
        end if;
        v_out := v_out || jsonb_build_array(v_step);
    end loop;

    -- No cycle of "after": every step gets a stage.
    select s.name into v_name from cairn.flow_stages(v_out) s where s.stage is null order by s.ord limit 1;
    if found then
        v_path := array[v_name];
        loop
            select d into v_dep
              from jsonb_array_elements(v_out) s, jsonb_array_elements_text(s->'after') d
             where s->>'name' = v_name
               and d in (select x.name from cairn.flow_stages(v_out) x where x.stage is null)
             limit 1;
            if v_dep = any (v_path) then
                v_path := v_path[array_position(v_path, v_dep):] || v_dep;
                exit;
            end if;
            v_path := v_path || v_dep;
            v_name := v_dep;
        end loop;
        perform cairn.flow_error(flow, v_path[1],
            format('a cycle in "after": %s (each waits for the next)', array_to_string(v_path, ' → ')),
            '22023', 'a loop goes back with "goto", which has a bound');
    end if;
    -- A loop goes back to the step itself or to one it waits for.
    for v_step in select value from jsonb_array_elements(v_out) where value ? 'goto' loop
        v_target := v_step->'goto'->>'step';
        if v_target <> v_step->>'name'
           and not v_target = any (cairn.flow_reach(v_out, v_step->>'name', true)) then
            perform cairn.flow_error(flow, v_step->>'name',
                format('goto "%s" must go back: to this step or to one it waits for, directly or not', v_target));
        end if;
    end loop;
    return v_result || jsonb_build_object('steps', v_out);
end $$;

create or replace function cairn.register_step_handler(name text)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan
as $$
begin
    perform cairn.check_not_null(name, 'step handler name');
    perform cairn.check_task_name(name);
    perform cairn.check_not_workflow(name);
    insert into cairn.step_handlers (name) values (register_step_handler.name)
    on conflict on constraint step_handlers_pkey do update set registered_at = pg_catalog.now();
end $$;
comment on function cairn.register_step_handler(text) is
    'Announce a step handler by name (App::initialize and workers do this); flow definitions may name only announced handlers.';

-- Store a flow. A definition equal to the latest version's returns that
-- version; any other becomes the next version. Runs keep the version they
-- started with. Locks: the flows row (rank 0, like a schedule's).
create or replace function cairn.create_flow(name text, definition jsonb)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now     timestamptz := cairn.now();
    v_def     jsonb;
    v_version integer;
    v_latest  jsonb;
    v_step    jsonb;
begin
    perform cairn.check_not_null(name, 'flow name');
    perform cairn.check_task_name(name);
    if exists (select from cairn.workflows w where w.name = create_flow.name) then
        raise exception 'cairn: "%" is a code-first workflow; a flow needs another name', name
            using errcode = 'duplicate_object';
    end if;
    perform cairn.check_not_null(definition, 'flow definition');
    v_def := cairn.check_flow(name, definition);
    insert into cairn.flows (name, version, created_at, updated_at)
    values (create_flow.name, 1, v_now, v_now)
    on conflict on constraint flows_pkey do nothing;
    if found then
        v_version := 1;
    else
        select f.version into v_version from cairn.flows f where f.name = create_flow.name for update;
        select v.definition into v_latest from cairn.flow_versions v
         where v.flow = create_flow.name and v.version = v_version;
        if v_latest = v_def then
            return v_version;
        end if;
        v_version := v_version + 1;
        update cairn.flows f set version = v_version, updated_at = v_now where f.name = create_flow.name;
    end if;
    insert into cairn.flow_versions (flow, version, definition, created_at)
    values (create_flow.name, v_version, v_def, v_now);
    -- The queues its steps go to exist from now on (workers may wait on them).
    insert into cairn.queues (name)
    select distinct q from (select v_def->>'queue' as q
                            union all
                            select s->>'queue' from jsonb_array_elements(v_def->'steps') s) x
     where q is not null
    on conflict do nothing;
    return v_version;
end $$;
comment on function cairn.create_flow(text, jsonb) is
    'Store a flow definition; returns its version (the latest one again if the definition is unchanged). Bad definitions are refused with the step and the reason.';

-- A flow that runs registered handlers one after another. A handler named
-- twice gets steps name, name_2, ...
create or replace function cairn.compose_flow(name text, handlers text[], queue text default null)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_steps jsonb := '[]';
    v_prev  text;
    v_step  text;
    v_h     text;
    v_n     integer;
begin
    perform cairn.check_not_null(name, 'flow name');
    if handlers is null or cardinality(handlers) = 0 then
        raise exception 'cairn: compose_flow needs at least one handler name'
            using errcode = 'invalid_parameter_value';
    end if;
    foreach v_h in array handlers loop
        if v_h is null then
            raise exception 'cairn: handler names must not be NULL' using errcode = 'null_value_not_allowed';
        end if;
        if not exists (select from cairn.step_handlers h where h.name = v_h) then
            raise exception 'cairn: unknown handler "%"', v_h
                using errcode = 'undefined_object',
                      hint = 'select name from cairn.step_handlers lists the handlers workers have announced';
        end if;
        v_step := regexp_replace(v_h, '[^A-Za-z0-9_]', '_', 'g');
        if v_step !~ '^[A-Za-z_]' then
            v_step := '_' || v_step;
        end if;
        v_n := 1;
        while exists (select from jsonb_array_elements(v_steps) s
                       where s->>'name' = v_step || case when v_n > 1 then '_' || v_n else '' end) loop
            v_n := v_n + 1;
        end loop;
        v_step := v_step || case when v_n > 1 then '_' || v_n else '' end;
        v_steps := v_steps || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
            'name', v_step, 'handler', v_h,
            'after', case when v_prev is not null then jsonb_build_array(v_prev) end)));
        v_prev := v_step;
    end loop;
    return cairn.create_flow(name, jsonb_strip_nulls(jsonb_build_object('steps', v_steps, 'queue', queue)));
end $$;
comment on function cairn.compose_flow(text, text[], text) is
    'Store a sequential flow of registered handlers, one step each, in order; an unknown handler is refused by name. Returns the version.';

create or replace function cairn.list_flows()
returns table (name text, version integer, steps integer, queue text, definition jsonb,
               created_at timestamptz, updated_at timestamptz)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select f.name, f.version, jsonb_array_length(v.definition->'steps'), v.definition->>'queue',
           v.definition, f.created_at, f.updated_at
      from cairn.flows f join cairn.flow_versions v on v.flow = f.name and v.version = f.version
     order by f.name
$$;
comment on function cairn.list_flows() is 'Every flow with its latest version''s definition.';

-- The dry run: the steps in the stages they would run in (a stage starts
-- once the one before has finished, steps of one stage run side by side),
-- what each runs, and its condition, fan-out and loop.
create or replace function cairn.plan_flow(definition jsonb)
returns table (stage integer, step text, kind text, target text, after text[], condition text,
               fan_out text, loop_to text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_def jsonb := cairn.check_flow('(plan)', definition);
begin
    return query
    select st.stage, st.name, k.kind, s->>k.kind,
           array(select jsonb_array_elements_text(coalesce(s->'after', '[]'))),
           s->>'when', s->>'map',
           case when s ? 'goto' then format('%s (at most %s times%s)', s->'goto'->>'step',
                                            s->'goto'->>'max',
                                            coalesce(', when ' || (s->'goto'->>'when'), '')) end
      from cairn.flow_stages(v_def->'steps') st
      join jsonb_array_elements(v_def->'steps') with ordinality e(s, o) on e.o = st.ord,
           lateral (select x from unnest(array['handler', 'flow', 'workflow', 'signal']) x
                     where s ? x limit 1) k(kind)
     order by st.stage, st.ord;
end $$;

create or replace function cairn.plan_flow(flow text, version integer default null)
returns table (stage integer, step text, kind text, target text, after text[], condition text,
               fan_out text, loop_to text)
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_def jsonb;
begin
    perform cairn.check_not_null(flow, 'flow name');
    select v.definition into v_def
      from cairn.flows f join cairn.flow_versions v
        on v.flow = f.name and v.version = coalesce(plan_flow.version, f.version)
     where f.name = plan_flow.flow;
    if not found then
        raise exception 'cairn: unknown flow "%"%', flow, coalesce(' version ' || version, '')
            using errcode = 'undefined_object';
    end if;
    return query select * from cairn.plan_flow(v_def);
end $$;
comment on function cairn.plan_flow(text, integer) is
    'Dry run of a stored flow (its latest version unless one is named): its steps by stage, without running anything.';
comment on function cairn.plan_flow(jsonb) is
    'Dry run of a definition: checks it and lists its steps by stage, without storing or running anything.';

-- SQL that recreates a flow (its latest version) in another database.
create or replace function cairn.export_flow(name text)
returns text
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_def     jsonb;
    v_version integer;
begin
    perform cairn.check_not_null(name, 'flow name');
    select v.definition, v.version into v_def, v_version
      from cairn.flows f join cairn.flow_versions v on v.flow = f.name and v.version = f.version
     where f.name = export_flow.name;
    if not found then
        raise exception 'cairn: unknown flow "%"', name using errcode = 'undefined_object';
    end if;
    return format(E'-- cairn flow %s (version %s here)\nselect cairn.create_flow(%L, %L::jsonb);\n',
                  name, v_version, name, jsonb_pretty(v_def));
end $$;
comment on function cairn.export_flow(text) is
    'SQL (a create_flow call) that recreates the flow''s latest version in another database.';

-- Every flow, the flows other flows run as steps first.
create or replace function cairn.export_flows()
returns text
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_done text[] := '{}';
    v_out  text := '';
    v_name text;
    v_more boolean := true;
begin
    while v_more loop
        v_more := false;
        for v_name in
            select f.name
              from cairn.flows f join cairn.flow_versions v on v.flow = f.name and v.version = f.version
             where not f.name = any (v_done)
               and not exists (select from jsonb_array_elements(v.definition->'steps') s
                                where s ? 'flow' and not (s->>'flow') = any (v_done))
             order by f.name
        loop
            v_out := v_out || cairn.export_flow(v_name) || E'\n';
            v_done := v_done || v_name;
            v_more := true;
        end loop;
    end loop;
    return v_out;
end $$;
comment on function cairn.export_flows() is
    'SQL that recreates every flow in another database, sub-flows before the flows that run them.';

-- Internal: the run's context: its input, and every completed step's
-- output under the step's name. The helpers on a step's path are PL/pgSQL,
-- not SQL: a SQL function with SET clauses is planned on every call.
create or replace function cairn.flow_context(run_id uuid, input jsonb)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
begin
    return (select jsonb_build_object('input', flow_context.input)
                   || coalesce(jsonb_object_agg(s.key, s.output)
                                   filter (where s.status = 'completed' and strpos(s.key, '[') = 0), '{}')
              from cairn.steps s where s.run_id = flow_context.run_id);
end $$;

-- Internal: a step's input, selected from the context (and, in a map, the
-- element as $item and its position as $index).
create or replace function cairn.flow_input(step jsonb, context jsonb, vars jsonb)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if not step ? 'input' then
        return case when step ? 'map' then vars->'item' else context end;
    elsif jsonb_typeof(step->'input') = 'string' then
        return coalesce(jsonb_path_query_first(context, (step->>'input')::jsonpath, vars, true), 'null');
    end if;
    return coalesce((select jsonb_object_agg(f.key, coalesce(
                                 jsonb_path_query_first(context, (f.value #>> '{}')::jsonpath, vars, true),
                                 'null'))
                       from jsonb_each(step->'input') f), '{}');
end $$;

-- Internal: create a flow run (no job drives it) and start its first
-- steps. With an idempotency key already taken, creates nothing and returns
-- NULL. A child's parent is held by the caller.
create or replace function cairn.create_flow_run(
    flow            text,
    version         integer,
    input           jsonb,
    idempotency_key text,
    priority        integer,
    delay           double precision,
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
    v_run cairn.runs;
    v_qid integer;
begin
    v_qid := cairn.ensure_queue((select v.definition->>'queue' from cairn.flow_versions v
                                  where v.flow = create_flow_run.flow
                                    and v.version = create_flow_run.version));
    insert into cairn.runs (id, workflow, queue_id, input, idempotency_key, priority, parent_run,
                            parent_step, created_at, updated_at, started_at, traceparent,
                            flow_version, status, wake_at)
    values (gen_random_uuid(), create_flow_run.flow, v_qid, create_flow_run.input,
            create_flow_run.idempotency_key, create_flow_run.priority, create_flow_run.parent_run,
            create_flow_run.parent_step, v_now, v_now, v_now, create_flow_run.traceparent,
            create_flow_run.version,
            case when create_flow_run.delay > 0 then 'sleeping' else 'running' end,
            case when create_flow_run.delay > 0
                 then v_now + make_interval(secs => create_flow_run.delay) end)
    on conflict (workflow, idempotency_key) where idempotency_key is not null do nothing
    returning * into v_run;
    if not found then
        return null;
    end if;
    perform cairn.advance_flow(v_run);
    return v_run.id;
end $$;

create or replace function cairn.start_flow(
    flow            text,
    input           jsonb default '{}',
    idempotency_key text default null,
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
    v_version integer;
    v_run     uuid;
begin
    perform cairn.check_not_null(flow, 'flow name');
    select f.version into v_version from cairn.flows f where f.name = start_flow.flow;
    if not found then
        perform cairn.check_task_name(flow);
        raise exception 'cairn: unknown flow "%"', flow
            using errcode = 'undefined_object',
                  hint = 'store it first: select cairn.create_flow(name, definition)';
    end if;
    perform cairn.check_start(input, priority, delay, traceparent, conflict, idempotency_key);
    v_run := cairn.create_flow_run(flow, v_version, input, idempotency_key, priority, delay,
                                   traceparent, null, null);
    if v_run is not null then
        return v_run;
    end if;
    return cairn.existing_run(flow, idempotency_key, input, null, priority, conflict);
end $$;
comment on function cairn.start_flow(text, jsonb, text, integer, double precision, text, text) is
    'Start a run of a flow''s latest version; returns its id. Postgres drives it from here: each step''s end starts the steps it makes ready. Idempotency keys as for start_workflow.';

-- Internal: the step jobs `ids` (visible now) were just started. True
-- when an ack_and_take in this transaction may take them: it turns the
-- transaction-local setting cairn.taking on while its acks settle, and
-- reads the jobs so started from cairn.started (their ids,
-- comma-separated), which this appends to. Their NOTIFY is then left to
-- it: it wakes other workers only for the jobs it did not take. Forging
-- the settings can only delay a job of one's own transaction until the
-- workers' next poll: only ack_and_take reads cairn.started, and it clears
-- both first.
create or replace function cairn.flow_held(ids bigint[])
returns boolean
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_list text;
begin
    if coalesce(current_setting('cairn.taking', true), '') = '' or cardinality(ids) = 0 then
        return false;
    end if;
    -- Simple expressions, not queries: this runs for every step started.
    v_list := set_config('cairn.started',
                         concat_ws(',', nullif(current_setting('cairn.started', true), ''),
                                   array_to_string(ids, ',')),
                         true);
    return true;
end $$;

-- Internal: start one step of a flow run (`def`: its definition): a job of
-- its handler (one per element for a map), a child run, or a wait for a
-- signal. Returns the
-- step's status afterwards ('waiting', 'completed' or 'failed'), or NULL if
-- the step had been started already. The caller holds the run.
create or replace function cairn.flow_start_step(run cairn.runs, def jsonb, step jsonb, seq integer,
                                                 context jsonb, visible_at timestamptz)
returns text
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_name    text := step->>'name';
    v_kind    text := case when step ? 'handler' then 'task'
                           when step ? 'signal' then 'signal' else 'child' end;
    v_items   jsonb;
    v_input   jsonb;
    v_problem text;
    v_queue   text;
    v_policy  jsonb;
    v_keys    text[];
    v_inputs  jsonb[];
    v_i       integer;
    v_pending integer;
    v_job     bigint;
    v_jobs    bigint[];
begin
    if step ? 'map' then
        v_items := jsonb_path_query_first(context, (step->>'map')::jsonpath, '{}', true);
        if jsonb_typeof(v_items) is distinct from 'array' then
            v_problem := format('map over %s: expected an array, got %s', step->>'map',
                                coalesce(jsonb_typeof(v_items), 'nothing'));
        end if;
    else
        v_input := cairn.flow_input(step, context, '{}');
        v_problem := 'the step''s input ' || cairn.json_problem(v_input);
    end if;
    insert into cairn.steps (run_id, key, seq, kind, status, input, error, attempts, started_at,
                             finished_at, wake_at)
    values (run.id, v_name, seq, case when step ? 'map' then 'map' else v_kind end,
            case when v_problem is null then 'waiting' else 'failed' end,
            case when v_kind = 'signal' then step->'signal' else v_input end, v_problem, 1, v_now,
            case when v_problem is not null then v_now end,
            -- A signal's wait runs out at its deadline (cairn.fire_timers).
            case when v_kind = 'signal' and step ? 'timeout'
                 then greatest(v_now, visible_at) + make_interval(secs => (step->>'timeout')::double precision)
            end)
    on conflict on constraint steps_pkey do nothing;
    if not found then
        return null;
    end if;
    if v_problem is not null then
        insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error)
        values (run.id, v_now, v_now, 'attempt', v_name, 1, 'failed', v_problem);
        return 'failed';
    end if;

    if v_kind = 'signal' then
        if not cairn.flow_take_signal(run.id, v_name, step->>'signal') then
            return 'waiting';
        end if;
        perform cairn.flow_loop(run, def, v_name);
        return 'completed';
    end if;

    if v_kind = 'task' then
        v_queue := coalesce(step->>'queue', def->>'queue');
        v_policy := jsonb_strip_nulls(coalesce(step->'retry', '{}')
                                      || jsonb_build_object('timeout', step->'timeout'));
    end if;

    if step ? 'map' then
        -- The elements: inserted once (a retried map keeps those that
        -- completed, and those still running), started when new.
        with items as (
            select e.value as item, (e.o - 1)::integer as idx
              from jsonb_array_elements(v_items) with ordinality e(value, o)
        ), ins as (
            insert into cairn.steps as t (run_id, key, seq, kind, status, input, attempts, started_at)
            select run.id, format('%s[%s]', v_name, i.idx), i.idx, v_kind, 'waiting',
                   cairn.flow_input(step, context, jsonb_build_object('item', i.item, 'index', i.idx)),
                   1, v_now
              from items i
            on conflict on constraint steps_pkey do nothing
            returning t.key, t.input, t.seq
        )
        select coalesce(array_agg(e.key order by e.seq), '{}'),
               coalesce(array_agg(e.input order by e.seq), '{}'),
               min(format('element %s: the input %s', e.key, e.problem))
                   filter (where e.problem is not null)
          into v_keys, v_inputs, v_problem
          from (select ins.key, ins.input, ins.seq, cairn.json_problem(ins.input) as problem
                  from ins) e;
        if v_problem is not null then
            delete from cairn.steps s where s.run_id = run.id and s.key = any (v_keys);
            update cairn.steps s set status = 'failed', error = v_problem, finished_at = v_now
             where s.run_id = run.id and s.key = v_name;
            insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error)
            values (run.id, v_now, v_now, 'attempt', v_name, 1, 'failed', v_problem);
            return 'failed';
        end if;
        select count(*) filter (where s.status <> 'completed') into v_pending
          from cairn.steps s
         where s.run_id = run.id and left(s.key, length(v_name) + 1) = v_name || '[';
        update cairn.steps s set pending = v_pending where s.run_id = run.id and s.key = v_name;
        if v_kind = 'task' then
            with ins as (
                insert into cairn.jobs (queue_id, task, payload, priority, visible_at, enqueued_at,
                                        parent_run, parent_step, traceparent)
                -- The queue's id, in the insert (ensure_queue creates it
                -- if it is new): no query of its own.
                select coalesce((select q.id from cairn.queues q where q.name = v_queue),
                                cairn.ensure_queue(v_queue)),
                       step->>'handler',
                       jsonb_build_object('input', u.input)
                       || case when v_policy <> '{}' then jsonb_build_object('policy', v_policy) else '{}' end,
                       run.priority, visible_at, v_now, run.id, u.key, run.traceparent
                  from unnest(v_keys, v_inputs) as u(key, input)
                returning id
            )
            select coalesce(array_agg(ins.id), '{}') into v_jobs from ins;
            if cardinality(v_jobs) > 0 and visible_at <= v_now
               and not cairn.flow_held(v_jobs) then
                perform pg_notify('cairn', v_queue);
            end if;
        else
            for v_i in 1 .. cardinality(v_keys) loop
                perform cairn.flow_start_child(run, step, v_keys[v_i], v_inputs[v_i], visible_at);
            end loop;
        end if;
        if v_pending = 0 then
            -- Nothing to run: an empty array, or every element done before.
            update cairn.steps s
               set status = 'completed', finished_at = v_now, pending = 0,
                   output = cairn.flow_map_output(run.id, v_name)
             where s.run_id = run.id and s.key = v_name;
            perform cairn.flow_loop(run, def, v_name);
        end if;
        -- Children that ended at once may have settled it already.
        return (select s.status from cairn.steps s where s.run_id = run.id and s.key = v_name);
    end if;

    if v_kind = 'task' then
        insert into cairn.jobs (queue_id, task, payload, priority, visible_at, enqueued_at, parent_run,
                                parent_step, traceparent)
        values (coalesce((select q.id from cairn.queues q where q.name = v_queue),
                         cairn.ensure_queue(v_queue)),
                step->>'handler',
                jsonb_build_object('input', v_input)
                || case when v_policy <> '{}' then jsonb_build_object('policy', v_policy) else '{}' end,
                run.priority, visible_at, v_now, run.id, v_name, run.traceparent)
        returning id into v_job;
        if visible_at <= v_now and not cairn.flow_held(array[v_job]) then
            perform pg_notify('cairn', v_queue);
        end if;
        return 'waiting';
    end if;
    perform cairn.flow_start_child(run, step, v_name, v_input, visible_at);
    return (select s.status from cairn.steps s where s.run_id = run.id and s.key = v_name);
end $$;

-- Internal: a child run for the step `key` (a sub-flow or a code-first
-- workflow). The step's row exists already: a child that ends at once
-- settles it.
create or replace function cairn.flow_start_child(run cairn.runs, step jsonb, key text, input jsonb,
                                                  visible_at timestamptz)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_version integer;
    v_qid     integer;
    v_child   uuid;
begin
    if step ? 'flow' then
        select f.version into v_version from cairn.flows f where f.name = step->>'flow';
        v_child := cairn.create_flow_run(step->>'flow', v_version, input, null, run.priority,
                                         extract(epoch from visible_at - v_now)::double precision,
                                         run.traceparent, run.id, key);
    else
        select w.queue_id into v_qid from cairn.workflows w where w.name = step->>'workflow';
        if not found then
            perform cairn.settle_step(run.id, key, 'failed', null,
                                      format('unknown workflow "%s"', step->>'workflow'));
            return;
        end if;
        v_child := cairn.create_run(step->>'workflow', v_qid, input, null, run.priority, visible_at,
                                    run.traceparent, run.id, key);
    end if;
    update cairn.steps s
       set input = jsonb_build_object(case when step ? 'flow' then 'flow' else 'workflow' end,
                                      coalesce(step->>'flow', step->>'workflow'),
                                      'run', v_child, 'input', flow_start_child.input)
     where s.run_id = run.id and s.key = flow_start_child.key;
end $$;

-- Internal: a map's output: its elements' outputs, in order.
create or replace function cairn.flow_map_output(run_id uuid, name text)
returns jsonb
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
begin
    return (select coalesce(jsonb_agg(s.output order by s.seq), '[]')
              from cairn.steps s
             where s.run_id = flow_map_output.run_id
               and left(s.key, length(flow_map_output.name) + 1) = flow_map_output.name || '[');
end $$;

-- Internal: move a flow run on: start every step that became ready (or
-- record it skipped), fail the run if a step failed, complete it when every
-- step is done. The caller holds the run and its ancestors (rank 1) and
-- passes the run's row as it stands (and its flow definition when it has
-- read it). Re-entrant: a child that ends at once settles its step from
-- inside. A step's readiness and the end of the run are expressions over
-- two values read once per pass (the steps' states, and the names of those
-- done as a JSON array), not queries: this runs on every step's ack.
create or replace function cairn.advance_flow(run cairn.runs, definition jsonb default null)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_id      uuid := run.id;
    v_run     cairn.runs := run;
    v_def     jsonb := definition;
    v_state   jsonb;    -- name → status, of the steps started
    v_done    jsonb;    -- names of the steps completed or skipped
    v_failed  bigint;
    v_ctx     jsonb;
    v_step    jsonb;
    v_ord     integer;
    v_again   boolean;
    v_failed_key   text;
    v_failed_error text;
    v_at      timestamptz;
    v_output  jsonb;
    v_problem text;
    v_status  text;
begin
    loop
        if v_run.id is null then
            -- A later pass: the run may have moved meanwhile.
            select * into v_run from cairn.runs r where r.id = v_id;
        end if;
        if v_run.status not in ('pending', 'running', 'sleeping', 'waiting') then
            return;
        end if;
        if v_def is null then
            select v.definition into v_def from cairn.flow_versions v
             where v.flow = v_run.workflow and v.version = v_run.flow_version;
        end if;
        -- The context (flow_context) comes with the states: one query a pass.
        select coalesce(jsonb_object_agg(s.key, s.status), '{}'),
               coalesce(jsonb_agg(s.key) filter (where s.status in ('completed', 'skipped')), '[]'),
               count(*) filter (where s.status = 'failed'),
               jsonb_build_object('input', v_run.input)
               || coalesce(jsonb_object_agg(s.key, s.output) filter (where s.status = 'completed'), '{}')
          into v_state, v_done, v_failed, v_ctx
          from cairn.steps s
         where s.run_id = v_run.id and strpos(s.key, '[') = 0;
        if v_failed > 0 then
            select s.key, s.error into v_failed_key, v_failed_error
              from cairn.steps s
             where s.run_id = v_run.id and strpos(s.key, '[') = 0 and s.status = 'failed'
             order by s.finished_at, s.key
             limit 1;
            perform cairn.finish_run(v_run.id, 'failed', null,
                                     format('step %s failed: %s', v_failed_key, v_failed_error));
            return;
        end if;
        v_again := false;
        v_at := greatest(v_now, coalesce(v_run.wake_at, v_now));
        -- By position, with simple expressions: no query per pass.
        for v_ord in 1 .. jsonb_array_length(v_def->'steps') loop
            v_step := v_def->'steps'->(v_ord - 1);
            continue when v_state ? (v_step->>'name')
                       or not v_done @> coalesce(v_step->'after', '[]');
            if v_step ? 'when' and not coalesce(v_ctx @@ (v_step->>'when')::jsonpath, false) then
                -- A skip counts as done for its dependents: one listed
                -- before it is found on the next pass.
                v_again := true;
                insert into cairn.steps (run_id, key, seq, kind, status, attempts, started_at, finished_at)
                values (v_run.id, v_step->>'name', v_ord,
                        case when v_step ? 'map' then 'map' when v_step ? 'handler' then 'task'
                             when v_step ? 'signal' then 'signal' else 'child' end,
                        'skipped', 0, v_now, v_now)
                on conflict on constraint steps_pkey do nothing;
                v_state := v_state || jsonb_build_object(v_step->>'name', 'skipped');
                v_done := v_done || to_jsonb(v_step->>'name');
                continue;
            end if;
            v_status := cairn.flow_start_step(v_run, v_def, v_step, v_ord, v_ctx, v_at);
            v_state := v_state || jsonb_build_object(v_step->>'name', coalesce(v_status, 'waiting'));
            if v_status is distinct from 'waiting' then
                -- Done at once (or failed, or moved by a child that ended):
                -- read everything again.
                v_again := true;
                exit;
            end if;
        end loop;
        -- A step that started and waits unlocks nothing yet: another pass
        -- is needed only after a skip or a step that ended at once.
        if not v_again then
            exit;
        end if;
        v_run := null;
    end loop;
    if jsonb_array_length(v_done) < jsonb_array_length(v_def->'steps') then
        return;
    end if;
    -- The last pass started nothing: its context is the run's.
    v_output := case when v_def ? 'output'
                     then coalesce(jsonb_path_query_first(v_ctx, (v_def->>'output')::jsonpath, '{}', true), 'null')
                     else v_ctx - 'input' end;
    v_problem := cairn.json_problem(v_output);
    if v_problem is not null then
        perform cairn.finish_run(v_run.id, 'failed', null, 'the run''s output ' || v_problem);
    else
        perform cairn.finish_run(v_run.id, 'completed', v_output, null);
    end if;
end $$;

-- Internal: a step of flow run `run` settled (settle_step wrote it; `run`
-- is the run's row as it stands, `definition` its flow's when the caller
-- has read it). An element of a map counts down its map,
-- which settles when the last one does (or fails with the first that
-- fails); a completed step may loop back; then the run moves on. The
-- caller holds the run and its ancestors.
create or replace function cairn.flow_step_settled(run cairn.runs, key text, status text, error text,
                                                   definition jsonb default null)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now  timestamptz := cairn.now();
    v_run  cairn.runs := run;
    v_map  text;
    v_left integer;
    v_def  jsonb := definition;
begin
    if v_run.status = 'sleeping' then
        update cairn.runs r set status = 'running', wake_at = null, updated_at = v_now
         where r.id = v_run.id;
        v_run.status := 'running';
        v_run.wake_at := null;
        v_run.updated_at := v_now;
    end if;
    if right(key, 1) = ']' then
        v_map := left(key, strpos(key, '[') - 1);
        if status = 'completed' then
            update cairn.steps s set pending = s.pending - 1
             where s.run_id = v_run.id and s.key = v_map and s.status = 'waiting'
            returning s.pending into v_left;
            if not found or v_left > 0 then
                return;
            end if;
            update cairn.steps s
               set status = 'completed', finished_at = v_now,
                   output = cairn.flow_map_output(v_run.id, v_map)
             where s.run_id = v_run.id and s.key = v_map;
        else
            update cairn.steps s
               set status = 'failed', finished_at = v_now,
                   error = left(format('element %s: %s', key, error), 4096)
             where s.run_id = v_run.id and s.key = v_map and s.status = 'waiting';
            if not found then
                return;
            end if;
        end if;
        key := v_map;
    end if;
    if v_def is null then
        select v.definition into v_def from cairn.flow_versions v
         where v.flow = v_run.workflow and v.version = v_run.flow_version;
    end if;
    if status = 'completed' and jsonb_path_exists(v_def, '$.steps[*].goto') then
        perform cairn.flow_loop(v_run, v_def, key);
    end if;
    perform cairn.advance_flow(v_run, v_def);
end $$;

-- Internal: the step `key` of flow run `run` (definition `def`) just
-- completed; if it has a goto
-- whose condition holds and whose bound is not reached, the run goes back:
-- the goto's target and every step that waits for it, directly or not, are
-- run again (their earlier passes go to the history). A step of the loop
-- still running is not started again: its outcome counts for the new pass.
create or replace function cairn.flow_loop(run cairn.runs, def jsonb, key text)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now   timestamptz := cairn.now();
    v_goto  jsonb;
    v_taken integer;
    v_reset text[];
begin
    if not jsonb_path_exists(def, '$.steps[*].goto') then
        return;  -- no loops in this flow: the common case, without a query
    end if;
    select s->'goto' into v_goto from jsonb_array_elements(def->'steps') s
     where s->>'name' = flow_loop.key;
    if v_goto is null then
        return;
    end if;
    if v_goto ? 'when' and not coalesce(cairn.flow_context(run.id, run.input) @@ (v_goto->>'when')::jsonpath,
                                        false) then
        return;
    end if;
    select count(*) into v_taken from cairn.run_events e
     where e.run_id = run.id and e.event = 'looped' and e.step = flow_loop.key;
    if v_taken >= (v_goto->>'max')::integer then
        return;
    end if;
    -- The steps run again: the target and all that wait for it, except
    -- those still running.
    select array_agg(s.key) into v_reset
      from cairn.steps s
     where s.run_id = run.id
       and s.key = any (array[v_goto->>'step'] || cairn.flow_reach(def->'steps', v_goto->>'step', false))
       and s.status in ('completed', 'skipped');
    insert into cairn.run_events (run_id, at, ended_at, event, step, attempt, outcome, error, detail)
    select s.run_id, s.started_at, s.finished_at, 'attempt', s.key, s.attempts, s.status, s.error,
           jsonb_build_object('pass', v_taken + 1)
      from cairn.steps s
     where s.run_id = run.id and s.key = any (v_reset);
    delete from cairn.steps s
     where s.run_id = run.id
       and (s.key = any (v_reset) or (strpos(s.key, '[') > 0
                                      and left(s.key, strpos(s.key, '[') - 1) = any (v_reset)));
    insert into cairn.run_events (run_id, at, event, step, detail)
    values (run.id, v_now, 'looped', key,
            jsonb_build_object('to', v_goto->>'step', 'pass', v_taken + 2));
end $$;

-- Internal: hand the oldest pending signal `name` of the run to its step
-- `key`, which completes with {"payload": ...}. False if none is pending.
-- The caller holds the run; this locks the signal (rank 3).
create or replace function cairn.flow_take_signal(run_id uuid, key text, name text)
returns boolean
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_signal record;
begin
    select g.id, g.payload into v_signal from cairn.signals g
     where g.run_id = flow_take_signal.run_id and g.name = flow_take_signal.name
       and g.consumed_by is null
     order by g.id limit 1
       for update;
    if not found then
        return false;
    end if;
    update cairn.signals g set consumed_by = flow_take_signal.key where g.id = v_signal.id;
    update cairn.steps s
       set status = 'completed', output = jsonb_build_object('payload', v_signal.payload),
           finished_at = cairn.now(), wake_at = null
     where s.run_id = flow_take_signal.run_id and s.key = flow_take_signal.key;
    return true;
end $$;

-- Internal: a signal reached a flow run: the oldest step waiting for that
-- name takes it, and the run moves on. The caller holds the run and its
-- ancestors.
create or replace function cairn.flow_signal(run_id uuid, name text)
returns void
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_key text;
begin
    select s.key into v_key from cairn.steps s
     where s.run_id = flow_signal.run_id and s.kind = 'signal' and s.status = 'waiting'
       and s.input = to_jsonb(flow_signal.name)
     order by s.started_at, s.key limit 1;
    if found and cairn.flow_take_signal(run_id, v_key, name) then
        perform cairn.flow_step_settled((select r from cairn.runs r where r.id = flow_signal.run_id),
                                        v_key, 'completed', null);
    end if;
end $$;

-- Signal waits of flow runs that ran out: each such step completes with
-- {"timeout": true} (as ctx.wait_for_signal's does) and its run moves on.
-- Every worker calls this about once a second (beside tick_schedules);
-- returns how many fired (at most lim: call again while it returns lim).
-- Locks: the runs concerned with their ancestors, all at once in the
-- engine's order (lock_runs, rank 1), then their steps (rank 3); a wait a
-- signal or another caller settled first is left alone.
create or replace function cairn.fire_timers(lim integer default 100)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_now  timestamptz := cairn.now();
    v_runs uuid[];
    v_due  record;
    v_n    integer := 0;
begin
    perform cairn.check_batch(lim, 'lim', 10000);
    select array_agg(distinct d.run_id) into v_runs
      from (select s.run_id
              from cairn.steps s join cairn.runs r on r.id = s.run_id
             where s.kind = 'signal' and s.status = 'waiting' and s.wake_at <= v_now
               and r.flow_version is not null
               -- A cancelled or failed run's waits stay as they were.
               and r.status in ('pending', 'running', 'sleeping', 'waiting')
             order by s.wake_at
             limit lim) d;
    if v_runs is null then
        return 0;
    end if;
    perform from cairn.lock_runs(v_runs);
    for v_due in
        select s.run_id, s.key
          from cairn.steps s
         where s.run_id = any (v_runs) and s.kind = 'signal' and s.status = 'waiting'
           and s.wake_at <= v_now
         order by s.wake_at, s.run_id, s.key
    loop
        -- An earlier one may have moved this run on (ended it, looped it).
        update cairn.steps s
           set status = 'completed', output = '{"timeout": true}', finished_at = v_now, wake_at = null
          from cairn.runs r
         where s.run_id = v_due.run_id and s.key = v_due.key
           and s.status = 'waiting' and s.wake_at <= v_now
           and r.id = s.run_id and r.status in ('pending', 'running', 'sleeping', 'waiting');
        continue when not found;
        perform cairn.flow_step_settled((select r from cairn.runs r where r.id = v_due.run_id),
                                        v_due.key, 'completed', null);
        v_n := v_n + 1;
    end loop;
    return v_n;
end $$;
comment on function cairn.fire_timers(integer) is
    'Complete the signal steps of flow runs whose timeout ran out, with {"timeout": true}, and move their runs on; returns how many (at most lim). Workers call it about once a second.';

-- Worker: ack jobs as cairn.ack(ids, leases, outputs) does and, in the same
-- transaction, lease to the caller up to qty of the step jobs those acks
-- started: a flow's next step goes to the worker that finished the step
-- before it, with no claim, no notification and no second round trip
-- (Temporal's eager dispatch does the same). Taken are the step jobs that
-- the acks started (flow_held lists them), visible now, in one of `queues`
-- and naming one of `tasks` (the caller's step handlers), the first by id;
-- they jump the queue's order, as a code-first workflow's next step runs
-- inline without queueing. Returns a row per acked id (taken false, the
-- other columns NULL; ids whose lease no longer matched are missing, as
-- from ack), then a row per job taken, with its lease and queue, as claim
-- returns them. Locks: as ack; the jobs taken are this transaction's own,
-- which no other can see yet.
create or replace function cairn.ack_and_take(
    ids     bigint[],
    leases  bigint[],
    outputs jsonb[],
    vt      double precision,
    qty     integer,
    queues  text[],
    tasks   text[])
returns table (taken boolean, id bigint, task text, payload jsonb, attempts integer, lease bigint,
               enqueued_at timestamptz, visible_at timestamptz, parent_run uuid,
               traceparent text, run_id uuid, queue text)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now     timestamptz := cairn.now();
    v_started bigint[];
    v_taken   integer;
    v_queue   text;
begin
    if vt is null or vt <> vt or vt < 0.001 or vt > 86400 then
        perform cairn.check_seconds(vt, 'visibility timeout', 0.001, 86400);
    end if;
    if qty is null or qty < 0 or qty > 10000 then
        perform cairn.check_not_null(qty, 'qty');
        raise exception 'cairn: qty must be between 0 and 10000, got %', qty
            using errcode = 'invalid_parameter_value';
    end if;
    if ids is null or leases is null or cardinality(ids) <> cardinality(leases)
       or array_position(ids, null) is not null or array_position(leases, null) is not null then
        perform cairn.check_pairs(ids, leases);
    end if;
    if outputs is not null and cardinality(outputs) <> cardinality(ids) then
        perform cairn.check_outputs(ids, outputs);
    end if;
    -- What ack does, without its plain jobs' shortcut: these are mostly
    -- step jobs, which settle_jobs settles (it deletes plain ones too).
    -- The step jobs these acks start send no NOTIFY and are listed
    -- (flow_held): this call may take them, and wakes other workers below
    -- for those it leaves.
    perform set_config('cairn.started', '', true),
            set_config('cairn.taking', case when qty > 0 then 'on' else '' end, true);
    return query
    select false, a.id, null::text, null::jsonb, null::integer, null::bigint, null::timestamptz,
           null::timestamptz, null::uuid, null::text, null::uuid, null::text
      from cairn.settle_jobs(ids, leases, outputs, 'completed', null, false) a;
    v_started := string_to_array(nullif(current_setting('cairn.started', true), ''), ',')::bigint[];
    perform set_config('cairn.started', '', true), set_config('cairn.taking', '', true);
    if v_started is null then
        return;
    end if;
    v_taken := 0;
    if queues is not null and tasks is not null then
        return query
        update cairn.jobs j
           set leased_until = v_now + make_interval(secs => ack_and_take.vt),
               attempts     = 1,
               lease        = pg_catalog.floor(pg_catalog.random() * 9007199254740992)::bigint
          from (select s.id, q.name as queue
                  from cairn.jobs s join cairn.queues q on q.id = s.queue_id
                 where s.id = any (v_started)
                   and q.name = any (ack_and_take.queues) and s.task = any (ack_and_take.tasks)
                   and s.attempts = 0 and s.visible_at <= v_now
                 order by s.id
                 limit ack_and_take.qty) c
         where j.id = c.id
        returning true, j.id, j.task, j.payload, j.attempts, j.lease, j.enqueued_at, j.leased_until,
                  j.parent_run, j.traceparent, j.run_id, c.queue;
        get diagnostics v_taken = row_count;
    end if;
    if v_taken = cardinality(v_started) then
        return;
    end if;
    -- The NOTIFY flow_held held back, for the steps left to the queue.
    for v_queue in
        select distinct q.name
          from cairn.jobs j join cairn.queues q on q.id = j.queue_id
         where j.id = any (v_started) and j.attempts = 0 and j.visible_at <= v_now
    loop
        perform pg_notify('cairn', v_queue);
    end loop;
end $$;
comment on function cairn.ack_and_take(bigint[], bigint[], jsonb[], double precision, integer, text[], text[]) is
    'ack(ids, leases, outputs), then lease up to qty of the step jobs those acks started (in the given queues, naming the given tasks) for vt seconds: rows with taken false are the acked ids, rows with taken true the jobs now leased to the caller, as claim returns them.';
