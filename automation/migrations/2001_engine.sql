-- The automation engine's own state (issue 17), written in one transaction
-- with the log positions it has decided up to.
CREATE TABLE engine_offsets (
    topic       text NOT NULL,
    "partition" int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, "partition")
);

-- Every pending wait, computed from recorded times, so a restart neither
-- resets nor skips one: `hold` (a trigger's `forSecs` or a presence
-- debounce), `schedule` (a time trigger's next instant), `resume` (a delay),
-- `wait` (a waitFor's timeout), `queued` (a run waiting its turn).
CREATE TABLE engine_timers (
    timer_id      uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    automation_id uuid NOT NULL,
    kind          text NOT NULL,
    "trigger"     int,
    run_id        uuid,
    step          int,
    depth         int NOT NULL DEFAULT 0,
    due_at        timestamptz NOT NULL,
    payload       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX engine_timers_due ON engine_timers (due_at);
CREATE INDEX engine_timers_automation ON engine_timers (automation_id, kind);
