-- cairn 0006: schedules — cron in the database.
--
-- Append-only: never edit this file once released; add a new numbered file.

-- One row per schedule. A due tick (next_fire <= cairn.now()) is fired by
-- cairn.tick_schedules(), which every worker calls about once a second: it
-- locks due rows with SKIP LOCKED, starts one run (or enqueues one job) per
-- tick and moves next_fire on, all in one transaction, so a tick fires once
-- whatever number of workers run and wherever they crash.
create table cairn.schedules (
    name        text primary key
                check (name ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$'),
    cron        text not null,
    timezone    text not null,
    -- What a tick starts: a workflow run, or a job on a queue (task named).
    workflow    text,
    queue       text,
    task        text,
    input       jsonb not null check (jsonb_typeof(input) = 'object'),
    priority    integer not null default 0,
    -- Ticks missed while no worker ran: 'coalesce' fires one for all of
    -- them, 'catch_up' fires every one, a bounded batch per call.
    missed      text not null check (missed in ('coalesce', 'catch_up')),
    -- A tick while the previous run or job is still live: 'allow' fires,
    -- 'skip' drops the tick, 'queue' holds it until the previous one ends.
    overlap     text not null check (overlap in ('allow', 'skip', 'queue')),
    paused      boolean not null default false,
    next_fire   timestamptz not null,
    last_fire   timestamptz,
    last_run    uuid,
    last_job    bigint,
    fired       bigint not null default 0,
    skipped     bigint not null default 0,
    last_error  text,
    created_at  timestamptz not null,
    updated_at  timestamptz not null,
    check ((workflow is null) <> (queue is null)),
    check (task is null or queue is not null)
);

-- The tick's one read when nothing is due: the head of this index.
create index schedules_due_idx on cairn.schedules (next_fire) where not paused;

-- A cron expression read into the values each field allows (cairn.parse_cron).
-- days_any / weekdays_any: the field began with '*'. As in Vixie cron, when
-- both day fields are restricted a day matches either; otherwise both.
create type cairn.cron_spec as (
    minutes      integer[],
    hours        integer[],
    days         integer[],
    months       integer[],
    weekdays     integer[],
    days_any     boolean,
    weekdays_any boolean
);
