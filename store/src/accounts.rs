//! The API's users, machine tokens and settings, and the audit trail.
//!
//! The store keeps what the server decided: password hashes (argon2id, made by the caller),
//! the SHA-256 of machine tokens (the token itself is shown once and never stored), a few
//! settings the API servers of one store share (the JWT signing key, so a token from one
//! `pipe serve` is good at another), and one audit row per change of a user, token or
//! credential — who, what, when, never a value. Every change and its audit row are one
//! transaction: there is no change without its trail.

use crate::sql::{p, Backend, Row, SqlStore, Tx};
use crate::{Result, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// What a user or a token may do. Ordered: each role may do everything of the ones below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything (but private credential values, which nobody reads).
    Viewer,
    /// Also triggers, cancels, repairs, enables and disables, backfills.
    Operator,
    /// Also manages users, machine tokens and credentials.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role `{other}` (roles: viewer, operator, admin)"
            )),
        }
    }
}

/// A user, without the password hash.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserRow {
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Set when the user may no longer log in (tokens already issued stop at their next use).
    pub disabled_at: Option<DateTime<Utc>>,
    /// When the user's sessions were last ended (a logout, `pipe users logout`): every
    /// access and refresh JWT issued up to then is refused.
    pub sessions_ended_at: Option<DateTime<Utc>>,
}

/// A user with the hash to check a password against.
#[derive(Clone)]
pub struct UserAuth {
    pub user: UserRow,
    pub password_hash: String,
}

impl std::fmt::Debug for UserAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A machine token (its hash stays in the store).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiTokenRow {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// One audited change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditRow {
    pub id: i64,
    pub time: DateTime<Utc>,
    /// The user (`user:NAME`), machine token (`token:ID`) or command (`cli`) that did it.
    pub actor: String,
    /// `user.add`, `user.passwd`, `token.create`, `credential.set` …
    pub action: String,
    /// What it was done to: `user:NAME`, `token:ID`, `credential:NAME`.
    pub target: String,
    /// Names, never values.
    pub detail: serde_json::Value,
}

/// How often a token's `last_used_at` is written at most (not once per request).
const LAST_USED_RESOLUTION: chrono::Duration = chrono::Duration::seconds(60);

/// Users, tokens, settings, audit.
pub trait AccountStore: Send + Sync {
    /// A new user. `Conflict` when the name is taken.
    fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        role: Role,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<()>;
    /// A new password. `NotFound` for an unknown user.
    fn set_password(
        &self,
        name: &str,
        password_hash: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<()>;
    /// A new role. `NotFound` for an unknown user.
    fn set_role(&self, name: &str, role: Role, actor: &str, now: DateTime<Utc>) -> Result<()>;
    /// Disable (or enable again) a user. `NotFound` for an unknown user.
    fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<()>;
    /// End every session of a user: the access and refresh JWTs issued to them up to `now`
    /// are refused from then on (machine tokens are revoked one by one). `NotFound` for an
    /// unknown user.
    fn end_sessions(&self, name: &str, actor: &str, now: DateTime<Utc>) -> Result<()>;
    /// Remove a user. False when there was none.
    fn delete_user(&self, name: &str, actor: &str, now: DateTime<Utc>) -> Result<bool>;
    fn get_user(&self, name: &str) -> Result<Option<UserAuth>>;
    fn list_users(&self) -> Result<Vec<UserRow>>;
    /// A new machine token (stored by its hash); its id.
    fn add_api_token(
        &self,
        name: &str,
        token_hash: &str,
        role: Role,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64>;
    /// The live (not revoked) token of this hash; notes its use (at most once a minute).
    fn use_api_token(&self, token_hash: &str, now: DateTime<Utc>) -> Result<Option<ApiTokenRow>>;
    fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>>;
    /// Revoke a token. False when it was unknown or already revoked.
    fn revoke_api_token(&self, id: i64, actor: &str, now: DateTime<Utc>) -> Result<bool>;
    /// A shared setting.
    fn setting(&self, key: &str) -> Result<Option<String>>;
    /// The setting, stored as `value` first when it has none (the first of concurrent
    /// callers wins; every caller gets the stored value).
    fn setting_or_insert(&self, key: &str, value: &str) -> Result<String>;
    /// Record a change that has no table of its own here (a login refused, say).
    fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<()>;
    /// The newest audit rows first, below `before_id` (paging), at most `limit`.
    fn list_audit(&self, before_id: Option<i64>, limit: usize) -> Result<Vec<AuditRow>>;
}

/// The audit row of a change, in the change's own transaction.
pub(crate) fn audit_in(
    tx: &mut dyn Tx,
    actor: &str,
    action: &str,
    target: &str,
    detail: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<()> {
    let detail = serde_json::to_string(detail)
        .map_err(|e| StoreError::Backend(anyhow::anyhow!("audit detail: {e}")))?;
    tx.exec(
        "INSERT INTO audit(time, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        p![now, actor, action, target, detail.as_str()],
    )?;
    Ok(())
}

/// The columns of `audit` in order, as [`audit_row`] reads them.
pub(crate) const AUDIT_COLUMNS: &str = "id, time, actor, action, target, detail";

pub(crate) fn audit_row(r: &Row) -> Result<AuditRow> {
    Ok(AuditRow {
        id: r.int(0)?,
        time: r.time(1)?,
        actor: r.text(2)?,
        action: r.text(3)?,
        target: r.text(4)?,
        detail: r.json(5)?,
    })
}

fn user_row(r: &Row) -> Result<UserRow> {
    Ok(UserRow {
        name: r.text(0)?,
        role: r.parsed(1)?,
        created_at: r.time(2)?,
        updated_at: r.time(3)?,
        disabled_at: r.opt_time(4)?,
        sessions_ended_at: r.opt_time(5)?,
    })
}

fn token_row(r: &Row) -> Result<ApiTokenRow> {
    Ok(ApiTokenRow {
        id: r.int(0)?,
        name: r.text(1)?,
        role: r.parsed(2)?,
        created_by: r.text(3)?,
        created_at: r.time(4)?,
        last_used_at: r.opt_time(5)?,
        revoked_at: r.opt_time(6)?,
    })
}

const USER_COLUMNS: &str = "name, role, created_at, updated_at, disabled_at, sessions_ended_at";
const TOKEN_COLUMNS: &str = "id, name, role, created_by, created_at, last_used_at, revoked_at";

/// Update one user's row; `NotFound` when there is none. Audited.
fn update_user(
    tx: &mut dyn Tx,
    name: &str,
    set: &str,
    value: crate::sql::Value,
    audit: (&str, &str, serde_json::Value),
    now: DateTime<Utc>,
) -> Result<()> {
    let n = tx.exec(
        &format!("UPDATE users SET {set} = ?2, updated_at = ?3 WHERE name = ?1"),
        &[name.into(), value, now.into()],
    )?;
    if n == 0 {
        return Err(StoreError::not_found(format!("no user `{name}`")));
    }
    audit_in(tx, audit.0, audit.1, &format!("user:{name}"), &audit.2, now)
}

impl<B: Backend> AccountStore for SqlStore<B> {
    fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        role: Role,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.write(|tx| {
            let n = tx.exec(
                "INSERT INTO users(name, password_hash, role, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT(name) DO NOTHING",
                p![name, password_hash, role.as_str(), now],
            )?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("user `{name}` exists")));
            }
            audit_in(
                tx,
                actor,
                "user.add",
                &format!("user:{name}"),
                &serde_json::json!({"role": role}),
                now,
            )
        })
    }

    fn set_password(
        &self,
        name: &str,
        password_hash: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.write(|tx| {
            update_user(
                tx,
                name,
                "password_hash",
                password_hash.into(),
                (actor, "user.passwd", serde_json::json!({})),
                now,
            )
        })
    }

    fn set_role(&self, name: &str, role: Role, actor: &str, now: DateTime<Utc>) -> Result<()> {
        self.write(|tx| {
            update_user(
                tx,
                name,
                "role",
                role.as_str().into(),
                (actor, "user.role", serde_json::json!({"role": role})),
                now,
            )
        })
    }

    fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.write(|tx| {
            update_user(
                tx,
                name,
                "disabled_at",
                if disabled {
                    now.into()
                } else {
                    None::<String>.into()
                },
                (
                    actor,
                    if disabled {
                        "user.disable"
                    } else {
                        "user.enable"
                    },
                    serde_json::json!({}),
                ),
                now,
            )
        })
    }

    fn end_sessions(&self, name: &str, actor: &str, now: DateTime<Utc>) -> Result<()> {
        self.write(|tx| {
            update_user(
                tx,
                name,
                "sessions_ended_at",
                now.into(),
                (actor, "user.logout", serde_json::json!({})),
                now,
            )
        })
    }

    fn delete_user(&self, name: &str, actor: &str, now: DateTime<Utc>) -> Result<bool> {
        self.write(|tx| {
            let n = tx.exec("DELETE FROM users WHERE name = ?1", p![name])?;
            if n > 0 {
                audit_in(
                    tx,
                    actor,
                    "user.delete",
                    &format!("user:{name}"),
                    &serde_json::json!({}),
                    now,
                )?;
            }
            Ok(n > 0)
        })
    }

    fn get_user(&self, name: &str) -> Result<Option<UserAuth>> {
        self.read(|tx| {
            tx.one(
                &format!("SELECT {USER_COLUMNS}, password_hash FROM users WHERE name = ?1"),
                p![name],
            )?
            .map(|r| {
                Ok(UserAuth {
                    user: user_row(&r)?,
                    password_hash: r.text(6)?,
                })
            })
            .transpose()
        })
    }

    fn list_users(&self) -> Result<Vec<UserRow>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {USER_COLUMNS} FROM users ORDER BY name"),
                p![],
            )?
            .iter()
            .map(user_row)
            .collect()
        })
    }

    fn add_api_token(
        &self,
        name: &str,
        token_hash: &str,
        role: Role,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<i64> {
        self.write(|tx| {
            let id = tx
                .one(
                    "INSERT INTO api_tokens(name, token_hash, role, created_by, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
                    p![name, token_hash, role.as_str(), actor, now],
                )?
                .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("no id returned")))?
                .int(0)?;
            audit_in(
                tx,
                actor,
                "token.create",
                &format!("token:{id}"),
                &serde_json::json!({"name": name, "role": role}),
                now,
            )?;
            Ok(id)
        })
    }

    fn use_api_token(&self, token_hash: &str, now: DateTime<Utc>) -> Result<Option<ApiTokenRow>> {
        let row = self.read(|tx| {
            tx.one(
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM api_tokens
                     WHERE token_hash = ?1 AND revoked_at IS NULL"
                ),
                p![token_hash],
            )?
            .map(|r| token_row(&r))
            .transpose()
        })?;
        if let Some(t) = &row {
            if t.last_used_at
                .is_none_or(|u| u + LAST_USED_RESOLUTION < now)
            {
                self.write(|tx| {
                    tx.exec(
                        "UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1",
                        p![t.id, now],
                    )
                })?;
            }
        }
        Ok(row)
    }

    fn list_api_tokens(&self) -> Result<Vec<ApiTokenRow>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY id"),
                p![],
            )?
            .iter()
            .map(token_row)
            .collect()
        })
    }

    fn revoke_api_token(&self, id: i64, actor: &str, now: DateTime<Utc>) -> Result<bool> {
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                p![id, now],
            )?;
            if n > 0 {
                audit_in(
                    tx,
                    actor,
                    "token.revoke",
                    &format!("token:{id}"),
                    &serde_json::json!({}),
                    now,
                )?;
            }
            Ok(n > 0)
        })
    }

    fn setting(&self, key: &str) -> Result<Option<String>> {
        self.read(|tx| {
            tx.one("SELECT value FROM settings WHERE key = ?1", p![key])?
                .map(|r| r.text(0))
                .transpose()
        })
    }

    fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        self.write(|tx| {
            tx.exec(
                "INSERT INTO settings(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO NOTHING",
                p![key, value],
            )?;
            tx.one("SELECT value FROM settings WHERE key = ?1", p![key])?
                .ok_or_else(|| StoreError::Backend(anyhow::anyhow!("setting {key} vanished")))?
                .text(0)
        })
    }

    fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<()> {
        self.write(|tx| audit_in(tx, actor, action, target, detail, Utc::now()))
    }

    fn list_audit(&self, before_id: Option<i64>, limit: usize) -> Result<Vec<AuditRow>> {
        let limit = i64::try_from(limit.clamp(1, 10_000)).unwrap_or(10_000);
        self.read(|tx| {
            tx.query(
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit WHERE id < ?1 ORDER BY id DESC LIMIT ?2"
                ),
                p![before_id.unwrap_or(i64::MAX), limit],
            )?
            .iter()
            .map(audit_row)
            .collect()
        })
    }
}
