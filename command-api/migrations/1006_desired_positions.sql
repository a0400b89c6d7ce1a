-- The log position of each device's last versioned desired change (issue 15,
-- defect 7): the next versioned writer waits until the read model applied
-- it before it checks the version, so the check is exact without holding
-- the device's lock across the projector's apply.
CREATE TABLE desired_positions (
    device_id  uuid   PRIMARY KEY,
    topic      text   NOT NULL,
    partition  int    NOT NULL,
    "offset"   bigint NOT NULL
);
