//! Stored credentials: a connection type's public fields in clear, its private fields as
//! one sealed (encrypted) value the store never opens. Encryption is the caller's (the
//! `credentials` crate): the store keeps what it is given and could not read it.
//!
//! Why the audit row is written here, in the same transaction as the change: an audit
//! trail that a crash (or a failed second write) can leave out of step with the table is
//! not one. The caller says who did it and which fields changed; the store never sees a
//! value, so no audit row can hold one.
//!
//! Why a save names what it read (`previous`): the private part of a credential is merged
//! (a field left out of a save keeps its stored value), so a save is a read, a merge and a
//! write; two saves at once must not silently drop what the first one wrote. The write is
//! refused (`Conflict`) when the row is no longer what the merge was based on.

use crate::accounts::AuditRow;
use crate::sql::{p, ts, Backend, Row, SqlStore};
use crate::{Result, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// One stored credential as the table holds it.
#[derive(Clone, PartialEq, Serialize)]
pub struct CredentialRow {
    /// `[a-z0-9][a-z0-9_.-]*`, unique.
    pub name: String,
    /// The connection type (`carol`, `postgres` …).
    pub kind: String,
    /// The public fields (a JSON object), in clear.
    pub public: serde_json::Value,
    /// The private fields, sealed by the caller (opaque text).
    pub sealed: String,
    /// Which key sealed them (a fingerprint, never the key).
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Who saved it last.
    pub updated_by: String,
}

impl std::fmt::Debug for CredentialRow {
    // The sealed text is ciphertext, but it has no business in logs either.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRow")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("public", &self.public)
            .field("key_id", &self.key_id)
            .field("updated_at", &self.updated_at)
            .field("updated_by", &self.updated_by)
            .finish_non_exhaustive()
    }
}

/// What a save writes.
pub struct CredentialWrite<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    /// A JSON object.
    pub public: &'a serde_json::Value,
    pub sealed: &'a str,
    pub key_id: &'a str,
    /// The sealed text the caller's merge read (`None`: it found no row). The save is a
    /// `Conflict` when the row changed since.
    pub previous: Option<&'a str>,
    /// Who saves it (the audit's actor and the row's `updated_by`).
    pub actor: &'a str,
    /// The names of the fields this save changes (public and private), for the audit.
    pub changed: &'a [String],
}

/// A credential sealed again under another key ([`CredentialStore::reseal_credentials`]).
pub struct Resealed {
    pub name: String,
    /// The sealed text the caller opened: the row must still hold it.
    pub previous: String,
    pub sealed: String,
}

/// The audit target of a credential.
pub fn credential_target(name: &str) -> String {
    format!("credential:{name}")
}

/// The credentials table, and the audit trail of its changes.
pub trait CredentialStore: Send + Sync {
    /// Create or replace a credential, with its `credential.set` audit row, in one
    /// transaction. True when it was created. `Conflict` when the row is not what
    /// [`CredentialWrite::previous`] says the caller read.
    fn put_credential(&self, c: &CredentialWrite<'_>, now: DateTime<Utc>) -> Result<bool>;
    /// One credential.
    fn get_credential(&self, name: &str) -> Result<Option<CredentialRow>>;
    /// Every credential, by name.
    fn list_credentials(&self) -> Result<Vec<CredentialRow>>;
    /// Delete a credential, with its `credential.delete` audit row. False when there was none
    /// (and nothing is audited).
    fn delete_credential(&self, name: &str, actor: &str, now: DateTime<Utc>) -> Result<bool>;
    /// Replace the sealed part of these credentials by what `key_id` sealed (a key rotation)
    /// in one transaction, one `credential.rotate` audit row each. All or nothing:
    /// `Conflict` when one of them changed since the caller read it, or when a credential
    /// not in `rows` would be left sealed with another key than `key_id` (it was saved
    /// during the rotation). Returns how many were sealed again.
    fn reseal_credentials(
        &self,
        rows: &[Resealed],
        key_id: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64>;
    /// The newest audit rows whose target starts with `target_prefix` (`""`: all,
    /// `credential:` every credential's), newest first; `limit` 0 is all.
    fn list_audit(&self, target_prefix: &str, limit: usize) -> Result<Vec<AuditRow>>;
}

const COLUMNS: &str = "name, type, public, sealed, key_id, created_at, updated_at, updated_by";

fn row(r: &Row) -> Result<CredentialRow> {
    Ok(CredentialRow {
        name: r.text(0)?,
        kind: r.text(1)?,
        public: r.json(2)?,
        sealed: r.text(3)?,
        key_id: r.text(4)?,
        created_at: r.time(5)?,
        updated_at: r.time(6)?,
        updated_by: r.text(7)?,
    })
}

fn audit(
    tx: &mut dyn crate::sql::Tx,
    now: DateTime<Utc>,
    actor: &str,
    action: &str,
    name: &str,
    detail: serde_json::Value,
) -> Result<()> {
    tx.exec(
        "INSERT INTO audit(time, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        p![
            ts(now),
            actor,
            action,
            credential_target(name),
            serde_json::to_string(&detail)?
        ],
    )?;
    Ok(())
}

impl<B: Backend> CredentialStore for SqlStore<B> {
    fn put_credential(&self, c: &CredentialWrite<'_>, now: DateTime<Utc>) -> Result<bool> {
        let public = serde_json::to_string(c.public)?;
        self.write(|tx| {
            let current = tx
                .one("SELECT sealed FROM credentials WHERE name = ?1", p![c.name])?
                .map(|r| r.text(0))
                .transpose()?;
            if current.as_deref() != c.previous {
                return Err(StoreError::conflict(format!(
                    "credential {} changed while it was being saved; save it again",
                    c.name
                )));
            }
            let created = current.is_none();
            // One statement for both: a replaced row keeps its `created_at`.
            tx.exec(
                &format!(
                    "INSERT INTO credentials({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7) \
                     ON CONFLICT(name) DO UPDATE SET type = excluded.type, \
                     public = excluded.public, sealed = excluded.sealed, \
                     key_id = excluded.key_id, updated_at = excluded.updated_at, \
                     updated_by = excluded.updated_by"
                ),
                p![
                    c.name,
                    c.kind,
                    &public,
                    c.sealed,
                    c.key_id,
                    ts(now),
                    c.actor
                ],
            )?;
            audit(
                tx,
                now,
                c.actor,
                "credential.set",
                c.name,
                serde_json::json!({"type": c.kind, "created": created, "fields": c.changed}),
            )?;
            Ok(created)
        })
    }

    fn get_credential(&self, name: &str) -> Result<Option<CredentialRow>> {
        self.read(|tx| {
            tx.one(
                &format!("SELECT {COLUMNS} FROM credentials WHERE name = ?1"),
                p![name],
            )?
            .as_ref()
            .map(row)
            .transpose()
        })
    }

    fn list_credentials(&self) -> Result<Vec<CredentialRow>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {COLUMNS} FROM credentials ORDER BY name"),
                p![],
            )?
            .iter()
            .map(row)
            .collect()
        })
    }

    fn delete_credential(&self, name: &str, actor: &str, now: DateTime<Utc>) -> Result<bool> {
        self.write(|tx| {
            let Some(kind) = tx
                .one("SELECT type FROM credentials WHERE name = ?1", p![name])?
                .map(|r| r.text(0))
                .transpose()?
            else {
                return Ok(false);
            };
            tx.exec("DELETE FROM credentials WHERE name = ?1", p![name])?;
            audit(
                tx,
                now,
                actor,
                "credential.delete",
                name,
                serde_json::json!({"type": kind}),
            )?;
            Ok(true)
        })
    }

    fn reseal_credentials(
        &self,
        rows: &[Resealed],
        key_id: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        self.write(|tx| {
            let mut n = 0;
            for r in rows {
                let old = tx
                    .one(
                        "SELECT type, key_id FROM credentials WHERE name = ?1 AND sealed = ?2",
                        p![&r.name, &r.previous],
                    )?
                    .ok_or_else(|| {
                        StoreError::conflict(format!(
                            "credential {} changed during the key rotation; nothing was \
                             changed, rotate again",
                            r.name
                        ))
                    })?;
                let (kind, old_key) = (old.text(0)?, old.text(1)?);
                tx.exec(
                    "UPDATE credentials SET sealed = ?2, key_id = ?3 WHERE name = ?1",
                    p![&r.name, &r.sealed, key_id],
                )?;
                audit(
                    tx,
                    now,
                    actor,
                    "credential.rotate",
                    &r.name,
                    serde_json::json!({"type": kind, "from_key": old_key, "to_key": key_id}),
                )?;
                n += 1;
            }
            // Every credential must now be sealed with the new key.
            if let Some(left) = tx.one(
                "SELECT name FROM credentials WHERE key_id <> ?1 LIMIT 1",
                p![key_id],
            )? {
                return Err(StoreError::conflict(format!(
                    "credential {} was saved during the key rotation; nothing was changed, \
                     rotate again",
                    left.text(0)?
                )));
            }
            Ok(n)
        })
    }

    fn list_audit(&self, target_prefix: &str, limit: usize) -> Result<Vec<AuditRow>> {
        let limit = if limit == 0 { i64::MAX } else { limit as i64 };
        let chars = target_prefix.chars().count() as i64;
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT {} FROM audit WHERE substr(target, 1, ?2) = ?1 \
                     ORDER BY id DESC LIMIT ?3",
                    crate::accounts::AUDIT_COLUMNS
                ),
                p![target_prefix, chars, limit],
            )?
            .iter()
            .map(crate::accounts::audit_row)
            .collect()
        })
    }
}
