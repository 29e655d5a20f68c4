-- cairn 0012: claims that write no index.
--
-- Append-only: never edit this file once released; add a new numbered file.
--
-- Until now the lease was visible_at itself: a claim moved it to now + the
-- lease, and since visible_at is in the claim index every claimed job got a
-- second entry in every index of cairn.jobs (an update that changes an
-- indexed column cannot be heap-only). Now a claim writes leased_until, in
-- no index, and leaves visible_at where it was: the update is heap-only
-- (HOT) when the page has room for the new row version, and the job keeps
-- the one entry per index its insert made. A job is claimable when both
-- visible_at and leased_until (if set) have passed; lease extensions and
-- set_vt move leased_until only. Measured in `bench -- queue`: see
-- docs/design.md, "Claims that write no index".
alter table cairn.jobs add column leased_until timestamptz;

-- Jobs leased when this migration runs: their lease ends where visible_at
-- says (a retry or a suspended run clears the lease, so a job that still
-- has one is leased, or its lease has run out).
update cairn.jobs set leased_until = visible_at where lease is not null;

-- Room in every page for the new versions of its rows, so that a claim of
-- all of a page's jobs in one statement can keep every update heap-only.
-- A claimed row is a little larger than the row sent (its lease and
-- leased_until are set), hence a little under half. Applies to pages
-- written from now on.
alter table cairn.jobs set (fillfactor = 45);
