//! Authentication of HTTP steps: `basic`, `bearer`, `api_key` and `oauth2`.
//!
//! OAuth2 tokens are cached by the worker ([`crate::tokens`]), keyed by (token URL, client
//! id, grant, username) and a fingerprint of the secrets: the steps of a run — and the
//! concurrent pages of one extraction — share one token instead of each logging in (some
//! APIs revoke the previous token on every login, and token endpoints are often rate limited
//! hard). A token is fetched again 60 s before it expires (a token without `expires_in` after
//! the worker's token TTL), and once when the API answers 401 (revoked early). When the token
//! endpoint returned a refresh token, that is tried first.

use super::client::{cancellable, client, Policy};
use engine::secrets::Redactor;
use engine::step::{StepContext, StepError};
use reqwest::RequestBuilder;
use schemars::JsonSchema;
use serde::Deserialize;
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
        #[schemars(extend("writeOnly" = true))]
        password: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token (use `{{ secret('NAME') }}`).
        #[schemars(extend("writeOnly" = true))]
        token: String,
    },
    /// An API key in a header or a query parameter.
    ApiKey {
        /// The header or query parameter name (`X-API-Key`, `api_key` …).
        name: String,
        /// The key (use `{{ secret('NAME') }}`).
        #[schemars(extend("writeOnly" = true))]
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
        #[schemars(extend("writeOnly" = true))]
        client_secret: Option<String>,
        /// The user name (grant `password`).
        #[serde(default)]
        username: Option<String>,
        /// The password (grant `password`).
        #[serde(default)]
        #[schemars(extend("writeOnly" = true))]
        password: Option<String>,
        /// The refresh token (grant `refresh_token`).
        #[serde(default)]
        #[schemars(extend("writeOnly" = true))]
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

/// An OAuth2 token of the http steps, as the worker's [`TokenCache`] keeps it.
#[derive(Debug, Clone)]
pub struct Token {
    access: String,
    expires_at: Instant,
    refresh: Option<String>,
}

impl Token {
    fn fresh(&self) -> bool {
        Instant::now() + EXPIRY_MARGIN < self.expires_at
    }
}

type Slot = crate::tokens::Slot<Token>;
type TokenCache = crate::tokens::TokenCache<Token>;

/// The worker's cache of http OAuth2 tokens.
fn cache(ctx: &StepContext) -> std::sync::Arc<TokenCache> {
    let ttl = ctx.resources.token_ttl();
    ctx.resources.get_or_init(|| TokenCache::new(ttl))
}

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

    fn slot(&self, ctx: &StepContext) -> Option<Slot> {
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
            return None;
        };
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let public = [
            token_url.clone(),
            grant.as_str().to_string(),
            opt(client_id),
            opt(username),
            opt(scope),
        ];
        let secret = [opt(client_secret), opt(password), opt(refresh_token)];
        Some(cache(ctx).slot(
            &public.iter().map(String::as_str).collect::<Vec<_>>(),
            &secret.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
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
    pub async fn invalidate(&self, ctx: &StepContext, used: &str) {
        if let Some(slot) = self.slot(ctx) {
            let mut g = slot.lock().await;
            if let Some(t) = g.as_mut() {
                if t.access == used {
                    t.expires_at = Instant::now();
                }
            }
        }
    }

    /// A valid OAuth2 access token, from the cache or the token endpoint.
    async fn token(&self, ctx: &StepContext, policy: &Policy) -> Result<String, StepError> {
        let slot = self.slot(ctx).expect("oauth2");
        let mut guard = cancellable(ctx, slot.lock()).await?;
        if let Some(t) = guard.as_ref().filter(|t| t.fresh()) {
            // Maybe fetched by another run of this worker: this run masks it too.
            ctx.redactor.add(&t.access);
            if let Some(r) = &t.refresh {
                ctx.redactor.add(r);
            }
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
            expires_at: cache(ctx).expiry(expires_in.and_then(super::client::server_delay)),
            refresh: parsed.refresh_token.or_else(|| refresh.map(str::to_string)),
        })
    }
}
