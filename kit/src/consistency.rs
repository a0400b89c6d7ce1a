//! Consistency tokens: "read your writes" across the command and query
//! sides. Every accepted write answers with the log positions it appended
//! (`HomeLink-Consistency-Token`, and `consistencyToken` in the bodies of
//! commands); a read given the token waits, bounded, until the read models
//! have applied those positions.
//!
//! The token is opaque to clients: `topic:partition:offset` entries joined by
//! `,`, base64url without padding.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// The header that carries a token, both ways.
pub const HEADER: &str = "homelink-consistency-token";

/// At most this many positions in one token.
const MAX_POSITIONS: usize = 16;
/// Longer than any Kafka topic name (249).
const MAX_TOPIC: usize = 255;

/// A position in the log: what a write appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The positions a write appended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Token(pub Vec<Position>);

impl Token {
    pub fn encode(&self) -> String {
        let raw: Vec<String> = self.0.iter().map(|p| format!("{}:{}:{}", p.topic, p.partition, p.offset)).collect();
        URL_SAFE_NO_PAD.encode(raw.join(","))
    }

    /// `None` for anything this module did not write.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > 4 * MAX_POSITIONS * (MAX_TOPIC + 24) / 3 {
            return None;
        }
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(s.trim()).ok()?).ok()?;
        let mut out = Vec::new();
        for entry in raw.split(',') {
            let (rest, offset) = entry.rsplit_once(':')?;
            let (topic, partition) = rest.rsplit_once(':')?;
            let valid_topic = !topic.is_empty()
                && topic.len() <= MAX_TOPIC
                && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            let (partition, offset): (i32, i64) = (partition.parse().ok()?, offset.parse().ok()?);
            if !valid_topic || partition < 0 || offset < 0 {
                return None;
            }
            out.push(Position { topic: topic.to_owned(), partition, offset });
        }
        (!out.is_empty() && out.len() <= MAX_POSITIONS).then_some(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_garbage_does_not() {
        let t = Token(vec![
            Position { topic: "homelink.commands".into(), partition: 3, offset: 1234 },
            Position { topic: "homelink.telemetry".into(), partition: 0, offset: 0 },
        ]);
        assert_eq!(Token::parse(&t.encode()), Some(t));
        for bad in [
            "",
            "!!",
            &URL_SAFE_NO_PAD.encode("t:1"),
            &URL_SAFE_NO_PAD.encode("t:-1:2"),
            &URL_SAFE_NO_PAD.encode("a b:1:2"),
            &"A".repeat(100_000),
        ] {
            assert_eq!(Token::parse(bad), None, "{bad:.40}");
        }
    }
}
