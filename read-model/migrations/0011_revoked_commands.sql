-- A command whose sender lost the right to send it (issue 15): it ends
-- `rejected` with a reason, and this is when.
ALTER TABLE device_commands ADD COLUMN revoked_at timestamptz;
