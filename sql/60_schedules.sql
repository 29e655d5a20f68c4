-- cairn: schedules — cron expressions read, validated and stepped through in
-- the database, and the tick that fires what is due.
--
-- Who calls it: admins create, update, pause, resume, trigger and delete
-- schedules; producers list them and ask for next_fires; every worker calls
-- cairn.tick_schedules() about once a second (see 90_grants.sql).
--
-- Cron: five fields, minute (0-59) hour (0-23) day-of-month (1-31) month
-- (1-12, jan-dec) day-of-week (0-7, sun-sat; 0 and 7 are Sunday), each a
-- list of '*', a value or a range a-b, with an optional step '/n' ('5/15'
-- is 5-59/15); or a shorthand: @yearly (@annually), @monthly, @weekly,
-- @daily (@midnight), @hourly. When both day fields are restricted a day
-- matching either fires (Vixie cron's rule); a day field that begins with
-- '*' leaves the other to decide.
--
-- Time zones are IANA names from the database's own zone data. The fields
-- are matched against the wall clock of the schedule's zone, and across a
-- daylight-saving change the rule is:
--   * a wall-clock time that does not exist (the spring-forward gap) fires
--     once, at the instant the gap ends (02:30 in New York on the spring day
--     fires at 03:00 EDT; an hourly schedule fires 23 times that day);
--   * a wall-clock time that happens twice (the autumn hour) fires once, at
--     its first occurrence (an hourly schedule fires 24 times that day, once
--     per distinct wall-clock hour).
--
-- A tick fires exactly once: cairn.tick_schedules() locks the due schedule
-- rows (FOR UPDATE SKIP LOCKED, so tickers never wait for one another),
-- starts the run or enqueues the job, and moves next_fire on, in one
-- transaction. A crash before the commit leaves the tick due; after it, the
-- tick is done. A workflow run's idempotency key is the tick's identity,
-- 'schedule:<name>@<scheduled time>', and its input (a JSON object) carries
-- "scheduled_at": the tick's time in UTC, RFC 3339.
--
-- Lock order: a schedules row before anything start_workflow or send locks
-- (runs, then jobs: see 20_run_engine.sql). Nothing that holds a runs or
-- jobs row waits for a schedules row.

-- Internal: raise 22023 for a bad cron expression, naming the character.
create or replace function cairn.cron_error(cron text, at integer, reason text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    raise exception 'cairn: invalid cron expression "%" at character %: %', cron, at, reason
        using errcode = 'invalid_parameter_value',
              hint = 'five fields: minute (0-59) hour (0-23) day-of-month (1-31) month (1-12 or jan-dec) day-of-week (0-7 or sun-sat), each *, a value, a range a-b or a list a,b,c, with an optional step /n; or @yearly, @monthly, @weekly, @daily, @hourly';
end $$;

-- Internal: one value of a field, a number or a name (names[1] is lo).
create or replace function cairn.cron_value(
    cron text, at integer, token text, what text, lo integer, hi integer, names text[])
returns integer
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v integer;
begin
    if token ~ '^[0-9]{1,6}$' then
        v := token::integer;
    else
        v := array_position(names, token) - 1 + lo;
        if v is null then
            perform cairn.cron_error(cron, at, format('"%s" is not a %s', token, what));
        end if;
    end if;
    if v < lo or v > hi then
        perform cairn.cron_error(cron, at, format('%s %s is out of range %s-%s', what, v, lo, hi));
    end if;
    return v;
end $$;

-- Internal: the sorted values one field allows. `at` is the field's first
-- character in the expression, for errors.
create or replace function cairn.cron_field(
    cron text, field text, at integer, what text, lo integer, hi integer, names text[] default null)
returns integer[]
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_values integer[] := '{}';
    v_item   text;
    v_at     integer := at;
    v_m      text[];
    v_from   integer;
    v_to     integer;
    v_step   integer := 1;
begin
    foreach v_item in array string_to_array(field, ',') loop
        v_m := regexp_match(lower(v_item), '^(\*|[a-z0-9]+)(?:-([a-z0-9]+))?(?:/([0-9]+))?$');
        if v_m is null then
            perform cairn.cron_error(cron, v_at, format('cannot read %s "%s"', what, v_item));
        end if;
        if v_m[1] = '*' then
            if v_m[2] is not null then
                perform cairn.cron_error(cron, v_at, format('"%s" is not a range: * already means every %s', v_item, what));
            end if;
            v_from := lo;
            v_to := hi;
        else
            v_from := cairn.cron_value(cron, v_at, v_m[1], what, lo, hi, names);
            v_to := case
                when v_m[2] is not null then cairn.cron_value(cron, v_at, v_m[2], what, lo, hi, names)
                when v_m[3] is not null then hi
                else v_from end;
            if v_from > v_to then
                perform cairn.cron_error(cron, v_at, format('range %s runs backwards', v_item));
            end if;
        end if;
        if v_m[3] is not null then
            if length(v_m[3]) > 6 or v_m[3]::integer < 1 then
                perform cairn.cron_error(cron, v_at, format('step /%s: a step must be at least 1', v_m[3]));
            end if;
            v_step := v_m[3]::integer;
        else
            v_step := 1;
        end if;
        v_values := v_values || array(select generate_series(v_from, v_to, v_step));
        v_at := v_at + length(v_item) + 1;
    end loop;
    return array(select distinct v from unnest(v_values) v order by v);
end $$;

-- A cron expression read and checked; raises 22023 naming the character and
-- the reason, or that it can never fire (such as '0 0 31 2 *').
create or replace function cairn.parse_cron(cron text)
returns cairn.cron_spec
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_expr   text := btrim(cron);
    v_fields text[];
    v_at     integer[];
    v_spec   cairn.cron_spec;
begin
    if cron is null then
        raise exception 'cairn: cron expression must not be NULL'
            using errcode = 'null_value_not_allowed';
    end if;
    if length(cron) > 200 then
        perform cairn.cron_error(left(cron, 100) || '...', 201, 'a cron expression is at most 200 characters');
    end if;
    if v_expr like '@%' then
        v_expr := case lower(v_expr)
            when '@yearly' then '0 0 1 1 *'
            when '@annually' then '0 0 1 1 *'
            when '@monthly' then '0 0 1 * *'
            when '@weekly' then '0 0 * * 0'
            when '@daily' then '0 0 * * *'
            when '@midnight' then '0 0 * * *'
            when '@hourly' then '0 * * * *'
        end;
        if v_expr is null then
            perform cairn.cron_error(cron, strpos(cron, '@'), format('unknown shorthand "%s"', btrim(cron)));
        end if;
        return cairn.parse_cron(v_expr);
    end if;
    v_fields := regexp_split_to_array(v_expr, '\s+');
    if v_expr = '' or cardinality(v_fields) <> 5 then
        raise exception 'cairn: invalid cron expression "%": % fields, expected 5 (minute hour day-of-month month day-of-week)',
                        cron, case when v_expr = '' then 0 else cardinality(v_fields) end
            using errcode = 'invalid_parameter_value',
                  hint = 'for example ''30 2 * * *'' (02:30 every day) or a shorthand such as @daily';
    end if;
    v_at := array(select regexp_instr(cron, '\S+', 1, i) from generate_series(1, 5) i);
    v_spec.minutes := cairn.cron_field(cron, v_fields[1], v_at[1], 'minute', 0, 59);
    v_spec.hours := cairn.cron_field(cron, v_fields[2], v_at[2], 'hour', 0, 23);
    v_spec.days := cairn.cron_field(cron, v_fields[3], v_at[3], 'day of month', 1, 31);
    v_spec.months := cairn.cron_field(cron, v_fields[4], v_at[4], 'month', 1, 12,
        array['jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec']);
    v_spec.weekdays := array(select distinct d % 7 from unnest(
        cairn.cron_field(cron, v_fields[5], v_at[5], 'day of week', 0, 7,
            array['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'])) d order by 1);
    v_spec.days_any := v_fields[3] like '*%';
    v_spec.weekdays_any := v_fields[5] like '*%';
    -- Only the day of the month decides: some month must have one of the days
    -- (29 February counts: it fires in leap years).
    if not v_spec.days_any and v_spec.weekdays_any and not exists (
        select from unnest(v_spec.months) m, unnest(v_spec.days) d
         where d <= (array[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[m]) then
        raise exception 'cairn: cron expression "%" never fires: no month it names has day %', cron,
                        array_to_string(v_spec.days, ' or ')
            using errcode = 'invalid_parameter_value';
    end if;
    return v_spec;
end $$;

-- Internal: the first wall-clock minute after `after` that the spec allows.
create or replace function cairn.cron_next_local(spec cairn.cron_spec, after timestamp)
returns timestamp
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
declare
    t timestamp := date_trunc('minute', after) + interval '1 minute';
    v_next integer;
    v_day_ok boolean;
begin
    -- Each pass moves to the start of the next month, day or hour that could
    -- match, or to the allowed minute; at most a few hundred passes a year.
    for i in 1..20000 loop
        if not extract(month from t)::integer = any (spec.months) then
            t := date_trunc('month', t) + interval '1 month';
            continue;
        end if;
        v_day_ok := case
            when spec.days_any and spec.weekdays_any then true
            when spec.days_any then extract(dow from t)::integer = any (spec.weekdays)
            when spec.weekdays_any then extract(day from t)::integer = any (spec.days)
            else extract(day from t)::integer = any (spec.days)
                 or extract(dow from t)::integer = any (spec.weekdays) end;
        if not v_day_ok then
            t := date_trunc('day', t) + interval '1 day';
        elsif not extract(hour from t)::integer = any (spec.hours) then
            t := date_trunc('hour', t) + interval '1 hour';
        else
            select min(m) into v_next from unnest(spec.minutes) m
             where m >= extract(minute from t)::integer;
            if v_next is null then
                t := date_trunc('hour', t) + interval '1 hour';
            else
                return date_trunc('hour', t) + make_interval(mins => v_next);
            end if;
        end if;
    end loop;
    raise exception 'cairn: no fire time found after %', after
        using errcode = 'program_limit_exceeded';
end $$;

-- Internal: the instant a wall-clock time names in a zone, by the rule
-- above: the first of two (the autumn hour), or the end of the gap it falls
-- in (spring). Postgres alone would take the second of two, and read a time
-- in the gap with the offset before it.
create or replace function cairn.wall_clock_instant(local timestamp, timezone text)
returns timestamptz
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_utc    timestamptz := local at time zone 'UTC';
    v_before timestamptz := v_utc - interval '1 day';
    v_after  timestamptz := v_utc + interval '1 day';
    -- The candidate instants: the wall-clock time read with the offset in
    -- force a day before and a day after.
    v_a timestamptz := v_utc - ((v_before at time zone timezone) - (v_before at time zone 'UTC'));
    v_b timestamptz := v_utc - ((v_after at time zone timezone) - (v_after at time zone 'UTC'));
    v_lo timestamptz;
    v_hi timestamptz;
    v_mid timestamptz;
begin
    if (v_a at time zone timezone) = local then
        if (v_b at time zone timezone) = local then
            return least(v_a, v_b);
        end if;
        return v_a;
    elsif (v_b at time zone timezone) = local then
        return v_b;
    end if;
    -- In a gap: the first instant whose wall clock is past `local`, found by
    -- halving the span between the candidates down to a second.
    v_lo := least(v_a, v_b);
    v_hi := greatest(v_a, v_b);
    if v_lo = v_hi or (v_hi at time zone timezone) <= local then
        return local at time zone timezone;
    end if;
    while v_hi - v_lo > interval '1 second' loop
        v_mid := v_lo + (v_hi - v_lo) / 2;
        if (v_mid at time zone timezone) > local then
            v_hi := v_mid;
        else
            v_lo := v_mid;
        end if;
    end loop;
    return date_trunc('second', v_hi);
end $$;

-- Internal: the first fire strictly after `after`.
create or replace function cairn.cron_next(spec cairn.cron_spec, timezone text, after timestamptz)
returns timestamptz
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_local timestamp := after at time zone timezone;
    v_fire  timestamptz;
begin
    -- A wall-clock time whose first occurrence is already past (`after` in
    -- the repeated autumn hour) is passed over.
    for i in 1..2000 loop
        v_local := cairn.cron_next_local(spec, v_local);
        v_fire := cairn.wall_clock_instant(v_local, timezone);
        if v_fire > after then
            return v_fire;
        end if;
    end loop;
    raise exception 'cairn: no fire time found after %', after
        using errcode = 'program_limit_exceeded';
end $$;

-- Internal: raise for an unknown time zone (IANA names only: no
-- abbreviations or POSIX strings, whose meaning is not what they look like).
create or replace function cairn.check_timezone(timezone text)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_not_null(timezone, 'timezone');
    if not exists (select from pg_catalog.pg_timezone_names z where z.name = timezone) then
        raise exception 'cairn: unknown time zone "%"', left(timezone, 100)
            using errcode = 'invalid_parameter_value',
                  hint = 'give an IANA name such as Europe/London, America/New_York or UTC (see pg_timezone_names)';
    end if;
end $$;

-- Internal: an instant as RFC 3339 in UTC, fractions only when present.
create or replace function cairn.rfc3339(t timestamptz)
returns text
language sql immutable
set search_path = pg_catalog, pg_temp
as $$
    select to_char(t at time zone 'UTC',
                   case when date_trunc('second', t) = t then 'YYYY-MM-DD"T"HH24:MI:SS"Z"'
                        else 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"' end)
$$;

create or replace function cairn.next_fires(
    cron     text,
    timezone text default 'UTC',
    n        integer default 5,
    after    timestamptz default null)
returns setof timestamptz
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_spec cairn.cron_spec := cairn.parse_cron(cron);
    v_at   timestamptz := coalesce(after, cairn.now());
begin
    perform cairn.check_timezone(timezone);
    perform cairn.check_batch(n, 'n', 1000);
    for i in 1..n loop
        v_at := cairn.cron_next(v_spec, timezone, v_at);
        return next v_at;
    end loop;
end $$;
comment on function cairn.next_fires(text, text, integer, timestamptz) is
    'The next n fire times (1 to 1000) of a cron expression in an IANA time zone, after the given time (default now). Raises 22023 with the position and reason for a bad expression.';

-- Internal: a schedule's name: like a task name.
create or replace function cairn.check_schedule_name(name text)
returns void
language plpgsql immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_not_null(name, 'schedule name');
    if name !~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$' then
        raise exception 'cairn: invalid schedule name "%"', left(name, 200)
            using errcode = 'invalid_parameter_value',
                  hint = 'a schedule name is 1 to 128 characters of A-Z, a-z, 0-9 and _ . : -, not starting with a digit';
    end if;
end $$;

-- Internal: the checks shared by create and update.
create or replace function cairn.check_schedule_options(
    input jsonb, missed text, overlap text, priority integer)
returns void
language plpgsql stable
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_payload(input, 'input');
    if jsonb_typeof(input) <> 'object' then
        raise exception 'cairn: a schedule''s input must be a JSON object, got %', jsonb_typeof(input)
            using errcode = 'invalid_parameter_value',
                  hint = 'each run''s input is this object with "scheduled_at" added';
    end if;
    perform cairn.check_not_null(missed, 'missed');
    if missed not in ('coalesce', 'catch_up') then
        raise exception 'cairn: missed must be ''coalesce'' or ''catch_up'', got %', quote_literal(missed)
            using errcode = 'invalid_parameter_value';
    end if;
    perform cairn.check_not_null(overlap, 'overlap');
    if overlap not in ('allow', 'skip', 'queue') then
        raise exception 'cairn: overlap must be ''allow'', ''skip'' or ''queue'', got %', quote_literal(overlap)
            using errcode = 'invalid_parameter_value';
    end if;
    perform cairn.check_not_null(priority, 'priority');
    perform cairn.check_priority(priority);
end $$;

-- Internal: the schedule row, locked; raises 42704 if there is none.
create or replace function cairn.lock_schedule(name text)
returns cairn.schedules
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v cairn.schedules;
begin
    perform cairn.check_schedule_name(name);
    select * into v from cairn.schedules s where s.name = lock_schedule.name for update;
    if not found then
        raise exception 'cairn: unknown schedule "%"', name
            using errcode = 'undefined_object';
    end if;
    return v;
end $$;

create or replace function cairn.create_schedule(
    name     text,
    cron     text,
    workflow text default null,
    input    jsonb default '{}',
    timezone text default 'UTC',
    queue    text default null,
    task     text default null,
    missed   text default 'coalesce',
    overlap  text default 'allow',
    priority integer default 0,
    paused   boolean default false)
returns timestamptz
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_now  timestamptz := cairn.now();
    v_spec cairn.cron_spec;
    v_next timestamptz;
begin
    perform cairn.check_schedule_name(name);
    v_spec := cairn.parse_cron(cron);
    perform cairn.check_timezone(timezone);
    if (workflow is null) = (queue is null) then
        raise exception 'cairn: a schedule starts a workflow or enqueues on a queue: give exactly one of workflow => and queue =>'
            using errcode = 'invalid_parameter_value';
    end if;
    if workflow is not null then
        if task is not null then
            raise exception 'cairn: task => goes with queue =>, not with workflow =>'
                using errcode = 'invalid_parameter_value';
        end if;
        if not exists (select from cairn.workflows w where w.name = create_schedule.workflow) then
            perform cairn.check_task_name(workflow);
            raise exception 'cairn: unknown workflow "%"', workflow
                using errcode = 'undefined_object',
                      hint = 'a workflow is known once it is registered: by App::initialize or a worker of an app that defines it, or by select cairn.register_workflow(name, queue)';
        end if;
    else
        perform cairn.queue_id(queue);
        perform cairn.check_task_name(task);
        perform cairn.check_not_workflow(coalesce(task, queue));
    end if;
    perform cairn.check_schedule_options(input, missed, overlap, priority);
    perform cairn.check_not_null(paused, 'paused');

    v_next := cairn.cron_next(v_spec, timezone, v_now);
    insert into cairn.schedules as s
           (name, cron, timezone, workflow, queue, task, input, priority, missed, overlap,
            paused, next_fire, created_at, updated_at)
    values (create_schedule.name, btrim(create_schedule.cron), create_schedule.timezone,
            create_schedule.workflow, create_schedule.queue, create_schedule.task,
            create_schedule.input, create_schedule.priority, create_schedule.missed,
            create_schedule.overlap, create_schedule.paused, v_next, v_now, v_now)
    on conflict on constraint schedules_pkey do nothing;
    if not found then
        raise exception 'cairn: a schedule named "%" exists already', name
            using errcode = 'unique_violation',
                  hint = 'change it with cairn.update_schedule, or delete it first';
    end if;
    return v_next;
end $$;
comment on function cairn.create_schedule(text, text, text, jsonb, text, text, text, text, text, integer, boolean) is
    'Create a schedule that starts a workflow run (workflow =>) or enqueues a job (queue =>, task =>) at every tick of a cron expression in an IANA time zone; returns its first fire time. missed: coalesce (one run for ticks missed while no worker ran) or catch_up (every one). overlap: allow, skip (while the previous run or job is live) or queue (after it).';

create or replace function cairn.update_schedule(
    name     text,
    cron     text default null,
    timezone text default null,
    input    jsonb default null,
    missed   text default null,
    overlap  text default null,
    priority integer default null)
returns timestamptz
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v cairn.schedules := cairn.lock_schedule(name);
    v_spec cairn.cron_spec := cairn.parse_cron(coalesce(cron, v.cron));
begin
    v.cron := btrim(coalesce(cron, v.cron));
    v.timezone := coalesce(timezone, v.timezone);
    perform cairn.check_timezone(v.timezone);
    v.input := coalesce(input, v.input);
    v.missed := coalesce(missed, v.missed);
    v.overlap := coalesce(overlap, v.overlap);
    v.priority := coalesce(priority, v.priority);
    perform cairn.check_schedule_options(v.input, v.missed, v.overlap, v.priority);
    if update_schedule.cron is not null or update_schedule.timezone is not null then
        v.next_fire := cairn.cron_next(v_spec, v.timezone, cairn.now());
    end if;
    update cairn.schedules s
       set cron = v.cron, timezone = v.timezone,
           input = v.input, missed = v.missed, overlap = v.overlap, priority = v.priority,
           next_fire = v.next_fire, updated_at = cairn.now()
     where s.name = update_schedule.name;
    return v.next_fire;
end $$;
comment on function cairn.update_schedule(text, text, text, jsonb, text, text, integer) is
    'Change a schedule; NULL keeps a setting. A new cron expression or time zone moves the next fire to its first tick from now. Returns the next fire time.';

create or replace function cairn.pause_schedule(name text)
returns void
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.lock_schedule(name);
    update cairn.schedules s set paused = true, updated_at = cairn.now()
     where s.name = pause_schedule.name;
end $$;
comment on function cairn.pause_schedule(text) is
    'Stop a schedule firing until resume_schedule.';

create or replace function cairn.resume_schedule(name text)
returns timestamptz
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v cairn.schedules := cairn.lock_schedule(name);
    v_now timestamptz := cairn.now();
begin
    if v.paused then
        -- Ticks that fell while paused are not fired.
        v.next_fire := cairn.cron_next(cairn.parse_cron(v.cron), v.timezone, v_now);
        update cairn.schedules s set paused = false, next_fire = v.next_fire, updated_at = v_now
         where s.name = resume_schedule.name;
    end if;
    return v.next_fire;
end $$;
comment on function cairn.resume_schedule(text) is
    'Let a paused schedule fire again from its next tick (ticks that fell while paused are not fired); returns that tick.';

create or replace function cairn.delete_schedule(name text)
returns boolean
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform cairn.check_schedule_name(name);
    delete from cairn.schedules s where s.name = delete_schedule.name;
    return found;
end $$;
comment on function cairn.delete_schedule(text) is
    'Delete a schedule (runs it started are kept); false if there was none.';

create or replace function cairn.list_schedules()
returns table (name text, cron text, timezone text, workflow text, queue text, task text,
               input jsonb, priority integer, missed text, overlap text, paused boolean,
               next_fire timestamptz, last_fire timestamptz, last_run uuid, last_job bigint,
               fired bigint, skipped bigint, last_error text, created_at timestamptz)
language sql stable security definer
set search_path = pg_catalog, pg_temp
as $$
    select s.name, s.cron, s.timezone, s.workflow, s.queue, s.task, s.input, s.priority,
           s.missed, s.overlap, s.paused, s.next_fire, s.last_fire, s.last_run, s.last_job,
           s.fired, s.skipped, s.last_error, s.created_at
      from cairn.schedules s
     order by s.name
$$;
comment on function cairn.list_schedules() is
    'Every schedule with its next and last fire, the last run or job it started, how many ticks fired and were skipped, and the last error.';

-- Internal: start the run or enqueue the job of one tick. Returns the run
-- or the job.
create or replace function cairn.fire_schedule(s cairn.schedules, at timestamptz, key text,
                                               out run_id uuid, out job_id bigint)
language plpgsql volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_input jsonb := s.input || jsonb_build_object('scheduled_at', cairn.rfc3339(at));
begin
    if s.workflow is not null then
        run_id := cairn.start_workflow(s.workflow, v_input, idempotency_key => key,
                                       priority => s.priority, conflict => 'return');
    else
        job_id := cairn.send(s.queue, v_input, priority => s.priority, task => s.task);
    end if;
end $$;

-- Internal: whether the run or job this schedule started last is still live.
create or replace function cairn.schedule_busy(s cairn.schedules)
returns boolean
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select case
        when s.last_run is not null then exists (
            select from cairn.runs r
             where r.id = s.last_run and r.status not in ('completed', 'failed', 'cancelled'))
        when s.last_job is not null then exists (select from cairn.jobs j where j.id = s.last_job)
        else false end
$$;

create or replace function cairn.trigger_schedule(name text)
returns table (run_id uuid, job_id bigint)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v cairn.schedules := cairn.lock_schedule(name);
    v_now timestamptz := cairn.now();
begin
    select f.run_id, f.job_id into run_id, job_id
      from cairn.fire_schedule(v, v_now, format('schedule:%s@%s:now', v.name, cairn.rfc3339(v_now))) f;
    update cairn.schedules s
       set last_run = trigger_schedule.run_id, last_job = trigger_schedule.job_id,
           fired = s.fired + 1, updated_at = v_now
     where s.name = v.name;
    return next;
end $$;
comment on function cairn.trigger_schedule(text) is
    'Fire a schedule now, paused or not and whatever its overlap policy; its ticks are unchanged. Returns the run (or job) started.';

create or replace function cairn.tick_schedules(batch integer default 100)
returns integer
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
set enable_seqscan = off  -- the due index, whatever the statistics said when it was planned
set plan_cache_mode = force_generic_plan
as $$
declare
    v_now   timestamptz := cairn.now();
    v_fired integer := 0;
    v_ticks integer := 0;
    v       cairn.schedules;
    v_spec  cairn.cron_spec;
    v_out   record;
begin
    -- Tested inline: this runs every second in every worker, and a call of
    -- a function with a SET clause costs.
    if batch is null or batch not between 1 and 10000 then
        perform cairn.check_batch(batch, 'batch', 10000);
    end if;
    for v in
        select * from cairn.schedules s
         where not s.paused and s.next_fire <= v_now
         order by s.next_fire
         limit batch
           for update skip locked
    loop
        exit when v_ticks >= batch;
        v_spec := cairn.parse_cron(v.cron);
        -- A schedule's due ticks, oldest first: one under coalesce (the next
        -- is then the first tick after now), every one under catch_up; at
        -- most `batch` ticks (fired or skipped) per call.
        while v.next_fire <= v_now and v_ticks < batch loop
            v_ticks := v_ticks + 1;
            if v.overlap <> 'allow' and cairn.schedule_busy(v) then
                exit when v.overlap = 'queue'; -- held until the previous ends
                v.skipped := v.skipped + 1;
            else
                begin
                    select * into v_out
                      from cairn.fire_schedule(v, v.next_fire,
                               format('schedule:%s@%s', v.name, cairn.rfc3339(v.next_fire)));
                    v.last_run := v_out.run_id;
                    v.last_job := v_out.job_id;
                    v.last_fire := v.next_fire;
                    v.fired := v.fired + 1;
                    v.last_error := null;
                    v_fired := v_fired + 1;
                exception when others then
                    -- A tick that cannot fire (its queue dropped, say) is
                    -- dropped with its reason, never retried for ever.
                    v.last_error := format('tick %s: %s (SQLSTATE %s)',
                                           cairn.rfc3339(v.next_fire), sqlerrm, sqlstate);
                    raise warning 'cairn: schedule "%": %', v.name, v.last_error;
                end;
            end if;
            v.next_fire := cairn.cron_next(v_spec, v.timezone,
                case when v.missed = 'coalesce' then greatest(v.next_fire, v_now) else v.next_fire end);
        end loop;
        update cairn.schedules s
           set next_fire = v.next_fire, last_fire = v.last_fire, last_run = v.last_run,
               last_job = v.last_job, fired = v.fired, skipped = v.skipped,
               last_error = v.last_error, updated_at = v_now
         where s.name = v.name;
    end loop;
    return v_fired;
end $$;
comment on function cairn.tick_schedules(integer) is
    'Fire the due ticks of every schedule, at most batch (1 to 10000) runs or jobs; returns how many fired. Workers call it about once a second; concurrent callers split the due schedules between them (SKIP LOCKED) and a tick fires once.';
