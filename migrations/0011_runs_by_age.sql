-- cairn 0011: the newest runs, found by an index.
--
-- Append-only: never edit this file once released; add a new numbered file.

-- cairn.list_runs (the CLI's `runs`, the HTTP API's /api/runs, and the
-- dashboard's first page, refreshed every few seconds) returns the newest
-- runs first. With no index on created_at each call read and sorted every
-- run kept: 130–470 ms over a million runs, 0.3 ms with this index.
-- created_at never changes; the index costs an entry per run, and one per
-- change of its state (those updates write every index of cairn.runs).
-- Building it holds writes to cairn.runs back while it runs: about a
-- second per million runs stored, on the machine that measured the above.
create index runs_created_idx on cairn.runs (created_at);
