//! `pipe serve`: the integration service on one machine.
//!
//! The service loads every pipeline of a folder as an integration ([`catalog`]), keeps
//! watching the folder, plans each schedule's ticks and enqueues them in the store (the one
//! place that decides "this tick exists once"), and runs N workers in the same process that
//! claim queued runs from the store and start them through a [`Launcher`] (the runner, the
//! one run path `pipe run` uses too). Every decision that must survive a crash (ticks,
//! queue, leases, enabled flags) lives in the store, never only in this process's memory: a
//! restart, a second server on the same PostgreSQL or a `kill -9` changes nothing about
//! which runs exist. See [`serve`] for the tasks and docs/decisions/0023-service.md.
//!
//! With a broker (`pipe serve --broker`), the server also publishes each queued run to
//! RabbitMQ (`publish`: the store is the outbox), and [`worker`] is `pipe worker`: the same
//! run path on other machines, taking runs from RabbitMQ and claiming them in the store
//! (`runs` is the part both kinds of worker share). docs/decisions/0026-workers.md.

pub mod catalog;
mod publish;
mod runs;
pub mod serve;
pub mod worker;

pub use catalog::{Catalog, Change, Integration};
pub use serve::{ServeConfig, ServeReport, Service};

use engine::plan::Plan;
use engine::status::Status;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A claimed queue item to run.
pub struct Job {
    /// The integration's loaded version.
    pub plan: Arc<Plan>,
    /// Its text as validated (the run keeps it), when the service read it.
    pub source: Option<Arc<str>>,
    /// What was queued: trigger, logical date (the tick's instant), params (`name` →
    /// text as given to `pipe trigger --param`, typed by the plan's declarations).
    pub queue_item: store::QueueItem,
    /// The lease owner id the run is recorded under.
    pub lease_owner: String,
    /// Record the run under the claim's fencing token ([`store::QueueItem::fence`]) and
    /// fence its history writes: a remote worker's runs, whose claim can be taken away.
    pub fenced: bool,
    pub store: Arc<dyn store::RunStore>,
}

/// A started run.
pub struct RunHandle {
    pub run_id: i64,
    /// Cancel the run (running steps stop; teardown steps still run).
    pub cancel: CancellationToken,
    /// How it ended, once it did.
    pub done: tokio::sync::oneshot::Receiver<RunEnd>,
}

/// How a started run ended.
#[derive(Debug, Clone, Copy)]
pub struct RunEnd {
    pub status: Status,
    /// Its end is recorded in the store, which marked its queue item done in the same
    /// transaction: no ack is needed (one write less per run).
    pub recorded: bool,
}

/// Starts runs for the workers: the seam between the service and the run path, so the
/// service never builds an executor itself (and its tests can count runs without steps).
#[async_trait::async_trait]
pub trait Launcher: Send + Sync {
    /// Record the run (linked to its queue item, owned by the lease owner) and start it.
    /// An error means no run was recorded.
    async fn start(&self, job: Job) -> anyhow::Result<RunHandle>;

    /// `pause_after_failures` just disabled the integration of `plan` after `failures`
    /// failed runs in a row, the last being `last_run`: send its `notify: on: [paused]`
    /// notifications. Errors are the implementation's to log; the default sends nothing.
    async fn paused(
        &self,
        _plan: Arc<Plan>,
        _last_run: i64,
        _failures: u32,
        _store: Arc<dyn store::RunStore>,
    ) {
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use engine::step::Registry;

    /// A `log` step type that does nothing: the engine alone knows no step types.
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Log {
        #[allow(dead_code)]
        message: String,
    }

    #[async_trait::async_trait]
    impl engine::step::StepConfig for Log {
        const TYPE: &'static str = "log";
        const SUMMARY: &'static str = "test";
        async fn run(
            self,
            _: engine::step::StepContext,
        ) -> Result<engine::step::StepOutput, engine::step::StepError> {
            unreachable!("service unit tests never run steps")
        }
    }

    pub fn registry() -> Registry {
        let mut r = Registry::new();
        r.register(engine::step::StepKind::of::<Log>());
        r
    }
}
