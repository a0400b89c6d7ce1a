-- Issue 17: a scene's or an automation's command acked `ok` whose reports
-- never showed its values is sent again as a new command (the bridge's
-- resend sweep, `read_model::commands::unconfirmed`). The sweep reads them
-- by this index, not by scanning the command history.
CREATE INDEX IF NOT EXISTS device_commands_unconfirmed ON device_commands (acked_at)
    WHERE caused_by IS NOT NULL AND ack_status = 'ok' AND confirmed_at IS NULL
      AND expired_at IS NULL AND superseded_at IS NULL;
