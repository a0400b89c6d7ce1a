//! Request limits async-graphql does not have built in: a cap on aliases, so a
//! document cannot multiply one cheap field into thousands of resolver calls,
//! and no NUL character in the document or its variables (no read model can
//! store or compare one; refused as `BAD_USER_INPUT` before anything runs).

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{ErrorExtensionValues, Positioned, ServerError, ServerResult, Value, Variables};
use std::sync::Arc;

/// Refuses documents with more than `.0` aliased fields or with a NUL
/// character, before validation and before any resolver runs. Applies to
/// queries and to subscriptions over WebSocket alike.
pub struct AliasLimit(pub usize);

impl ExtensionFactory for AliasLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(AliasLimitExt(self.0))
    }
}

struct AliasLimitExt(usize);

fn aliases(set: &Positioned<SelectionSet>) -> usize {
    set.node
        .items
        .iter()
        .map(|s| match &s.node {
            Selection::Field(f) => usize::from(f.node.alias.is_some()) + aliases(&f.node.selection_set),
            Selection::InlineFragment(i) => aliases(&i.node.selection_set),
            Selection::FragmentSpread(_) => 0,
        })
        .sum()
}

pub fn count_aliases(doc: &ExecutableDocument) -> usize {
    doc.operations.iter().map(|(_, op)| aliases(&op.node.selection_set)).sum::<usize>()
        + doc.fragments.values().map(|f| aliases(&f.node.selection_set)).sum::<usize>()
}

#[async_graphql::async_trait::async_trait]
impl Extension for AliasLimitExt {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        if document_has_nul(query) || variables.values().any(const_has_nul) {
            return Err(coded("text must not contain the NUL character (\\u0000)", crate::errors::codes::BAD_USER_INPUT));
        }
        let doc = next.run(ctx, query, variables).await?;
        let n = count_aliases(&doc);
        if n > self.0 {
            return Err(coded(&format!("Query has {n} aliases; at most {} are allowed.", self.0), crate::errors::codes::TOO_MANY_ALIASES));
        }
        Ok(doc)
    }
}

fn coded(message: &str, code: &str) -> ServerError {
    let mut e = ServerError::new(message, None);
    let mut ext = ErrorExtensionValues::default();
    ext.set("code", Value::from(code));
    e.extensions = Some(ext);
    e
}

/// A raw NUL or a `\u0000` escape in a GraphQL document (a literal
/// backslash-u0000 in a string is refused too: harmless, and simpler than a
/// second parse).
fn document_has_nul(query: &str) -> bool {
    homelink_events::text::has_nul(query) || query.contains("\\u0000")
}

fn const_has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => homelink_events::text::has_nul(s),
        Value::List(l) => l.iter().any(const_has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| homelink_events::text::has_nul(k) || const_has_nul(v)),
        _ => false,
    }
}
