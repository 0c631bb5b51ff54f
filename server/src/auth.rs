//! Who is asking: passwords (argon2id), JWTs (HS256, signature, expiry and `alg` checked),
//! machine tokens (stored as SHA-256), roles, and the limit on failed logins.
//!
//! Access tokens live 15 minutes and say only who the user is and what kind of token they
//! are; the role is read from the store on every request, so a role change or a disabled
//! user takes effect at once instead of when the token expires. Refresh tokens live 7 days
//! and give new access tokens (`POST /api/v1/token/refresh/`). The signing key is one
//! random 256-bit value kept in the store's settings, so every `pipe serve` on one
//! PostgreSQL accepts the others' tokens; whoever can read the store could forge tokens,
//! but whoever can write the store can already do everything a token allows.
//! docs/decisions/0028-api-auth.md.

use crate::problem::{ApiResult, Problem};
use crate::AppState;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use store::Role;

/// How long an access token is good for.
pub const ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a refresh token is good for.
pub const REFRESH_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Machine tokens start with this, so they are told from JWTs (and found by secret scanners).
pub const API_TOKEN_PREFIX: &str = "pipe_";
/// The setting holding the JWT signing key (hex).
const JWT_KEY_SETTING: &str = "jwt_hs256_key";
/// The shortest password accepted.
pub const MIN_PASSWORD: usize = 8;
/// The longest password accepted (argon2 takes any length; a megabyte would still cost).
pub const MAX_PASSWORD: usize = 1024;

/// Hash a password with argon2id (the crate's defaults: 19 MiB, 2 passes), a random salt.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    check_password(password).map_err(|p| anyhow::anyhow!(p.detail))?;
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?
        .to_string())
}

/// Is this password acceptable as a new one?
pub fn check_password(password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(Problem::invalid(
            "password",
            format!("a password has at least {MIN_PASSWORD} characters"),
        ));
    }
    if password.len() > MAX_PASSWORD {
        return Err(Problem::invalid(
            "password",
            format!("a password has at most {MAX_PASSWORD} bytes"),
        ));
    }
    Ok(())
}

/// Does `password` match the stored hash? (Constant time in the argon2 crate.)
pub fn verify_password(password: &str, hash: &str) -> bool {
    if password.len() > MAX_PASSWORD {
        return false;
    }
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash to check against when the user does not exist, so an unknown name costs as much
/// time as a wrong password (no user enumeration by timing).
pub(crate) fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password("not-a-password-at-all").unwrap_or_default())
}

/// A new machine token: what to show once, and what to store.
pub fn new_api_token() -> (String, String) {
    let token = format!(
        "{API_TOKEN_PREFIX}{}",
        hex::encode(rand::random::<[u8; 24]>())
    );
    let hash = token_hash(&token);
    (token, hash)
}

/// The stored form of a machine token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What kind of JWT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Access,
    Refresh,
}

/// The claims of our JWTs.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user's name.
    pub sub: String,
    pub typ: TokenKind,
    pub iat: i64,
    pub exp: i64,
    /// Random: two tokens issued in the same second differ.
    pub jti: String,
}

/// The signing keys.
pub(crate) struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Keys {
    /// The store's key, made now if it has none.
    pub fn load(store: &dyn store::RunStore) -> store::Result<Keys> {
        let fresh = hex::encode(rand::random::<[u8; 32]>());
        let key = store
            .accounts()
            .setting_or_insert(JWT_KEY_SETTING, &fresh)?;
        let bytes = hex::decode(key.trim()).map_err(|_| {
            store::StoreError::invalid(format!(
                "the store's setting {JWT_KEY_SETTING} is not hex; delete it to make a new key"
            ))
        })?;
        Ok(Keys {
            encoding: EncodingKey::from_secret(&bytes),
            decoding: DecodingKey::from_secret(&bytes),
        })
    }

    pub fn issue(&self, user: &str, typ: TokenKind) -> ApiResult<(String, u64)> {
        let ttl = match typ {
            TokenKind::Access => ACCESS_TTL,
            TokenKind::Refresh => REFRESH_TTL,
        };
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user.to_string(),
            typ,
            iat: now,
            exp: now + ttl.as_secs() as i64,
            jti: hex::encode(rand::random::<[u8; 8]>()),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Problem::unavailable(format!("cannot sign a token: {e}")))?;
        Ok((token, ttl.as_secs()))
    }

    /// The claims of a token of kind `typ`, checked: HS256 only (a token saying `none`, or
    /// any other algorithm, is refused before its signature is looked at), signature,
    /// expiry (no leeway), kind.
    pub fn verify(&self, token: &str, typ: TokenKind) -> ApiResult<Claims> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            Problem::unauthorized(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired; get a new one",
                ErrorKind::InvalidAlgorithm => "the token is not signed with HS256",
                ErrorKind::InvalidSignature => "the token's signature is wrong",
                _ => "the token is not a valid JWT of this server",
            })
        })?;
        if data.claims.typ != typ {
            return Err(Problem::unauthorized(match typ {
                TokenKind::Access => "a refresh token cannot be used as an access token",
                TokenKind::Refresh => "an access token cannot be used to refresh",
            }));
        }
        Ok(data.claims)
    }
}

/// Who made a request, and with which role.
#[derive(Debug, Clone)]
pub struct Caller {
    pub who: Principal,
    pub role: Role,
}

#[derive(Debug, Clone)]
pub enum Principal {
    User(String),
    Token { id: i64, name: String },
}

impl Caller {
    /// Refuse the request unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> ApiResult<()> {
        if self.role >= role {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this needs the {role} role; {} has {}",
                self.actor(),
                self.role
            )))
        }
    }
    /// The audit trail's name for the caller.
    pub fn actor(&self) -> String {
        match &self.who {
            Principal::User(n) => format!("user:{n}"),
            Principal::Token { id, .. } => format!("token:{id}"),
        }
    }
    pub fn user_name(&self) -> Option<&str> {
        match &self.who {
            Principal::User(n) => Some(n),
            Principal::Token { .. } => None,
        }
    }
}

impl AppState {
    /// The caller an access token (JWT or machine token) stands for.
    pub async fn authenticate(&self, token: &str) -> ApiResult<Caller> {
        if let Some(rest) = token.strip_prefix(API_TOKEN_PREFIX) {
            if rest.is_empty() || rest.len() > 128 {
                return Err(Problem::unauthorized("not a token of this server"));
            }
            let hash = token_hash(token);
            let row = self
                .db(move |s| s.accounts().use_api_token(&hash, chrono::Utc::now()))
                .await?
                .ok_or_else(|| Problem::unauthorized("unknown or revoked machine token"))?;
            return Ok(Caller {
                who: Principal::Token {
                    id: row.id,
                    name: row.name,
                },
                role: row.role,
            });
        }
        let claims = self.keys().verify(token, TokenKind::Access)?;
        self.user_caller(claims.sub, claims.iat).await
    }

    /// The caller for a user name from a verified token issued at `issued_at` (Unix
    /// seconds): the user must still exist and be enabled, their sessions must not have
    /// been ended since (a logout; a token of the same second as the logout is refused
    /// too), and they have the role the store says now.
    pub async fn user_caller(&self, name: String, issued_at: i64) -> ApiResult<Caller> {
        let lookup = name.clone();
        let user = self
            .db(move |s| s.accounts().get_user(&lookup))
            .await?
            .ok_or_else(|| Problem::unauthorized("the token's user no longer exists"))?;
        if user.user.disabled_at.is_some() {
            return Err(Problem::unauthorized("the user is disabled"));
        }
        if user
            .user
            .sessions_ended_at
            .is_some_and(|ended| issued_at <= ended.timestamp())
        {
            return Err(Problem::unauthorized(
                "this session was ended (logged out): log in again",
            ));
        }
        Ok(Caller {
            who: Principal::User(name),
            role: user.user.role,
        })
    }
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> ApiResult<Option<&str>> {
    let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let h = h
        .to_str()
        .map_err(|_| Problem::unauthorized("the Authorization header is not text"))?;
    let (scheme, token) = h.split_once(' ').unwrap_or((h, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Problem::unauthorized(
            "expected `Authorization: Bearer <token>` (POST /api/v1/token/ gives one)",
        ));
    }
    Ok(Some(token.trim()))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Caller> {
        let Some(token) = bearer(parts)? else {
            return Err(Problem::unauthorized(
                "this needs a token: `Authorization: Bearer <token>` (POST /api/v1/token/ gives one)",
            ));
        };
        state.authenticate(token).await
    }
}

/// Failed logins per user name and per client address, in a sliding window: past the
/// limit, logins are refused with 429 until the window has passed (even with the right
/// password, or guessing would go on). Bounded: at most [`LIMITER_ENTRIES`] keys are
/// remembered, the stalest forgotten first.
pub(crate) struct LoginLimiter {
    entries: Mutex<HashMap<String, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    since: Instant,
}

/// Failed logins allowed per name within [`LIMIT_WINDOW`].
pub const NAME_LIMIT: u32 = 5;
/// Failed logins allowed per client address within [`LIMIT_WINDOW`].
pub const ADDR_LIMIT: u32 = 20;
pub const LIMIT_WINDOW: Duration = Duration::from_secs(300);
const LIMITER_ENTRIES: usize = 10_000;

impl LoginLimiter {
    pub fn new() -> LoginLimiter {
        LoginLimiter {
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `keys` may try again, if any of them is over its limit.
    pub fn blocked(&self, keys: &[(String, u32)]) -> Option<u64> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        keys.iter()
            .filter_map(|(k, limit)| {
                let f = map.get(k)?;
                let age = now.duration_since(f.since);
                (f.count >= *limit && age < LIMIT_WINDOW)
                    .then(|| (LIMIT_WINDOW - age).as_secs().max(1))
            })
            .max()
    }

    pub fn failed(&self, keys: &[(String, u32)]) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= LIMITER_ENTRIES {
            map.retain(|_, f| now.duration_since(f.since) < LIMIT_WINDOW);
            while map.len() >= LIMITER_ENTRIES {
                let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                map.remove(&oldest);
            }
        }
        for (k, _) in keys {
            let f = map.entry(k.clone()).or_insert(Failures {
                count: 0,
                since: now,
            });
            if now.duration_since(f.since) >= LIMIT_WINDOW {
                *f = Failures {
                    count: 0,
                    since: now,
                };
            }
            f.count += 1;
        }
    }

    pub fn succeeded(&self, name_key: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name_key);
    }
}
