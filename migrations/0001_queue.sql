-- cairn 0001: the queue core.
--
-- Append-only: never edit this file once released; add a new numbered file.
-- Functions live in sql/ and are re-applied by initialize().

create table cairn.queues (
    name       text primary key
               check (name ~ '^[a-z_][a-z0-9_]{0,62}$'),
    created_at timestamptz not null default pg_catalog.now()
);

-- A lease token is drawn from this sequence at every claim. Completion and
-- lease extension name it, so a worker whose lease ran out cannot touch a job
-- that has since been handed to someone else (fencing).
create sequence cairn.lease_seq as bigint;

-- Live jobs: ready, delayed, or leased. The lease *is* visible_at: a claimed
-- job is invisible until its lease runs out, then it is claimable again.
-- No foreign key to cairn.queues: FK checks would take row locks on the hot
-- path (multixacts); send() checks the queue exists instead.
create table cairn.jobs (
    id          bigint generated always as identity primary key,
    queue       text not null,
    task        text not null,
    payload     jsonb not null,
    priority    smallint not null default 0,
    visible_at  timestamptz not null,
    attempts    integer not null default 0 check (attempts >= 0),
    lease       bigint,
    enqueued_at timestamptz not null,
    last_error  text
);

-- The claim index: equality on queue, then the claim order.
create index jobs_claim_idx on cairn.jobs (queue, priority, visible_at, id);

-- Completed-and-kept jobs and dead letters. A dead letter is kept, queryable
-- and can be put back with cairn.requeue(); nothing is dropped silently.
create table cairn.archive (
    id          bigint primary key,
    queue       text not null,
    task        text not null,
    payload     jsonb not null,
    priority    smallint not null,
    attempts    integer not null,
    enqueued_at timestamptz not null,
    archived_at timestamptz not null,
    outcome     text not null check (outcome in ('completed', 'dead')),
    output      jsonb,
    last_error  text
);

create index archive_queue_idx on cairn.archive (queue, outcome, archived_at);

-- Hot, high-churn table: vacuum it early.
alter table cairn.jobs set (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 2000
);
