-- The engine's last command to each device (issue 17, item 6): when, at
-- which causation depth, from which automation. An automation does not act
-- on its own commands' effects, and the loop guard counts depth through
-- devices, for 30 s after a command; kept here (written with the engine's
-- positions) so a restart within those 30 s still knows.
CREATE TABLE engine_sent (
    device_id     uuid PRIMARY KEY,
    sent_at       timestamptz NOT NULL,
    depth         integer NOT NULL,
    automation_id uuid NOT NULL
);
