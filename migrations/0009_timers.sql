-- cairn 0009: timers for flow runs — a signal step that waits with a timeout.
--
-- Append-only: never edit this file once released; add a new numbered file.

-- The waits that can run out, by deadline: cairn.fire_timers() (every
-- worker calls it about once a second) reads the due ones from here. Small:
-- only steps that wait for a signal with a deadline.
create index steps_timer_idx on cairn.steps (wake_at)
    where kind = 'signal' and status = 'waiting' and wake_at is not null;
