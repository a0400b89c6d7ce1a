-- A member's last reported presence (issue 17): `home` or `away`, NULL when
-- their app never reported; `presence_since` is when it last changed.
ALTER TABLE household_members ADD COLUMN presence text;
ALTER TABLE household_members ADD COLUMN presence_since timestamptz;
