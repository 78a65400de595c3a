//! Metadata contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`) and queries.

/// A metadata context selected for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Id the server assigned; appears in `BLOCK_STATUS` chunks.
    pub id: u32,
    /// Full context name.
    pub name: String,
}

/// One query string from `LIST_META_CONTEXT` or `SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery(String);

impl MetaQuery {
    /// Wraps a query string as received.
    pub fn new(query: String) -> Self {
        Self(query)
    }

    /// Listing semantics: a query ending in `:` (`base:`, `qemu:`,
    /// `qemu:dirty-bitmap:`) matches every context under it; any other query
    /// matches only the context of that exact name.
    pub fn matches_listing(&self, context: &str) -> bool {
        if self.0.ends_with(':') {
            context.starts_with(&self.0) && context.len() > self.0.len()
        } else {
            self.matches_exactly(context)
        }
    }

    /// Selection semantics: only exact names select a context.
    pub fn matches_exactly(&self, context: &str) -> bool {
        self.0 == context
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_queries_list_everything_below_them() {
        let q = MetaQuery::new("qemu:dirty-bitmap:".into());
        assert!(q.matches_listing("qemu:dirty-bitmap:backup"));
        assert!(!q.matches_listing("base:allocation"));
        assert!(!q.matches_exactly("qemu:dirty-bitmap:backup"));
        assert!(MetaQuery::new("base:".into()).matches_listing("base:allocation"));
        assert!(MetaQuery::new("base:allocation".into()).matches_exactly("base:allocation"));
    }
}
