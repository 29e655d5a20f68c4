-- cairn 0005: retention — finished runs and the archive are pruned by age.
--
-- Append-only: never edit this file once released; add a new numbered file.

-- How long finished work is kept; NULL keeps it for ever. One row.
--   completed  completed and cancelled runs (with their steps, history,
--              signals and child runs), and completed jobs in cairn.archive
--   failed     failed runs, and dead letters in cairn.archive (kept longer
--              by default: they are what an operator retries or requeues)
-- cairn.prune() deletes what is older, a small batch at a time; workers call
-- it in the background (see 50_retention.sql).
create table cairn.retention (
    singleton boolean primary key default true check (singleton),
    completed interval default '7 days' check (completed >= interval '0'),
    failed    interval default '30 days' check (failed >= interval '0'),
    pruned_at timestamptz
);
insert into cairn.retention default values;

-- Root runs in the order they become prunable, one index per window so a
-- prune never walks past runs the other window still keeps. Child runs go
-- with their root.
create index runs_done_idx on cairn.runs (finished_at)
    where parent_run is null and status in ('completed', 'cancelled');
create index runs_failed_idx on cairn.runs (finished_at)
    where parent_run is null and status = 'failed';

-- Archived jobs by age, for the same reason.
create index archive_age_idx on cairn.archive (outcome, archived_at);

-- Deleting a run deletes its signals through the foreign key; without an
-- index on run_id each deleted run would scan the whole signals table.
create index signals_run_idx on cairn.signals (run_id);
