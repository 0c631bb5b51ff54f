//! Stored credentials of one run: each `credential: NAME` connection of the plan resolved
//! through the [`credentials::Vault`] into a [`ConnectionOverride::Fill`] (the stored
//! fields set as literals after the connection renders, `credential` removed), and every
//! private value handed to the run's redactor before anything runs.
//!
//! Why here, before the run is recorded: a missing credential or master key fails the run
//! before any step starts, with the connection and the credential named, and the redactor
//! knows every stored secret before the first log row, output or error could show one.
//! `--sandbox` wins: a connection its fakes stand in for is not resolved (no key needed
//! offline), its `credential` key is dropped with the rest of the plan's.

use engine::connection::{ConnectionOverride, ConnectionOverrides, CREDENTIAL_KEY};
use engine::plan::Plan;
use indexmap::IndexMap;

/// A run's connection overrides with its credentials resolved, and the secrets they hold.
pub(crate) struct Resolved {
    pub connections: ConnectionOverrides,
    pub secrets: Vec<String>,
}

/// The credential names of the plan's connections, by connection (none: nothing to do).
pub(crate) fn named(plan: &Plan) -> Vec<(String, String)> {
    plan.connections
        .iter()
        .filter_map(|(name, spec)| {
            let credential = spec.fields.get(CREDENTIAL_KEY)?.as_str()?;
            Some((name.clone(), credential.to_string()))
        })
        .collect()
}

/// Resolve `named` (from [`named`]) with `vault` over what `--sandbox` made of the plan's
/// connections (`sandboxed`). Blocking (the store).
pub(crate) fn resolve(
    plan: &Plan,
    named: &[(String, String)],
    sandboxed: &ConnectionOverrides,
    vault: Option<&credentials::Vault>,
) -> Result<Resolved, String> {
    let mut out: IndexMap<String, ConnectionOverride> = sandboxed
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut secrets = Vec::new();
    for (connection, credential) in named {
        let context =
            |e: String| format!("connection `{connection}`: credential `{credential}`: {e}");
        match out.get_mut(connection) {
            // The fake stands in for the credential too.
            Some(ConnectionOverride::Patch { remove, .. }) => remove.push(CREDENTIAL_KEY.into()),
            Some(_) => {}
            None => {
                let vault = vault.ok_or_else(|| context("no store to read it from".into()))?;
                let r = vault
                    .resolve(credential)
                    .map_err(|e| context(e.to_string()))?;
                let kind = &plan.connections[connection].kind;
                if &r.kind != kind {
                    return Err(context(format!(
                        "it is a `{}` credential, and the connection is of type `{kind}`",
                        r.kind
                    )));
                }
                secrets.extend(r.secrets);
                out.insert(
                    connection.clone(),
                    ConnectionOverride::Fill {
                        values: r.fields,
                        remove: vec![CREDENTIAL_KEY.into()],
                    },
                );
            }
        }
    }
    Ok(Resolved {
        connections: ConnectionOverrides::new(out),
        secrets,
    })
}
