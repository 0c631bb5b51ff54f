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
    /// How many runs this server executes at once (in-process workers).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// On SIGTERM, how long running runs may take to finish before they are cancelled
    /// (their teardown steps still run).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
}

pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    engine::duration::parse(text)
}

use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Serve until SIGTERM or Ctrl-C. Exit codes: 0 after a clean stop, 1 when the service
/// could not start (or failed), 2 for bad arguments.
pub fn main(args: ServeArgs, cfg: &store::StoreConfig) -> i32 {
    if args.workers == 0 {
        eprintln!("error: --workers must be at least 1");
        return 2;
    }
    let store = match store::open(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot open the store: {e}");
            return 1;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let shutdown = CancellationToken::new();
    let hurry = CancellationToken::new();
    let config = service::ServeConfig {
        dir: args.dir,
        workers: args.workers,
        drain_timeout: args.drain_timeout,
        registry: super::registry(),
        store: store.clone(),
        launcher: Arc::new(launcher::RunnerLauncher::new(super::registry())),
        hurry: hurry.clone(),
    };
    let result = runtime.block_on(async {
        let signals = tokio::spawn(watch_signals(shutdown.clone(), hurry));
        let r = service::Service::run(config, shutdown).await;
        signals.abort();
        r
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// The first SIGTERM or Ctrl-C stops the service (drain); a second ends the drain now
/// (running runs are cancelled, their teardown steps still run).
async fn watch_signals(shutdown: CancellationToken, hurry: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        count += 1;
        if count == 1 {
            shutdown.cancel();
        } else {
            service::serve::log("second signal: cancelling the running runs now");
            hurry.cancel();
        }
    }
}

/// The service's [`service::Launcher`]: how a claimed queue item becomes a run.
mod launcher {
    use chrono::Utc;
    use engine::executor::{self, RunRequest};
    use engine::secrets::Redactor;
    use engine::status::Status;
    use engine::template::{Runtime, Templates};
    use std::sync::Arc;
    use store::{HistoryWriter, NewRun, Owner, RunEvent};
    use tokio_util::sync::CancellationToken;

    pub struct RunnerLauncher {
        concurrency: usize,
    }

    impl RunnerLauncher {
        pub fn new(_registry: engine::step::Registry) -> Self {
            RunnerLauncher {
                concurrency: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2),
            }
        }
    }

    /// The queued params (typed JSON, checked again against this version of the plan)
    /// plus the defaults of the others.
    fn params(
        plan: &engine::plan::Plan,
        given: &serde_json::Value,
    ) -> Result<indexmap::IndexMap<String, serde_json::Value>, String> {
        let empty = serde_json::Map::new();
        let given = given.as_object().unwrap_or(&empty);
        let mut out = indexmap::IndexMap::new();
        for name in given.keys() {
            if !plan.params.contains_key(name) {
                return Err(format!(
                    "unknown param `{name}` (the pipeline changed since the run was queued?)"
                ));
            }
        }
        for (name, spec) in &plan.params {
            let v = match given.get(name).or(spec.default.as_ref()) {
                Some(v) => engine::params::check_value(spec, v)
                    .map_err(|e| format!("param `{name}`: {e}"))?,
                None => return Err(format!("param `{name}` is required and has no default: pass it with `pipe trigger --param {name}=VALUE`")),
            };
            out.insert(name.clone(), v);
        }
        Ok(out)
    }

    #[async_trait::async_trait]
    impl service::Launcher for RunnerLauncher {
        async fn start(&self, job: service::Job) -> anyhow::Result<service::RunHandle> {
            let service::Job {
                plan,
                queue_item: item,
                lease_owner,
                store,
            } = job;
            let tz = plan.timezone();
            let logical_date = item.logical_date.unwrap_or_else(Utc::now);
            let redactor = Redactor::new();
            let resolved = params(&plan, &item.params);
            let recorded = match &resolved {
                Ok(p) => redactor
                    .redact_json(&serde_json::Value::Object(p.clone().into_iter().collect())),
                Err(_) => item.params.clone(),
            };
            let run_id = {
                let store = store.clone();
                let new = NewRun {
                    params: recorded,
                    logical_date: Some(logical_date),
                    lease_owner: Some(lease_owner),
                    queue_item: Some(item.id),
                    ..NewRun::new(plan.name.clone(), item.trigger, Owner::Pipe)
                };
                tokio::task::spawn_blocking(move || store.create_run(&new)).await??
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let cancel = CancellationToken::new();
            let params = match resolved {
                Ok(p) => p,
                Err(e) => {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || {
                        store.write_events(
                            run_id,
                            &[RunEvent::RunFinished {
                                status: Status::Failed,
                                error: Some(e),
                                at: Utc::now(),
                            }],
                        )
                    })
                    .await??;
                    let _ = tx.send(Status::Failed);
                    return Ok(service::RunHandle {
                        run_id,
                        cancel,
                        done: rx,
                    });
                }
            };
            let templates = Arc::new(Templates::new(Runtime {
                redactor: redactor.clone(),
                tz,
                logical_date,
                dry_run: false,
                overrides: Default::default(),
            }));
            let mut values = std::collections::BTreeMap::new();
            for (name, value) in &params {
                let v = engine::params::template_value(&plan.params[name], value, logical_date, tz)
                    .map_err(|e| anyhow::anyhow!("param `{name}`: {e}"))?;
                values.insert(name.clone(), v);
            }
            let writer = Arc::new(HistoryWriter::start(store.clone(), run_id)?);
            let concurrency = plan
                .concurrency
                .map(|c| c as usize)
                .unwrap_or(self.concurrency);
            let request = RunRequest {
                plan: plan.clone(),
                params: minijinja::Value::from(values),
                run: engine::template::run_value(run_id, Utc::now(), logical_date, tz),
                run_id,
                concurrency,
                run_dir: store.run_dir(run_id),
                templates,
                redactor,
                observer: writer.clone(),
                cancel: cancel.clone(),
                hard_cancel: CancellationToken::new(),
                history: Some(Arc::new(store::HistoryReader {
                    store: store.clone(),
                    writer: Some(writer.clone()),
                })),
            };
            tokio::spawn(async move {
                let result = executor::execute(request).await;
                let status = result.status;
                let _ = tokio::task::spawn_blocking(move || writer.close()).await;
                let _ = tx.send(status);
            });
            Ok(service::RunHandle {
                run_id,
                cancel,
                done: rx,
            })
        }
    }
}
