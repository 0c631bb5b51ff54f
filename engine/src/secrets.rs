//! The redactor: every secret value `pipe` learns is replaced by `***` wherever text leaves
//! the process (stdout, stderr, log rows, history, errors, the panic hook).
//!
//! Values are learnt as they appear (a `secret()` call, a secret connection field, a
//! `secret: true` output; the executor also learns every `secret('LITERAL')` and secret
//! connection field before the first step starts) together with the forms they take on the
//! wire, so a derived header or URL is caught too:
//!
//! * every URL encoding: each character other than an ASCII letter or digit as itself or as
//!   `%XX` (upper or lower hex, UTF-8 bytes), a space also as `+` — so the form encoding of a
//!   query string, a path, userinfo and `encodeURIComponent` are all one pattern;
//! * base64, standard and URL-safe, padded or not, and the secret inside a longer base64
//!   string at any of the three byte alignments (`base64("user:" + secret)`, as a script
//!   builds Basic auth): the characters that depend on the secret alone are masked, the one or
//!   two at each edge that mix in its neighbours are not;
//! * JSON-escaped, SQL-quoted (`'` doubled or backslashed), and each line of a multi-line
//!   secret (a key file).
//!
//! What cannot be masked: a secret transformed by a template or a script beyond these
//! (upper-cased, reversed, hashed, split, encrypted), and attachments (`::file::`), which
//! are stored as they are.
//!
//! All forms are alternatives of one regular expression (longest first, so a value that
//! contains another is masked whole), rebuilt only when a new value is learnt: the cost of
//! [`Redactor::redact`] is one linear scan per string, whatever the number of secrets.

use base64::Engine as _;
use regex::Regex;
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

pub const MASK: &str = "***";

/// Values longer than this get literal forms only (no per-character URL pattern), which
/// keeps the expression small for key files.
const URL_PATTERN_MAX: usize = 1024;
/// The shortest base64 fragment masked inside a longer base64 string (6 bytes of secret):
/// shorter ones would mask ordinary base64 text by chance.
const MIN_FRAGMENT: usize = 8;

#[derive(Clone, Default)]
pub struct Redactor {
    inner: Arc<RwLock<Known>>,
}

#[derive(Default)]
struct Known {
    /// The values learnt (so learning one again costs a hash).
    values: HashSet<String>,
    /// Regex alternatives with their shortest match, in bytes.
    patterns: Vec<(usize, String)>,
    /// `patterns` as one expression; `None` while nothing is known or until the next use
    /// after a value was learnt (so learning many values at once compiles once).
    matcher: Option<Arc<Regex>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Redactor({} values)",
            self.inner.read().map(|k| k.values.len()).unwrap_or(0)
        )
    }
}

impl Redactor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Learn a secret value and its derived forms. Values shorter than 3 characters are not
    /// masked (they would mask every occurrence of a common letter), but still never printed
    /// on purpose by pipe.
    pub fn add(&self, value: &str) {
        let value = value.trim_end_matches(['\n', '\r']);
        if value.chars().count() < 3 {
            return;
        }
        if self.inner.read().unwrap().values.contains(value) {
            return;
        }
        let patterns = forms(value);
        self.learn(value, patterns);
    }

    /// Learn a user:password pair as used by HTTP Basic auth.
    pub fn add_basic_auth(&self, user: &str, password: &str) {
        self.add(password);
        let pair = format!("{user}:{password}");
        if password.chars().count() < 3 || self.inner.read().unwrap().values.contains(&pair) {
            return;
        }
        let patterns = base64_forms(pair.as_bytes())
            .into_iter()
            .map(|f| (f.len(), regex::escape(&f)))
            .collect();
        self.learn(&pair, patterns);
    }

    fn learn(&self, value: &str, patterns: Vec<(usize, String)>) {
        let mut known = self.inner.write().unwrap();
        if !known.values.insert(value.to_string()) {
            return;
        }
        for p in patterns {
            if !known.patterns.contains(&p) {
                known.patterns.push(p);
            }
        }
        // Longest first: at one position the regex takes the first alternative that matches.
        known
            .patterns
            .sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        known.matcher = None;
    }

    pub fn is_empty(&self) -> bool {
        self.inner.read().unwrap().values.is_empty()
    }

    fn matcher(&self) -> Option<Arc<Regex>> {
        {
            let known = self.inner.read().unwrap();
            if known.matcher.is_some() || known.patterns.is_empty() {
                return known.matcher.clone();
            }
        }
        let mut known = self.inner.write().unwrap();
        if known.matcher.is_none() {
            known.matcher = Some(Arc::new(compile(&known.patterns)));
        }
        known.matcher.clone()
    }

    pub fn redact(&self, text: &str) -> String {
        match self.matcher() {
            Some(m) => m.replace_all(text, regex::NoExpand(MASK)).into_owned(),
            None => text.to_string(),
        }
    }

    /// Where to cut `text` at or before byte `at` (on a char boundary) so that no secret
    /// straddles the cut: `at`, or the start of the secret that would. Used to split a long
    /// line into rows that are each masked whole.
    pub fn safe_split(&self, text: &str, at: usize) -> usize {
        let mut cut = at.min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Some(m) = self.matcher() {
            for hit in m.find_iter(text) {
                if hit.start() >= cut {
                    break;
                }
                if hit.end() > cut {
                    if hit.start() > 0 {
                        cut = hit.start();
                    }
                    break;
                }
            }
        }
        cut
    }

    /// Redact every string inside a JSON value.
    pub fn redact_json(&self, v: &serde_json::Value) -> serde_json::Value {
        use serde_json::Value as J;
        if self.is_empty() {
            return v.clone();
        }
        match v {
            J::String(s) => J::String(self.redact(s)),
            J::Array(a) => J::Array(a.iter().map(|x| self.redact_json(x)).collect()),
            J::Object(o) => J::Object(
                o.iter()
                    .map(|(k, x)| (k.clone(), self.redact_json(x)))
                    .collect(),
            ),
            other => {
                let s = other.to_string();
                let r = self.redact(&s);
                if r == s {
                    other.clone()
                } else {
                    J::String(r)
                }
            }
        }
    }
}

/// The regex alternatives for `value`: (shortest match in bytes, pattern).
fn forms(value: &str) -> Vec<(usize, String)> {
    let mut literals = base64_forms(value.as_bytes());
    literals.extend(base64_fragments(value.as_bytes()));
    literals.push(
        serde_json::to_string(value)
            .unwrap_or_default()
            .trim_matches('"')
            .to_string(),
    );
    if value.contains('\'') {
        literals.push(value.replace('\'', "''"));
        literals.push(value.replace('\'', "\\'"));
    }
    // Multi-line secrets (key files) are also caught line by line.
    if value.contains('\n') {
        literals.extend(
            value
                .lines()
                .filter(|l| l.trim().len() >= 8)
                .map(|l| l.trim().to_string()),
        );
    }
    let mut patterns = vec![(value.len(), url_pattern(value))];
    // Also as literals: a set too large to compile falls back to the literal alternatives
    // (see `compile`), which must still hold the value and its usual URL encoding.
    literals.push(value.to_string());
    literals.push(
        percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    );
    patterns.extend(
        literals
            .into_iter()
            .filter(|l| l.len() >= 3)
            .map(|l| (l.len(), regex::escape(&l))),
    );
    patterns.sort();
    patterns.dedup();
    patterns
}

/// `value` in any URL encoding: each character that is not an ASCII letter or digit as
/// itself or percent-encoded (either hex case), a space also as `+`. Longer values: as is.
fn url_pattern(value: &str) -> String {
    if value.len() > URL_PATTERN_MAX {
        return regex::escape(value);
    }
    let mut p = String::new();
    let mut utf8 = [0u8; 4];
    for c in value.chars() {
        if c.is_ascii_alphanumeric() {
            p.push(c);
            continue;
        }
        p.push_str("(?:");
        p.push_str(&regex::escape(c.encode_utf8(&mut utf8)));
        if c == ' ' {
            p.push_str(r"|\+");
        }
        p.push('|');
        for b in c.encode_utf8(&mut utf8).bytes() {
            p.push('%');
            for h in format!("{b:02X}").chars() {
                if h.is_ascii_alphabetic() {
                    p.push_str(&format!("[{h}{}]", h.to_ascii_lowercase()));
                } else {
                    p.push(h);
                }
            }
        }
        p.push(')');
    }
    p
}

/// The base64 of `bytes`: standard and URL-safe, with and without padding.
fn base64_forms(bytes: &[u8]) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut v: Vec<String> = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .map(|e| e.encode(bytes))
        .collect();
    v.dedup();
    v
}

/// The base64 characters that `bytes` alone decide when they sit at each of the three byte
/// alignments inside a longer base64 string (standard and URL-safe alphabets). The one or
/// two characters at each edge that mix in neighbouring bytes are left out.
fn base64_fragments(bytes: &[u8]) -> Vec<String> {
    let mut v = Vec::new();
    for align in 0..3 {
        let mut buf = vec![0u8; align];
        buf.extend_from_slice(bytes);
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&buf);
        let start = [0, 2, 3][align];
        let end = buf.len() / 3 * 4 + buf.len() % 3;
        if end >= start + MIN_FRAGMENT {
            let fragment = &encoded[start..end];
            v.push(fragment.to_string());
            v.push(fragment.replace('+', "-").replace('/', "_"));
        }
    }
    v.dedup();
    v
}

/// One expression of every alternative. A set too large to compile (thousands of long
/// secrets) falls back to the literal alternatives, which always compile.
fn compile(patterns: &[(usize, String)]) -> Regex {
    let joined = |ps: &mut dyn Iterator<Item = &String>| {
        ps.map(|p| format!("(?:{p})")).collect::<Vec<_>>().join("|")
    };
    let all = joined(&mut patterns.iter().map(|(_, p)| p));
    regex::RegexBuilder::new(&all)
        .size_limit(64 << 20)
        .build()
        .unwrap_or_else(|_| {
            let literal = joined(
                &mut patterns
                    .iter()
                    .map(|(_, p)| p)
                    .filter(|p| !p.contains("(?:")),
            );
            regex::RegexBuilder::new(&literal)
                .size_limit(256 << 20)
                .build()
                .expect("escaped literals compile")
        })
}

/// A header name that carries a credential (its value is masked).
pub fn is_secret_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["auth", "token", "key", "secret", "cookie", "password"]
        .iter()
        .any(|w| n.contains(w))
}

/// Learn the credentials in a step's rendered `with:` the way the steps do when they run:
/// fields named like secrets at any depth (`auth.password`, `client_secret`; not `*url`),
/// an `auth`'s `value` (an API key), and the values of credential headers (`Authorization`,
/// `X-Api-Key`), with the credentials after an `Authorization` scheme on their own. So
/// `--dry-run` masks what a real run masks.
/// A value holding a dry run's placeholder (`<steps.login.token>`, `<item>`) is not a
/// credential yet (and masking it would hide what the dry run shows).
pub fn learn_step_credentials(config: &serde_json::Value, redactor: &Redactor) {
    let Some(fields) = config.as_object() else {
        return;
    };
    let known = |v: &str| !v.contains("<steps.") && !v.contains("<item");
    let learn = |v: &str| {
        if known(v) {
            redactor.add(v)
        }
    };
    for (key, value) in fields {
        match value {
            serde_json::Value::String(s)
                if crate::validate::is_secret_field(key)
                    && !key.to_ascii_lowercase().ends_with("url") =>
            {
                learn(s)
            }
            serde_json::Value::Object(inner) if key == "headers" => {
                for (name, v) in inner {
                    if let (true, Some(v)) = (is_secret_header(name), v.as_str()) {
                        learn(v);
                        if let Some((_, credential)) = v.trim().split_once(' ') {
                            learn(credential.trim());
                        }
                    }
                }
            }
            serde_json::Value::Object(inner) => {
                if key == "auth" {
                    if let Some(v) = inner.get("value").and_then(|v| v.as_str()) {
                        learn(v);
                    }
                    if let (Some(user), Some(pw)) = (
                        inner.get("username").and_then(|v| v.as_str()),
                        inner.get("password").and_then(|v| v.as_str()),
                    ) {
                        if known(pw) {
                            redactor.add_basic_auth(user, pw);
                        }
                    }
                }
                learn_step_credentials(value, redactor);
            }
            _ => {}
        }
    }
}

/// The names of the `secret('NAME')` / `secret("NAME")` calls with a literal name in a
/// template (a name computed at run time is found when it runs).
pub fn literal_secret_names(template: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find("secret(") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "secret(".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let arg = after.trim_start();
        let Some(quote) = arg.chars().next().filter(|c| *c == '\'' || *c == '"') else {
            continue;
        };
        let Some(end) = arg[1..].find(quote) else {
            continue;
        };
        let name = &arg[1..1 + end];
        if !name.is_empty()
            && !name.contains(['\\', '\n'])
            && arg[1 + end + 1..].trim_start().starts_with(')')
        {
            names.push(name.to_string());
        }
    }
    names
}

/// Where a run's `secret()` reads from. The default, [`EnvSecrets`], is the process
/// environment; a service replaces it with its stored credentials, so that two runs in one
/// process can see different values for the same name.
pub trait SecretSource: Send + Sync {
    /// The value of the secret `name`, if this source has it.
    fn lookup(&self, name: &str) -> Option<String>;
    /// What the user should do when `name` is not set (the end of the step's error).
    fn missing(&self, name: &str) -> String {
        format!("secret {name} is not set")
    }
}

/// `secret(NAME)` = the environment variable `NAME`, else the file `NAME_FILE` names.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSecrets;

impl SecretSource for EnvSecrets {
    fn lookup(&self, name: &str) -> Option<String> {
        lookup_secret(name)
    }
    fn missing(&self, name: &str) -> String {
        format!("secret {name} is not set: set the environment variable {name} or {name}_FILE")
    }
}

/// Fixed values by name (tests, and sources built from stored credentials).
#[derive(Debug, Clone, Default)]
pub struct MapSecrets(pub std::collections::HashMap<String, String>);

impl SecretSource for MapSecrets {
    fn lookup(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// A run's [`SecretSource`], cheap to clone (the default is the environment).
#[derive(Clone)]
pub struct Secrets(pub std::sync::Arc<dyn SecretSource>);

impl Secrets {
    pub fn new(source: impl SecretSource + 'static) -> Secrets {
        Secrets(std::sync::Arc::new(source))
    }
}

impl Default for Secrets {
    fn default() -> Self {
        Secrets::new(EnvSecrets)
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the values.
        f.write_str("Secrets(..)")
    }
}

/// Read a secret by name: the environment variable `NAME`, else the file named by `NAME_FILE`.
pub fn lookup_secret(name: &str) -> Option<String> {
    if let Ok(v) = std::env::var(name) {
        return Some(v);
    }
    let path = std::env::var(format!("{name}_FILE")).ok()?;
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_value_and_derived_forms() {
        let r = Redactor::new();
        r.add("p@ss word!");
        assert_eq!(r.redact("x p@ss word! y"), "x *** y");
        assert_eq!(r.redact("q=p%40ss%20word%21"), "q=***");
        assert_eq!(
            r.redact(&base64::engine::general_purpose::STANDARD.encode("p@ss word!")),
            "***"
        );
        r.add_basic_auth("me", "p@ss word!");
        let hdr = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("me:p@ss word!")
        );
        assert_eq!(r.redact(&hdr), "Basic ***");
    }

    #[test]
    fn masks_every_url_encoding() {
        let r = Redactor::new();
        r.add("Ur1-s_e.c~r*e!t=v@l ue");
        for encoded in [
            "Ur1-s_e.c%7Er*e%21t%3Dv%40l+ue",           // form (reqwest's query)
            "Ur1-s_e.c~r*e!t=v@l%20ue",                 // path
            "Ur1-s_e.c~r*e!t%3Dv%40l%20ue",             // userinfo
            "Ur1%2ds%5fe%2ec%7er%2ae%21t%3dv%40l%20ue", // lowercase hex, everything
            "Ur1%2Ds%5Fe%2Ec%7Er%2Ae%21t%3Dv%40l%20ue",
        ] {
            assert_eq!(
                r.redact(&format!("u?k={encoded}&x=1")),
                "u?k=***&x=1",
                "{encoded}"
            );
        }
        r.add("café-pw");
        assert_eq!(r.redact("x=caf%C3%A9-pw"), "x=***");
        assert_eq!(r.redact("x=caf%c3%a9%2Dpw"), "x=***");
    }

    #[test]
    fn masks_base64_of_anything_colon_secret() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let r = Redactor::new();
        r.add("canary-5f2b9e1d-secret");
        for user in ["", "a:", "ab:", "abc:", "someone@example.com:"] {
            for encoded in [
                STANDARD.encode(format!("{user}canary-5f2b9e1d-secret")),
                URL_SAFE_NO_PAD.encode(format!("{user}canary-5f2b9e1d-secret!?")),
            ] {
                let out = r.redact(&format!("Basic {encoded}"));
                assert!(out.contains(MASK), "{user}: {out}");
                // At most 3 characters of the secret's part are left at each edge.
                let left = out.len() - MASK.len() - "Basic ".len();
                let user_part = (user.len() * 4).div_ceil(3);
                assert!(left <= user_part + 6, "{user}: {out}");
            }
        }
        // The whole base64 of the secret alone is masked whole.
        assert_eq!(r.redact(&STANDARD.encode("canary-5f2b9e1d-secret")), MASK);
        // Short secrets are not looked for inside base64 (it would mask by chance).
        let short = Redactor::new();
        short.add("abc");
        assert_eq!(short.redact("eGFiYw=="), "eGFiYw==");
    }

    #[test]
    fn masks_sql_quoted_and_json_escaped() {
        let r = Redactor::new();
        r.add("it's \"x\"-pw");
        assert_eq!(r.redact("v = 'it''s \"x\"-pw'"), "v = '***'");
        assert_eq!(r.redact(r#"{"v":"it's \"x\"-pw"}"#), r#"{"v":"***"}"#);
        assert_eq!(r.redact(r#"v = 'it\'s "x"-pw'"#), "v = '***'");
    }

    #[test]
    fn a_secret_inside_another_is_masked_whole_and_learning_twice_is_free() {
        let r = Redactor::new();
        r.add("token");
        r.add("token-and-more");
        r.add("token");
        assert_eq!(r.redact("a token-and-more b token"), "a *** b ***");
        assert_eq!(format!("{r:?}"), "Redactor(2 values)");
    }

    #[test]
    fn learns_a_steps_credentials_but_not_dry_run_placeholders() {
        let r = Redactor::new();
        learn_step_credentials(
            &serde_json::json!({
                "url": "http://h/x",
                "headers": {"Authorization": "Bearer bearer-123", "X-Api-Key": "key-456", "Accept": "text/csv",
                            "X-Token": "<steps.login.token>"},
                "auth": {"type": "oauth2", "token_url": "http://h/token", "client_secret": "cs-789",
                         "username": "me", "password": "pw-000"},
                "nested": {"auth": {"type": "api_key", "name": "k", "value": "val-111"}},
            }),
            &r,
        );
        assert_eq!(
            r.redact("bearer-123 key-456 cs-789 pw-000 val-111 text/csv http://h/token me <steps.login.token>"),
            "*** *** *** *** *** text/csv http://h/token me <steps.login.token>"
        );
    }

    #[test]
    fn finds_literal_secret_names() {
        assert_eq!(
            literal_secret_names(
                "{{ secret('A_1') }} {{ secret( \"B\" ) | b64 }} {{ secret(name) }} {{ my_secret('C') }} {{ x.secret('D') }} {{ secret('E' ~ x) }} {{ secret('"
            ),
            ["A_1", "B"]
        );
    }

    #[test]
    fn safe_split_never_cuts_through_a_secret() {
        let r = Redactor::new();
        assert_eq!(r.safe_split("aaaa", 2), 2);
        r.add("s3cret-value");
        let text = "aaaaaas3cret-valuebbb";
        assert_eq!(r.safe_split(text, 8), 6);
        assert_eq!(r.safe_split(text, 6), 6);
        assert_eq!(r.safe_split(text, 18), 18);
        assert_eq!(
            r.safe_split("s3cret-value", 4),
            4,
            "a secret at 0 cannot move"
        );
        assert_eq!(r.safe_split("aé", 2), 1, "char boundary");
    }
}
