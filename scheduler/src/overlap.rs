//! What a new run of an integration does while others are running: `max_concurrent_runs`
//! and `on_overlap`, with a capped queue.

use crate::{OnOverlap, ScheduleSpec};

/// How many runs of one integration may wait in the queue by default: enough for a burst of
/// triggers, never an unbounded backlog.
pub const DEFAULT_QUEUE_CAP: usize = 10;

/// The inputs of [`decide_overlap`] that come from the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlapPolicy {
    /// At least 1 (0 is read as 1).
    pub max_concurrent_runs: u32,
    pub on_overlap: OnOverlap,
    /// The most runs of this integration waiting in the queue.
    pub queue_cap: usize,
}

impl Default for OverlapPolicy {
    /// What a pipeline without a schedule gets: one run at a time, new runs skipped.
    fn default() -> Self {
        OverlapPolicy {
            max_concurrent_runs: 1,
            on_overlap: OnOverlap::Skip,
            queue_cap: DEFAULT_QUEUE_CAP,
        }
    }
}

impl OverlapPolicy {
    /// The schedule's policy, for its current (newest) tick and for triggers.
    pub fn of(spec: &ScheduleSpec) -> Self {
        OverlapPolicy {
            max_concurrent_runs: spec.max_concurrent_runs,
            on_overlap: spec.on_overlap,
            queue_cap: DEFAULT_QUEUE_CAP,
        }
    }

    /// For the older ticks of a catch-up (`catch_up: all`): they queue behind each other, up
    /// to `max_catch_up`, whatever `on_overlap` says (they were asked for).
    pub fn for_catch_up(spec: &ScheduleSpec) -> Self {
        OverlapPolicy {
            max_concurrent_runs: spec.max_concurrent_runs,
            on_overlap: OnOverlap::Queue,
            queue_cap: (spec.max_catch_up as usize).max(DEFAULT_QUEUE_CAP),
        }
    }
}

/// What to do with a new run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlapDecision {
    /// A slot is free: enqueue it, it starts as soon as a worker takes it.
    Start,
    /// No slot: enqueue it to wait for one.
    Queue,
    /// No slot (or the queue is full): do not enqueue; record the tick as skipped.
    Skip,
    /// Cancel the `cancel` oldest running runs, then enqueue it.
    CancelRunning { cancel: usize },
}

impl OverlapDecision {
    /// Whether the new run goes into the queue.
    pub fn enqueues(self) -> bool {
        !matches!(self, OverlapDecision::Skip)
    }
}

/// Decide for a new run, given how many runs of the integration are `running` and how many
/// are `queued` (waiting, not started).
pub fn decide_overlap(policy: &OverlapPolicy, running: usize, queued: usize) -> OverlapDecision {
    let max = policy.max_concurrent_runs.max(1) as usize;
    let active = running.saturating_add(queued);
    if active < max {
        return OverlapDecision::Start;
    }
    let queue_or_skip = if queued < policy.queue_cap {
        OverlapDecision::Queue
    } else {
        OverlapDecision::Skip
    };
    match policy.on_overlap {
        OnOverlap::Skip => OverlapDecision::Skip,
        OnOverlap::Queue => queue_or_skip,
        OnOverlap::CancelRunning => {
            // Free one slot for the new run: the waiting runs keep their places.
            let cancel = (active.saturating_add(1) - max).min(running);
            if cancel == 0 {
                queue_or_skip
            } else {
                OverlapDecision::CancelRunning { cancel }
            }
        }
    }
}

/// Decide for all `due` ticks of one [`crate::TickPlan`], oldest first, given the runs that
/// were `running` and `queued` before it. One tick (the normal case) follows `on_overlap`.
/// Several ticks are a catch-up (`catch_up: all` after downtime): every one of them queues
/// behind the others, up to `max_catch_up` waiting ([`OverlapPolicy::for_catch_up`]), so the
/// newest is not skipped for overlapping the older ones it came with.
pub fn decide_ticks(
    spec: &ScheduleSpec,
    due: usize,
    running: usize,
    queued: usize,
) -> Vec<OverlapDecision> {
    if due == 1 {
        return vec![decide_overlap(&OverlapPolicy::of(spec), running, queued)];
    }
    let policy = OverlapPolicy::for_catch_up(spec);
    (0..due)
        .map(|k| decide_overlap(&policy, running, queued.saturating_add(k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use OverlapDecision::*;

    fn policy(max: u32, on_overlap: OnOverlap) -> OverlapPolicy {
        OverlapPolicy {
            max_concurrent_runs: max,
            on_overlap,
            queue_cap: 2,
        }
    }

    #[test]
    fn a_free_slot_starts_whatever_the_policy() {
        for p in [OnOverlap::Skip, OnOverlap::Queue, OnOverlap::CancelRunning] {
            assert_eq!(decide_overlap(&policy(1, p), 0, 0), Start);
            assert_eq!(decide_overlap(&policy(3, p), 1, 1), Start);
        }
    }

    #[test]
    fn skip_skips_when_full() {
        let p = policy(1, OnOverlap::Skip);
        assert_eq!(decide_overlap(&p, 1, 0), Skip);
        assert_eq!(decide_overlap(&p, 0, 1), Skip);
        assert!(!Skip.enqueues());
    }

    #[test]
    fn queue_queues_up_to_the_cap() {
        let p = policy(2, OnOverlap::Queue);
        assert_eq!(decide_overlap(&p, 2, 0), Queue);
        assert_eq!(decide_overlap(&p, 2, 1), Queue);
        assert_eq!(decide_overlap(&p, 2, 2), Skip);
        assert_eq!(decide_overlap(&p, 2, 100), Skip);
        assert!(Queue.enqueues());
    }

    #[test]
    fn cancel_running_frees_one_slot() {
        let p = policy(1, OnOverlap::CancelRunning);
        assert_eq!(decide_overlap(&p, 1, 0), CancelRunning { cancel: 1 });
        let p = policy(2, OnOverlap::CancelRunning);
        assert_eq!(decide_overlap(&p, 2, 0), CancelRunning { cancel: 1 });
        // More running than allowed (the limit was lowered): back under it.
        assert_eq!(decide_overlap(&p, 4, 0), CancelRunning { cancel: 3 });
        // A waiting run holds a slot: the running one is cancelled, at most all of them.
        assert_eq!(decide_overlap(&p, 1, 1), CancelRunning { cancel: 1 });
        // Nothing running to cancel (the queue is full of waiting runs): queue or skip.
        assert_eq!(decide_overlap(&p, 0, 2), Skip);
        let p = OverlapPolicy {
            queue_cap: 5,
            ..policy(2, OnOverlap::CancelRunning)
        };
        assert_eq!(decide_overlap(&p, 0, 2), Queue);
        assert!(CancelRunning { cancel: 1 }.enqueues());
    }

    #[test]
    fn a_catch_up_queues_every_tick_and_one_tick_follows_on_overlap() {
        let mut spec = ScheduleSpec::cron("* * * * *", chrono_tz::UTC).unwrap();
        spec.max_catch_up = 12;
        // One tick while one runs: skip (the default on_overlap).
        assert_eq!(decide_ticks(&spec, 1, 1, 0), [Skip]);
        assert_eq!(decide_ticks(&spec, 1, 0, 0), [Start]);
        // Five missed ticks, nothing running: the first starts, the rest wait, none skipped.
        assert_eq!(
            decide_ticks(&spec, 5, 0, 0),
            [Start, Queue, Queue, Queue, Queue]
        );
        // Still bounded: beyond max_catch_up waiting, the newest are skipped.
        let d = decide_ticks(&spec, 5, 1, 10);
        assert_eq!(d, [Queue, Queue, Skip, Skip, Skip]);
        assert!(decide_ticks(&spec, 0, 0, 0).is_empty());
    }

    #[test]
    fn zero_max_is_one() {
        assert_eq!(decide_overlap(&policy(0, OnOverlap::Skip), 0, 0), Start);
        assert_eq!(decide_overlap(&policy(0, OnOverlap::Skip), 1, 0), Skip);
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let p = policy(1, OnOverlap::CancelRunning);
        assert!(matches!(
            decide_overlap(&p, usize::MAX, usize::MAX),
            CancelRunning { cancel } if cancel >= usize::MAX - 1
        ));
    }
}
