//! `--sandbox`: the local fakes for one run, and what the run's names resolve to.
//!
//! The validated plan is not touched: each connection kind's own `sandbox` hook (registered
//! with the kind in `steps::registry()`) says what its connections become against the
//! fakes, and the result travels with the run as connection overrides; `secret()`/`env()`
//! take the values of the pipeline's `sandbox:` block, rendered over the fakes' values.

use chrono::{DateTime, Utc};
use engine::plan::Plan;
use engine::secrets::Redactor;
use engine::step::Registry;
use engine::template::{Overrides, Runtime, Templates};
use std::path::Path;

/// The fakes of one run and what its names resolve to.
pub(crate) struct Attached {
    pub fakes: sandbox::Sandbox,
    /// `env`, `secrets` and `connections` (the secret source is the runner's to set).
    pub overrides: Overrides,
    /// The fakes' anchor date: the run's default logical date, so the same command extracts
    /// the same data every time.
    pub anchor: DateTime<Utc>,
}

/// Start the fakes and resolve the plan's connections and `sandbox:` block against them.
pub(crate) async fn attach(
    plan: &Plan,
    registry: &Registry,
    state_dir: &Path,
) -> Result<Attached, String> {
    let mut options = sandbox::Options::from_env().map_err(|e| format!("PIPE_SANDBOX: {e:#}"))?;
    // The fake BigQuery keeps its tables under pipe's state dir, where `pipe sandbox
    // tables` (and anyone with a Parquet reader) can read what was loaded.
    options
        .state_dir
        .get_or_insert_with(|| state_dir.to_path_buf());
    let anchor = options.anchor;
    let fakes = sandbox::Sandbox::start(options)
        .await
        .map_err(|e| format!("cannot start the local fakes: {e:#}"))?;
    match overrides(plan, registry, &fakes.values()) {
        Ok(overrides) => Ok(Attached {
            fakes,
            overrides,
            anchor,
        }),
        Err(e) => {
            fakes.shutdown().await;
            Err(e)
        }
    }
}

fn overrides(
    plan: &Plan,
    registry: &Registry,
    values: &serde_json::Value,
) -> Result<Overrides, String> {
    let connections = registry
        .connections
        .sandbox_overrides(&plan.connections, values)?;
    // The `sandbox:` block, rendered with `sandbox` = the fakes' values.
    let scratch = Templates::new(Runtime {
        redactor: Redactor::new(),
        tz: plan.timezone(),
        logical_date: Utc::now(),
        dry_run: false,
        overrides: Default::default(),
    });
    let scope = engine::template::Scope::new(
        minijinja::Value::UNDEFINED,
        minijinja::Value::UNDEFINED,
        minijinja::Value::UNDEFINED,
    )
    .with("sandbox", minijinja::Value::from_serialize(values));
    let mut overrides = Overrides {
        connections,
        ..Default::default()
    };
    for (target, source) in [
        (&mut overrides.secrets, &plan.sandbox.secrets),
        (&mut overrides.env, &plan.sandbox.env),
    ] {
        for (name, template) in source {
            let v = scratch
                .render_str(template, &scope)
                .map_err(|e| format!("sandbox.{name}: {e}"))?;
            target.insert(
                name.clone(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            );
        }
    }
    Ok(overrides)
}

/// What the fakes received (requests, logins, logouts, results), for the run's summary.
pub(crate) fn stats(fakes: &sandbox::Sandbox) -> serde_json::Value {
    let mut v = serde_json::to_value(fakes.stats()).unwrap_or_default();
    v["qockpit_results"] = fakes.qockpit_results();
    v["carol_state"] = fakes.carol_state(false);
    v
}
