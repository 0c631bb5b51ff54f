//! `pipe serve`: run the integration service in the foreground (see the `service` crate).
//!
//! The CLI only parses arguments, opens the store and hands over; stopping is SIGTERM or
//! Ctrl-C (drain, then cancel), and the exit code is 0 after a clean stop.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The folder of pipeline files, each one an integration (watched while serving).
    #[arg(default_value = "pipelines")]
    pub dir: PathBuf,
    /// How many runs this server executes at once (in-process workers); 0 schedules only
    /// (with `--broker`: `pipe worker`s run the runs).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// On SIGTERM, how long running runs may take to finish before they are cancelled
    /// (their teardown steps still run).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Run every run offline against pipe's local fakes of the external services, as
    /// `pipe run --sandbox` does (each run gets its own fakes): try the service, the API
    /// and the dashboard on the real pipelines without touching Tiflux, Google or Carol.
    /// With --broker, give it to the `pipe worker`s too.
    #[arg(long)]
    pub sandbox: bool,
}

/// The REST API and the dashboard.
#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// Serve the REST API (`/api/v1/`, docs at `/api/v1/docs/`) and the dashboard (`/`) on
    /// this address (`127.0.0.1:8080`; port 0 picks a free one, logged at start).
    #[arg(long, env = "PIPE_LISTEN", value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Create this admin user at start when the store has no user yet; the password is
    /// read from PIPE_INIT_ADMIN_PASSWORD or --init-admin-password-file (never from the
    /// command line).
    #[arg(
        long,
        env = "PIPE_INIT_ADMIN",
        value_name = "NAME",
        requires = "listen"
    )]
    pub init_admin: Option<String>,
    /// A file holding the first admin's password (its first line).
    #[arg(long, value_name = "FILE", requires = "init_admin")]
    pub init_admin_password_file: Option<PathBuf>,
}

/// The variable holding the first admin's password.
pub const INIT_ADMIN_PASSWORD_VAR: &str = "PIPE_INIT_ADMIN_PASSWORD";

impl ApiArgs {
    /// The first admin's name and password, when asked for (an error when the password
    /// is missing).
    fn init_admin(&self) -> Result<Option<(String, String)>, String> {
        let Some(name) = &self.init_admin else {
            return Ok(None);
        };
        let password = match &self.init_admin_password_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| format!("--init-admin-password-file {}: {e}", f.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
            None => std::env::var(INIT_ADMIN_PASSWORD_VAR).map_err(|_| {
                format!("--init-admin {name}: set {INIT_ADMIN_PASSWORD_VAR} or give --init-admin-password-file")
            })?,
        };
        server::auth::check_password(&password)
            .map_err(|p| format!("--init-admin {name}: {}", p.detail))?;
        Ok(Some((name.clone(), password)))
    }
}

/// Bind the API's address and serve it beside the service until `shutdown`.
async fn start_api(
    state_dir: std::path::PathBuf,
    listen: std::net::SocketAddr,
    init_admin: Option<(String, String)>,
    store: Arc<dyn store::RunStore>,
    sandbox: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    if let Some((name, password)) = init_admin {
        let store = store.clone();
        let made = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
            if !store.accounts().list_users()?.is_empty() {
                return Ok(false);
            }
            let hash = server::auth::hash_password(&password)?;
            store.accounts().add_user(
                &name,
                &hash,
                store::Role::Admin,
                "cli:serve --init-admin",
                chrono::Utc::now(),
            )?;
            Ok(true)
        })
        .await??;
        service::serve::log(if made {
            "created the first admin user (--init-admin)".to_string()
        } else {
            "--init-admin: the store has users already; none was created".to_string()
        });
    }
    // Saving a credential needs the master key (PIPE_MASTER_KEY, PIPE_MASTER_KEY_FILE or
    // the state dir's key file); without one the API lists and deletes, and a save says so.
    let key = match credentials::load_key(&state_dir) {
        Ok(k) => k.map(|(key, _)| key),
        Err(e) => anyhow::bail!("cannot read the credentials' master key: {e}"),
    };
    let registry = super::registry();
    let vault = credentials::Vault::new(store.clone(), registry.connections.clone(), key);
    let config = server::ServerConfig {
        vault,
        store,
        registry: Arc::new(super::registry()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        repairs: Some(Arc::new(RunnerRepairs(Arc::new(super::registry())))),
        sandbox,
    };
    let state = server::AppState::new(config, shutdown.clone()).await?;
    service::serve::log(format!(
        "API on http://{addr}/api/v1/ (docs: http://{addr}/api/v1/docs/)"
    ));
    let app = server::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            service::serve::log(format!("the API stopped: {e}"));
        }
    }))
}

/// Repairs planned by the runner, for `POST /api/v1/runs/{id}/repair`.
struct RunnerRepairs(Arc<engine::step::Registry>);

impl server::api::runs::RepairPlanner for RunnerRepairs {
    fn plan(
        &self,
        store: &dyn store::RunStore,
        id: i64,
    ) -> server::problem::ApiResult<server::api::runs::RepairPlan> {
        use runner::repair::RepairError;
        use server::problem::Problem;
        let r = runner::repair::plan_repair(store, &self.0, id).map_err(|e| match e {
            RepairError::NoRun(_) => Problem::not_found(e.to_string()),
            RepairError::Store(_) => Problem::unavailable(e.to_string()),
            _ => Problem::conflict(e.to_string()),
        })?;
        let mut reuse: Vec<String> = r.reuse.keys().cloned().collect();
        reuse.sort();
        Ok(server::api::runs::RepairPlan {
            rerun: r
                .rerun
                .iter()
                .map(|(step, why)| server::api::runs::RerunStep {
                    step: step.clone(),
                    why: why.to_string(),
                })
                .collect(),
            reuse,
        })
    }
}

/// Where RabbitMQ is, shared by `pipe serve` and `pipe worker`.
#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// RabbitMQ (`amqp://user:password@host:5672/vhost`): `pipe serve` publishes each queued
    /// run there for `pipe worker`s on any machine; the store stays the record of the runs.
    #[arg(long, env = "PIPE_BROKER")]
    pub broker: Option<String>,
    /// The prefix of pipe's RabbitMQ queue names (pipe queue `default` is
    /// `<prefix>default`): several pipe installations can share one broker.
    #[arg(long, env = "PIPE_QUEUE_PREFIX", default_value = "pipe.")]
    pub queue_prefix: String,
}

impl BrokerArgs {
    pub fn config(&self) -> Option<broker::BrokerConfig> {
        self.broker.as_ref().map(|url| {
            let mut cfg = broker::BrokerConfig::new(url.clone());
            cfg.queue_prefix = self.queue_prefix.clone();
            cfg
        })
    }
}

pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    engine::duration::parse(text)
}

use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Serve until SIGTERM or Ctrl-C. Exit codes: 0 after a clean stop, 1 when the service
/// could not start (or failed), 2 for bad arguments.
pub fn main(args: ServeArgs, cfg: &store::StoreConfig) -> i32 {
    if args.workers == 0 && args.broker.broker.is_none() {
        eprintln!(
            "error: --workers 0 schedules only: give --broker (or PIPE_BROKER) so that `pipe worker`s run the runs"
        );
        return 2;
    }
    let broker = args.broker.config();
    let init_admin = match args.api.init_admin() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let listen = args.api.listen;
    let sandbox = args.sandbox;
    let state_dir = cfg.state_dir.clone();
    run_until_signalled(cfg, move |store, shutdown, hurry| {
        let api_store = store.clone();
        // Its own token: the API keeps answering while the runs drain, and stops after.
        let api_shutdown = CancellationToken::new();
        let config = service::ServeConfig {
            dir: args.dir,
            workers: args.workers,
            broker,
            drain_timeout: args.drain_timeout,
            registry: super::registry(),
            store,
            launcher: Arc::new(
                launcher::RunnerLauncher::new(super::registry(), &cfg.state_dir)
                    .sandboxed(args.sandbox),
            ),
            hurry,
        };
        async move {
            let api = match listen {
                Some(addr) => Some(
                    start_api(
                        state_dir,
                        addr,
                        init_admin,
                        api_store,
                        sandbox,
                        api_shutdown.clone(),
                    )
                    .await?,
                ),
                None => None,
            };
            let served = service::Service::run(config, shutdown).await.map(drop);
            // The service drained; the API stops with it (its streams end).
            api_shutdown.cancel();
            if let Some(api) = api {
                let _ = api.await;
            }
            served
        }
    })
}

/// The store, or `None` after saying why it cannot be opened.
pub(crate) fn open_store(cfg: &store::StoreConfig) -> Option<Arc<dyn store::RunStore>> {
    match store::open(cfg) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("error: cannot open the store: {e}");
            None
        }
    }
}

/// How [`run_until_signalled`] ended short of an error.
enum Ended {
    Stopped,
    /// The store could not be opened (`open_store` said why).
    NoStore,
}

/// Open the store and run a service (`pipe serve`, `pipe worker`) on a new runtime until it
/// returns: the first SIGTERM or Ctrl-C cancels its `shutdown` token (drain), a second its
/// `hurry` token (running runs are cancelled, their teardown steps still run). The handlers
/// are in place before the store is opened, so a SIGTERM while it connects is a clean stop
/// too. The exit code: 0 after a clean stop, 1 when the store cannot be opened or the
/// service failed (the error is printed).
pub(crate) fn run_until_signalled<F, Fut>(cfg: &store::StoreConfig, service: F) -> i32
where
    F: FnOnce(Arc<dyn store::RunStore>, CancellationToken, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (shutdown, hurry) = (CancellationToken::new(), CancellationToken::new());
    let result = runtime.block_on(async {
        let Some(mut signals) = super::Signals::install() else {
            anyhow::bail!("cannot install the SIGINT and SIGTERM handlers");
        };
        // On the blocking pool (the PostgreSQL backend blocks on a runtime of its own), so
        // a signal while it connects (for up to its connect timeout) stops at once.
        let cfg = cfg.clone();
        let opening = tokio::task::spawn_blocking(move || open_store(&cfg));
        let store = tokio::select! {
            opened = opening => match opened {
                Ok(Some(store)) => store,
                Ok(None) => return Ok(Ended::NoStore),
                Err(e) => anyhow::bail!("opening the store failed: {e}"),
            },
            _ = signals.recv() => {
                service::serve::log("stopped before the store was opened");
                return Ok(Ended::Stopped);
            }
        };
        let (s, h) = (shutdown.clone(), hurry.clone());
        let signals = tokio::spawn(signals.serve(
            move || s.cancel(),
            move || {
                service::serve::log("second signal: cancelling the running runs now");
                h.cancel();
            },
        ));
        let r = service(store, shutdown, hurry).await;
        signals.abort();
        r.map(|()| Ended::Stopped)
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(Ended::Stopped) => 0,
        Ok(Ended::NoStore) => 1,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// The service's [`service::Launcher`]: a claimed queue item becomes a run through the
/// runner, the one run path `pipe run` uses too.
pub(crate) mod launcher {
    use std::sync::{Arc, OnceLock};

    pub struct RunnerLauncher {
        registry: Arc<engine::step::Registry>,
        /// Every run against the local fakes (`--sandbox`).
        sandbox: bool,
        state_dir: std::path::PathBuf,
        /// One runner for all workers (they share its token caches), made at the first run:
        /// it records runs under the service's lease, known once the service started.
        runner: OnceLock<Arc<runner::Runner>>,
    }

    impl RunnerLauncher {
        pub fn new(registry: engine::step::Registry, state_dir: &std::path::Path) -> Self {
            RunnerLauncher {
                registry: Arc::new(registry),
                sandbox: false,
                state_dir: state_dir.to_path_buf(),
                runner: OnceLock::new(),
            }
        }

        /// Run every run against the local fakes (`pipe serve --sandbox`, `pipe worker
        /// --sandbox`).
        pub fn sandboxed(mut self, sandbox: bool) -> Self {
            self.sandbox = sandbox;
            self
        }

        fn runner(&self, job: &service::Job) -> Arc<runner::Runner> {
            self.runner
                .get_or_init(|| {
                    let mut config = runner::RunnerConfig::new(&self.state_dir);
                    config.registry = self.registry.clone();
                    config.store = Some(job.store.clone());
                    config.lease_owner = Some(job.lease_owner.clone());
                    Arc::new(runner::Runner::new(config))
                })
                .clone()
        }
    }

    #[async_trait::async_trait]
    impl service::Launcher for RunnerLauncher {
        /// `notify: on: [paused]`: the integration was just disabled after its failures; the
        /// summary is its last run's. What cannot be sent is logged, as for a run.
        async fn paused(
            &self,
            plan: Arc<engine::plan::Plan>,
            last_run: i64,
            failures: u32,
            store: Arc<dyn store::RunStore>,
        ) {
            let Ok(Ok(Some(d))) =
                tokio::task::spawn_blocking(move || store.get_run(last_run)).await
            else {
                return;
            };
            let r = &d.run;
            let mut summary = notify::RunSummary::started(
                &r.pipeline,
                r.id,
                r.trigger.as_str(),
                r.logical_date,
                r.started_at,
            );
            summary.status = r.status;
            summary.error = r.error.clone();
            summary.finished_at = r.finished_at;
            summary.duration_ms = r.duration_ms.unwrap_or(0);
            let redactor = engine::secrets::Redactor::new();
            let report = notify::paused(&plan, &summary, &redactor).await;
            for f in &report.failed {
                service::serve::log(format!(
                    "{}: paused after {failures} failed runs; a notification was not sent: {f}",
                    plan.name
                ));
            }
        }

        async fn start(&self, job: service::Job) -> anyhow::Result<service::RunHandle> {
            let runner = self.runner(&job);
            let item = &job.queue_item;
            let json_params = |v: &serde_json::Value| -> Vec<(String, runner::ParamValue)> {
                v.as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), runner::ParamValue::Json(v.clone())))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let mut spec = match (item.trigger, item.run_id) {
                // A queued repair: the next attempt of that run, as `pipe runs repair` does
                // (its recorded params; the steps it keeps are the runner's decision).
                (store::Trigger::Repair, Some(run_id)) => {
                    let store = job.store.clone();
                    let registry = self.registry.clone();
                    let repair = tokio::task::spawn_blocking(move || {
                        runner::repair::plan_repair(&*store, &registry, run_id)
                            .map_err(|e| anyhow::anyhow!("repair of run {run_id}: {e}"))
                    })
                    .await??;
                    let mut spec =
                        runner::RunSpec::new(runner::PlanSource::Plan(repair.plan.clone()));
                    spec.params = json_params(&repair.run.run.params);
                    spec.logical_date = repair.run.run.logical_date;
                    spec.trigger = repair.run.run.trigger;
                    spec.resume = Some(run_id);
                    spec.reuse = repair.reuse;
                    spec
                }
                _ => {
                    let source = match &job.source {
                        Some(text) => runner::PlanSource::Loaded(runner::Loaded {
                            plan: job.plan.clone(),
                            diagnostics: Vec::new(),
                            source: text.clone(),
                        }),
                        None => runner::PlanSource::Plan(job.plan.clone()),
                    };
                    let mut spec = runner::RunSpec::new(source);
                    spec.logical_date = item.logical_date;
                    spec.params = json_params(&item.params);
                    spec.trigger = item.trigger;
                    spec
                }
            };
            spec.queue_item = Some(item.id);
            spec.lease_owner = Some(job.lease_owner.clone());
            if job.fenced && item.trigger != store::Trigger::Repair {
                spec.fence = Some(item.fence);
            }
            spec.sandbox = self.sandbox;
            let prepared = match runner.prepare(spec.clone()).await {
                Ok(p) => p,
                // Its store cannot be written: nothing can be recorded (the service logs it).
                Err(e @ runner::PrepareError::History(_)) => return Err(e.into()),
                // A missing credential, a wrong param, fakes that did not start: a failed
                // run with the reason, in the runs list and on the dashboard, not only in
                // the server's log.
                Err(why) => {
                    let run_id = runner.record_unstartable(&spec, &why).await?;
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let _ = tx.send(service::RunEnd {
                        status: engine::status::Status::Failed,
                        recorded: true,
                    });
                    return Ok(service::RunHandle {
                        run_id,
                        cancel: tokio_util::sync::CancellationToken::new(),
                        done: rx,
                    });
                }
            };
            let handle = prepared.start(Vec::new());
            let run_id = handle.id();
            let cancel = tokio_util::sync::CancellationToken::new();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let controls = handle.controls();
            let watch = cancel.clone();
            tokio::spawn(async move {
                let join = handle.join();
                tokio::pin!(join);
                let outcome = tokio::select! {
                    o = &mut join => o,
                    _ = watch.cancelled() => {
                        controls.cancel();
                        join.await
                    }
                };
                if let Some(e) = &outcome.history_error {
                    service::serve::log(format!(
                        "run {run_id}: its history may be incomplete: {e}"
                    ));
                }
                let _ = tx.send(service::RunEnd {
                    status: outcome.status,
                    // The writer committed the run's end (and with it its item's).
                    recorded: outcome.history_error.is_none(),
                });
            });
            Ok(service::RunHandle {
                run_id,
                cancel,
                done: rx,
            })
        }
    }
}
