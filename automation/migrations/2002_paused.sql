-- Automations the engine's breaker paused (issue 17): nothing starts until
-- the automation is saved again. Written with the engine's positions.
CREATE TABLE engine_paused (
    automation_id uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    paused_at     timestamptz NOT NULL,
    reason        text NOT NULL
);
