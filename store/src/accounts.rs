//! The API's users, machine tokens and settings, and the audit trail.

use crate::sql::{Backend, SqlStore};

/// Users, tokens, settings, audit.
pub trait AccountStore: Send + Sync {}

impl<B: Backend> AccountStore for SqlStore<B> {}
