//! `pipe credentials`: stored credentials, their private part sealed in the store with the
//! master key (see the `credentials` crate and docs/decisions/0027-credentials.md).
//!
//! Private values never come from the command line (argv is visible to every user of the
//! machine in `ps` and lands in shell histories): `set` reads them from stdin or from files
//! named by flags (`--private-from`, `--private-file FIELD=PATH`). Nothing this command
//! prints holds one: `show` and `list` give the public part and the names of the private
//! fields that are set. Exit codes as the other store commands: 0 done, 1 refused or failed
//! (the message names the field or the credential), 2 usage.

use super::Format;
use anyhow::{anyhow, bail, Context, Result};
use credentials::{CredentialInfo, CredentialType, KeySource, MasterKey, Vault};
use serde_json::{Map, Value};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum CredentialsCommand {
    /// Create or replace a credential. Private values come from stdin (a JSON object, or
    /// `key=value` lines) or from files, never from arguments; a private field left out
    /// keeps its stored value, `null` (JSON) removes it.
    Set {
        /// The credential's name (`[a-z0-9][a-z0-9_.-]*`), what a connection's `credential:`
        /// names.
        name: String,
        /// The credential type: a connection type (`pipe credentials types`).
        #[arg(long = "type", short = 't')]
        kind: String,
        /// A public value, `key=value` (repeatable); typed by the type's schema.
        #[arg(long = "public", value_name = "KEY=VALUE")]
        public: Vec<String>,
        /// Read the private values from this file (a JSON object or `key=value` lines)
        /// instead of stdin.
        #[arg(long, value_name = "FILE")]
        private_from: Option<PathBuf>,
        /// One private value from a file, `key=PATH` (repeatable): the file's contents (a
        /// key JSON, a password file).
        #[arg(long = "private-file", value_name = "KEY=PATH")]
        private_files: Vec<String>,
        /// Read no private values (only the public part changes; stored private values stay).
        #[arg(long, conflicts_with_all = ["private_from"])]
        no_private: bool,
    },
    /// List the credentials (public part and which private fields are set).
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show a credential's public part and the names of its private fields.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Delete a credential.
    Delete { name: String },
    /// Seal every credential again with a new master key, in one transaction. The new key
    /// is read from the file, or generated into it (mode 0600) when it does not exist.
    RotateKey {
        #[arg(long, value_name = "FILE")]
        new_key_file: PathBuf,
    },
    /// The credential types (one per connection type) with their public and private
    /// JSON Schemas.
    Types {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Make a new random master key: written to FILE (mode 0600, never replacing one), or
    /// printed when no FILE is given.
    NewKey { file: Option<PathBuf> },
    /// The audit trail of a credential (of all of them without NAME), newest first.
    Audit {
        name: Option<String>,
        /// At most this many rows (0: all).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

pub fn main(cmd: CredentialsCommand, cfg: &store::StoreConfig) -> i32 {
    match run(cmd, cfg) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// Who the audit trail says did it.
fn actor() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    format!("cli:{user}")
}

fn vault(cfg: &store::StoreConfig, key: Option<MasterKey>) -> Result<Vault> {
    let store = store::open(cfg).context("cannot open the store")?;
    Ok(Vault::new(store, super::registry().connections, key))
}

/// The master key if one is set; a key that is set but unreadable is an error.
fn current_key(cfg: &store::StoreConfig) -> Result<Option<(MasterKey, KeySource)>> {
    Ok(credentials::load_key(&cfg.state_dir)?)
}

fn json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn run(cmd: CredentialsCommand, cfg: &store::StoreConfig) -> Result<()> {
    match cmd {
        CredentialsCommand::Set {
            name,
            kind,
            public,
            private_from,
            private_files,
            no_private,
        } => set(
            cfg,
            &name,
            &kind,
            &public,
            private_from,
            &private_files,
            no_private,
        ),
        CredentialsCommand::List { format } => {
            let v = vault(cfg, None)?;
            let list = v.list()?;
            match format {
                Format::Json => json(&list)?,
                Format::Text if list.is_empty() => {
                    println!("no credentials (`pipe credentials set NAME --type T` stores one)")
                }
                Format::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|c| {
                            vec![
                                c.name.clone(),
                                c.kind.clone(),
                                public_text(&c.public),
                                c.private_fields.join(", "),
                                format!("{} {}", time(c.updated_at), c.updated_by),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        super::table(
                            &["NAME", "TYPE", "PUBLIC", "PRIVATE (set)", "UPDATED"],
                            &rows
                        )
                    );
                }
            }
            Ok(())
        }
        CredentialsCommand::Show { name, format } => {
            let v = vault(cfg, None)?;
            let c = v
                .show(&name)?
                .ok_or_else(|| credentials::CredentialError::NotFound(name.clone()))?;
            match format {
                Format::Json => json(&c)?,
                Format::Text => print_credential(&c),
            }
            Ok(())
        }
        CredentialsCommand::Delete { name } => {
            let v = vault(cfg, None)?;
            if !v.delete(&name, &actor())? {
                return Err(credentials::CredentialError::NotFound(name).into());
            }
            println!("credential {name} deleted");
            Ok(())
        }
        CredentialsCommand::RotateKey { new_key_file } => rotate(cfg, &new_key_file),
        CredentialsCommand::Types { format } => {
            let types = credentials::types(&super::registry().connections);
            match format {
                Format::Json => json(&types)?,
                Format::Text => {
                    for t in &types {
                        println!("{} — {}", t.name, t.summary);
                        println!("  public:  {}", or_none(&t.public_fields()));
                        println!("  private: {}", or_none(&t.private_fields()));
                    }
                }
            }
            Ok(())
        }
        CredentialsCommand::NewKey { file } => {
            let key = MasterKey::generate();
            match file {
                Some(path) => {
                    key.write_new_file(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    println!(
                        "new master key {} written to {} (mode 0600)",
                        key.id(),
                        path.display()
                    );
                }
                None => println!("{}", key.to_base64().as_str()),
            }
            Ok(())
        }
        CredentialsCommand::Audit {
            name,
            limit,
            format,
        } => {
            let v = vault(cfg, None)?;
            let rows = v.audit(name.as_deref(), limit)?;
            match format {
                Format::Json => json(&rows)?,
                Format::Text => {
                    let rows: Vec<Vec<String>> = rows
                        .iter()
                        .map(|a| {
                            vec![
                                time(a.time),
                                a.actor.clone(),
                                a.action.clone(),
                                a.target.clone(),
                                a.detail.to_string(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        super::table(&["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"], &rows)
                    );
                }
            }
            Ok(())
        }
    }
}

fn or_none(fields: &[String]) -> String {
    if fields.is_empty() {
        "none".into()
    } else {
        fields.join(", ")
    }
}

fn public_text(public: &Map<String, Value>) -> String {
    public
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_credential(c: &CredentialInfo) {
    println!("credential {} ({})", c.name, c.kind);
    println!("  created   {}", time(c.created_at));
    println!("  updated   {} by {}", time(c.updated_at), c.updated_by);
    println!("  sealed with key {}", c.key_id);
    println!("  public:");
    if c.public.is_empty() {
        println!("    (none)");
    }
    for (k, v) in &c.public {
        match v {
            Value::String(s) => println!("    {k}: {s}"),
            other => println!("    {k}: {other}"),
        }
    }
    println!(
        "  private (set, write-only): {}",
        or_none(&c.private_fields)
    );
}

/// `text` as the value of property `field` of `schema`: text where the property takes a
/// string, else JSON (a number, a mapping), else text (the type's check says what is wrong).
fn typed(schema: &Value, field: &str, text: &str) -> Value {
    let prop = &schema["properties"][field];
    let takes_string = match &prop["type"] {
        Value::String(t) => t == "string",
        Value::Array(ts) => ts.iter().any(|t| t == "string"),
        _ => false,
    };
    if takes_string {
        return Value::String(text.to_string());
    }
    serde_json::from_str(text.trim()).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Private values: a JSON object, or `key=value` lines (blank lines and `#` comments
/// skipped). The error never quotes the text.
fn parse_private(text: &str, ty: &CredentialType, from: &str) -> Result<Map<String, Value>> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) | Err(_) => bail!("{from}: not a JSON object (its text is not shown)"),
        };
    }
    let mut out = Map::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!(
                "{from}, line {}: expected `key=value` or a JSON object (the line is not shown)",
                i + 1
            );
        };
        let k = k.trim();
        out.insert(k.to_string(), typed(&ty.private_schema, k, v));
    }
    Ok(out)
}

fn set(
    cfg: &store::StoreConfig,
    name: &str,
    kind: &str,
    public_args: &[String],
    private_from: Option<PathBuf>,
    private_files: &[String],
    no_private: bool,
) -> Result<()> {
    let types = credentials::types(&super::registry().connections);
    let Some(ty) = types.iter().find(|t| t.name == kind) else {
        // The vault says it best (with the known types and a did-you-mean).
        vault(cfg, None)?.set(name, kind, Map::new(), Map::new(), &actor())?;
        unreachable!("an unknown type is refused");
    };
    let mut public = Map::new();
    for item in public_args {
        let Some((k, v)) = item.split_once('=') else {
            bail!("--public expects KEY=VALUE, got `{item}`");
        };
        if ty.private_fields().iter().any(|f| f == k) {
            bail!(
                "`{k}` is private: give it on stdin, with --private-from FILE or --private-file {k}=PATH, never as an argument"
            );
        }
        public.insert(k.to_string(), typed(&ty.public_schema, k, v));
    }
    let mut private = if no_private {
        Map::new()
    } else if let Some(path) = &private_from {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        parse_private(&text, ty, &path.display().to_string())?
    } else if !private_files.is_empty() && std::io::stdin().is_terminal() {
        Map::new()
    } else {
        let mut text = String::new();
        if std::io::stdin().is_terminal() {
            eprintln!(
                "private values of {kind} credential {name} ({}), as key=value lines or a JSON object; end with Ctrl-D:",
                or_none(&ty.private_fields())
            );
        }
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the private values from stdin")?;
        parse_private(&text, ty, "stdin")?
    };
    for item in private_files {
        let Some((k, path)) = item.split_once('=') else {
            bail!("--private-file expects KEY=PATH, got `{item}`");
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        private.insert(k.to_string(), typed(&ty.private_schema, k, text));
    }
    let (key, source, created_key) = credentials::load_or_create_key(&cfg.state_dir)?;
    if created_key {
        eprintln!(
            "note: created the master key {} in {source} (mode 0600); keep a copy elsewhere, \
             and set {} from a secret instead where the state dir is backed up or shared",
            key.id(),
            credentials::MASTER_KEY_VAR
        );
    }
    let v = vault(cfg, Some(key))?;
    let saved = v.set(name, kind, public, private, &actor())?;
    let changed = if saved.changed.is_empty() {
        "nothing changed".to_string()
    } else {
        format!("changed: {}", saved.changed.join(", "))
    };
    println!(
        "credential {name} {} ({kind}; {changed})",
        if saved.created { "created" } else { "saved" }
    );
    Ok(())
}

fn rotate(cfg: &store::StoreConfig, new_key_file: &std::path::Path) -> Result<()> {
    let (old, source) = current_key(cfg)?.ok_or(credentials::CredentialError::NoMasterKey)?;
    let new = if new_key_file.exists() {
        MasterKey::read_file(new_key_file)?
    } else {
        let key = MasterKey::generate();
        key.write_new_file(new_key_file)
            .with_context(|| format!("cannot create {}", new_key_file.display()))?;
        eprintln!(
            "generated the new master key {} into {} (mode 0600)",
            key.id(),
            new_key_file.display()
        );
        key
    };
    if new == old {
        bail!(
            "the new key is the current key ({}); nothing to rotate",
            old.id()
        );
    }
    let v = vault(cfg, Some(old.clone()))?;
    let n = v.rotate_key(&new, &actor())?;
    println!(
        "{n} credential(s) sealed again: key {} -> {}",
        old.id(),
        new.id()
    );
    match source {
        KeySource::Default(path) => {
            new.replace_file(&path)
                .map_err(|e| anyhow!("the credentials now need key {} (in {}), but {} could not be replaced: {e}", new.id(), new_key_file.display(), path.display()))?;
            println!("{} now holds the new key", path.display());
        }
        other => println!(
            "now give pipe the new key: replace {other} with the contents of {} (every process that runs pipelines needs it)",
            new_key_file.display()
        ),
    }
    Ok(())
}
