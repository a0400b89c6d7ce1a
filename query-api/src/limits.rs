//! Query limits async-graphql does not have built in: a cap on aliases, so a
//! document cannot multiply one cheap field into thousands of resolver calls.

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{ErrorExtensionValues, Positioned, ServerError, ServerResult, Value, Variables};
use std::sync::Arc;

/// Refuses documents with more than `.0` aliased fields, before validation
/// and before any resolver runs.
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
        let doc = next.run(ctx, query, variables).await?;
        let n = count_aliases(&doc);
        if n > self.0 {
            let mut e = ServerError::new(format!("Query has {n} aliases; at most {} are allowed.", self.0), None);
            let mut ext = ErrorExtensionValues::default();
            ext.set("code", Value::from("TOO_MANY_ALIASES"));
            e.extensions = Some(ext);
            return Err(e);
        }
        Ok(doc)
    }
}
