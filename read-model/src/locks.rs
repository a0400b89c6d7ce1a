//! Every Postgres advisory lock HomeLink takes, with its key, in one place:
//! two purposes never share a key by accident, and a new service (the
//! automation engine) picks a free one here instead of a magic number.
//!
//! | lock | held by | around |
//! |---|---|---|
//! | [`Lock::Household`] | command-api | a household write: read the aggregate, decide, append |
//! | [`Lock::DeviceDesired`] | command-api | a versioned `PUT …/desired`, until the read model applied it |
//! | [`Lock::SigningKeys`] | command-api | creating or rotating the token signing keys |
//! | [`Lock::ExpirySweep`] | device-bridge | the command expiry sweep (bridges take turns) |
//!
//! All are transaction-scoped (`pg_advisory_xact_lock` and its `try_` form):
//! released by COMMIT or ROLLBACK, never left behind by a crash.

use uuid::Uuid;

/// An advisory lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// A household's writes.
    Household(Uuid),
    /// A device's versioned desired-state writes.
    DeviceDesired(Uuid),
    /// The token signing keys.
    SigningKeys,
    /// The bridges' command expiry sweep.
    ExpirySweep,
    /// The bridges' resending of scene and automation commands left unanswered.
    ResendSweep,
}

impl Lock {
    /// The `bigint` key of `pg_advisory_xact_lock`. Per-id keys are half
    /// of the id's bits mixed with a constant per purpose (the two halves
    /// and the two constants differ, so a household and a device with the
    /// same id do not share a key); the fixed ones are small numbers.
    pub fn key(self) -> i64 {
        match self {
            Lock::Household(h) => first_half(h) ^ 0x486f_6d65_4c69_6e6b,
            Lock::DeviceDesired(d) => second_half(d) ^ 0x4465_7369_7265_6421,
            Lock::SigningKeys => 7_410_001,
            Lock::ExpirySweep => 7_311_001,
            Lock::ResendSweep => 7_311_002,
        }
    }
}

fn first_half(id: Uuid) -> i64 {
    let b = id.as_bytes();
    i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn second_half(id: Uuid) -> i64 {
    let b = id.as_bytes();
    i64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_ones_running_services_take() {
        // Unchanged from before the registry: a service of the previous
        // release and one of this release exclude each other.
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(Lock::Household(id).key(), 0x0123_4567_89ab_cdef ^ 0x486f_6d65_4c69_6e6b);
        assert_eq!(Lock::DeviceDesired(id).key(), (0xfedc_ba98_7654_3210_u64 as i64) ^ 0x4465_7369_7265_6421);
        assert_eq!(Lock::SigningKeys.key(), 7_410_001);
        assert_eq!(Lock::ExpirySweep.key(), 7_311_001);
    }

    #[test]
    fn purposes_do_not_share_keys() {
        for n in 0..10_000u128 {
            let id = Uuid::from_u128(n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
            let keys = [
                Lock::Household(id).key(),
                Lock::DeviceDesired(id).key(),
                Lock::SigningKeys.key(),
                Lock::ExpirySweep.key(),
                Lock::ResendSweep.key(),
            ];
            for (i, a) in keys.iter().enumerate() {
                assert!(keys[i + 1..].iter().all(|b| a != b), "{id}: {keys:?}");
            }
        }
    }
}
