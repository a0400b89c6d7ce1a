//! Write rate limits on device commands (`POST …/commands`, `PUT …/desired`):
//! per member and per device, token buckets (GCRA, the `governor` crate)
//! counted in this process. Over either, the answer is 429 `rate-limited`
//! with `Retry-After`, audited, and nothing is appended. Scenes and
//! automations do not pass through here: their commands are bounded by
//! their own definitions.
//!
//! Why both: a member with many devices is bounded by the member limit, a
//! device many members hammer (a dimmer slider shared by a family) by the
//! device limit; together with supersession (one open command per set of
//! capabilities) and the bridge's flush limit, what one device can queue is
//! bounded everywhere.

use crate::problem::ApiError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use uuid::Uuid;

/// The rates: sustained per second and the burst allowed at once.
#[derive(Debug, Clone, Copy)]
pub struct CommandLimits {
    pub per_member_per_second: u32,
    pub per_member_burst: u32,
    pub per_device_per_second: u32,
    pub per_device_burst: u32,
}

impl Default for CommandLimits {
    /// A person taps far slower; a slider dragged across a room's lights
    /// sends a burst.
    fn default() -> Self {
        Self { per_member_per_second: 10, per_member_burst: 40, per_device_per_second: 5, per_device_burst: 20 }
    }
}

pub struct Limiters {
    member: DefaultKeyedRateLimiter<Uuid>,
    device: DefaultKeyedRateLimiter<Uuid>,
    clock: DefaultClock,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limiters {
    pub fn new(l: &CommandLimits) -> Self {
        Self {
            member: RateLimiter::keyed(quota(l.per_member_per_second, l.per_member_burst)),
            device: RateLimiter::keyed(quota(l.per_device_per_second, l.per_device_burst)),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one command of `member` to `device`; 429 over either limit.
    pub fn check(&self, member: Uuid, device: Uuid) -> Result<(), ApiError> {
        let (limiter, who) = match (self.member.check_key(&member), self.device.check_key(&device)) {
            (Err(n), _) => (n, "you are sending commands too fast"),
            (_, Err(n)) => (n, "this device is receiving commands too fast"),
            (Ok(()), Ok(())) => return Ok(()),
        };
        let wait = limiter.wait_time_from(self.clock.now());
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Err(ApiError::RateLimited(format!("{who}; retry in {} s", secs.max(1)), secs.max(1)))
    }

    /// Forgets keys whose buckets are full again (bounded memory).
    pub fn prune(&self) {
        self.member.retain_recent();
        self.device.retain_recent();
        self.member.shrink_to_fit();
        self.device.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_over_the_burst_is_told_when_to_retry_and_others_are_not_affected() {
        let l = Limiters::new(&CommandLimits {
            per_member_per_second: 1,
            per_member_burst: 3,
            per_device_per_second: 100,
            per_device_burst: 100,
        });
        let (me, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        for d in 0..3 {
            assert!(l.check(me, Uuid::from_u128(100 + d)).is_ok());
        }
        match l.check(me, Uuid::from_u128(200)) {
            Err(ApiError::RateLimited(_, secs)) => assert_eq!(secs, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(l.check(other, Uuid::from_u128(200)).is_ok());
    }

    #[test]
    fn a_device_over_its_burst_is_limited_whoever_sends() {
        let l = Limiters::new(&CommandLimits {
            per_member_per_second: 100,
            per_member_burst: 100,
            per_device_per_second: 1,
            per_device_burst: 2,
        });
        let lamp = Uuid::from_u128(9);
        assert!(l.check(Uuid::from_u128(1), lamp).is_ok());
        assert!(l.check(Uuid::from_u128(2), lamp).is_ok());
        assert!(matches!(l.check(Uuid::from_u128(3), lamp), Err(ApiError::RateLimited(..))));
    }
}
