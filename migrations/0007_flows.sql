-- cairn 0007: flows — workflows defined as data and driven by Postgres.
--
-- Append-only: never edit this file once released; add a new numbered file.
--
-- A flow is a versioned definition (JSON): steps naming step handlers,
-- their dependencies, conditions, fan-outs, sub-flows and loops. A flow run
-- is a row of cairn.runs like any other, with the version it started with;
-- it has no driving job: its steps are jobs whose ack, in the same
-- transaction, records the step and starts every step that became ready.

-- Step handlers the workers have announced: a definition may only name these.
create table cairn.step_handlers (
    name          text primary key
                  check (name ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$'),
    registered_at timestamptz not null default pg_catalog.now()
);

create table cairn.flows (
    name       text primary key
               check (name ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$'),
    version    integer not null check (version >= 1),  -- the latest
    created_at timestamptz not null,
    updated_at timestamptz not null
);

-- Every version stays: runs keep the version they started with.
create table cairn.flow_versions (
    flow       text not null references cairn.flows (name) on delete cascade,
    version    integer not null check (version >= 1),
    definition jsonb not null,
    created_at timestamptz not null,
    primary key (flow, version)
);

-- The version a flow run follows; NULL for a code-first run.
alter table cairn.runs add column flow_version integer;

-- A fan-out (kind 'map') counts its elements still to finish in `pending`;
-- a step a condition turned off is 'skipped'.
alter table cairn.steps
    add column pending integer,
    drop constraint steps_kind_check,
    add constraint steps_kind_check
        check (kind in ('step', 'sleep', 'signal', 'value', 'child', 'task', 'map')),
    drop constraint steps_status_check,
    add constraint steps_status_check
        check (status in ('running', 'completed', 'failed', 'retrying', 'waiting', 'skipped'));

-- A loop that goes back ('looped'), and the earlier passes of the steps it
-- runs again (attempts with outcome 'completed' or 'skipped').
alter table cairn.run_events
    drop constraint run_events_event_check,
    add constraint run_events_event_check
        check (event in ('attempt', 'suspended', 'resumed', 'signal', 'failed', 'retried',
                         'cancelled', 'looped')),
    drop constraint run_events_outcome_check,
    add constraint run_events_outcome_check
        check (outcome in ('retrying', 'failed', 'lost', 'cancelled', 'completed', 'skipped'));
