//! What one request may read (issue 15, defect 10), on top of the limits
//! checked before it runs (depth, complexity, aliases: [`crate::schema::Limits`]):
//!
//! - [`RowBudget`]: the rows one request may read from the read models, over
//!   all its resolvers. Every query goes through it, one at a time per
//!   request, limited to the rows left (plus one, to tell an overrun); a
//!   request that needs more fails as a whole with `QUERY_TOO_EXPENSIVE`
//!   (`data: null`) instead of reading on.
//! - [`Batch`]: nested lookups (a room's devices, a device's commands…) of
//!   one level of one request are gathered for a moment and read with one
//!   query, instead of one query per parent.
//!
//! [`ReadLimit`] gives every request (over HTTP and WebSocket alike) its own
//! budget and batches.

use crate::errors::{codes, error, unavailable};
use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextExecute, NextPrepareRequest};
use async_graphql::{Context, ErrorExtensionValues, Response, Result, ServerError, ServerResult, Value};
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Rows one request may read by default: a page of 200 devices with their
/// latest commands, or every room of a 1,000-device household with its
/// devices, fit several times over; 30 aliases of such reads do not.
pub const DEFAULT_MAX_ROWS: i64 = 5_000;

/// The rows a request may still read.
pub struct RowBudget {
    max: i64,
    /// Held across each query: a request reads with one query at a time
    /// (so it also holds at most one pooled connection).
    left: tokio::sync::Mutex<i64>,
    exhausted: AtomicBool,
}

impl RowBudget {
    pub fn new(max: i64) -> Self {
        Self { max, left: tokio::sync::Mutex::new(max), exhausted: AtomicBool::new(false) }
    }

    /// Whether the request asked for more rows than its budget.
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }

    pub fn refusal(&self) -> async_graphql::Error {
        error(
            codes::QUERY_TOO_EXPENSIVE,
            format!("the query reads more than {} rows; ask for fewer fields, fewer aliases or smaller pages", self.max),
        )
    }

    /// Runs one query of at most `want` rows (`None`: as many as there
    /// are). `run` gets the LIMIT to apply to the whole query: `want`, or
    /// the rows left plus one when fewer are left. Reading more than are
    /// left exhausts the budget and fails (and so does every read after).
    pub async fn read<T, F, Fut>(&self, want: Option<i64>, run: F) -> Result<Vec<T>>
    where
        F: FnOnce(i64) -> Fut,
        Fut: Future<Output = Result<Vec<T>, sqlx::Error>>,
    {
        if self.exhausted() {
            return Err(self.refusal());
        }
        let mut left = self.left.lock().await;
        if self.exhausted() {
            return Err(self.refusal());
        }
        let limit = match want {
            Some(w) => w.clamp(0, *left + 1),
            None => *left + 1,
        };
        let rows = run(limit).await.map_err(unavailable)?;
        let n = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        if n > *left {
            *left = 0;
            self.exhausted.store(true, Ordering::Relaxed);
            return Err(self.refusal());
        }
        *left -= n;
        Ok(rows)
    }

    /// [`Self::read`] of a query of at most one row.
    pub async fn read_one<T, Fut>(&self, run: impl FnOnce() -> Fut) -> Result<Option<T>>
    where
        Fut: Future<Output = Result<Option<T>, sqlx::Error>>,
    {
        let rows = self.read(Some(1), |_| async move { run().await.map(|r| r.into_iter().collect::<Vec<_>>()) }).await?;
        Ok(rows.into_iter().next())
    }
}

/// The request's budget (every request gets one from [`ReadLimit`]).
pub fn budget<'a>(ctx: &Context<'a>) -> Result<&'a RowBudget> {
    ctx.data::<Arc<RowBudget>>().map(|b| b.as_ref())
}

/// How long the first lookup of a batch waits for its siblings to join.
const BATCH_WINDOW: Duration = Duration::from_millis(1);

/// Most parents read by one batch query.
pub const MAX_BATCH_KEYS: usize = 1_000;

/// Lookups by key `K` (a parent's id) with the same arguments `G` (page,
/// filter, role…) that start together are answered by one call of the
/// loader, which returns the values of all their keys (a key it leaves out
/// has none). Per request; an error is every waiter's error.
pub struct Batch<G, K, V> {
    open: Mutex<HashMap<G, Arc<Round<K, V>>>>,
}

struct Round<K, V> {
    keys: Mutex<Vec<K>>,
    result: tokio::sync::OnceCell<Result<Arc<HashMap<K, V>>>>,
}

impl<G, K, V> Default for Batch<G, K, V> {
    fn default() -> Self {
        Self { open: Mutex::new(HashMap::new()) }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<G: Hash + Eq + Clone, K: Hash + Eq + Clone, V: Clone> Batch<G, K, V> {
    /// The value of `key`, loaded together with the other keys asked for
    /// with `group` at the same time. `load` runs once per batch (whichever
    /// lookup gets there first runs it).
    pub async fn load<F, Fut>(&self, group: G, key: K, load: F) -> Result<Option<V>>
    where
        F: FnOnce(G, Vec<K>) -> Fut,
        Fut: Future<Output = Result<HashMap<K, V>>>,
    {
        let round = {
            let mut open = lock(&self.open);
            let round = open.entry(group.clone()).or_insert_with(|| Arc::new(Round { keys: Mutex::default(), result: Default::default() }));
            if lock(&round.keys).len() >= MAX_BATCH_KEYS {
                *round = Arc::new(Round { keys: Mutex::default(), result: Default::default() });
            }
            let mut keys = lock(&round.keys);
            if !keys.contains(&key) {
                keys.push(key.clone());
            }
            drop(keys);
            round.clone()
        };
        let result = round
            .result
            .get_or_init(|| async {
                tokio::time::sleep(BATCH_WINDOW).await;
                // Closed: later lookups start the next batch.
                let keys = {
                    let mut open = lock(&self.open);
                    if open.get(&group).is_some_and(|r| Arc::ptr_eq(r, &round)) {
                        open.remove(&group);
                    }
                    lock(&round.keys).clone()
                };
                load(group.clone(), keys).await.map(Arc::new)
            })
            .await;
        match result {
            Ok(values) => Ok(values.get(&key).cloned()),
            Err(e) => Err(e.clone()),
        }
    }
}

/// Gives each request its [`RowBudget`] of `max_rows` and a fresh `L` (the
/// schema's batches), and answers a request that ran out of rows with its
/// refusal alone (`data: null`).
pub struct ReadLimit<L> {
    pub max_rows: i64,
    loaders: PhantomData<fn() -> L>,
}

impl<L> ReadLimit<L> {
    pub fn new(max_rows: i64) -> Self {
        Self { max_rows, loaders: PhantomData }
    }
}

impl<L: Default + Send + Sync + 'static> ExtensionFactory for ReadLimit<L> {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ReadLimitExt::<L> { budget: Arc::new(RowBudget::new(self.max_rows)), loaders: PhantomData })
    }
}

struct ReadLimitExt<L> {
    budget: Arc<RowBudget>,
    loaders: PhantomData<fn() -> L>,
}

#[async_graphql::async_trait::async_trait]
impl<L: Default + Send + Sync + 'static> Extension for ReadLimitExt<L> {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: async_graphql::Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<async_graphql::Request> {
        next.run(ctx, request.data(self.budget.clone()).data(L::default())).await
    }

    async fn execute(&self, ctx: &ExtensionContext<'_>, operation_name: Option<&str>, next: NextExecute<'_>) -> Response {
        let mut resp = next.run(ctx, operation_name).await;
        if self.budget.exhausted() {
            let mut e = ServerError::new(self.budget.refusal().message, None);
            let mut ext = ErrorExtensionValues::default();
            ext.set("code", Value::from(codes::QUERY_TOO_EXPENSIVE));
            e.extensions = Some(ext);
            resp.data = Value::Null;
            resp.errors = vec![e];
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn concurrent_lookups_are_one_load_per_group() {
        let batch: Batch<i32, u32, u32> = Batch::default();
        let loads = AtomicUsize::new(0);
        let lookup = |group: i32, key: u32| {
            let (batch, loads) = (&batch, &loads);
            async move {
                batch
                    .load(group, key, |g, keys| async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok(keys.into_iter().filter(|k| k % 7 != 0).map(|k| (k, k * 10 + g as u32)).collect())
                    })
                    .await
            }
        };
        let same = futures::future::try_join_all((1..=100).map(|k| lookup(1, k))).await.expect("loaded");
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for 100 parents");
        assert_eq!(same[0], Some(11));
        assert_eq!(same[6], None, "a key the loader left out has no value");
        // Two argument groups: two loads; a later lookup: a new batch.
        let (a, b) = futures::future::join(lookup(1, 3), lookup(2, 3)).await;
        assert_eq!((a.expect("a"), b.expect("b")), (Some(31), Some(32)));
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_load_fails_every_waiter_once() {
        let batch: Batch<(), u32, u32> = Batch::default();
        let loads = AtomicUsize::new(0);
        let all = futures::future::join_all((0..10).map(|k| {
            batch.load((), k, |_, _| async {
                loads.fetch_add(1, Ordering::SeqCst);
                Err(error(codes::UNAVAILABLE, "down"))
            })
        }))
        .await;
        assert!(all.iter().all(|r| r.as_ref().is_err_and(|e| e.message == "down")));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_batch_holds_at_most_max_batch_keys() {
        let batch: Batch<(), usize, usize> = Batch::default();
        let sizes = Mutex::new(Vec::new());
        let n = MAX_BATCH_KEYS + 1;
        let all = futures::future::try_join_all((0..n).map(|k| {
            batch.load((), k, |_, keys| async {
                lock(&sizes).push(keys.len());
                Ok(keys.into_iter().map(|k| (k, k)).collect())
            })
        }))
        .await
        .expect("loaded");
        assert_eq!(all.len(), n);
        assert_eq!(*lock(&sizes), [MAX_BATCH_KEYS, 1]);
    }

    #[tokio::test]
    async fn the_budget_limits_each_read_to_the_rows_left_and_refuses_an_overrun() {
        let budget = RowBudget::new(10);
        let rows = |n: usize| move |limit: i64| async move { Ok::<_, sqlx::Error>(vec![(); n.min(limit as usize)]) };
        assert_eq!(budget.read(Some(4), rows(100)).await.expect("4").len(), 4);
        // 6 left: an unbounded read is limited to 7 rows, and 7 is one too many.
        let limits = Mutex::new(Vec::new());
        let r = budget
            .read(None, |limit| {
                lock(&limits).push(limit);
                rows(100)(limit)
            })
            .await;
        assert_eq!(*lock(&limits), [7]);
        assert_eq!(r.expect_err("overrun").message, budget.refusal().message);
        assert!(budget.exhausted());
        // Nothing more is read once it ran out.
        let ran = AtomicBool::new(false);
        let r = budget
            .read(Some(1), |limit| {
                ran.store(true, Ordering::SeqCst);
                rows(1)(limit)
            })
            .await;
        assert!(r.is_err() && !ran.load(Ordering::SeqCst), "read after the budget ran out");

        let exact = RowBudget::new(3);
        assert_eq!(exact.read(None, rows(3)).await.expect("3").len(), 3);
        assert_eq!(exact.read(None, rows(0)).await.expect("nothing more").len(), 0, "an empty read still fits");
        assert!(!exact.exhausted());
    }
}
