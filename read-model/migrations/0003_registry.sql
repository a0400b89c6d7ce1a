-- The device registry (issue 4): rooms with ids, device serials and
-- certificates, removal. Derived from the households topic like the rest.

CREATE TABLE rooms (
    room_id      uuid PRIMARY KEY,
    household_id uuid NOT NULL,
    name         text NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE INDEX rooms_household ON rooms (household_id);

ALTER TABLE devices ADD COLUMN room_id uuid;
ALTER TABLE devices ADD COLUMN serial text;
-- Hex serial number of the device's certificate; revoked once removed_at is set.
ALTER TABLE devices ADD COLUMN cert_serial text;
ALTER TABLE devices ADD COLUMN removed_at timestamptz;
CREATE INDEX devices_household_room ON devices (household_id, room_id);
CREATE INDEX devices_revoked ON devices (removed_at) WHERE removed_at IS NOT NULL;
