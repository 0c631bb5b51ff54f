//! `pipe schedule next FILE`: the coming fire times of a pipeline's schedule, in UTC and on
//! the schedule's wall clock, so a user can see what a cron does across DST changes before
//! `pipe serve` runs it. The times come from the `scheduler` crate, the same code the
//! service uses.

use super::Format;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum ScheduleCommand {
    /// Print the coming fire times of FILE's schedule (UTC and local time).
    Next(NextArgs),
}

#[derive(clap::Args)]
pub struct NextArgs {
    /// The pipeline file.
    pub path: PathBuf,
    /// Start after this time instead of now: RFC 3339 (`2024-11-03T05:00:00Z`), or a date or
    /// `YYYY-MM-DDTHH:MM[:SS]` on the schedule's wall clock.
    #[arg(long)]
    pub after: Option<String>,
    /// How many fire times (1 to 10000).
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// The most fire times one command prints.
const MAX_COUNT: usize = 10_000;

fn usage(msg: impl std::fmt::Display) -> i32 {
    eprintln!("error: {msg}");
    2
}

pub fn main(cmd: ScheduleCommand) -> i32 {
    match cmd {
        ScheduleCommand::Next(args) => next(args),
    }
}

fn next(args: NextArgs) -> i32 {
    if args.count == 0 || args.count > MAX_COUNT {
        return usage(format!(
            "--count must be from 1 to {MAX_COUNT} (got {})",
            args.count
        ));
    }
    let display = args.path.display().to_string();
    let outcome = engine::validate::validate_file(&args.path, &display, &super::registry());
    let Some(plan) = outcome.plan else {
        for d in &outcome.diagnostics {
            eprintln!("{d}");
        }
        return usage(format!("{display} is not a valid pipeline"));
    };
    let spec = match scheduler::ScheduleSpec::from_plan(&plan) {
        Ok(Some(spec)) => spec,
        Ok(None) => {
            return usage(format!(
                "{display} has no `schedule:` (add e.g. `schedule: {{ cron: \"0 6 * * *\", timezone: UTC }}`)"
            ))
        }
        Err(e) => return usage(format!("{display}: {e}")),
    };
    let tz = spec.timezone;
    let after = match args.after.as_deref() {
        None => Utc::now(),
        Some(text) => match parse_after(text, tz) {
            Ok(t) => t,
            Err(e) => return usage(e),
        },
    };
    let fires = scheduler::upcoming(&spec, after, args.count);
    let local = |t: &DateTime<Utc>| {
        t.with_timezone(&tz)
            .to_rfc3339_opts(SecondsFormat::Secs, false)
    };
    let utc = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    match args.format {
        Format::Json => {
            let value = serde_json::json!({
                "pipeline": plan.name,
                "schedule": spec.describe(),
                "timezone": tz.name(),
                "enabled": spec.enabled,
                "after": utc(&after),
                "fires": fires
                    .iter()
                    .map(|t| serde_json::json!({ "utc": utc(t), "local": local(t) }))
                    .collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&value).expect("json"));
        }
        Format::Text => {
            let disabled = if spec.enabled {
                ""
            } else {
                " (disabled: `enabled: false`)"
            };
            println!(
                "{}: {}{disabled}, after {}",
                plan.name,
                spec.describe(),
                utc(&after)
            );
            let mut offset = offset_of(&after, tz);
            let rows: Vec<Vec<String>> = fires
                .iter()
                .map(|t| {
                    let now = offset_of(t, tz);
                    let note = if now != offset {
                        format!("UTC offset {now} (was {offset})")
                    } else {
                        String::new()
                    };
                    offset = now;
                    vec![utc(t), local(t), note]
                })
                .collect();
            print!("{}", super::table(&["UTC", tz.name(), ""], &rows));
            if fires.len() < args.count {
                println!("(the schedule fires no more)");
            }
        }
    }
    0
}

fn offset_of(t: &DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format("%:z").to_string()
}

/// RFC 3339, else a wall-clock date or date-time in `tz` (a repeated time is its first
/// occurrence, a skipped one the end of the gap, as for fire times).
fn parse_after(text: &str, tz: Tz) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let naive = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
        .ok_or_else(|| {
            format!("--after: expected an RFC 3339 time (2024-11-03T05:00:00Z), a date or YYYY-MM-DDTHH:MM on the schedule's clock, got `{text}`")
        })?;
    scheduler::wall_clock_instant(tz, naive)
        .ok_or_else(|| format!("--after: `{text}` is out of range"))
}
