//! Running one claimed queue item to its end: the part the service's embedded workers and
//! remote workers (`pipe worker`) share, so neither copies it.
//!
//! A claimed item becomes a run through the [`crate::Launcher`]; while it runs, its cancel
//! requests (`pipe runs cancel`, `on_overlap: cancel_running`) are polled from the store and
//! the end of a drain cancels it; once it finished its item is acked, and a failed run may
//! pause its integration (`pause_after_failures`).

use crate::catalog::Integration;
use crate::serve::log;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use store::{AckOutcome, QueueItem, RunStore, Status};
use tokio_util::sync::CancellationToken;

/// How often a running run's cancel request is looked for.
const CANCEL_POLL: Duration = Duration::from_millis(500);

/// Run a store call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<dyn RunStore>,
    f: impl FnOnce(&dyn RunStore) -> store::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || f(store.as_ref())).await??)
}

/// Ack a claimed item (`Done`: its run finished; `Cancelled`: given up); a failure is logged
/// (the item stays claimed until its claimer's lease expires, then goes back to the queue).
pub(crate) async fn ack(store: &Arc<dyn RunStore>, item: i64, outcome: AckOutcome) {
    if let Err(e) = blocking(store, move |s| s.ack(item, outcome, Utc::now())).await {
        log(format!("cannot ack queue item {item}: {e:#}"));
    }
}

/// What running claimed items needs.
pub(crate) struct Runs {
    pub store: Arc<dyn RunStore>,
    pub launcher: Arc<dyn crate::Launcher>,
    /// Cancelled when a drain's time is over: running runs are cancelled.
    pub drain_over: CancellationToken,
}

/// The drain: wait for `running` (the runs in progress) for `timeout`, or until `hurry`;
/// then cancel them (`drain_over`; their teardown steps run) and wait for them to end.
pub(crate) async fn drain(
    running: impl std::future::Future<Output = ()>,
    timeout: Duration,
    hurry: &CancellationToken,
    drain_over: &CancellationToken,
) {
    tokio::pin!(running);
    tokio::select! {
        _ = &mut running => {}
        _ = async {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                _ = hurry.cancelled() => {}
            }
        } => {
            log(format!(
                "drain timeout ({}) passed: cancelling the running runs (teardown steps run)",
                engine::duration::human(timeout)
            ));
            drain_over.cancel();
            running.await;
        }
    }
}

/// How a run of a claimed item ended.
pub(crate) struct Finished {
    pub run_id: i64,
    pub cancelled_at_drain: bool,
}

impl Runs {
    /// Start a run of the claimed `item` of `integration` (recorded under `owner`, fenced by
    /// the claim when `fenced`), call `started` with its run id, wait for it, ack the item.
    /// `None` when no run could be started (the item is then given up, and logged).
    pub(crate) async fn run(
        &self,
        who: &str,
        integration: &Integration,
        item: QueueItem,
        owner: &str,
        fenced: bool,
        started: impl FnOnce(i64),
    ) -> Option<Finished> {
        let job = crate::Job {
            plan: integration.plan.clone(),
            source: Some(integration.source.clone()),
            queue_item: item.clone(),
            lease_owner: owner.to_string(),
            fenced,
            store: self.store.clone(),
        };
        let handle = match self.launcher.start(job).await {
            Ok(h) => h,
            Err(e) => {
                log(format!(
                    "{who}: cannot start a run of {} (item {}): {e:#}",
                    item.integration, item.id
                ));
                // No run was recorded: the item is given up, not done.
                ack(&self.store, item.id, AckOutcome::Cancelled).await;
                return None;
            }
        };
        let run_id = handle.run_id;
        started(run_id);
        log(format!(
            "{who}: run {run_id} of {} started ({}{})",
            item.integration,
            item.trigger,
            item.logical_date
                .map(|d| format!(
                    ", logical date {}",
                    d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ))
                .unwrap_or_default()
        ));
        let crate::RunHandle {
            cancel, mut done, ..
        } = handle;
        let mut cancelled_at_drain = false;
        let end = loop {
            tokio::select! {
                end = &mut done => break end.unwrap_or(crate::RunEnd {
                    status: Status::Failed,
                    recorded: false,
                }),
                _ = self.drain_over.cancelled(), if !cancelled_at_drain => {
                    cancelled_at_drain = true;
                    cancel.cancel();
                }
                _ = tokio::time::sleep(CANCEL_POLL) => {
                    let requested = blocking(&self.store, move |s| s.cancel_requested(run_id)).await;
                    if matches!(requested, Ok(true)) && !cancel.is_cancelled() {
                        log(format!("run {run_id}: cancel requested"));
                        cancel.cancel();
                    }
                }
            }
        };
        let status = end.status;
        if !end.recorded {
            ack(&self.store, item.id, AckOutcome::Done).await;
        }
        log(format!(
            "{who}: run {run_id} of {} {}",
            item.integration,
            status.label()
        ));
        if status == Status::Failed {
            self.pause_if_failing(integration, run_id).await;
        }
        Some(Finished {
            run_id,
            cancelled_at_drain,
        })
    }

    /// `pause_after_failures: N`: disable after N consecutive failed runs.
    async fn pause_if_failing(&self, integration: &Integration, last_run: i64) {
        let Some(limit) = integration
            .plan
            .schedule
            .as_ref()
            .and_then(|s| s.pause_after_failures)
        else {
            return;
        };
        let name = integration.name.clone();
        let result = blocking(&self.store, move |s| {
            let failures = s.consecutive_failures(&name)?;
            if failures >= limit {
                let changed = s.set_enabled(&name, false, Utc::now())?;
                return Ok(Some((failures, changed)));
            }
            Ok(None)
        })
        .await;
        match result {
            Ok(Some((failures, true))) => {
                log(format!(
                    "integration {}: paused (disabled) after {failures} consecutive failed runs (pause_after_failures: {limit}); `pipe integrations enable {}` resumes it",
                    integration.name, integration.name
                ));
                self.launcher
                    .paused(
                        integration.plan.clone(),
                        last_run,
                        failures,
                        self.store.clone(),
                    )
                    .await;
            }
            Ok(_) => {}
            Err(e) => log(format!(
                "integration {}: cannot check pause_after_failures: {e:#}",
                integration.name
            )),
        }
    }
}
