-- The device twin (issue 11): desired state and per-property metadata on
-- the shadow, every step of a command's life with its time.
ALTER TABLE device_shadows
    ADD COLUMN IF NOT EXISTS desired jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS metadata jsonb NOT NULL DEFAULT '{}';
COMMENT ON COLUMN device_shadows.desired IS 'desired values not reported yet, each from the latest command that set it';
COMMENT ON COLUMN device_shadows.metadata IS 'per property: reportedAt, desiredAt, commandId';

-- Ranks: requested 0, queued 1, delivered 2, ok/rejected/failed/expired/superseded 3, confirmed 4.
UPDATE device_commands SET status_rank = 3 WHERE status_rank = 2;
ALTER TABLE device_commands
    ADD COLUMN IF NOT EXISTS queued boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS delivered_at timestamptz,
    ADD COLUMN IF NOT EXISTS ack_status text,
    ADD COLUMN IF NOT EXISTS confirmed_at timestamptz,
    ADD COLUMN IF NOT EXISTS expired_at timestamptz,
    ADD COLUMN IF NOT EXISTS superseded_at timestamptz,
    ADD COLUMN IF NOT EXISTS superseded_by uuid;
UPDATE device_commands SET ack_status = status WHERE status IN ('ok', 'rejected', 'failed');
-- The expiry timer's and the offline queue's reads: only open commands.
CREATE INDEX IF NOT EXISTS device_commands_open_expiry ON device_commands (expires_at) WHERE status_rank < 3;
CREATE INDEX IF NOT EXISTS device_commands_open_device ON device_commands (device_id, requested_at) WHERE status_rank < 2;

