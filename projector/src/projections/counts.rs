//! `household_event_counts`: how many events of each type were applied per
//! household — cheap statistics, and what makes a double application visible.
//! Written by the applier's closing statement with the batch's positions
//! ([`crate::apply`]).

use homelink_events::Event;
use homelink_kit::reader::Located;
use std::collections::HashMap;
use uuid::Uuid;

/// A batch's events counted per household and type, as columns.
#[derive(Debug, Default)]
pub struct Counts {
    pub households: Vec<Uuid>,
    pub types: Vec<String>,
    pub applied: Vec<i64>,
}

/// Counts the batch's events per household and type.
pub fn of(work: &[(&Located, Event)]) -> Counts {
    let mut n: HashMap<(Uuid, &'static str), i64> = HashMap::new();
    for (l, ev) in work {
        *n.entry((l.envelope.household_id, ev.type_name())).or_default() += 1;
    }
    let mut c = Counts::default();
    for ((h, t), k) in n {
        c.households.push(h);
        c.types.push(t.to_owned());
        c.applied.push(k);
    }
    c
}
