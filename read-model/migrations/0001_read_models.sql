-- Read models built by the projector. Every table here is derived from the
-- Kafka log and can be dropped and rebuilt from it.

CREATE TABLE households (
    household_id uuid PRIMARY KEY,
    name         text NOT NULL,
    created_at   timestamptz NOT NULL
);

CREATE TABLE devices (
    device_id     uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    kind          text NOT NULL,
    name          text NOT NULL,
    room          text,
    registered_at timestamptz NOT NULL
);
CREATE INDEX devices_household ON devices (household_id);

CREATE TABLE device_shadows (
    device_id     uuid PRIMARY KEY,
    household_id  uuid NOT NULL,
    reported      jsonb NOT NULL DEFAULT '{}',
    seq           bigint NOT NULL DEFAULT 0,
    version       bigint NOT NULL DEFAULT 0,
    battery       smallint,
    online        boolean NOT NULL DEFAULT false,
    -- telemetry offset of the last applied status event: orders online/offline
    status_offset bigint NOT NULL DEFAULT -1,
    last_seen     timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_shadows_household ON device_shadows (household_id);

CREATE TABLE device_commands (
    command_id   uuid PRIMARY KEY,
    household_id uuid NOT NULL,
    device_id    uuid NOT NULL,
    set_values   jsonb,
    status       text NOT NULL,
    status_rank  smallint NOT NULL,
    reason       text,
    actor        jsonb,
    requested_at timestamptz,
    expires_at   timestamptz,
    acked_at     timestamptz
);
CREATE INDEX device_commands_device ON device_commands (device_id, requested_at);

-- How many events of each type were applied per household: a read model for
-- analysts that also makes double application visible.
CREATE TABLE household_event_counts (
    household_id uuid NOT NULL,
    event_type   text NOT NULL,
    applied      bigint NOT NULL,
    PRIMARY KEY (household_id, event_type)
);

-- The catch-up consumer's position, committed with the rows it produced.
CREATE TABLE projector_offsets (
    topic       text NOT NULL,
    partition   int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- Events applied through the push channel ahead of the catch-up consumer;
-- the consumer skips them and deletes them as it passes.
CREATE TABLE projector_pushed (
    topic     text NOT NULL,
    partition int NOT NULL,
    "offset"  bigint NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
);
