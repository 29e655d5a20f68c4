-- cairn 0001: the queue core.
--
-- Append-only: never edit this file once released; add a new numbered file.
-- Functions live in sql/ and are re-applied by initialize().

create table cairn.queues (
    id         integer generated always as identity primary key,
    name       text not null unique
               check (name ~ '^[a-z_][a-z0-9_]{0,62}$'),
    created_at timestamptz not null default pg_catalog.now()
);

-- Live jobs: ready, delayed, or leased. The lease *is* visible_at: a claimed
-- job is invisible until its lease runs out, then it is claimable again.
-- Jobs name their queue by its integer id: the claim index is then all
-- fixed-width columns, which the claim scan compares much faster than text.
-- No foreign key to cairn.queues: FK checks would take row locks on the hot
-- path (multixacts); send() looks the queue up instead.
create table cairn.jobs (
    id          bigint generated always as identity primary key,
    queue_id    integer not null,
    task        text not null,
    payload     jsonb not null,
    priority    smallint not null default 0,
    visible_at  timestamptz not null,
    attempts    integer not null default 0 check (attempts >= 0),
    -- A random token drawn at every claim. Settling and extending name it,
    -- so a worker whose lease ran out cannot touch a job that has since been
    -- handed to someone else (fencing). Random rather than a sequence: claims
    -- commit without waiting for the WAL flush, and a sequence could hand out
    -- the same value again after a crash.
    lease       bigint,
    enqueued_at timestamptz not null,
    last_error  text
);

-- The claim index: equality on queue, then the claim order.
create index jobs_claim_idx on cairn.jobs (queue_id, priority, visible_at, id);

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
