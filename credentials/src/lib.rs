//! Stored credentials (issue 12, Hopen's credential plugins): a connection's settings kept
//! in the run store under a name, its private part encrypted at rest, used by pipelines as
//! `connections: { carol: { type: carol, credential: carol-prod } }`.
//!
//! - **Types** ([`types`]): each registered connection kind is a credential type. Its public
//!   and private JSON Schemas come from the kind's own config struct, split by the fields'
//!   `writeOnly` marks ([`types`] module), so adding a kind adds a type.
//! - **Sealing** ([`MasterKey`]): the private fields are one XChaCha20-Poly1305 box per
//!   credential, bound to its name and type; the store holds ciphertext and the key's id,
//!   never the key (see the [`key`] module and docs/decisions/0027-credentials.md).
//! - **The vault** ([`Vault`]): list, show (public part and the names of the private fields,
//!   never their values), set (a private field left out keeps its stored value: write-only
//!   form semantics; the whole is checked as the steps will read it, errors name the
//!   field), delete, key rotation in one transaction, and [`Vault::resolve`] for a run.
//!   Every change is audited in the store in the same transaction (who, what, which
//!   fields, never a value).
//!
//! Why a crate of its own: the CLI (`pipe credentials`), the runner (a run resolves its
//! `credential:` connections) and the REST API all use the same vault; it knows no concrete
//! connection kind (they come from the registry) and no HTTP.

#![deny(missing_docs)]

pub mod key;
mod types;
mod vault;

pub use key::{
    load_key, load_or_create_key, KeySource, MasterKey, DEFAULT_KEY_FILE, MASTER_KEY_FILE_VAR,
    MASTER_KEY_VAR,
};
pub use types::{credential_type, types, CredentialType};
pub use vault::{CredentialInfo, Resolved, Saved, Vault};

/// Why a credential operation failed. Messages name the credential or the field, and never
/// contain a private value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// No connection kind of that name.
    #[error("unknown credential type `{kind}`{hint}; known types: {}", known.join(", "))]
    UnknownType {
        /// The type asked for.
        kind: String,
        /// The registered types.
        known: Vec<String>,
        /// ` (did you mean `x`?)` or empty.
        hint: String,
    },
    /// The credential does not check against its type (the API's 422).
    #[error("{}{message}", if field.is_empty() { String::new() } else { format!("`{field}`: ") })]
    Invalid {
        /// The key at fault (`""`: the credential as a whole).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// No credential of that name.
    #[error("no credential `{0}` (`pipe credentials list` shows them)")]
    NotFound(String),
    /// The operation needs the master key and none is set.
    #[error(
        "no master key: set {MASTER_KEY_VAR} (32 bytes as base64 or hex; `pipe credentials \
         new-key` makes one) or {MASTER_KEY_FILE_VAR} (a file holding it); `pipe credentials \
         set` creates <state dir>/{DEFAULT_KEY_FILE} when neither is set"
    )]
    NoMasterKey,
    /// The credential was sealed with another key than the one given.
    #[error(
        "credential {name} was sealed with key {sealed_with}, {MASTER_KEY_VAR} is {have} \
         (the key that sealed it is needed; after a rotation, use the new key)"
    )]
    WrongKey {
        /// The credential.
        name: String,
        /// The id of the key that sealed it.
        sealed_with: String,
        /// The id of the key given.
        have: String,
    },
    /// The key's own id matches but the sealed value does not open: it was altered or moved
    /// from another row.
    #[error("credential {0}: its sealed value does not open with its key (altered, or copied from another credential); set it again")]
    Unreadable(String),
    /// A name that is not `[a-z0-9][a-z0-9_.-]{{0,63}}`.
    #[error("`{0}` is not a credential name: use 1 to 64 of a-z 0-9 _ . - starting with a letter or digit")]
    InvalidName(String),
    /// The master key given cannot be read (not 32 bytes, not base64 or hex, no such file).
    #[error("master key: {0}")]
    BadKey(String),
    /// The store failed (or refused: a concurrent change is a `Conflict`).
    #[error("{0}")]
    Store(#[from] store::StoreError),
}

impl CredentialError {
    /// Whether this is the caller's fault (bad input: the API's 4xx), not the store's.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            CredentialError::UnknownType { .. }
                | CredentialError::Invalid { .. }
                | CredentialError::InvalidName(_)
        )
    }
}

/// Whether `name` may name a credential: `[a-z0-9][a-z0-9_.-]{0,63}`.
pub fn is_valid_name(name: &str) -> bool {
    engine::connection::is_credential_name(name)
}
