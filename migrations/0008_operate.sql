-- cairn 0008: what an operator sees — the workers that are running.
--
-- Append-only: never edit this file once released; add a new numbered file.

-- One row per running worker process: who serves what, since when. A worker
-- says hello when it starts, updates seen_at every few seconds, and deletes
-- its row when it stops; a row not seen for a while is a worker that died.
create table cairn.workers (
    id          uuid primary key,
    host        text not null,
    pid         integer not null,
    queues      text[] not null,
    handlers    text[] not null,
    concurrency integer not null,
    started_at  timestamptz not null,
    seen_at     timestamptz not null
);
alter table cairn.workers set (fillfactor = 50); -- seen_at updates stay HOT
