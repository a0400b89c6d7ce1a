-- The expiry timer also lets the values of commands the device acked `ok`
-- but never reported lapse at `expiresAt` (their status stays `ok`, their
-- `expired_at` says when the values stopped being desired).
CREATE INDEX IF NOT EXISTS device_commands_due ON device_commands (expires_at)
    WHERE expired_at IS NULL AND (status_rank < 3 OR status = 'ok');
DROP INDEX IF EXISTS device_commands_open_expiry;
