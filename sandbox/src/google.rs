//! The Google fakes: the OAuth2 token endpoint for service accounts and the Sheets v4
//! API: `values.get` / `values.update` here, and in [`sheets_calls`] the other calls real
//! clients make (gspread's `open_by_key` reads `spreadsheets.get`; `append_row`, `clear`,
//! `batch_get`, `batch_clear`, `batch_update`, `add_worksheet` …).
//!
//! The token endpoint verifies the client's RS256 JWT against the public half of the
//! service-account key written to disk, exactly as Google does, so a client that signs
//! wrongly (bad key, wrong `aud`, expired) fails here as it would in production.
//!
//! The RSA key pair is fixed (`src/keys/`), not generated per run: generating 2048-bit
//! keys takes seconds in unoptimised debug builds and would pull in the `rsa` crate
//! (RUSTSEC-2023-0071). THE KEY IS A FAKE CREDENTIAL, PUBLIC BY DESIGN, VALID ONLY FOR
//! THIS LOCAL FAKE; no Google project knows it (see `src/keys/README.md`).

use crate::faults;
use crate::tiflux::bearer;
use crate::{hash, random_token, Shared};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod sheets_calls;

/// Fake credential for the local fake only (see the module docs).
const PRIVATE_KEY_PEM: &str = include_str!("keys/sandbox-sa.pem");
const PUBLIC_KEY_PEM: &str = include_str!("keys/sandbox-sa.pub.pem");

/// The JWT audience Google's token endpoint expects ("When making an access token
/// request this value is always https://oauth2.googleapis.com/token").
const GOOGLE_TOKEN_AUDIENCE: &str = "https://oauth2.googleapis.com/token";
/// A spreadsheet id the fake answers 403 for.
const FORBIDDEN_ID: &str = "forbidden";
/// Default grid size of a new tab, as in Google Sheets.
const GRID_ROWS: u32 = 1000;
const GRID_COLS: u32 = 26;
/// Google's limit of cells in one spreadsheet (all its tabs' grids together).
const MAX_CELLS: u64 = 10_000_000;

/// The generated service-account key.
pub(crate) struct ServiceAccount {
    pub client_email: String,
    pub project_id: String,
    private_key_id: String,
    client_id: String,
    google_url: String,
}

impl ServiceAccount {
    pub fn new(seed: u64, google_url: &str) -> Self {
        let project_id = format!("pipe-sandbox-{:06x}", hash(seed, &[1]) & 0xff_ffff);
        ServiceAccount {
            client_email: format!("pipe-sandbox@{project_id}.iam.gserviceaccount.com"),
            private_key_id: format!(
                "{:016x}{:016x}{:08x}",
                hash(seed, &[2]),
                hash(seed, &[3]),
                hash(seed, &[4]) as u32
            ),
            client_id: format!("1{:020}", hash(seed, &[5]) % 10_000_000_000_000_000_000),
            project_id,
            google_url: google_url.to_string(),
        }
    }

    /// The key file's JSON, in Google's layout.
    pub fn json(&self) -> Value {
        let g = &self.google_url;
        json!({
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": PRIVATE_KEY_PEM,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": format!("{g}/o/oauth2/auth"),
            "token_uri": format!("{g}/token"),
            "auth_provider_x509_cert_url": format!("{g}/oauth2/v1/certs"),
            "client_x509_cert_url": format!("{g}/robot/v1/metadata/x509/{}", self.client_email.replace('@', "%40")),
            "universe_domain": "googleapis.com",
        })
    }
}

/// A spreadsheet id of Google's shape (44 characters), from the seed.
pub(crate) fn spreadsheet_id(seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id = String::from("1");
    for i in 0..43u64 {
        id.push(ALPHABET[(hash(seed, &[0x0053_6865_6574, i]) % 64) as usize] as char);
    }
    id
}

#[derive(Clone)]
struct Tab {
    /// The tab's `sheetId` (the `gid` of its URL): 0 for the first, as in Google Sheets.
    id: u32,
    title: String,
    rows: u32,
    cols: u32,
    cells: Vec<Vec<Value>>,
}

impl Tab {
    fn grid_cells(&self) -> u64 {
        self.rows as u64 * self.cols as u64
    }
}

/// One spreadsheet: its title and tabs.
struct Spreadsheet {
    title: String,
    tabs: Vec<Tab>,
}

/// The fake's spreadsheets and access tokens.
pub(crate) struct Store {
    sheets: Mutex<HashMap<String, Spreadsheet>>,
    tokens: Mutex<HashMap<String, (Instant, String)>>,
    decoding: DecodingKey,
}

impl Store {
    pub fn new(otp_sheet: &str) -> anyhow::Result<Self> {
        let otp = Tab {
            id: 0,
            title: "OTP".into(),
            rows: GRID_ROWS,
            cols: GRID_COLS,
            cells: vec![vec![json!("code"), json!("received_at")]],
        };
        Ok(Store {
            sheets: Mutex::new(HashMap::from([(
                otp_sheet.to_string(),
                Spreadsheet {
                    title: "OTP inbox".into(),
                    tabs: vec![otp],
                },
            )])),
            tokens: Mutex::new(HashMap::new()),
            decoding: DecodingKey::from_rsa_pem(PUBLIC_KEY_PEM.as_bytes())?,
        })
    }

    /// Write values (RAW) into a spreadsheet range; used by the OTP "e-mail".
    pub fn write(&self, sheet: &str, range: &str, values: Vec<Vec<Value>>) {
        let mut sheets = self.sheets.lock().unwrap();
        if let Some(book) = sheets.get_mut(sheet) {
            if let Some(r) = parse_range(&book.tabs, range) {
                let _ = write_cells(&mut book.tabs[r.tab], &r, &values, range, MAX_CELLS);
            }
        }
    }

    /// A valid access token with `scope`, without the JWT dance (unit tests).
    #[cfg(test)]
    pub(crate) fn grant(&self, scope: &str) -> String {
        let access = format!("ya29.sandbox.{}", random_token(32));
        self.tokens.lock().unwrap().insert(
            access.clone(),
            (
                Instant::now() + Duration::from_secs(3599),
                scope.to_string(),
            ),
        );
        access
    }

    pub(crate) fn scope_of(&self, headers: &HeaderMap) -> Option<String> {
        let token = bearer(headers)?;
        let tokens = self.tokens.lock().unwrap();
        tokens
            .get(&token)
            .filter(|(exp, _)| *exp > Instant::now())
            .map(|(_, scope)| scope.clone())
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/token", post(token))
        .route(
            "/v4/spreadsheets/{id}",
            get(sheets_calls::get_spreadsheet).post(sheets_calls::spreadsheet_method),
        )
        .route(
            "/v4/spreadsheets/{id}/values/{range}",
            get(get_values)
                .put(put_values)
                .post(sheets_calls::range_method),
        )
        .route(
            "/v4/spreadsheets/{id}/{method}",
            get(sheets_calls::collection_get).post(sheets_calls::collection_post),
        )
        .merge(crate::bigquery::router())
        .fallback(|| async {
            google_error(StatusCode::NOT_FOUND, "Requested entity was not found.")
        })
        // A method a path does not have answers Google's JSON error, not axum's empty 405
        // (which breaks the clients).
        .method_not_allowed_fallback(|| async {
            google_error(StatusCode::NOT_FOUND, "Method not found.")
        })
        .layer(middleware::from_fn_with_state(shared.clone(), faults::gate))
        .with_state(shared)
}

/// Google's JSON error shape.
pub(crate) fn google_error(status: StatusCode, message: &str) -> Response {
    let (name, reason) = match status.as_u16() {
        400 => ("INVALID_ARGUMENT", "badRequest"),
        401 => ("UNAUTHENTICATED", "authError"),
        403 => ("PERMISSION_DENIED", "forbidden"),
        404 => ("NOT_FOUND", "notFound"),
        409 => ("ALREADY_EXISTS", "duplicate"),
        429 => ("RESOURCE_EXHAUSTED", "rateLimitExceeded"),
        500 => ("INTERNAL", "backendError"),
        503 => ("UNAVAILABLE", "backendError"),
        _ => ("UNKNOWN", "backendError"),
    };
    let message = if message.is_empty()
        || message == "invalid_token" && status == StatusCode::UNAUTHORIZED
    {
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
    } else {
        message
    };
    let body = json!({"error": {
        "code": status.as_u16(),
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
        "status": name,
    }});
    (status, Json(body)).into_response()
}

fn grant_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// Check an RS256 JWT (padded or unpadded base64url segments); its claims when the
/// signature holds.
fn verify_jwt(token: &str, key: &DecodingKey) -> Result<Value, ()> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (Some(head), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(());
    };
    let header: Value =
        serde_json::from_slice(&b64.decode(head.trim_end_matches('=')).map_err(|_| ())?)
            .map_err(|_| ())?;
    if header["alg"] != "RS256" {
        return Err(());
    }
    let message = format!("{head}.{body}");
    match jsonwebtoken::crypto::verify(
        sig.trim_end_matches('='),
        message.as_bytes(),
        key,
        Algorithm::RS256,
    ) {
        Ok(true) => {}
        _ => return Err(()),
    }
    serde_json::from_slice(&b64.decode(body.trim_end_matches('=')).map_err(|_| ())?).map_err(|_| ())
}

async fn token(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return grant_error(
            "unsupported_grant_type",
            &format!("Invalid grant_type: {grant_type}"),
        );
    }
    let Some(assertion) = form.get("assertion") else {
        return grant_error("invalid_request", "Missing required parameter: assertion");
    };
    // Google accepts base64url with or without padding (yup-oauth2 pads, most clients do
    // not), so the JWT is checked here by hand: the signature over the segments exactly as
    // sent, then the claims.
    let claims = match verify_jwt(assertion, &shared.google.decoding) {
        Ok(claims) => claims,
        Err(()) => return grant_error("invalid_grant", "Invalid JWT Signature."),
    };
    for claim in ["exp", "iat", "aud", "iss"] {
        if claims.get(claim).is_none() {
            return grant_error(
                "invalid_grant",
                &format!("Invalid JWT: missing claim {claim}"),
            );
        }
    }
    // Google's documented audience is always its own token endpoint; google-auth (Python)
    // signs exactly that whatever the key's `token_uri` says, while yup-oauth2 signs the
    // `token_uri` (which, for a real key, is the same URL). Accept both.
    let aud = claims["aud"].as_str();
    if aud != Some(shared.token_uri.as_str()) && aud != Some(GOOGLE_TOKEN_AUDIENCE) {
        return grant_error(
            "invalid_grant",
            &format!(
                "Invalid JWT: Failed audience check. The right audience is {}",
                shared.token_uri
            ),
        );
    }
    if claims["iss"].as_str() != Some(shared.client_email.as_str()) {
        return grant_error("invalid_grant", "Invalid grant: account not found");
    }
    if claims["exp"].as_i64().unwrap_or(0) <= chrono::Utc::now().timestamp() {
        return grant_error(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
    }
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    let now = chrono::Utc::now().timestamp();
    if exp - iat > 3600 || iat > now + 300 {
        return grant_error(
            "invalid_grant",
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
    }
    let scope = claims["scope"].as_str().unwrap_or("").to_string();
    if scope.trim().is_empty() {
        return grant_error(
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        );
    }
    let access = format!("ya29.sandbox.{}", random_token(32));
    {
        let mut tokens = shared.google.tokens.lock().unwrap();
        let now = Instant::now();
        tokens.retain(|_, (e, _)| *e > now);
        tokens.insert(access.clone(), (now + Duration::from_secs(3599), scope));
    }
    Json(json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

/// A parsed A1 range: tab index and inclusive 0-based bounds (None = open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    tab: usize,
    c1: u32,
    r1: u32,
    c2: Option<u32>,
    r2: Option<u32>,
}

/// `A1`, `A`, `1` → (column, row), 0-based.
fn parse_cell(s: &str) -> Option<(Option<u32>, Option<u32>)> {
    let split = s
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(s.len());
    let (letters, digits) = s.split_at(split);
    if letters.is_empty() && digits.is_empty()
        || letters.len() > 3
        || !digits.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let col = (!letters.is_empty()).then(|| {
        letters.bytes().fold(0u32, |acc, b| {
            acc * 26 + (b.to_ascii_uppercase() - b'A' + 1) as u32
        }) - 1
    });
    let row = match digits {
        "" => None,
        d => Some(d.parse::<u32>().ok().filter(|r| *r >= 1)? - 1),
    };
    Some((col, row))
}

fn parse_cells(tab: usize, s: &str) -> Option<Range> {
    let (a, b) = match s.split_once(':') {
        Some((a, b)) => (parse_cell(a)?, parse_cell(b)?),
        None => {
            let c = parse_cell(s)?;
            if c.0.is_none() || c.1.is_none() {
                return None;
            }
            (c, c)
        }
    };
    // A row-only or column-only side must match the other side's kind.
    if a.0.is_some() != b.0.is_some() && a.1.is_some() != b.1.is_some() {
        return None;
    }
    let (c1, c2) = (a.0.unwrap_or(0), b.0);
    let (r1, r2) = (a.1.unwrap_or(0), b.1);
    let (c1, c2) = match c2 {
        Some(c2) if c2 < c1 => (c2, Some(c1)),
        _ => (c1, c2),
    };
    let (r1, r2) = match r2 {
        Some(r2) if r2 < r1 => (r2, Some(r1)),
        _ => (r1, r2),
    };
    Some(Range {
        tab,
        c1,
        r1,
        c2,
        r2,
    })
}

fn parse_range(tabs: &[Tab], s: &str) -> Option<Range> {
    let find = |name: &str| {
        tabs.iter()
            .position(|t| t.title == name)
            .or_else(|| tabs.iter().position(|t| t.title.eq_ignore_ascii_case(name)))
    };
    let whole = |tab| Range {
        tab,
        c1: 0,
        r1: 0,
        c2: None,
        r2: None,
    };
    if let Some(rest) = s.strip_prefix('\'') {
        // 'Sheet name' with '' for a quote.
        let mut name = String::new();
        let mut chars = rest.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().map(|(_, c)| *c) == Some('\'') {
                    chars.next();
                    name.push('\'');
                    continue;
                }
                let tab = find(&name)?;
                let after = &rest[i + 1..];
                return match after.strip_prefix('!') {
                    Some(cells) => parse_cells(tab, cells),
                    None if after.is_empty() => Some(whole(tab)),
                    None => None,
                };
            }
            name.push(c);
        }
        return None;
    }
    match s.rsplit_once('!') {
        Some((name, cells)) => parse_cells(find(name)?, cells),
        None => match find(s) {
            Some(tab) => Some(whole(tab)),
            None if !tabs.is_empty() => parse_cells(0, s),
            None => None,
        },
    }
}

fn col_name(mut c: u32) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'A' + (c % 26) as u8);
        if c < 26 {
            break;
        }
        c = c / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

fn quote_title(t: &str) -> String {
    if t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        t.to_string()
    } else {
        format!("'{}'", t.replace('\'', "''"))
    }
}

/// The A1 range Sheets answers with: `Tab!B3` for one cell, `Tab!A1:C9` otherwise.
fn a1(tab: &Tab, c1: u32, r1: u32, c2: u32, r2: u32) -> String {
    if c1 == c2 && r1 == r2 {
        return format!("{}!{}{}", quote_title(&tab.title), col_name(c1), r1 + 1);
    }
    format!(
        "{}!{}{}:{}{}",
        quote_title(&tab.title),
        col_name(c1),
        r1 + 1,
        col_name(c2),
        r2 + 1
    )
}

/// A number typed into a cell: whole numbers stay integers (`12`, not `12.0`).
fn parse_number(s: &str) -> Option<serde_json::Number> {
    match s.parse::<i64>() {
        Ok(i) => Some(i.into()),
        Err(_) => serde_json::Number::from_f64(s.parse::<f64>().ok()?),
    }
}

/// A number as Sheets displays it by default: a whole number without `.0`.
fn format_number(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => n.to_string(),
    }
}

fn is_empty(v: &Value) -> bool {
    v.is_null() || v.as_str() == Some("")
}

fn bad_range(range: &str) -> Response {
    google_error(
        StatusCode::BAD_REQUEST,
        &format!("Unable to parse range: {range}"),
    )
}

fn query_pairs(q: &Option<String>) -> HashMap<String, String> {
    serde_urlencoded::from_str(q.as_deref().unwrap_or("")).unwrap_or_default()
}

/// Auth and spreadsheet checks shared by get and put. `write`: needs the write scope.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn check(shared: &Shared, headers: &HeaderMap, id: &str, write: bool) -> Result<(), Response> {
    let Some(scope) = shared.google.scope_of(headers) else {
        return Err(google_error(StatusCode::UNAUTHORIZED, ""));
    };
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let allowed = scopes.iter().any(|s| {
        let s = s.trim_start_matches("https://www.googleapis.com/auth/");
        s == "spreadsheets"
            || s == "drive"
            || !write && (s == "spreadsheets.readonly" || s == "drive.readonly")
    });
    if !allowed {
        return Err(google_error(
            StatusCode::FORBIDDEN,
            "Request had insufficient authentication scopes.",
        ));
    }
    if id == FORBIDDEN_ID {
        return Err(google_error(
            StatusCode::FORBIDDEN,
            "The caller does not have permission",
        ));
    }
    if !shared.google.sheets.lock().unwrap().contains_key(id) {
        return Err(google_error(
            StatusCode::NOT_FOUND,
            "Requested entity was not found.",
        ));
    }
    Ok(())
}

#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn major_dimension(v: Option<&str>) -> Result<bool, Response> {
    match v.unwrap_or("ROWS") {
        "ROWS" | "DIMENSION_UNSPECIFIED" => Ok(false),
        "COLUMNS" => Ok(true),
        other => Err(google_error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid value at 'major_dimension' (type.googleapis.com/google.apps.sheets.v4.Dimension), \"{other}\""),
        )),
    }
}

/// How values are read back: the major dimension and whether they are rendered as text.
#[derive(Clone, Copy)]
struct Render {
    columns: bool,
    formatted: bool,
}

/// `majorDimension`, `valueRenderOption` and `dateTimeRenderOption` (names as the
/// request spells them, for the error).
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn render_options(
    major: Option<&str>,
    render: Option<&str>,
    date_time: Option<&str>,
) -> Result<Render, Response> {
    let columns = major_dimension(major)?;
    let formatted = match render.unwrap_or("FORMATTED_VALUE") {
        "FORMATTED_VALUE" => true,
        "UNFORMATTED_VALUE" | "FORMULA" => false,
        other => {
            return Err(google_error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid value at 'value_render_option' (type.googleapis.com/google.apps.sheets.v4.ValueRenderOption), \"{other}\""),
            ))
        }
    };
    match date_time.unwrap_or("SERIAL_NUMBER") {
        "SERIAL_NUMBER" | "FORMATTED_STRING" => {}
        other => {
            return Err(google_error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid value at 'date_time_render_option' (type.googleapis.com/google.apps.sheets.v4.DateTimeRenderOption), \"{other}\""),
            ))
        }
    }
    Ok(Render { columns, formatted })
}

/// The range's bounds, open ends closed at the grid's edge; an error past the grid.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn bounds(tab: &Tab, r: &Range, range: &str) -> Result<(u32, u32), Response> {
    let (c2, r2) = (
        r.c2.unwrap_or(tab.cols.saturating_sub(1)),
        r.r2.unwrap_or(tab.rows.saturating_sub(1)),
    );
    if c2 >= tab.cols || r2 >= tab.rows {
        return Err(google_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Range ({range}) exceeds grid limits. Max rows: {}, max columns: {}",
                tab.rows, tab.cols
            ),
        ));
    }
    Ok((c2, r2))
}

/// A cell's value as a read renders it (`FORMATTED_VALUE`: numbers and booleans as text).
fn rendered(tab: &Tab, row: u32, col: u32, formatted: bool) -> Value {
    let v = tab
        .cells
        .get(row as usize)
        .and_then(|cells| cells.get(col as usize))
        .cloned()
        .unwrap_or(Value::Null);
    match v {
        Value::Number(n) if formatted => Value::String(format_number(&n)),
        Value::Bool(b) if formatted => Value::String(if b { "TRUE" } else { "FALSE" }.into()),
        Value::Null => Value::String(String::new()),
        other => other,
    }
}

/// The `ValueRange` of `r` in `tab` (`range` as asked, for errors): trailing empty cells
/// and rows dropped, no `values` at all when the range is empty, as Sheets answers.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn read_range(tab: &Tab, r: &Range, range: &str, how: Render) -> Result<Value, Response> {
    let (c2, r2) = bounds(tab, r, range)?;
    let columns = how.columns;
    let (outer, inner) = if columns {
        ((r.c1, c2), (r.r1, r2))
    } else {
        ((r.r1, r2), (r.c1, c2))
    };
    // Only the populated part of the grid can hold values.
    let last_row = (tab.cells.len() as u32).min(r2 + 1);
    let last_col = (tab.cells.iter().map(Vec::len).max().unwrap_or(0) as u32).min(c2 + 1);
    let (outer_end, inner_end) = if columns {
        (last_col, last_row)
    } else {
        (last_row, last_col)
    };
    let mut values: Vec<Value> = Vec::new();
    for o in outer.0..outer_end.max(outer.0).min(outer.1 + 1) {
        let mut line: Vec<Value> = (inner.0..inner_end.max(inner.0).min(inner.1 + 1))
            .map(|i| {
                if columns {
                    rendered(tab, i, o, how.formatted)
                } else {
                    rendered(tab, o, i, how.formatted)
                }
            })
            .collect();
        while line.last().is_some_and(is_empty) {
            line.pop();
        }
        values.push(Value::Array(line));
    }
    while values
        .last()
        .is_some_and(|l| l.as_array().is_some_and(Vec::is_empty))
    {
        values.pop();
    }
    let mut body = json!({
        "range": a1(tab, r.c1, r.r1, c2, r2),
        "majorDimension": if columns { "COLUMNS" } else { "ROWS" },
    });
    if !values.is_empty() {
        body["values"] = Value::Array(values);
    }
    Ok(body)
}

async fn get_values(
    State(shared): State<Arc<Shared>>,
    Path((id, range)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check(&shared, &headers, &id, false) {
        return r;
    }
    let q = query_pairs(&q);
    let how = match render_options(
        q.get("majorDimension").map(String::as_str),
        q.get("valueRenderOption").map(String::as_str),
        q.get("dateTimeRenderOption").map(String::as_str),
    ) {
        Ok(how) => how,
        Err(r) => return r,
    };
    let sheets = shared.google.sheets.lock().unwrap();
    let tabs = &sheets[&id].tabs;
    let Some(r) = parse_range(tabs, &range) else {
        return bad_range(&range);
    };
    match read_range(&tabs[r.tab], &r, &range, how) {
        Ok(body) => Json(body).into_response(),
        Err(r) => r,
    }
}

/// Write `values` (rows) at the range's top-left corner, growing the grid if needed.
/// `budget`: the cells this tab's grid may grow to (the spreadsheet's limit less its other
/// tabs), checked before anything is written or allocated.
fn write_cells(
    tab: &mut Tab,
    r: &Range,
    values: &[Vec<Value>],
    range: &str,
    budget: u64,
) -> Result<(u32, u32, u32), String> {
    let too_many = || {
        format!("This action would increase the number of cells in the workbook above the limit of {MAX_CELLS} cells.")
    };
    let (rows, cols) = (
        values.len() as u64,
        values.iter().map(Vec::len).max().unwrap_or(0) as u64,
    );
    let grown_rows = (tab.rows as u64).max(r.r1 as u64 + rows);
    let grown_cols = (tab.cols as u64).max(r.c1 as u64 + cols);
    if grown_rows.saturating_mul(grown_cols) > budget {
        return Err(too_many());
    }
    let (rows, cols) = (rows as u32, cols as u32);
    if let Some(r2) = r.r2 {
        if rows > r2 - r.r1 + 1 {
            return Err(format!(
                "Requested writing within range [{range}], but tried writing to row [{}]",
                r.r1 + rows
            ));
        }
    }
    if let Some(c2) = r.c2 {
        if cols > c2 - r.c1 + 1 {
            return Err(format!(
                "Requested writing within range [{range}], but tried writing to column [{}]",
                col_name(r.c1 + cols - 1)
            ));
        }
    }
    let mut cells = 0;
    for (dr, line) in values.iter().enumerate() {
        for (dc, v) in line.iter().enumerate() {
            if v.is_null() {
                continue;
            }
            let (row, col) = (r.r1 as usize + dr, r.c1 as usize + dc);
            if tab.cells.len() <= row {
                tab.cells.resize(row + 1, Vec::new());
            }
            if tab.cells[row].len() <= col {
                tab.cells[row].resize(col + 1, Value::Null);
            }
            tab.cells[row][col] = v.clone();
            cells += 1;
        }
    }
    tab.rows = tab.rows.max(r.r1 + rows);
    tab.cols = tab.cols.max(r.c1 + cols);
    Ok((rows, cols, cells))
}

/// `valueInputOption`: whether typed text becomes numbers (`USER_ENTERED`) or stays (`RAW`).
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn input_option(v: Option<&str>) -> Result<bool, Response> {
    match v {
        Some("RAW") => Ok(false),
        Some("USER_ENTERED") => Ok(true),
        Some(other) => Err(google_error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid value at 'value_input_option' (type.googleapis.com/google.apps.sheets.v4.ValueInputOption), \"{other}\""),
        )),
        None => Err(google_error(
            StatusCode::BAD_REQUEST,
            "'valueInputOption' is required but not specified",
        )),
    }
}

/// A request's `values` (and `majorDimension`) as rows; `user_entered` turns numbers
/// typed as text into numbers, as Sheets does.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn values_of(body: &Value, user_entered: bool) -> Result<Vec<Vec<Value>>, Response> {
    let columns = major_dimension(body.get("majorDimension").and_then(Value::as_str))?;
    let not_lists = || {
        google_error(
            StatusCode::BAD_REQUEST,
            "Invalid JSON payload received. 'values' must be a list of lists.",
        )
    };
    let mut values: Vec<Vec<Value>> = match body.get("values") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(rows)) => rows
            .iter()
            .map(|r| r.as_array().cloned())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(not_lists)?,
        Some(_) => return Err(not_lists()),
    };
    if columns {
        let n = values.iter().map(Vec::len).max().unwrap_or(0);
        values = (0..n)
            .map(|i| {
                values
                    .iter()
                    .map(|col| col.get(i).cloned().unwrap_or(Value::Null))
                    .collect()
            })
            .collect();
    }
    if user_entered {
        for v in values.iter_mut().flatten() {
            if let Some(n) = v.as_str().and_then(|s| parse_number(s.trim())) {
                *v = Value::Number(n);
            }
        }
    }
    Ok(values)
}

/// The cells of every tab but `except`.
fn other_cells(tabs: &[Tab], except: usize) -> u64 {
    tabs.iter()
        .enumerate()
        .filter(|(i, _)| *i != except)
        .map(|(_, t)| t.grid_cells())
        .sum()
}

/// Write `values` at `r` (a single cell is the top-left corner of the block, as Sheets
/// writes `update(values, "A1")`): the `UpdateValuesResponse`, with `updatedData` read
/// back as `include` renders it.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn update_values(
    id: &str,
    tabs: &mut [Tab],
    r: Range,
    range: &str,
    values: &[Vec<Value>],
    include: Option<Render>,
) -> Result<Value, Response> {
    let cells_part = range.rsplit_once('!').map_or(range, |(_, c)| c);
    let r = if cells_part.contains(':') {
        r
    } else {
        Range {
            c2: None,
            r2: None,
            ..r
        }
    };
    let budget = MAX_CELLS.saturating_sub(other_cells(tabs, r.tab));
    let tab = &mut tabs[r.tab];
    let (rows, cols, cells) = write_cells(tab, &r, values, range, budget)
        .map_err(|m| google_error(StatusCode::BAD_REQUEST, &m))?;
    let (c2, r2) = if rows == 0 || cols == 0 {
        (r.c1, r.r1)
    } else {
        (r.c1 + cols - 1, r.r1 + rows - 1)
    };
    let mut out = json!({"spreadsheetId": id, "updatedRange": a1(tab, r.c1, r.r1, c2, r2)});
    if cells > 0 {
        out["updatedRows"] = json!(rows);
        out["updatedColumns"] = json!(cols);
        out["updatedCells"] = json!(cells);
    }
    if let Some(how) = include {
        let written = Range {
            tab: r.tab,
            c1: r.c1,
            r1: r.r1,
            c2: Some(c2),
            r2: Some(r2),
        };
        out["updatedData"] = read_range(tab, &written, range, how)?;
    }
    Ok(out)
}

/// `includeValuesInResponse` with `responseValueRenderOption` /
/// `responseDateTimeRenderOption`: how `updatedData` is rendered, when asked for.
#[allow(clippy::result_large_err)] // the error is a ready response, returned at once
fn include_option(
    include: Option<&Value>,
    render: Option<&str>,
    date_time: Option<&str>,
) -> Result<Option<Render>, Response> {
    let include = match include {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            return Err(google_error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid value at 'include_values_in_response' (TYPE_BOOL), {other}"),
            ))
        }
    };
    let how = render_options(None, render, date_time)?;
    Ok(include.then_some(how))
}

async fn put_values(
    State(shared): State<Arc<Shared>>,
    Path((id, range)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = check(&shared, &headers, &id, true) {
        return r;
    }
    let q = query_pairs(&q);
    let user_entered = match input_option(q.get("valueInputOption").map(String::as_str)) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let include = match include_option(
        q.get("includeValuesInResponse")
            .map(|s| Value::String(s.clone()))
            .as_ref(),
        q.get("responseValueRenderOption").map(String::as_str),
        q.get("responseDateTimeRenderOption").map(String::as_str),
    ) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return google_error(StatusCode::BAD_REQUEST, "Invalid JSON payload received.");
    };
    let values = match values_of(&body, user_entered) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let mut sheets = shared.google.sheets.lock().unwrap();
    let tabs = &mut sheets.get_mut(&id).expect("checked").tabs;
    let Some(r) = parse_range(tabs, &range) else {
        return bad_range(&range);
    };
    if let Some(body_range) = body.get("range").and_then(Value::as_str) {
        if parse_range(tabs, body_range).as_ref() != Some(&r) {
            return google_error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid values[0][0]: Requested range [{body_range}] does not match the range in the URL [{range}]"),
            );
        }
    }
    match update_values(&id, tabs, r, &range, &values, include) {
        Ok(out) => Json(out).into_response(),
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tabs() -> Vec<Tab> {
        ["OTP", "My Tab"]
            .iter()
            .map(|t| Tab {
                id: 0,
                title: t.to_string(),
                rows: 1000,
                cols: 26,
                cells: vec![],
            })
            .collect()
    }

    #[test]
    fn ranges() {
        let t = tabs();
        assert_eq!(
            parse_range(&t, "OTP!A2:B2"),
            Some(Range {
                tab: 0,
                c1: 0,
                r1: 1,
                c2: Some(1),
                r2: Some(1)
            })
        );
        assert_eq!(
            parse_range(&t, "OTP!B3"),
            Some(Range {
                tab: 0,
                c1: 1,
                r1: 2,
                c2: Some(1),
                r2: Some(2)
            })
        );
        assert_eq!(
            parse_range(&t, "OTP"),
            Some(Range {
                tab: 0,
                c1: 0,
                r1: 0,
                c2: None,
                r2: None
            })
        );
        assert_eq!(
            parse_range(&t, "A1:C"),
            Some(Range {
                tab: 0,
                c1: 0,
                r1: 0,
                c2: Some(2),
                r2: None
            })
        );
        assert_eq!(
            parse_range(&t, "'My Tab'!AA10:AB11"),
            Some(Range {
                tab: 1,
                c1: 26,
                r1: 9,
                c2: Some(27),
                r2: Some(10)
            })
        );
        assert_eq!(
            parse_range(&t, "My Tab!2:3"),
            Some(Range {
                tab: 1,
                c1: 0,
                r1: 1,
                c2: None,
                r2: Some(2)
            })
        );
        assert_eq!(parse_range(&t, "Nope!A1"), None);
        assert_eq!(parse_range(&t, "OTP!A0"), None);
        assert_eq!(parse_range(&t, "OTP!!"), None);
        assert_eq!(col_name(0), "A");
        assert_eq!(col_name(27), "AB");
    }
}
