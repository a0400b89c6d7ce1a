-- Records the projector could not apply (issue 9). A record that fails on its
-- content — a value Postgres refuses, an undecodable envelope — is recorded
-- here with its log position and the reason, counted in
-- homelink_projector_errors_total{kind="dead_letter"}, and the projection moves
-- on: a poison record never stops a partition. The record itself stays in
-- Kafka at (topic, partition, offset) for replay once the cause is fixed.
CREATE TABLE projector_dead_letters (
    topic        text        NOT NULL,
    partition    int         NOT NULL,
    "offset"     bigint      NOT NULL,
    -- 'log' (catch-up consumer) or 'push' (push channel)
    source       text        NOT NULL,
    event_id     uuid,
    household_id uuid,
    event_type   text,
    reason       text        NOT NULL,
    -- The record as JSON text (NUL characters escaped), at most 64 KiB.
    payload      text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX projector_dead_letters_recent ON projector_dead_letters (recorded_at DESC);

-- Retention of device_commands (issue 9): rows are deleted a while after they
-- were requested (projector `command_retention`, 30 days by default).
CREATE INDEX device_commands_age ON device_commands ((COALESCE(requested_at, acked_at)));
