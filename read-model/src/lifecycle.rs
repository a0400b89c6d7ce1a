//! A device command's lifecycle as `device_commands.status_rank` orders it:
//! the one definition the projector writes and the bridge and command-api
//! read (open commands, closed ones, what the expiry sweep may still expire).
//! The statuses of each rank are in the projector's `projections/commands.rs`.
//! Readers write a rank into their statement (`format!`) rather than bind
//! it: the partial indexes of `device_commands` (`status_rank < 2`, `< 3`)
//! serve a query only when the planner sees the number.

/// How far a command has come; a command's rank only grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(i16)]
pub enum Rank {
    /// Accepted for a connected device.
    Requested = 0,
    /// Accepted while the device was offline: waits in the offline queue.
    Queued = 1,
    /// The broker took it for the device.
    Delivered = 2,
    /// Acked (ok, rejected, failed), revoked, superseded or expired.
    Ended = 3,
    /// Acked ok and every value it set reported afterwards.
    Confirmed = 4,
}

impl Rank {
    /// The value stored in `status_rank`.
    pub const fn value(self) -> i16 {
        self as i16
    }
}

/// A command's rank derived from its columns (SQL over `device_commands`),
/// the same rule as its status: the first that holds.
pub fn rank_sql() -> String {
    format!(
        "CASE WHEN confirmed_at IS NOT NULL THEN {confirmed}
       WHEN ack_status IS NOT NULL OR revoked_at IS NOT NULL OR superseded_at IS NOT NULL OR expired_at IS NOT NULL THEN {ended}
       WHEN delivered_at IS NOT NULL THEN {delivered}
       WHEN queued THEN {queued} ELSE {requested} END",
        confirmed = Rank::Confirmed.value(),
        ended = Rank::Ended.value(),
        delivered = Rank::Delivered.value(),
        queued = Rank::Queued.value(),
        requested = Rank::Requested.value(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_the_stored_numbers_in_lifecycle_order() {
        // Stored in rows: these numbers never change.
        let all = [Rank::Requested, Rank::Queued, Rank::Delivered, Rank::Ended, Rank::Confirmed];
        assert_eq!(all.map(Rank::value), [0, 1, 2, 3, 4]);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert!(rank_sql().starts_with("CASE WHEN confirmed_at IS NOT NULL THEN 4"));
    }
}
