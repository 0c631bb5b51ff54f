//! Authentication of HTTP steps: `basic`, `bearer`, `api_key` and `oauth2`.
//!
//! OAuth2 tokens are cached for the whole process, keyed by (token URL, client id, grant,
//! username): the steps of a run — and the concurrent pages of one extraction — share one
//! token instead of each logging in (some APIs revoke the previous token on every login, and
//! token endpoints are often rate limited hard). A token is fetched again 60 s before it
//! expires, and once when the API answers 401 (revoked early). When the token endpoint
//! returned a refresh token, that is tried first.

use super::client::{cancellable, client, Policy};
use engine::secrets::Redactor;
use engine::step::{StepContext, StepError};
use reqwest::RequestBuilder;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Refresh a token this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// Where an API key goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyIn {
    /// A request header named `name`.
    #[default]
    Header,
    /// A query parameter named `name`.
    Query,
}

/// How an OAuth2 token is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// `client_id` + `client_secret` (machine to machine).
    ClientCredentials,
    /// `username` + `password` (resource owner password).
    Password,
    /// A long-lived `refresh_token`.
    RefreshToken,
}

impl Grant {
    fn as_str(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password => "password",
            Grant::RefreshToken => "refresh_token",
        }
    }
}

/// How requests authenticate (on the connection, or on the step to override it).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    /// HTTP Basic authentication.
    Basic {
        /// The user name.
        username: String,
        /// The password (use `{{ secret('NAME') }}`).
        password: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token (use `{{ secret('NAME') }}`).
        token: String,
    },
    /// An API key in a header or a query parameter.
    ApiKey {
        /// The header or query parameter name (`X-API-Key`, `api_key` …).
        name: String,
        /// The key (use `{{ secret('NAME') }}`).
        value: String,
        /// Where the key goes: `header` (default) or `query`.
        #[serde(default, rename = "in")]
        location: KeyIn,
    },
    /// OAuth2: a token from `token_url`, sent as `Authorization: Bearer <token>`, cached for
    /// the run and refreshed before it expires and once on a 401.
    Oauth2 {
        /// `client_credentials`, `password` or `refresh_token`.
        grant: Grant,
        /// The token endpoint (form-encoded POST).
        token_url: String,
        /// The client id (sent in the form body).
        #[serde(default)]
        client_id: Option<String>,
        /// The client secret (sent in the form body).
        #[serde(default)]
        client_secret: Option<String>,
        /// The user name (grant `password`).
        #[serde(default)]
        username: Option<String>,
        /// The password (grant `password`).
        #[serde(default)]
        password: Option<String>,
        /// The refresh token (grant `refresh_token`).
        #[serde(default)]
        refresh_token: Option<String>,
        /// Space-separated scopes to ask for.
        #[serde(default)]
        scope: Option<String>,
    },
}

/// The secret sub-fields of [`Auth`], for `pipe validate`'s literal-secret warning.
pub const SECRET_FIELDS: &[&str] = &[
    "password",
    "token",
    "value",
    "client_secret",
    "refresh_token",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    token_url: String,
    client_id: Option<String>,
    grant: Grant,
    username: Option<String>,
}

#[derive(Debug, Clone)]
struct Token {
    access: String,
    expires_at: Option<Instant>,
    refresh: Option<String>,
}

impl Token {
    fn fresh(&self) -> bool {
        self.expires_at
            .is_none_or(|t| Instant::now() + EXPIRY_MARGIN < t)
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Token>>>;

static CACHE: LazyLock<Mutex<HashMap<CacheKey, Slot>>> = LazyLock::new(Mutex::default);

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<String>,
}

impl Auth {
    /// Teach the redactor every secret this auth holds.
    pub fn learn_secrets(&self, r: &Redactor) {
        match self {
            Auth::Basic { username, password } => r.add_basic_auth(username, password),
            Auth::Bearer { token } => r.add(token),
            Auth::ApiKey { value, .. } => r.add(value),
            Auth::Oauth2 {
                client_secret,
                password,
                refresh_token,
                ..
            } => {
                for s in [client_secret, password, refresh_token]
                    .into_iter()
                    .flatten()
                {
                    r.add(s);
                }
            }
        }
    }

    fn slot(&self) -> Option<Slot> {
        let Auth::Oauth2 {
            grant,
            token_url,
            client_id,
            username,
            ..
        } = self
        else {
            return None;
        };
        let key = CacheKey {
            token_url: token_url.clone(),
            client_id: client_id.clone(),
            grant: *grant,
            username: username.clone(),
        };
        Some(CACHE.lock().unwrap().entry(key).or_default().clone())
    }

    /// Add the credentials to a request. Returns the OAuth2 token used, if any (to
    /// invalidate it on a 401).
    pub async fn apply(
        &self,
        rb: RequestBuilder,
        ctx: &StepContext,
        policy: &Policy,
    ) -> Result<(RequestBuilder, Option<String>), StepError> {
        Ok(match self {
            Auth::Basic { username, password } => (rb.basic_auth(username, Some(password)), None),
            Auth::Bearer { token } => (rb.bearer_auth(token), None),
            Auth::ApiKey {
                name,
                value,
                location: KeyIn::Header,
            } => (rb.header(name.as_str(), value.as_str()), None),
            Auth::ApiKey {
                name,
                value,
                location: KeyIn::Query,
            } => (rb.query(&[(name, value)]), None),
            Auth::Oauth2 { .. } => {
                let token = self.token(ctx, policy).await?;
                (rb.bearer_auth(&token), Some(token))
            }
        })
    }

    /// Forget `used` (the API rejected it) so the next request fetches a new token.
    pub async fn invalidate(&self, used: &str) {
        if let Some(slot) = self.slot() {
            let mut g = slot.lock().await;
            if let Some(t) = g.as_mut() {
                if t.access == used {
                    t.expires_at = Some(Instant::now());
                }
            }
        }
    }

    /// A valid OAuth2 access token, from the cache or the token endpoint.
    async fn token(&self, ctx: &StepContext, policy: &Policy) -> Result<String, StepError> {
        let slot = self.slot().expect("oauth2");
        let mut guard = cancellable(ctx, slot.lock()).await?;
        if let Some(t) = guard.as_ref().filter(|t| t.fresh()) {
            return Ok(t.access.clone());
        }
        let previous_refresh = guard.as_ref().and_then(|t| t.refresh.clone());
        let token = match previous_refresh {
            Some(r) => match self.fetch(ctx, policy, Some(&r)).await {
                Ok(t) => t,
                Err(_) => self.fetch(ctx, policy, None).await?,
            },
            None => self.fetch(ctx, policy, None).await?,
        };
        let access = token.access.clone();
        *guard = Some(token);
        Ok(access)
    }

    async fn fetch(
        &self,
        ctx: &StepContext,
        policy: &Policy,
        refresh: Option<&str>,
    ) -> Result<Token, StepError> {
        let Auth::Oauth2 {
            grant,
            token_url,
            client_id,
            client_secret,
            username,
            password,
            refresh_token,
            scope,
        } = self
        else {
            unreachable!("fetch is only called for oauth2")
        };
        let mut form: Vec<(&str, &str)> = Vec::new();
        let need = |v: &Option<String>, name: &str| -> Result<String, StepError> {
            v.clone().ok_or_else(|| {
                StepError::fatal(format!("oauth2 grant `{}` needs `{name}`", grant.as_str()))
            })
        };
        let (user, pass, rt);
        match (refresh, grant) {
            (Some(r), _) => {
                form.push(("grant_type", "refresh_token"));
                form.push(("refresh_token", r));
            }
            (None, Grant::ClientCredentials) => form.push(("grant_type", "client_credentials")),
            (None, Grant::Password) => {
                user = need(username, "username")?;
                pass = need(password, "password")?;
                form.push(("grant_type", "password"));
                form.push(("username", &user));
                form.push(("password", &pass));
            }
            (None, Grant::RefreshToken) => {
                rt = need(refresh_token, "refresh_token")?;
                form.push(("grant_type", "refresh_token"));
                form.push(("refresh_token", &rt));
            }
        }
        if let Some(id) = client_id {
            form.push(("client_id", id));
        }
        if let Some(s) = client_secret {
            form.push(("client_secret", s));
        }
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        let shown = super::client::without_query(&url::Url::parse(token_url).map_err(|e| {
            StepError::fatal(format!("invalid oauth2 token_url `{token_url}`: {e}"))
        })?);
        let res = cancellable(ctx, async {
            let resp = client()
                .post(token_url)
                .form(&form)
                .timeout(policy.timeout)
                .send()
                .await?;
            let status = resp.status();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        })
        .await?;
        let (status, body) = res.map_err(|e| {
            StepError::retryable(
                ctx.redactor
                    .redact(&format!("oauth2 token request to {shown}: {e}")),
            )
        })?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let excerpt: String = text.trim().chars().take(300).collect();
            let msg = ctx.redactor.redact(&format!(
                "oauth2 token request to {shown} returned HTTP {status}: {excerpt}"
            ));
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                StepError::retryable(msg)
            } else {
                StepError::fatal(msg)
            });
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            StepError::fatal(format!(
                "oauth2 token response from {shown} has no usable access_token: {e}"
            ))
        })?;
        ctx.redactor.add(&parsed.access_token);
        if let Some(r) = &parsed.refresh_token {
            ctx.redactor.add(r);
        }
        let expires_in = parsed.expires_in.and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        });
        Ok(Token {
            access: parsed.access_token,
            expires_at: expires_in
                .and_then(super::client::server_delay)
                .map(|d| Instant::now() + d),
            refresh: parsed.refresh_token.or_else(|| refresh.map(str::to_string)),
        })
    }
}
