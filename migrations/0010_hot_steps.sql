-- cairn 0010: a step's row can be updated in place (HOT).
--
-- Append-only: never edit this file once released; add a new numbered file.

-- 0009's timer index named `status` in its predicate. A column in any
-- index's predicate rules out heap-only updates, so every step that
-- settled (running or waiting → completed) wrote new entries into every
-- index of cairn.steps. The same deadlines, by a predicate on columns a
-- step's end does not change: `kind` is fixed when the row is made, and a
-- wait's deadline is cleared when it is settled. cairn.fire_timers and
-- the doctor filter on status as before.
drop index cairn.steps_timer_idx;
create index steps_timer_idx on cairn.steps (wake_at)
    where kind = 'signal' and wake_at is not null;
