-- cairn 0002: durable workflows.
--
-- A run is driven by one job on a queue (task = the workflow's name). Running
-- the workflow function replays it from the start; every step's outcome is a
-- row in cairn.steps, so a replay returns stored outputs instead of calling
-- handlers again. A run that waits (a sleep, a signal, a step's backoff)
-- holds no worker: its job is simply invisible until the wait ends.

-- Workflows a worker has announced; start_workflow refuses other names.
create table cairn.workflows (
    name          text primary key
                  check (name ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$'),
    queue_id      integer not null,
    registered_at timestamptz not null default pg_catalog.now()
);

create table cairn.runs (
    id              uuid primary key default gen_random_uuid(),
    workflow        text not null,
    queue_id        integer not null,
    input           jsonb not null,
    status          text not null default 'pending'
                    check (status in ('pending', 'running', 'sleeping', 'waiting',
                                      'completed', 'failed', 'cancelled')),
    output          jsonb,
    error           text,
    idempotency_key text,
    parent_run      uuid references cairn.runs (id) on delete cascade,
    parent_step     text,
    job_id          bigint,
    wake_at         timestamptz,
    -- Something the run waits for happened while it was running (a signal,
    -- a child's or a step job's end): park it only briefly.
    wake_pending    boolean not null default false,
    created_at      timestamptz not null,
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz not null
);

-- The same key always names the same run of a workflow.
create unique index runs_idempotency_idx on cairn.runs (workflow, idempotency_key)
    where idempotency_key is not null;
create index runs_parent_idx on cairn.runs (parent_run) where parent_run is not null;
create index runs_status_idx on cairn.runs (workflow, status, created_at);

-- Checkpoints, and the run's execution trace. `seq` is the order in
-- which the workflow first reached each step; a replay must meet the same
-- key at the same seq (position), which the worker checks against the
-- checkpoints it loaded.
create table cairn.steps (
    run_id      uuid not null references cairn.runs (id) on delete cascade,
    key         text not null,
    seq    integer not null,
    kind        text not null check (kind in ('step', 'sleep', 'signal', 'value', 'child', 'task')),
    status      text not null check (status in ('completed', 'failed', 'retrying', 'waiting')),
    input       jsonb,
    output      jsonb,
    error       text,
    attempts    integer not null default 0,
    wake_at     timestamptz,
    started_at  timestamptz not null,
    finished_at timestamptz,
    primary key (run_id, key)
);


-- Signals delivered to runs. A signal waits here until a wait consumes it,
-- so one sent before the run waits is not lost.
create table cairn.signals (
    id          bigint generated always as identity primary key,
    run_id      uuid not null references cairn.runs (id) on delete cascade,
    name        text not null,
    payload     jsonb not null,
    sent_at     timestamptz not null,
    consumed_by text
);

create index signals_pending_idx on cairn.signals (run_id, name, id) where consumed_by is null;

-- Test clock: an offset added to cairn.now() once the database owner calls
-- cairn.advance_test_clock(). Production time cannot be moved by a SET.
create table cairn.test_clock (
    singleton boolean primary key default true check (singleton),
    offset_s  double precision not null
);

-- A job run as a step of a workflow (a step routed to another queue) names
-- the run and step waiting for its outcome.
alter table cairn.jobs
    add column parent_run  uuid,
    add column parent_step text;

-- W3C trace context of the producer (`00-<trace id>-<span id>-<flags>`),
-- stored at enqueue so the trace continues in whichever worker runs the job.
alter table cairn.jobs add column traceparent text;
alter table cairn.runs add column traceparent text;
