//! Consistency tokens: "read your writes" across the command and query
//! sides. Every accepted write answers with a token
//! (`HomeLink-Consistency-Token`, and `consistencyToken` in the bodies of
//! commands); a read given the token waits, bounded, until the read models
//! show what the write did.
//!
//! A token names the write in its household's own terms — the household's
//! version after it, the commands it requested — never log positions, so it
//! reveals nothing of other households' write rates (issue 15, defect 6).
//! It is a JWS signed with the access-token keys (EdDSA, audience
//! [`AUDIENCE`]) and bound to the writer: query-api refuses at once a token
//! it cannot verify, another user's, or one of a household the reader is
//! not a member of. Every token it accepts names something that was
//! appended, so no token makes a read wait for what will never come.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The header that carries a token, both ways.
pub const HEADER: &str = "homelink-consistency-token";
/// `aud` of a consistency token (an access token is not one, nor the reverse).
pub const AUDIENCE: &str = "homelink-consistency";
/// How long a token stays usable.
pub const TTL_SECONDS: i64 = 600;
/// At most this many commands in one token.
pub const MAX_COMMANDS: usize = 16;

/// What a write did, in its household's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub household: Option<Uuid>,
    /// The household's version after the write (household events).
    pub version: Option<u64>,
    /// Commands it requested.
    pub commands: Vec<Uuid>,
}

impl Written {
    /// A household event that brought `household` to `version`.
    pub fn household_version(&mut self, household: Uuid, version: u64) {
        if self.claim(household) {
            self.version = Some(self.version.map_or(version, |v| v.max(version)));
        }
    }

    /// A command requested in `household`.
    pub fn command(&mut self, household: Uuid, command: Uuid) {
        if self.claim(household) && self.commands.len() < MAX_COMMANDS && !self.commands.contains(&command) {
            self.commands.push(command);
        }
    }

    /// A write touches one household; anything of another is not tokened.
    fn claim(&mut self, household: Uuid) -> bool {
        *self.household.get_or_insert(household) == household
    }

    pub fn is_empty(&self) -> bool {
        self.version.is_none() && self.commands.is_empty()
    }
}

/// The claims of a consistency token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The writer (a user id).
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    /// The household.
    pub h: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub c: Vec<Uuid>,
}

impl Claims {
    /// The claims of a token for `user`'s write, valid from `now` (Unix seconds).
    pub fn new(user: Uuid, w: &Written, now: i64) -> Option<Self> {
        let h = w.household.filter(|_| !w.is_empty())?;
        Some(Self {
            iss: crate::auth::ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: user.to_string(),
            iat: now,
            exp: now + TTL_SECONDS,
            h,
            v: w.version,
            c: w.commands.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_tokened_in_its_own_households_terms_only() {
        let (h, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut w = Written::default();
        assert!(Claims::new(Uuid::nil(), &w, 0).is_none(), "nothing written, no token");
        w.household_version(h, 4);
        w.household_version(h, 3);
        w.command(h, Uuid::from_u128(9));
        w.command(other, Uuid::from_u128(10));
        let c = Claims::new(Uuid::nil(), &w, 100).expect("claims");
        assert_eq!((c.h, c.v, c.c.clone()), (h, Some(4), vec![Uuid::from_u128(9)]));
        assert_eq!((c.aud.as_str(), c.exp), (AUDIENCE, 100 + TTL_SECONDS));
        for n in 0..100 {
            w.command(h, Uuid::from_u128(100 + n));
        }
        assert_eq!(w.commands.len(), MAX_COMMANDS);
    }
}
