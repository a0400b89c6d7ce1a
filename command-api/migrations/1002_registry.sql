-- Manufacturer serial numbers claimed by a registered device. A serial
-- belongs to one household at a time: the primary key decides between
-- concurrent claims. Released when the device is removed; a claim whose
-- registration never completed (a crash between claim and append) can be
-- taken over after five minutes.
CREATE TABLE device_serial_claims (
    serial       text PRIMARY KEY,
    household_id uuid NOT NULL,
    device_id    uuid NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now()
);
