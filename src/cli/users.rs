//! `pipe users` and `pipe tokens`: the REST API's users and machine tokens, managed on the
//! store directly (for the first admin, and for scripts on the server's machine).
//!
//! Passwords are read from a file or stdin, never from the command line (argv is visible
//! to every user of the machine in `ps`, and lands in shell history).

use super::runs::Format;
use anyhow::{anyhow, bail, Context, Result};
use chrono::Utc;
use std::io::BufRead;
use std::path::PathBuf;
use store::Role;

#[derive(Debug, clap::Subcommand)]
pub enum UsersCommand {
    /// Add a user (the password from --password-file, else the first line of stdin).
    Add {
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Set a user's password (from --password-file, else the first line of stdin).
    Passwd {
        name: String,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Change a user's role.
    Role {
        name: String,
        #[arg(value_parser = parse_role)]
        role: Role,
    },
    /// Stop a user from logging in (their tokens stop working at their next use).
    Disable { name: String },
    /// Let a disabled user log in again.
    Enable { name: String },
    /// End every session of a user (a lost laptop, a leaked token): the access and refresh
    /// tokens issued to them so far are refused; they log in again.
    Logout { name: String },
    /// Remove a user.
    Delete { name: String },
    /// Every user.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Create a machine token; it is printed once and stored only as its hash.
    Create {
        /// What it is for (`ci`, `prometheus`).
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// Every machine token (never the token itself).
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Revoke a machine token.
    Revoke { id: i64 },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
}

/// Who the audit trail says did it.
const ACTOR: &str = "cli";

fn read_password(file: &Option<PathBuf>) -> Result<String> {
    let line = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("--password-file {}", f.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    server::auth::check_password(&line).map_err(|p| anyhow!(p.detail))?;
    Ok(line)
}

fn finish(r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn time(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn users_main(cmd: UsersCommand, cfg: &store::StoreConfig) -> i32 {
    finish((|| {
        let store = store::open(cfg).context("cannot open the store")?;
        let a = store.accounts();
        let now = Utc::now();
        match cmd {
            UsersCommand::Add {
                name,
                role,
                password_file,
            } => {
                server::api::users::check_user_name(&name).map_err(|p| anyhow!(p.detail))?;
                let hash = server::auth::hash_password(&read_password(&password_file)?)?;
                a.add_user(&name, &hash, role, ACTOR, now)?;
                println!("user {name} added ({role})");
            }
            UsersCommand::Passwd {
                name,
                password_file,
            } => {
                if a.get_user(&name)?.is_none() {
                    bail!("no user `{name}`");
                }
                let hash = server::auth::hash_password(&read_password(&password_file)?)?;
                a.set_password(&name, &hash, ACTOR, now)?;
                println!("password of {name} changed");
            }
            UsersCommand::Role { name, role } => {
                a.set_role(&name, role, ACTOR, now)?;
                println!("{name} is now {role}");
            }
            UsersCommand::Disable { name } => {
                a.set_user_disabled(&name, true, ACTOR, now)?;
                println!("user {name} disabled");
            }
            UsersCommand::Enable { name } => {
                a.set_user_disabled(&name, false, ACTOR, now)?;
                println!("user {name} enabled");
            }
            UsersCommand::Logout { name } => {
                a.end_sessions(&name, ACTOR, now)?;
                println!("every session of {name} ended: their tokens are refused from now on");
            }
            UsersCommand::Delete { name } => {
                if !a.delete_user(&name, ACTOR, now)? {
                    bail!("no user `{name}`");
                }
                println!("user {name} deleted");
            }
            UsersCommand::List { format } => {
                let users = a.list_users()?;
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&users)?),
                    Format::Text if users.is_empty() => {
                        println!("no users (`pipe users add NAME --role admin`)")
                    }
                    Format::Text => {
                        let rows: Vec<Vec<String>> = users
                            .iter()
                            .map(|u| {
                                vec![
                                    u.name.clone(),
                                    u.role.to_string(),
                                    if u.disabled_at.is_some() {
                                        "disabled".into()
                                    } else {
                                        "enabled".into()
                                    },
                                    time(u.created_at),
                                ]
                            })
                            .collect();
                        print!(
                            "{}",
                            super::table(&["NAME", "ROLE", "STATE", "CREATED"], &rows)
                        );
                    }
                }
            }
        }
        Ok(())
    })())
}

pub fn tokens_main(cmd: TokensCommand, cfg: &store::StoreConfig) -> i32 {
    finish((|| {
        let store = store::open(cfg).context("cannot open the store")?;
        let a = store.accounts();
        match cmd {
            TokensCommand::Create { name, role } => {
                let (token, hash) = server::auth::new_api_token();
                let id = a.add_api_token(&name, &hash, role, ACTOR, Utc::now())?;
                eprintln!("machine token {id} ({name}, {role}); it is shown only now:");
                println!("{token}");
            }
            TokensCommand::List { format } => {
                let tokens = a.list_api_tokens()?;
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&tokens)?),
                    Format::Text if tokens.is_empty() => println!("no machine tokens"),
                    Format::Text => {
                        let rows: Vec<Vec<String>> = tokens
                            .iter()
                            .map(|t| {
                                vec![
                                    t.id.to_string(),
                                    t.name.clone(),
                                    t.role.to_string(),
                                    t.created_by.clone(),
                                    t.last_used_at.map(time).unwrap_or_else(|| "-".into()),
                                    t.revoked_at
                                        .map(|r| format!("revoked {}", time(r)))
                                        .unwrap_or_else(|| "live".into()),
                                ]
                            })
                            .collect();
                        print!(
                            "{}",
                            super::table(
                                &["ID", "NAME", "ROLE", "BY", "LAST USED", "STATE"],
                                &rows
                            )
                        );
                    }
                }
            }
            TokensCommand::Revoke { id } => {
                if !a.revoke_api_token(id, ACTOR, Utc::now())? {
                    bail!("no live machine token {id}");
                }
                println!("machine token {id} revoked");
            }
        }
        Ok(())
    })())
}
