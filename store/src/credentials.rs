//! Stored credentials: a connection type's public fields in clear, its private fields as
//! one sealed (encrypted) value the store never opens. Encryption is the caller's: the
//! store keeps what it is given.

use crate::sql::{Backend, SqlStore};

/// The credentials table.
pub trait CredentialStore: Send + Sync {}

impl<B: Backend> CredentialStore for SqlStore<B> {}
