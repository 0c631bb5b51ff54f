//! The redactor: every secret value `pipe` learns is replaced by `***` wherever text leaves
//! the process (stdout, stderr, log rows, history, errors, the panic hook).
//!
//! Values are learnt as they appear (a `secret()` call, a secret connection field, a
//! `secret: true` output) together with the forms they commonly take on the wire
//! (URL-encoded, base64, JSON-escaped), so a derived header is caught too. One redactor is
//! shared by the whole run; writers call [`Redactor::redact`] on every string they emit.

use base64::Engine as _;
use std::sync::{Arc, RwLock};

pub const MASK: &str = "***";

#[derive(Clone, Default)]
pub struct Redactor {
    inner: Arc<RwLock<Vec<String>>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Redactor({} values)",
            self.inner.read().map(|v| v.len()).unwrap_or(0)
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
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut forms = vec![
            value.to_string(),
            percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
            b64.encode(value),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value),
            serde_json::to_string(value)
                .unwrap_or_default()
                .trim_matches('"')
                .to_string(),
        ];
        // Multi-line secrets (key files) are also caught line by line.
        if value.contains('\n') {
            forms.extend(
                value
                    .lines()
                    .filter(|l| l.trim().len() >= 8)
                    .map(|l| l.trim().to_string()),
            );
        }
        let mut set = self.inner.write().unwrap();
        for f in forms {
            if f.len() >= 3 && !set.contains(&f) {
                set.push(f);
            }
        }
        // Longest first, so a value that contains another is masked whole.
        set.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// Learn a user:password pair as used by HTTP Basic auth.
    pub fn add_basic_auth(&self, user: &str, password: &str) {
        let b64 = base64::engine::general_purpose::STANDARD;
        self.add(password);
        self.add(&b64.encode(format!("{user}:{password}")));
    }

    pub fn is_empty(&self) -> bool {
        self.inner.read().unwrap().is_empty()
    }

    pub fn redact(&self, text: &str) -> String {
        let set = self.inner.read().unwrap();
        let mut out = text.to_string();
        for s in set.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
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
}
