//! The vault: stored credentials over the run store, sealed with the master key.
//!
//! Every method is one or two short store transactions and blocks (the store's clients
//! do): async callers use `spawn_blocking`.

use crate::key::{self, MasterKey, Sealed};
use crate::types::{credential_type, CredentialType};
use crate::CredentialError;
use chrono::{DateTime, Utc};
use engine::connection::Connections;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use store::{CredentialRow, CredentialWrite, Resealed, RunStore};

/// A stored credential as anyone may see it: its public part and which private fields are
/// set, never their values.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct CredentialInfo {
    /// The credential's name (what a connection's `credential:` says).
    pub name: String,
    /// The credential type (a connection `type:`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The public fields.
    pub public: Map<String, Value>,
    /// The names of the private fields that are set.
    pub private_fields: Vec<String>,
    /// The id of the key that sealed the private fields.
    pub key_id: String,
    /// When it was first saved (RFC 3339).
    #[schemars(with = "String")]
    pub created_at: DateTime<Utc>,
    /// When it was last saved (RFC 3339).
    #[schemars(with = "String")]
    pub updated_at: DateTime<Utc>,
    /// Who saved it last.
    pub updated_by: String,
}

/// What [`Vault::set`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Saved {
    /// True when the credential is new.
    pub created: bool,
    /// The names of the fields that changed (public and private).
    pub changed: Vec<String>,
}

/// A credential opened for a run: everything a connection of its type needs.
#[derive(Clone)]
pub struct Resolved {
    /// The credential type.
    pub kind: String,
    /// Public and private fields together, as the connection's keys.
    pub fields: Map<String, Value>,
    /// The private values (at any depth) the run's redactor must mask.
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("kind", &self.kind)
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .field("secrets", &format_args!("[{} hidden]", self.secrets.len()))
            .finish()
    }
}

/// Stored credentials: the store, the connection kinds (the credential types), and the
/// master key (`None`: listing and deleting work, anything that seals or opens says
/// [`CredentialError::NoMasterKey`]).
#[derive(Clone)]
pub struct Vault {
    store: Arc<dyn RunStore>,
    connections: Connections,
    key: Option<MasterKey>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("store", &self.store)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), CredentialError> {
    if crate::is_valid_name(name) {
        Ok(())
    } else {
        Err(CredentialError::InvalidName(name.to_string()))
    }
}

fn info(row: CredentialRow) -> CredentialInfo {
    CredentialInfo {
        private_fields: Sealed::parse(&row.sealed)
            .map(|s| s.fields)
            .unwrap_or_default(),
        public: row.public.as_object().cloned().unwrap_or_default(),
        name: row.name,
        kind: row.kind,
        key_id: row.key_id,
        created_at: row.created_at,
        updated_at: row.updated_at,
        updated_by: row.updated_by,
    }
}

fn invalid(field: &str, message: impl Into<String>) -> CredentialError {
    CredentialError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Every string at any depth of `v` (and numbers as text), for masking messages.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Number(n) => out.push(n.to_string()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// `message` with every one of `values` (of 3 characters or more) replaced by `***`.
fn mask(message: &str, values: &[String]) -> String {
    let mut values: Vec<&String> = values.iter().filter(|v| v.chars().count() >= 3).collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut out = message.to_string();
    for v in values {
        out = out.replace(v.as_str(), "***");
    }
    out
}

impl Vault {
    /// A vault over `store`, whose credential types are `connections`' kinds.
    pub fn new(
        store: Arc<dyn RunStore>,
        connections: Connections,
        key: Option<MasterKey>,
    ) -> Vault {
        Vault {
            store,
            connections,
            key,
        }
    }

    /// The id of the master key, when one is set.
    pub fn key_id(&self) -> Option<&str> {
        self.key.as_ref().map(MasterKey::id)
    }

    /// The credential types (one per connection kind).
    pub fn types(&self) -> Vec<CredentialType> {
        crate::types(&self.connections)
    }

    fn key(&self) -> Result<&MasterKey, CredentialError> {
        self.key.as_ref().ok_or(CredentialError::NoMasterKey)
    }

    fn credential_type(&self, kind: &str) -> Result<CredentialType, CredentialError> {
        match self.connections.get(kind) {
            Some(k) => Ok(credential_type(k)),
            None => {
                let known: Vec<String> = self.connections.names().map(str::to_string).collect();
                let hint = engine::diag::did_you_mean(kind, known.iter().map(String::as_str))
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                Err(CredentialError::UnknownType {
                    kind: kind.to_string(),
                    known,
                    hint,
                })
            }
        }
    }

    /// Open a stored row's private fields with the master key.
    fn open(&self, row: &CredentialRow) -> Result<Map<String, Value>, CredentialError> {
        let key = self.key()?;
        if row.key_id != key.id() {
            return Err(CredentialError::WrongKey {
                name: row.name.clone(),
                sealed_with: row.key_id.clone(),
                have: key.id().to_string(),
            });
        }
        key::open(key, &row.name, &row.kind, &row.sealed)
            .ok_or_else(|| CredentialError::Unreadable(row.name.clone()))
    }

    /// Every credential, by name (no key needed).
    pub fn list(&self) -> Result<Vec<CredentialInfo>, CredentialError> {
        Ok(self
            .store
            .credentials()
            .list_credentials()?
            .into_iter()
            .map(info)
            .collect())
    }

    /// One credential (no key needed); `None` when there is none of that name.
    pub fn show(&self, name: &str) -> Result<Option<CredentialInfo>, CredentialError> {
        check_name(name)?;
        Ok(self.store.credentials().get_credential(name)?.map(info))
    }

    /// Create or replace credential `name` of type `kind`. `public` is the whole public part
    /// (a key left out is removed); in `private`, a key left out keeps its stored value when
    /// the credential exists with the same type, and a `null` removes it. The merged whole
    /// must read as a connection of `kind` (as the steps read it, with the kind's rules):
    /// the first problem is [`CredentialError::Invalid`] naming its field. Audited as
    /// `credential.set` by `actor` with the names of the changed fields.
    pub fn set(
        &self,
        name: &str,
        kind: &str,
        public: Map<String, Value>,
        private: Map<String, Value>,
        actor: &str,
    ) -> Result<Saved, CredentialError> {
        check_name(name)?;
        let ty = self.credential_type(kind)?;
        let (public_fields, private_fields) = (ty.public_fields(), ty.private_fields());
        let mut given_secrets = Vec::new();
        private
            .values()
            .for_each(|v| strings(v, &mut given_secrets));
        let all: Vec<&str> = public_fields
            .iter()
            .chain(&private_fields)
            .map(String::as_str)
            .collect();
        let unknown = |field: &str| {
            let hint = engine::diag::did_you_mean(field, all.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            invalid(
                field,
                format!(
                    "unknown key `{field}` of a {kind} credential{hint} (public: {}; private: {})",
                    list_or_none(&public_fields),
                    list_or_none(&private_fields)
                ),
            )
        };
        let mut new_public = Map::new();
        for (k, v) in public {
            if k == "type" {
                if v.as_str() == Some(kind) {
                    continue;
                }
                return Err(invalid(
                    "type",
                    format!("the credential's type is `{kind}`"),
                ));
            }
            if private_fields.contains(&k) {
                return Err(invalid(
                    &k,
                    format!("`{k}` is private: give it with the private values (stdin or a file), never as a public value"),
                ));
            }
            if !public_fields.contains(&k) {
                return Err(unknown(&k));
            }
            if !v.is_null() {
                new_public.insert(k, v);
            }
        }
        for k in private.keys() {
            if public_fields.contains(k) {
                return Err(invalid(
                    k,
                    format!("`{k}` is public: give it as a public value (--public {k}=…)"),
                ));
            }
            if !private_fields.contains(k) {
                return Err(unknown(k));
            }
        }
        let key = self.key()?;
        let existing = self.store.credentials().get_credential(name)?;
        let (old_public, mut merged) = match &existing {
            Some(row) if row.kind == kind => (
                row.public.as_object().cloned().unwrap_or_default(),
                self.open(row)?,
            ),
            _ => (Map::new(), Map::new()),
        };
        let old_private = merged.clone();
        for (k, v) in private {
            if v.is_null() {
                merged.remove(&k);
            } else {
                merged.insert(k, v);
            }
        }
        // The whole, as a pipeline's connection of this type would render.
        let mut whole = Map::new();
        whole.insert("type".into(), Value::String(kind.to_string()));
        whole.extend(new_public.clone());
        whole.extend(merged.clone());
        let kind_def = self.connections.get(kind).expect("checked above");
        if let Some(p) = (kind_def.verify)(&Value::Object(whole)).into_iter().next() {
            let mut secrets = given_secrets;
            merged.values().for_each(|v| strings(v, &mut secrets));
            return Err(invalid(&p.field, mask(&p.message, &secrets)));
        }
        let changed = changed_fields(&old_public, &new_public, &old_private, &merged, &all);
        let sealed = key::seal(key, name, kind, &merged);
        let created = self.store.credentials().put_credential(
            &CredentialWrite {
                name,
                kind,
                public: &Value::Object(new_public),
                sealed: &sealed,
                key_id: key.id(),
                previous: existing.as_ref().map(|r| r.sealed.as_str()),
                actor,
                changed: &changed,
            },
            Utc::now(),
        )?;
        Ok(Saved { created, changed })
    }

    /// Delete credential `name`, audited as `credential.delete`; false when there was none.
    pub fn delete(&self, name: &str, actor: &str) -> Result<bool, CredentialError> {
        check_name(name)?;
        Ok(self
            .store
            .credentials()
            .delete_credential(name, actor, Utc::now())?)
    }

    /// Seal every credential again with `new` in one transaction (all or none), each audited
    /// as `credential.rotate`; returns how many. Credentials already sealed with `new` (a
    /// rotation run again after its key file was not switched) are left as they are. Use a
    /// vault with `new` afterwards.
    pub fn rotate_key(&self, new: &MasterKey, actor: &str) -> Result<usize, CredentialError> {
        let rows = self.store.credentials().list_credentials()?;
        let mut resealed = Vec::new();
        for row in rows.iter().filter(|r| r.key_id != new.id()) {
            let private = self.open(row)?;
            resealed.push(Resealed {
                name: row.name.clone(),
                previous: row.sealed.clone(),
                sealed: key::seal(new, &row.name, &row.kind, &private),
            });
        }
        Ok(self
            .store
            .credentials()
            .reseal_credentials(&resealed, new.id(), actor, Utc::now())? as usize)
    }

    /// Open credential `name` for a run.
    pub fn resolve(&self, name: &str) -> Result<Resolved, CredentialError> {
        check_name(name)?;
        let row = self
            .store
            .credentials()
            .get_credential(name)?
            .ok_or_else(|| CredentialError::NotFound(name.to_string()))?;
        let private = self.open(&row)?;
        let secret_keys = self
            .connections
            .get(&row.kind)
            .map(|k| credential_type(k).secret_keys())
            .unwrap_or_default();
        let mut secrets = Vec::new();
        for v in private.values() {
            match v {
                Value::String(s) => secrets.push(s.clone()),
                other => nested_secrets(other, &secret_keys, &mut secrets),
            }
        }
        secrets.retain(|s| !s.is_empty());
        let mut fields = row.public.as_object().cloned().unwrap_or_default();
        fields.extend(private);
        Ok(Resolved {
            kind: row.kind,
            fields,
            secrets,
        })
    }

    /// The audit trail of credential `name` (all credentials when `None`), newest first;
    /// `limit` 0 is all.
    pub fn audit(
        &self,
        name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<store::AuditRow>, CredentialError> {
        let prefix = match name {
            Some(n) => {
                check_name(n)?;
                store::credential_target(n)
            }
            None => store::credential_target(""),
        };
        let mut rows = self.store.credentials().list_audit(&prefix, limit)?;
        if name.is_some() {
            // `credential:carol` must not list `credential:carol-prod`.
            rows.retain(|r| r.target == prefix);
        }
        Ok(rows)
    }
}

fn list_or_none(fields: &[String]) -> String {
    if fields.is_empty() {
        "none".into()
    } else {
        fields.join(", ")
    }
}

/// Strings under a secret key at any depth of a private value (`auth.token`), and every
/// field named like a secret (`private_key` of a key mapping).
fn nested_secrets(v: &Value, keys: &std::collections::BTreeSet<String>, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match x {
                    Value::String(s)
                        if keys.contains(k) || engine::validate::is_secret_field(k) =>
                    {
                        out.push(s.clone())
                    }
                    other => nested_secrets(other, keys, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| nested_secrets(x, keys, out)),
        _ => {}
    }
}

/// The names of the fields whose value differs between the old and the new parts, in the
/// type's order.
fn changed_fields(
    old_public: &Map<String, Value>,
    new_public: &Map<String, Value>,
    old_private: &Map<String, Value>,
    new_private: &Map<String, Value>,
    order: &[&str],
) -> Vec<String> {
    order
        .iter()
        .filter(|k| {
            old_public.get(**k) != new_public.get(**k)
                || old_private.get(**k) != new_private.get(**k)
        })
        .map(|k| k.to_string())
        .collect()
}
