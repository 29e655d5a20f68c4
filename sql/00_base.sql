-- cairn: the clock and the argument checks every entry point shares.
--
-- Every function here and in the other sql/ files pins its search_path and
-- names every object with its schema, so a caller's temp tables or schemas
-- cannot capture a reference. Checks run before anything is written and raise
-- with a SQLSTATE a client can branch on:
--   22004 null_value_not_allowed   a required argument is NULL
--   22023 invalid_parameter_value  a name, delay, size or count out of range
--   42704 undefined_object         an unknown queue
--   54000 program_limit_exceeded   a payload above the size cap

-- The one clock. Leases, delays and retries all read it, never a client's.
-- PL/pgSQL rather than SQL: a SQL function with a SET clause is re-parsed on
-- every call, a PL/pgSQL one keeps its plan.
create or replace function cairn.now()
returns timestamptz
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$ begin return pg_catalog.now(); end $$;

-- Queue names become part of no SQL text, but they are shown to operators and
-- used as NOTIFY payloads: keep them plain lowercase identifiers.
create or replace function cairn.check_queue_name(queue text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if queue is null then
        raise exception 'cairn: queue name must not be NULL'
            using errcode = 'null_value_not_allowed';
    end if;
    if queue !~ '^[a-z_][a-z0-9_]{0,62}$' then
        raise exception 'cairn: invalid queue name "%"', queue
            using errcode = 'invalid_parameter_value',
                  hint = 'a queue name is 1 to 63 characters of a-z, 0-9 and _, not starting with a digit';
    end if;
end $$;

-- Internal: the queue's id, creating the queue first if it does not exist
-- (a step's job waits there for its workers). The name must be valid.
create or replace function cairn.ensure_queue(queue text)
returns integer
language plpgsql volatile
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_id integer;
begin
    select q.id into v_id from cairn.queues q where q.name = queue;
    if not found then
        insert into cairn.queues (name) values (queue) on conflict do nothing;
        v_id := cairn.queue_id(queue);
    end if;
    return v_id;
end $$;

-- The queue's id; raises if the name is invalid or the queue unknown.
create or replace function cairn.queue_id(queue text)
returns integer
language plpgsql stable
set search_path = pg_catalog, pg_temp
set enable_seqscan = off
as $$
declare
    v_id integer;
begin
    select q.id into v_id from cairn.queues q where q.name = queue;
    if not found then
        perform cairn.check_queue_name(queue);
        raise exception 'cairn: unknown queue "%"', queue
            using errcode = 'undefined_object',
                  hint = format('create it first: select cairn.create_queue(%L)', queue);
    end if;
    return v_id;
end $$;

create or replace function cairn.check_task_name(task text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if task is not null and task !~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$' then
        raise exception 'cairn: invalid task name "%"', task
            using errcode = 'invalid_parameter_value',
                  hint = 'a task name is 1 to 128 characters of A-Z, a-z, 0-9 and _ . : -, not starting with a digit';
    end if;
end $$;

-- The limits every JSON value entering cairn meets: at most 1 MiB (its size
-- as Postgres stores it, uncompressed), nested at most 64 levels, and numbers
-- within the range of a 64-bit float. The Rust worker's decoder accepts
-- exactly such values, so a payload that passes is never dead-lettered for
-- its shape. Returns NULL when the value is fine, else what is wrong. Cheap
-- for the common small value: the size is a header read, the depth scan runs
-- only for values large enough to be that deep, and the number scan is one
-- pass of the JSON path engine.
create or replace function cairn.json_problem(value jsonb)
returns text
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_size integer := pg_catalog.pg_column_size(value);
begin
    if pg_catalog.pg_column_compression(value) is not null then
        -- Stored compressed: measure the value itself (the array adds 11 bytes).
        v_size := pg_catalog.pg_column_size(pg_catalog.jsonb_build_array(value)) - 11;
    end if;
    if v_size > 1048576 then
        return format('is %s bytes, above the 1 MiB limit', v_size);
    end if;
    -- 65 levels of containers take at least 520 bytes.
    if v_size >= 512 and pg_catalog.jsonb_path_exists(value,
           'strict $.**{64} ? (@.type() == "object" || @.type() == "array")') then
        return 'is nested deeper than 64 levels';
    end if;
    if pg_catalog.jsonb_path_exists(value,
           'strict $.** ? (@ > 1.7976931348623157e308 || @ < -1.7976931348623157e308)') then
        return 'holds a number outside the range of a 64-bit float (±1.7976931348623157e308)';
    end if;
    return null;
end $$;

-- Raises for a NULL or out-of-limits payload: 22004, 54000 (too big) or
-- 22023 (too deep, number out of range). `'null'::jsonb` is a value; SQL
-- NULL is not.
create or replace function cairn.check_payload(payload jsonb, what text default 'payload')
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_problem text;
begin
    if payload is null then
        raise exception 'cairn: % must not be NULL (use ''null''::jsonb for a JSON null)', what
            using errcode = 'null_value_not_allowed';
    end if;
    v_problem := cairn.json_problem(payload);
    if v_problem is not null then
        raise exception 'cairn: % %', what, v_problem
            using errcode = case when v_problem like 'is % bytes%' then 'program_limit_exceeded'
                                 else 'invalid_parameter_value' end;
    end if;
end $$;

-- A required argument: raises 22004 naming it when it is NULL.
create or replace function cairn.check_not_null(value anyelement, what text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if value is null then
        raise exception 'cairn: % must not be NULL', what
            using errcode = 'null_value_not_allowed';
    end if;
end $$;

-- Delays and visibility timeouts are seconds (fractions allowed), measured on
-- the database clock. A delay may be 0; a lease must be positive.
create or replace function cairn.check_seconds(
    seconds double precision,
    what text,
    min_seconds double precision,
    max_seconds double precision)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if seconds is null then
        raise exception 'cairn: % must not be NULL', what
            using errcode = 'null_value_not_allowed';
    end if;
    if seconds <> seconds                      -- NaN
       or seconds < min_seconds
       or seconds > max_seconds then
        raise exception 'cairn: % must be between % and % seconds, got %',
            what, min_seconds, max_seconds, seconds
            using errcode = 'invalid_parameter_value';
    end if;
end $$;

create or replace function cairn.check_priority(priority integer)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_not_null(priority, 'priority');
    if priority < -32768 or priority > 32767 then
        raise exception 'cairn: priority must be between -32768 and 32767, got %', priority
            using errcode = 'invalid_parameter_value';
    end if;
end $$;

create or replace function cairn.check_batch(n integer, what text, max_n integer)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_not_null(n, what);
    if n < 1 or n > max_n then
        raise exception 'cairn: % must be between 1 and %, got %', what, max_n, n
            using errcode = 'invalid_parameter_value';
    end if;
end $$;

-- A worker's call names its run, job and lease: none may be NULL.
create or replace function cairn.check_held(run_id uuid, job_id bigint, lease bigint)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if run_id is null or job_id is null or lease is null then
        raise exception 'cairn: run id, job id and lease must not be NULL'
            using errcode = 'null_value_not_allowed';
    end if;
end $$;

-- A batch of a worker's run calls (begin_steps, load_runs, complete_runs):
-- (run, job, lease) triples as three parallel arrays, at most 1,000.
-- Returns how many.
create or replace function cairn.check_calls(run_ids uuid[], job_ids bigint[], leases bigint[])
returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if run_ids is null or job_ids is null or leases is null
       or array_position(run_ids, null) is not null or array_position(job_ids, null) is not null
       or array_position(leases, null) is not null then
        raise exception 'cairn: run ids, job ids and leases must not be NULL (nor hold NULLs)'
            using errcode = 'null_value_not_allowed';
    end if;
    if pg_catalog.cardinality(job_ids) <> pg_catalog.cardinality(run_ids)
       or pg_catalog.cardinality(leases) <> pg_catalog.cardinality(run_ids) then
        raise exception 'cairn: % run ids, % job ids and % leases; they must line up',
            pg_catalog.cardinality(run_ids), pg_catalog.cardinality(job_ids),
            pg_catalog.cardinality(leases)
            using errcode = 'invalid_parameter_value';
    end if;
    if pg_catalog.cardinality(run_ids) > 1000 then
        raise exception 'cairn: at most 1000 calls in a batch, got %', pg_catalog.cardinality(run_ids)
            using errcode = 'invalid_parameter_value';
    end if;
    return pg_catalog.cardinality(run_ids);
end $$;

-- Fenced calls name (id, lease) pairs as two parallel arrays.
create or replace function cairn.check_pairs(ids bigint[], leases bigint[])
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if ids is null or leases is null or array_position(ids, null) is not null
       or array_position(leases, null) is not null then
        raise exception 'cairn: ids and leases must not be NULL (nor hold NULLs)'
            using errcode = 'null_value_not_allowed';
    end if;
    if pg_catalog.cardinality(ids) <> pg_catalog.cardinality(leases) then
        raise exception 'cairn: % ids but % leases; they must pair up',
            pg_catalog.cardinality(ids), pg_catalog.cardinality(leases)
            using errcode = 'invalid_parameter_value';
    end if;
end $$;

-- Outputs, when given, pair up with the ids they belong to.
create or replace function cairn.check_outputs(ids bigint[], outputs jsonb[])
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if outputs is not null and cardinality(outputs) <> cardinality(ids) then
        raise exception 'cairn: % ids but % outputs; they must pair up',
            cardinality(ids), cardinality(outputs)
            using errcode = 'invalid_parameter_value';
    end if;
end $$;

create or replace function cairn.check_traceparent(traceparent text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if traceparent is not null
       and traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' then
        raise exception 'cairn: invalid traceparent "%"', left(traceparent, 100)
            using errcode = 'invalid_parameter_value',
                  hint = 'W3C trace context: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>';
    end if;
end $$;

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
