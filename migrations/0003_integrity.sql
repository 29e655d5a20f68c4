-- cairn 0003: integrity — a run's job is named by the engine, an
-- append-only history, input fingerprints for replay checks, and the
-- priority kept with the run (for idempotent starts).
--
-- Append-only: never edit this file once released; add a new numbered file.

-- Functions whose signatures or result columns change: the function files
-- re-create them.
drop function if exists cairn.claim(text, double precision, integer, text[]);
drop function if exists cairn.read(text, integer, integer);
drop function if exists cairn.ack(bigint[], bigint[]);
drop function if exists cairn.start_workflow(text, jsonb, text, text, integer, double precision, text);
drop function if exists cairn.load_run(uuid, bigint, bigint);
drop function if exists cairn.checkpoint(uuid, bigint, bigint, text, integer, text, text, jsonb, jsonb, text, integer);
drop function if exists cairn.sleep_step(uuid, bigint, bigint, text, integer, double precision);
drop function if exists cairn.await_signal(uuid, bigint, bigint, text, integer, text, double precision);
drop function if exists cairn.start_child(uuid, bigint, bigint, text, integer, text, jsonb);
drop function if exists cairn.start_task_step(uuid, bigint, bigint, text, integer, text, text, jsonb);
drop function if exists cairn.suspend_run(uuid, bigint, bigint, timestamptz, text);
drop function if exists cairn.complete_run(uuid, bigint, bigint, jsonb);
drop function if exists cairn.fail_run(uuid, bigint, bigint, text);
drop function if exists cairn.recorded_outcome(uuid, text);
drop function if exists cairn.hold_run(uuid, bigint, bigint);
drop function if exists cairn.settle_parent(uuid, text, text, jsonb, text);

-- The run a job drives. Set only by the run engine: cairn.send cannot, so a
-- producer cannot forge a run's job.
alter table cairn.jobs add column run_id uuid;
-- A run's step jobs, for cancel_run (partial: plain jobs pay nothing).
create index jobs_parent_run_idx on cairn.jobs (parent_run) where parent_run is not null;

-- Dead letters remember which run or step they belonged to, so requeue can
-- revive the run instead of losing the job.
alter table cairn.archive
    add column run_id      uuid,
    add column parent_run  uuid,
    add column parent_step text;

alter table cairn.runs add column priority smallint not null default 0;

-- A step is recorded when its attempt begins ('running'); the fingerprint
-- of its input lets a replay tell that a key is reached by another call.
-- No foreign key to runs: a check on every step's insert costs more than it
-- guards (cairn alone writes steps, and deletes them with their runs).
alter table cairn.steps
    drop constraint steps_run_id_fkey,
    add column fingerprint text,
    drop constraint steps_status_check,
    add constraint steps_status_check
        check (status in ('running', 'completed', 'failed', 'retrying', 'waiting'));

-- The run's history, append-only: attempts that did not complete, suspends,
-- resumes, signals, failures, retries, cancellations.
create table cairn.run_events (
    id       bigint generated always as identity primary key,
    run_id   uuid not null references cairn.runs (id) on delete cascade,
    at       timestamptz not null,
    ended_at timestamptz,
    event    text not null
             check (event in ('attempt', 'suspended', 'resumed', 'signal', 'failed',
                              'retried', 'cancelled')),
    step     text,
    attempt  integer,
    outcome  text check (outcome in ('retrying', 'failed', 'lost', 'cancelled')),
    error    text,
    detail   jsonb
);
create index run_events_run_idx on cairn.run_events (run_id, id);

-- Runs already in flight keep going: their jobs, dead letters and priority
-- are filled in from what 0002 recorded.
update cairn.jobs j set run_id = r.id from cairn.runs r where r.job_id = j.id;
update cairn.archive a set run_id = r.id from cairn.runs r where r.job_id = a.id;
update cairn.runs r set priority = j.priority from cairn.jobs j where j.id = r.job_id;
