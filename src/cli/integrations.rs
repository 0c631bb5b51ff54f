//! `pipe integrations`, `pipe trigger` and `pipe backfill`: what an operator does to the
//! integrations of a running (or stopped) service. They only talk to the store: the service
//! picks up enabled flags, manual runs and backfills from there.

use super::Format;

#[derive(clap::Subcommand, Debug)]
pub enum IntegrationsCommand {
    /// List the integrations the store knows, with their state.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show one integration: metadata, schedule, last and next run, load error.
    Show {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Enable an integration: its schedule resumes from now (no catch-up of the pause).
    Enable { name: String },
    /// Disable an integration: it is neither scheduled nor triggered until enabled.
    Disable { name: String },
}

#[derive(clap::Args, Debug)]
pub struct TriggerArgs {
    /// The integration.
    pub name: String,
    /// A param value, `name=value` (repeatable).
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Queue priority (higher first; scheduled runs have the integration's priority).
    #[arg(long)]
    pub priority: Option<i64>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackfillArgs {
    #[command(subcommand)]
    pub cmd: Option<BackfillCommand>,
    /// The integration to backfill.
    #[arg(required = true)]
    pub name: Option<String>,
    /// The first instant of the range (`2026-01-31` or RFC 3339), inclusive.
    #[arg(long, required = true)]
    pub from: Option<String>,
    /// The last instant of the range, inclusive (a date means that day's end).
    #[arg(long, required = true)]
    pub to: Option<String>,
    /// How many of the backfill's runs may run at once.
    #[arg(long, default_value_t = 1)]
    pub max_parallel: u32,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(clap::Subcommand, Debug)]
pub enum BackfillCommand {
    /// List backfills with their progress.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Cancel a backfill: its queued runs are removed, running ones cancelled.
    Cancel { id: i64 },
}

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, NaiveDate, Utc};
use std::sync::Arc;
use store::{Enqueue, RunStore, Trigger};

fn finish(result: Result<i32>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn open(cfg: &store::StoreConfig) -> Result<Arc<dyn RunStore>> {
    store::open(cfg).context("cannot open the store")
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The integration, or a clear error naming the known ones.
fn integration(store: &dyn RunStore, name: &str) -> Result<store::Integration> {
    if let Some(i) = store.get_integration(name)? {
        return Ok(i);
    }
    let known: Vec<String> = store
        .list_integrations()?
        .into_iter()
        .map(|i| i.name)
        .collect();
    let hint = engine::diag::did_you_mean(name, known.iter().map(String::as_str))
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default();
    bail!(
        "no integration `{name}`{hint} (integrations are the pipelines `pipe serve` has loaded; known: {})",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )
}

/// An integration that may be queued now: loaded, not removed, enabled.
fn runnable(store: &dyn RunStore, name: &str) -> Result<store::Integration> {
    let i = integration(store, name)?;
    if i.removed {
        bail!("integration `{name}`: its file is gone from the served folder; nothing is queued");
    }
    if !i.enabled {
        bail!("integration `{name}` is disabled; nothing is queued (`pipe integrations enable {name}` first)");
    }
    Ok(i)
}

/// The integration's file as it is now, validated (for params and the schedule).
fn plan_of(i: &store::Integration) -> Result<engine::plan::Plan> {
    let path = i
        .path
        .as_deref()
        .ok_or_else(|| anyhow!("integration `{}` has no loaded file", i.name))?;
    let outcome =
        engine::validate::validate_file(std::path::Path::new(path), path, &super::registry());
    outcome.plan.ok_or_else(|| {
        anyhow!(
            "integration `{}`: {path} does not validate now; fix it first (`pipe validate {path}`)",
            i.name
        )
    })
}

/// `--param name=value` items typed by the plan's declarations.
fn typed_params(
    plan: &engine::plan::Plan,
    given: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut pairs = Vec::new();
    for item in given {
        let Some((name, text)) = item.split_once('=') else {
            bail!("--param expects NAME=VALUE, got `{item}`");
        };
        pairs.push((name, serde_json::Value::String(text.to_string())));
    }
    server::ops::typed_params(plan, pairs.iter().map(|(n, v)| (*n, v)), false)
        .map_err(|e| anyhow!(e.message))
}

/// Is a `pipe serve` alive on this store (a live lease of a `serve` owner)?
fn server_alive(store: &dyn RunStore) -> bool {
    let now = Utc::now();
    store.list_leases().is_ok_and(|leases| {
        leases.iter().any(|l| {
            l.kind == store::LeaseKind::Owner && l.name.starts_with("serve-") && l.expires_at > now
        })
    })
}

pub fn integrations_main(cmd: IntegrationsCommand, cfg: &store::StoreConfig) -> i32 {
    finish((|| {
        let store = open(cfg)?;
        match cmd {
            IntegrationsCommand::List { format } => {
                let list = store.list_integrations()?;
                match format {
                    Format::Json => json(&list)?,
                    Format::Text if list.is_empty() => {
                        println!("no integrations (`pipe serve DIR` loads a folder of pipelines)")
                    }
                    Format::Text => {
                        let rows: Vec<Vec<String>> = list
                            .iter()
                            .map(|i| {
                                vec![
                                    i.name.clone(),
                                    state(i).to_string(),
                                    i.next_run_at.map(time).unwrap_or_else(|| "-".into()),
                                    i.last_run
                                        .as_ref()
                                        .map(|r| {
                                            format!(
                                                "{} {} {}",
                                                r.id,
                                                r.status.label(),
                                                time(r.started_at)
                                            )
                                        })
                                        .unwrap_or_else(|| "-".into()),
                                    i.metadata["group"].as_str().unwrap_or("-").to_string(),
                                    if i.load_error.is_some() {
                                        "load error".into()
                                    } else {
                                        String::new()
                                    },
                                ]
                            })
                            .collect();
                        print!(
                            "{}",
                            super::table(
                                &["NAME", "STATE", "NEXT RUN", "LAST RUN", "GROUP", ""],
                                &rows
                            )
                        );
                    }
                }
            }
            IntegrationsCommand::Show { name, format } => {
                let i = integration(store.as_ref(), &name)?;
                match format {
                    Format::Json => json(&i)?,
                    Format::Text => print_integration(&i),
                }
            }
            IntegrationsCommand::Enable { name } => {
                integration(store.as_ref(), &name)?;
                if store.set_enabled(&name, true, Utc::now())? {
                    println!("integration {name} enabled; its schedule resumes from now");
                } else {
                    println!("integration {name} was already enabled");
                }
            }
            IntegrationsCommand::Disable { name } => {
                integration(store.as_ref(), &name)?;
                if store.set_enabled(&name, false, Utc::now())? {
                    println!("integration {name} disabled: it is neither scheduled nor triggered (running runs finish)");
                } else {
                    println!("integration {name} was already disabled");
                }
            }
        }
        Ok(0)
    })())
}

fn state(i: &store::Integration) -> &'static str {
    if i.removed {
        "removed"
    } else if i.enabled {
        "enabled"
    } else {
        "disabled"
    }
}

fn print_integration(i: &store::Integration) {
    println!("integration {}", i.name);
    let mut fields: Vec<(&str, String)> = vec![("state", state(i).to_string())];
    if let Some(d) = &i.description {
        fields.push(("description", d.clone()));
    }
    for key in ["group", "direction", "external_system", "owner", "schedule"] {
        if let Some(v) = i.metadata.get(key).and_then(|v| v.as_str()) {
            fields.push((key, v.to_string()));
        }
    }
    if let Some(tags) = i.metadata.get("tags").and_then(|t| t.as_array()) {
        if !tags.is_empty() {
            let tags: Vec<&str> = tags.iter().filter_map(|t| t.as_str()).collect();
            fields.push(("tags", tags.join(", ")));
        }
    }
    fields.push(("queue", format!("{} (priority {})", i.queue, i.priority)));
    if let Some(m) = i.max_concurrent_runs {
        fields.push(("max runs", m.to_string()));
    }
    if let Some(p) = &i.path {
        fields.push(("file", p.clone()));
    }
    if let Some(t) = i.loaded_at {
        fields.push(("loaded", time(t)));
    }
    if let Some(t) = i.next_run_at {
        fields.push(("next run", time(t)));
    }
    if let Some(r) = &i.last_run {
        fields.push((
            "last run",
            format!(
                "{} {} ({}, {})",
                r.id,
                r.status.label(),
                r.trigger,
                time(r.started_at)
            ),
        ));
    }
    for (k, v) in fields {
        println!("{:<14}{v}", format!("{k}:"));
    }
    if let Some(e) = &i.load_error {
        println!(
            "\nthe file's latest version did not load{} (the previous one stays in use):\n{e}",
            i.load_error_at
                .map(|t| format!(" at {}", time(t)))
                .unwrap_or_default()
        );
    }
}

pub fn trigger_main(args: TriggerArgs, cfg: &store::StoreConfig) -> i32 {
    finish((|| {
        let store = open(cfg)?;
        let i = runnable(store.as_ref(), &args.name)?;
        let params = if args.params.is_empty() {
            serde_json::Map::new()
        } else {
            typed_params(&plan_of(&i)?, &args.params)?
        };
        let mut e = Enqueue::new(&i.name, Trigger::Manual);
        e.queue = i.queue.clone();
        e.priority = args.priority.unwrap_or(i.priority);
        e.params = serde_json::Value::Object(params);
        let q = store.enqueue(&e, Utc::now())?;
        let alive = server_alive(store.as_ref());
        match args.format {
            Format::Json => json(&serde_json::json!({
                "item": q.id, "merged": q.merged, "integration": i.name,
                "priority": e.priority, "server_running": alive,
            }))?,
            Format::Text => {
                println!(
                    "queued a run of {} (queue item {}, priority {})",
                    i.name, q.id, e.priority
                );
                if !alive {
                    println!(
                        "no `pipe serve` is running on this store: the run starts when one does"
                    );
                }
            }
        }
        Ok(0)
    })())
}

/// A date (`2026-01-31`, in the schedule's timezone; as `--to`, that day's end) or an RFC 3339 time.
fn parse_instant(
    text: &str,
    tz: chrono_tz::Tz,
    end_of_day: bool,
    flag: &str,
) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| anyhow!("{flag}: expected 2026-01-31 or an RFC 3339 time, got `{text}`"))?;
    let day = if end_of_day {
        day.succ_opt().unwrap_or(day)
    } else {
        day
    };
    let local = day.and_hms_opt(0, 0, 0).expect("midnight");
    // Midnight may not exist (a DST gap at midnight): the first instant after it.
    let t = (0..=180)
        .find_map(|m| {
            (local + chrono::Duration::minutes(m))
                .and_local_timezone(tz)
                .earliest()
        })
        .ok_or_else(|| anyhow!("{flag}: `{text}` has no midnight in {tz}"))?
        .with_timezone(&Utc);
    Ok(if end_of_day {
        t - chrono::Duration::seconds(1)
    } else {
        t
    })
}

pub fn backfill_main(args: BackfillArgs, cfg: &store::StoreConfig) -> i32 {
    finish((|| {
        let store = open(cfg)?;
        match args.cmd {
            Some(BackfillCommand::List { format }) => {
                let list = store.list_backfills(None)?;
                match format {
                    Format::Json => json(&list)?,
                    Format::Text if list.is_empty() => println!("no backfills"),
                    Format::Text => {
                        let rows: Vec<Vec<String>> = list
                            .iter()
                            .map(|b| {
                                vec![
                                    b.id.to_string(),
                                    b.integration.clone(),
                                    time(b.from),
                                    time(b.to),
                                    b.state.to_string(),
                                    b.queued.to_string(),
                                    b.claimed.to_string(),
                                    b.done.to_string(),
                                    b.cancelled.to_string(),
                                ]
                            })
                            .collect();
                        print!(
                            "{}",
                            super::table(
                                &[
                                    "ID",
                                    "INTEGRATION",
                                    "FROM",
                                    "TO",
                                    "STATE",
                                    "QUEUED",
                                    "RUNNING",
                                    "DONE",
                                    "CANCELLED"
                                ],
                                &rows
                            )
                        );
                    }
                }
                Ok(0)
            }
            Some(BackfillCommand::Cancel { id }) => {
                let (n, cancelled) = server::ops::cancel_backfill(store.as_ref(), id)?;
                println!("backfill {id} cancelled: {n} queued run(s) removed, {cancelled} running run(s) asked to cancel");
                Ok(0)
            }
            None => {
                let name = args.name.expect("clap requires NAME");
                let i = runnable(store.as_ref(), &name)?;
                let plan = plan_of(&i)?;
                let Some(config) = plan.schedule.as_ref() else {
                    bail!("integration `{name}` has no schedule: a backfill queues one run per scheduled tick (use `pipe trigger` for a single run)");
                };
                let spec = scheduler::ScheduleSpec::from_config(config)
                    .map_err(|e| anyhow!("integration `{name}`: {e}"))?;
                let from = parse_instant(
                    args.from.as_deref().expect("required"),
                    spec.timezone,
                    false,
                    "--from",
                )?;
                let to = parse_instant(
                    args.to.as_deref().expect("required"),
                    spec.timezone,
                    true,
                    "--to",
                )?;
                if args.max_parallel == 0 {
                    bail!("--max-parallel must be at least 1");
                }
                let ticks = server::ops::backfill_ticks(&name, &spec, from, to)
                    .map_err(|e| anyhow!(e.replace("`to`", "--to").replace("`from`", "--from")))?;
                let id = server::ops::queue_backfill(
                    store.as_ref(),
                    &i,
                    from,
                    to,
                    &ticks,
                    args.max_parallel,
                )?;
                match args.format {
                    Format::Json => json(&serde_json::json!({
                        "id": id, "integration": name, "runs": ticks.len(),
                        "first": time(ticks[0]), "last": time(*ticks.last().unwrap()),
                        "max_parallel": args.max_parallel,
                    }))?,
                    Format::Text => println!(
                        "backfill {id} of {name}: {} run(s) queued, {} to {}, at most {} at once (`pipe backfill list`, `pipe backfill cancel {id}`)",
                        ticks.len(), time(ticks[0]), time(*ticks.last().unwrap()), args.max_parallel
                    ),
                }
                if args.format == Format::Text && !server_alive(store.as_ref()) {
                    println!(
                        "no `pipe serve` is running on this store: the runs start when one does"
                    );
                }
                Ok(0)
            }
        }
    })())
}
