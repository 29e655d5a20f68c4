-- cairn 0004: throughput — the claim index without the job id.
--
-- Append-only: never edit this file once released; add a new numbered file.
--
-- With `id` as its last column, the claim index could serve a lookup by id
-- (a scan of the whole index with `id = ...` as its condition), and when the
-- table's statistics say it is nearly empty the planner rates that scan
-- as cheap as a primary-key probe and picks either: 100 probes of a
-- 20,000-job table then cost 16 ms instead of 0.5 ms. Without it, only the
-- primary key serves lookups by id. Jobs of equal priority and visibility
-- time are claimed in index order (the order their rows were written).
-- Takes a lock on cairn.jobs while the index is rebuilt: run it when the
-- queue is quiet.
drop index cairn.jobs_claim_idx;
create index jobs_claim_idx on cairn.jobs (queue_id, priority, visible_at);

