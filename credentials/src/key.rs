//! The master key and the sealing of a credential's private part.
//!
//! - XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`): an AEAD whose 24-byte nonce is
//!   large enough to pick at random for every seal (no counter to keep across processes
//!   and machines that share one store), constant-time in software on every CPU.
//! - Associated data: the format version, the credential's name, its type and the names of
//!   its private fields. A sealed value copied into another row (or a field list edited in
//!   the clear envelope) no longer opens: it is refused, never read as the other's.
//! - The key's id is a fingerprint (SHA-256 of a label and the key, 12 hex digits), kept
//!   with each sealed value, so a wrong key is a clear error naming both ids instead of an
//!   authentication failure, and rotation can tell what is left to re-seal. It tells
//!   nothing usable about the key.
//!
//! Where the key comes from, in order: `PIPE_MASTER_KEY` (32 bytes as base64 or hex),
//! `PIPE_MASTER_KEY_FILE` (a file holding that text, or the 32 raw bytes: a mounted
//! secret), else `<state dir>/master.key` when it exists. Only `pipe credentials set`
//! creates that default file (mode 0600, never overwritten), so `pipe` works out of the box
//! on one machine; a deployment that keeps its store elsewhere (PostgreSQL) or backs the
//! state dir up should set the key from a secret instead: a key beside the ciphertext
//! protects nothing from whoever copies both. See docs/decisions/0027-credentials.md.

use crate::CredentialError;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The variable holding the master key (base64 or hex of 32 bytes).
pub const MASTER_KEY_VAR: &str = "PIPE_MASTER_KEY";
/// The variable naming a file that holds the master key.
pub const MASTER_KEY_FILE_VAR: &str = "PIPE_MASTER_KEY_FILE";
/// The default key file in the state dir (created by the first `pipe credentials set`).
pub const DEFAULT_KEY_FILE: &str = "master.key";

/// The format of sealed values ([`Sealed::v`]).
const VERSION: u32 = 1;
const ALGORITHM: &str = "xchacha20poly1305";

/// A 32-byte master key. Its bytes are wiped when it is dropped and never printed: `Debug`
/// shows its id only.
#[derive(Clone)]
pub struct MasterKey {
    bytes: Zeroizing<[u8; 32]>,
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl PartialEq for MasterKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && *self.bytes == *other.bytes
    }
}

/// Where the master key was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `PIPE_MASTER_KEY`.
    Env,
    /// `PIPE_MASTER_KEY_FILE`.
    File(PathBuf),
    /// `<state dir>/master.key`.
    Default(PathBuf),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Env => write!(f, "{MASTER_KEY_VAR}"),
            KeySource::File(p) => write!(f, "{MASTER_KEY_FILE_VAR} ({})", p.display()),
            KeySource::Default(p) => write!(f, "the key file {}", p.display()),
        }
    }
}

impl MasterKey {
    /// A new random key (from the operating system's generator).
    pub fn generate() -> MasterKey {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).expect("the operating system's random generator");
        MasterKey::from_bytes(*bytes)
    }

    /// The key of these 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"pipe master key id\0");
        h.update(bytes);
        let id = hex::encode(&h.finalize()[..6]);
        MasterKey {
            bytes: Zeroizing::new(bytes),
            id,
        }
    }

    /// 32 bytes written as hex (64 digits) or base64 (standard or URL-safe, padded or not).
    /// The error never quotes the text.
    pub fn parse(text: &str) -> Result<MasterKey, String> {
        let text = text.trim();
        let decoded = Zeroizing::new(
            if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                hex::decode(text).map_err(|e| e.to_string())?
            } else {
                let t = text.trim_end_matches('=');
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(t)
                    .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
                    .map_err(|_| "it is neither hex nor base64".to_string())?
            },
        );
        let bytes: [u8; 32] = decoded.as_slice().try_into().map_err(|_| {
            format!(
                "it decodes to {} bytes, not 32 (make one with `pipe credentials new-key`)",
                decoded.len()
            )
        })?;
        Ok(MasterKey::from_bytes(bytes))
    }

    /// A key file: the key as text ([`MasterKey::parse`]) or its 32 raw bytes.
    pub fn read_file(path: &Path) -> Result<MasterKey, CredentialError> {
        let bad = |why: String| CredentialError::BadKey(format!("{}: {why}", path.display()));
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
        if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
            if std::str::from_utf8(&raw).map_or(true, |t| MasterKey::parse(t).is_err()) {
                return Ok(MasterKey::from_bytes(raw));
            }
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not a key".into()))?;
        MasterKey::parse(text).map_err(bad)
    }

    /// The key's fingerprint (12 hex digits), stored with what it sealed.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as base64 text (what a key file holds).
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.bytes.as_ref()))
    }

    /// Write the key to a new file, readable by its owner only (mode 0600); an existing file
    /// is never replaced.
    pub fn write_new_file(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(self.to_base64().as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    }

    /// Replace a key file by this key (a rotation of the default file): written beside it
    /// (0600) and renamed over it, so the file is always one whole key.
    pub fn replace_file(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("new-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        self.write_new_file(&tmp)?;
        std::fs::rename(&tmp, path)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&(*self.bytes).into())
    }
}

/// The master key as the environment and the state dir give it ([`KeySource`] order);
/// `None` when none is set.
pub fn load_key(state_dir: &Path) -> Result<Option<(MasterKey, KeySource)>, CredentialError> {
    if let Some(v) = std::env::var_os(MASTER_KEY_VAR).filter(|v| !v.is_empty()) {
        let text = Zeroizing::new(v.to_string_lossy().into_owned());
        let key = MasterKey::parse(&text)
            .map_err(|why| CredentialError::BadKey(format!("{MASTER_KEY_VAR}: {why}")))?;
        return Ok(Some((key, KeySource::Env)));
    }
    if let Some(p) = std::env::var_os(MASTER_KEY_FILE_VAR).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(p);
        return Ok(Some((MasterKey::read_file(&path)?, KeySource::File(path))));
    }
    let default = state_dir.join(DEFAULT_KEY_FILE);
    if default.exists() {
        return Ok(Some((
            MasterKey::read_file(&default)?,
            KeySource::Default(default),
        )));
    }
    Ok(None)
}

/// [`load_key`], or a new key written to `<state dir>/master.key` (mode 0600) when none is
/// set; true when it was created.
pub fn load_or_create_key(
    state_dir: &Path,
) -> Result<(MasterKey, KeySource, bool), CredentialError> {
    if let Some((key, source)) = load_key(state_dir)? {
        return Ok((key, source, false));
    }
    let path = state_dir.join(DEFAULT_KEY_FILE);
    let key = MasterKey::generate();
    match key.write_new_file(&path) {
        Ok(()) => Ok((key, KeySource::Default(path), true)),
        // Another process made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((
            MasterKey::read_file(&path)?,
            KeySource::Default(path),
            false,
        )),
        Err(e) => Err(CredentialError::BadKey(format!(
            "cannot create the key file {}: {e}",
            path.display()
        ))),
    }
}

/// What the `sealed` column holds: a JSON envelope. The private fields' names are in clear
/// (listing a credential needs no key) and authenticated (they are in the associated data).
#[derive(Serialize, Deserialize)]
pub(crate) struct Sealed {
    pub v: u32,
    pub alg: String,
    /// The names of the private fields inside.
    pub fields: Vec<String>,
    /// base64 of the 24-byte nonce.
    pub nonce: String,
    /// base64 of the ciphertext and its tag.
    pub data: String,
}

impl Sealed {
    pub fn parse(text: &str) -> Option<Sealed> {
        serde_json::from_str(text).ok()
    }
}

fn associated_data(name: &str, kind: &str, fields: &[String]) -> Vec<u8> {
    let mut aad = format!("pipe credential v{VERSION}\0{name}\0{kind}\0").into_bytes();
    aad.extend(fields.join(",").as_bytes());
    aad
}

/// Seal a credential's private fields (a JSON object) for the row `name` of type `kind`.
pub(crate) fn seal(
    key: &MasterKey,
    name: &str,
    kind: &str,
    private: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let fields: Vec<String> = private.keys().cloned().collect();
    let plain = Zeroizing::new(serde_json::to_vec(private).expect("JSON"));
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).expect("the operating system's random generator");
    let data = key
        .cipher()
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &plain,
                aad: &associated_data(name, kind, &fields),
            },
        )
        .expect("XChaCha20-Poly1305 seals any length we store");
    serde_json::to_string(&Sealed {
        v: VERSION,
        alg: ALGORITHM.into(),
        fields,
        nonce: b64.encode(nonce),
        data: b64.encode(data),
    })
    .expect("JSON")
}

/// Open what [`seal`] sealed for the same row; `None` when it does not open (altered, moved
/// from another row, or another key).
pub(crate) fn open(
    key: &MasterKey,
    name: &str,
    kind: &str,
    sealed: &str,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let s = Sealed::parse(sealed).filter(|s| s.v == VERSION && s.alg == ALGORITHM)?;
    let nonce: [u8; 24] = b64.decode(&s.nonce).ok()?.try_into().ok()?;
    let data = b64.decode(&s.data).ok()?;
    let plain = Zeroizing::new(
        key.cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &data,
                    aad: &associated_data(name, kind, &s.fields),
                },
            )
            .ok()?,
    );
    serde_json::from_slice(&plain).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private() -> serde_json::Map<String, serde_json::Value> {
        serde_json::json!({"api_key": "k-123456"})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn a_sealed_value_opens_only_in_its_own_row_with_its_own_key() {
        let key = MasterKey::generate();
        let sealed = seal(&key, "carol-prod", "carol", &private());
        assert!(!sealed.contains("k-123456"));
        assert_eq!(open(&key, "carol-prod", "carol", &sealed), Some(private()));
        assert_eq!(open(&key, "carol-dev", "carol", &sealed), None);
        assert_eq!(open(&key, "carol-prod", "http", &sealed), None);
        assert_eq!(
            open(&MasterKey::generate(), "carol-prod", "carol", &sealed),
            None
        );
        // The clear field list is authenticated too.
        let edited = sealed.replace("\"api_key\"", "\"password\"");
        assert_eq!(open(&key, "carol-prod", "carol", &edited), None);
        // A fresh nonce each time.
        assert_ne!(sealed, seal(&key, "carol-prod", "carol", &private()));
    }

    #[test]
    fn keys_parse_from_hex_base64_and_raw_files() {
        let key = MasterKey::from_bytes([7u8; 32]);
        let hex = hex::encode([7u8; 32]);
        assert_eq!(MasterKey::parse(&hex).unwrap(), key);
        assert_eq!(MasterKey::parse(&key.to_base64()).unwrap(), key);
        assert_eq!(
            MasterKey::parse(&format!(" {}\n", key.to_base64().trim_end_matches('='))).unwrap(),
            key
        );
        let short = MasterKey::parse("c2hvcnQ=").unwrap_err();
        assert!(short.contains("5 bytes, not 32"), "{short}");
        assert!(MasterKey::parse("not a key!").is_err());
        assert_eq!(key.id().len(), 12);
        assert_eq!(format!("{key:?}"), format!("MasterKey({})", key.id()));

        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.key");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        assert_eq!(MasterKey::read_file(&raw).unwrap(), key);
        let text = dir.path().join("sub/text.key");
        key.write_new_file(&text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&text).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(MasterKey::read_file(&text).unwrap(), key);
        assert!(key.write_new_file(&text).is_err(), "never overwritten");
        let other = MasterKey::generate();
        other.replace_file(&text).unwrap();
        assert_eq!(MasterKey::read_file(&text).unwrap(), other);
    }
}
