//! When scheduled runs fire, which ticks to plan after downtime, and what a tick does while
//! runs of the same integration are running. Pure: no IO, no clock (every function takes
//! `now` or `after`), no store; `pipe serve` (the `service` crate) and `pipe schedule next`
//! call it, and the store keeps what it returns.
//!
//! # Fire times and DST ([`next_after`], decision 0018)
//!
//! A cron schedule is read on the wall clock of its `timezone`. Wall clocks jump twice a
//! year, and croner alone gets both jumps wrong (inside the repeated hour it returns a time
//! in the past; at the autumn change it skips 01:00 of the second offset). So the matching is
//! done by croner on *naive* wall-clock times (croner in UTC, which has no DST), and each
//! matching wall-clock time `n` is mapped to an instant by one rule: **the first instant at
//! which the wall clock shows `n` or later**. That gives:
//!
//! - a time that exists once fires then;
//! - a time that does not exist (spring forward, e.g. 02:30 in New York on 2024-03-10, or
//!   midnight in São Paulo on 2018-11-04) fires once, at the first valid instant after the
//!   gap (03:00 EDT; 01:00 -02). All nonexistent times of one gap collapse to that instant,
//!   which fires once;
//! - a time that happens twice (fall back, e.g. 01:30 in New York on 2024-11-03) fires once,
//!   at its first occurrence (01:30 EDT); the repeated hour fires nothing, so `*/15 * * * *`
//!   has a one-hour hole there. Use `interval:` (or `timezone: UTC`) for evenly spaced runs.
//!
//! [`next_after`] returns the first fire time strictly after `after`, so iterating it gives
//! strictly increasing instants, never a duplicate and never one in the past.
//!
//! An `interval` schedule steps in UTC, at the multiples of the interval since the Unix
//! epoch (`15m` fires at :00, :15, :30, :45 UTC whatever the start time), so every process
//! computes the same ticks; the timezone only matters for display and templates.
//!
//! # Tick planning ([`plan_ticks`])
//!
//! The service keeps a [`Cursor`] per integration: the instant up to which ticks have been
//! planned and the schedule's [`ScheduleSpec::fingerprint`] (cron or interval, and timezone).
//! Each call plans the ticks in `(cursor.through, now]` and returns the new cursor (`now`):
//!
//! - no cursor (first start, or a re-enable: the caller passes `None`), a changed
//!   fingerprint (the cron or the timezone was edited), or `enabled: false`: nothing is due
//!   and the cursor restarts at `now`. Past ticks are never unleashed;
//! - a cursor later than `now` (the clock went back): nothing is due, the cursor is kept;
//! - otherwise the latest tick at or before `now` is *current* and older ones are *missed*
//!   (their successor was already due when they were planned: the service was down or
//!   behind). `catch_up: none` plans the current tick only if it is at most
//!   [`ScheduleSpec::grace`] late (default [`DEFAULT_GRACE`], 60 s); `latest` plans the
//!   current tick; `all` plans every tick, the newest `max_catch_up` of them (older ones are
//!   dropped, and [`TickPlan::dropped_since`] says from when).
//!
//! The work is bounded whatever the downtime: at most `max_catch_up` ticks are kept, found
//! by searching windows that double back from `now`.
//!
//! Exactly-once is the store's job (a unique key on (integration, scheduled instant)); this
//! crate only guarantees that one cursor never plans the same instant twice.
//!
//! # Overlap ([`decide_overlap`])
//!
//! Given how many runs of the integration are running and queued, a new run starts when
//! fewer than `max_concurrent_runs` are active (running + queued); otherwise `on_overlap`
//! decides: `skip`, `queue` (while fewer than [`OverlapPolicy::queue_cap`] wait, else skip),
//! or `cancel_running` (cancel the oldest running runs that keep it from a slot, then
//! start). Duplicates (the same tick twice) are merged by the store's unique key, not here.
//! [`decide_ticks`] decides a whole [`TickPlan`] at once: a single tick follows `on_overlap`;
//! several ticks are a catch-up (asked for by `catch_up: all`), and each of them queues behind
//! the others (up to `max_catch_up` waiting, [`OverlapPolicy::for_catch_up`]) instead of being
//! skipped for overlapping the ticks it came with.

mod cron;
mod overlap;
mod ticks;

pub use cron::CronExpr;
pub use engine::model::{CatchUp, OnOverlap};
pub use overlap::{
    decide_overlap, decide_ticks, OverlapDecision, OverlapPolicy, DEFAULT_QUEUE_CAP,
};
pub use ticks::{plan_ticks, ticks_between, Cursor, TickPlan};

/// The first instant at which `tz`'s wall clock shows `naive` or later: the instant itself,
/// the first of a repeated time, or the end of the gap a skipped time falls in. The rule
/// fire times follow; `None` only out of chrono's range.
pub fn wall_clock_instant(tz: Tz, naive: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
    cron::first_instant_showing(tz, naive)
}

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use engine::model::{ScheduleConfig, ScheduleTrigger};
use std::fmt;
use std::time::Duration;

/// How late the current tick may be planned under `catch_up: none` and still run.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// What fires a schedule.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// A cron expression on the timezone's wall clock.
    Cron(Box<CronExpr>),
    /// Every `secs` seconds (at least 1), at multiples of it since the Unix epoch.
    Interval { secs: u64 },
}

/// A schedule ready to compute fire times: the plan's `schedule:` with the cron parsed.
#[derive(Debug, Clone)]
pub struct ScheduleSpec {
    pub trigger: Trigger,
    pub timezone: Tz,
    pub enabled: bool,
    /// At least 1.
    pub max_concurrent_runs: u32,
    pub on_overlap: OnOverlap,
    pub catch_up: CatchUp,
    /// At least 1.
    pub max_catch_up: u32,
    pub pause_after_failures: Option<u32>,
    /// How late the current tick may be under `catch_up: none` (not a file key).
    pub grace: Duration,
}

/// The name the shared brief uses.
pub type Schedule = ScheduleSpec;

/// A schedule that cannot be used (a cron that does not parse, a zero interval).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError(pub String);

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ScheduleError {}

impl ScheduleSpec {
    /// From a validated plan's schedule (`plan.schedule`).
    pub fn from_config(config: &ScheduleConfig) -> Result<Self, ScheduleError> {
        let mut spec = match &config.trigger {
            ScheduleTrigger::Cron(expr) => Self::cron(expr, config.timezone)?,
            ScheduleTrigger::Interval(d) => Self::interval(*d)?,
        };
        spec.timezone = config.timezone;
        spec.enabled = config.enabled;
        spec.max_concurrent_runs = config.max_concurrent_runs.max(1);
        spec.on_overlap = config.on_overlap;
        spec.catch_up = config.catch_up;
        spec.max_catch_up = config.max_catch_up.max(1);
        spec.pause_after_failures = config.pause_after_failures;
        Ok(spec)
    }

    /// The plan's schedule, if it has one.
    pub fn from_plan(plan: &engine::plan::Plan) -> Result<Option<Self>, ScheduleError> {
        plan.schedule.as_ref().map(Self::from_config).transpose()
    }

    /// A cron schedule with the defaults of every other key.
    pub fn cron(expr: &str, timezone: Tz) -> Result<Self, ScheduleError> {
        let cron = cron::CronExpr::parse(expr)?;
        Ok(Self::with_trigger(Trigger::Cron(Box::new(cron)), timezone))
    }

    /// An interval schedule (whole seconds, at least 1) with the defaults of every other key.
    pub fn interval(every: Duration) -> Result<Self, ScheduleError> {
        if every.subsec_nanos() != 0 || every.as_secs() == 0 {
            return Err(ScheduleError(format!(
                "an interval is a whole number of seconds, at least 1s (found {every:?})"
            )));
        }
        Ok(Self::with_trigger(
            Trigger::Interval {
                secs: every.as_secs(),
            },
            chrono_tz::UTC,
        ))
    }

    fn with_trigger(trigger: Trigger, timezone: Tz) -> Self {
        ScheduleSpec {
            trigger,
            timezone,
            enabled: true,
            max_concurrent_runs: 1,
            on_overlap: OnOverlap::default(),
            catch_up: CatchUp::default(),
            max_catch_up: engine::model::DEFAULT_MAX_CATCH_UP,
            pause_after_failures: None,
            grace: DEFAULT_GRACE,
        }
    }

    /// What determines the fire times, as a stable string: a cursor made under another
    /// fingerprint restarts from "now" ([`plan_ticks`]). 16 hex digits of FNV-1a over the
    /// normalized cron (fields joined by one space) and the timezone, or over the interval
    /// (an interval's ticks do not depend on the timezone). Stable across versions and
    /// machines.
    pub fn fingerprint(&self) -> String {
        let text = match &self.trigger {
            Trigger::Cron(c) => format!("cron:{}\ntz:{}", c.normalized(), self.timezone.name()),
            Trigger::Interval { secs } => format!("interval:{secs}"),
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The schedule as written: `cron "0 6 * * *" in America/Sao_Paulo`, `every 15m`.
    pub fn describe(&self) -> String {
        match &self.trigger {
            Trigger::Cron(c) => format!("cron \"{}\" in {}", c.normalized(), self.timezone),
            Trigger::Interval { secs } => {
                format!("every {} (UTC, from the Unix epoch)", human_secs(*secs))
            }
        }
    }

    /// Whether `consecutive_failures` failed runs in a row should pause the integration.
    pub fn should_pause(&self, consecutive_failures: u32) -> bool {
        self.pause_after_failures
            .is_some_and(|n| consecutive_failures >= n)
    }
}

fn human_secs(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

/// The first fire time strictly after `after` (see the crate docs for DST), or `None` when
/// the schedule never fires again (`0 0 30 2 *`, or past the year 262143).
pub fn next_after(spec: &ScheduleSpec, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match &spec.trigger {
        Trigger::Interval { secs } => {
            let step = i64::try_from(*secs).ok()?;
            let k = after.timestamp().div_euclid(step).checked_add(1)?;
            DateTime::from_timestamp(k.checked_mul(step)?, 0)
        }
        Trigger::Cron(c) => c.next_after(spec.timezone, after),
    }
}

/// The next `count` fire times after `after` (fewer when the schedule ends).
pub fn upcoming(spec: &ScheduleSpec, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
    let mut out = Vec::with_capacity(count.min(10_000));
    let mut t = after;
    while out.len() < count {
        match next_after(spec, t) {
            Some(next) => {
                out.push(next);
                t = next;
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests;
