-- Removed devices whose open connection the broker confirmed closed (issue 9).
-- The revoker's loop kicks every removed device of the registry that is not
-- listed here, again and again until the broker confirms, so a removal whose
-- request died half-way (after the append) is still enforced.
CREATE TABLE device_kicks_confirmed (
    device_id  uuid        PRIMARY KEY,
    kicked_at  timestamptz NOT NULL DEFAULT now()
);
