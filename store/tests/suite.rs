//! One suite over both backends: each behaviour is a function of a [`Db`], run once on
//! SQLite (a temp dir) and once on the machine's PostgreSQL (a fresh database per test,
//! dropped afterwards). PostgreSQL is at `PIPE_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, the admin connection used to create and drop
//! the test databases); a missing server fails the PostgreSQL half loudly.

use chrono::{DateTime, Duration as TimeDelta, TimeZone, Utc};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;
use store::*;

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

fn admin_url() -> String {
    std::env::var("PIPE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG.to_string())
}

/// A store location for one test; dropping it removes the temp dir and the database.
struct Db {
    cfg: StoreConfig,
    _dir: tempfile::TempDir,
    pg_name: Option<String>,
}

impl Db {
    fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        Db {
            cfg: StoreConfig::sqlite(dir.path().join("state")),
            _dir: dir,
            pg_name: None,
        }
    }

    fn postgres() -> Db {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pipe_store_{}_{}_{:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            rand_u32()
        );
        let mut admin =
            postgres::Client::connect(&admin_url(), postgres::NoTls).unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is needed for this test (PIPE_TEST_POSTGRES_URL={}): {e}",
                    admin_url()
                )
            });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let mut cfg: postgres::Config = admin_url().parse().unwrap();
        cfg.dbname(&name);
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        let host = match &cfg.get_hosts()[0] {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let dir = tempfile::tempdir().unwrap();
        Db {
            cfg: StoreConfig {
                url: Some(format!("postgres://{user}@{host}:{port}/{name}")),
                state_dir: dir.path().join("state"),
            },
            _dir: dir,
            pg_name: Some(name),
        }
    }

    fn open(&self) -> Arc<dyn RunStore> {
        store::open(&self.cfg).unwrap()
    }

    /// Run raw SQL (test set-up that the API does not offer: rows of an old `pipe`).
    fn raw(&self, sql: &str) {
        match &self.cfg.url {
            Some(url) => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                c.batch_execute(sql).unwrap();
            }
            None => {
                let c = rusqlite::Connection::open(self.cfg.state_dir.join(DB_FILE)).unwrap();
                c.execute_batch(sql).unwrap();
            }
        }
    }
}

impl Db {
    /// A raw `SELECT COUNT(*) …`.
    fn count(&self, sql: &str) -> i64 {
        match &self.cfg.url {
            Some(url) => {
                let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
                c.query_one(sql, &[]).unwrap().get(0)
            }
            None => {
                let c = rusqlite::Connection::open(self.cfg.state_dir.join(DB_FILE)).unwrap();
                c.query_row(sql, [], |r| r.get(0)).unwrap()
            }
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            if let Ok(mut admin) = postgres::Client::connect(&admin_url(), postgres::NoTls) {
                let _ =
                    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        }
    }
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}

/// Each behaviour, once per backend.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[test]
            fn sqlite() {
                super::$name(&super::Db::sqlite());
            }
            #[test]
            fn postgres() {
                super::$name(&super::Db::postgres());
            }
        })*
    };
}

both!(
    runs_logs_round_trip,
    attached_files_are_copied,
    writer_records_events_in_batches,
    concurrent_writers_lose_nothing,
    concurrent_opens_migrate_once,
    queue_priority_order,
    concurrency_cap_in_claim,
    concurrent_claims_respect_the_cap,
    backfill_max_parallel_in_claim,
    dedup_merges_queued_items,
    ticks_are_recorded_once_under_two_planners,
    lease_expiry_marks_runs_abandoned,
    legacy_runs_are_judged_by_pid,
    claims_of_a_lost_worker_go_back_to_the_queue,
    leader_lease_is_exclusive,
    repair_attempts_keep_step_rows,
    integrations_keep_enabled_across_loads,
    cancel_requests_and_backfills,
    prune_keeps_what_is_still_needed,
    works_from_async_tasks,
    batched_ticks_and_counts,
    batched_ticks_merge_and_unkeyed_items_like_enqueue,
    integrations_version_moves_with_the_list,
    users_tokens_settings_and_their_audit,
    run_pages_step_batches_and_counts,
    a_database_one_version_behind_is_migrated,
    lost_runs_are_requeued_when_the_integration_says_so,
    claim_walks_past_full_integrations_and_cancels_disabled_ones,
    grouped_writes_of_many_threads_each_get_their_own_outcome,
    outbox_finds_what_was_never_published,
    outbox_holds_back_what_has_no_room,
    queue_waiters_wake_when_another_process_queues,
    claim_item_outcomes,
    claim_item_caps_hold_across_concurrent_claimers,
    fence_counts_the_claims_of_a_requeued_item,
    fenced_writes_of_a_run_taken_away_are_refused,
    workers_register_heartbeat_drain_and_prune,
    pipeline_texts_are_kept_once_per_text,
    credentials_are_saved_audited_and_resealed,
);

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn log(step: Option<&str>, message: &str) -> LogRecord {
    LogRecord {
        time: Utc::now(),
        level: Level::Info,
        step: step.map(str::to_string),
        message: message.into(),
        description: None,
        file: None,
    }
}

fn new_run(pipeline: &str, owner: Owner) -> NewRun {
    let trigger = match owner {
        Owner::Pipe => Trigger::Cli,
        Owner::External => Trigger::External,
    };
    NewRun {
        params: serde_json::json!({"month": "2026-10"}),
        ..NewRun::new(pipeline, trigger, owner)
    }
}

/// A lease owner that looks like another machine's (its pid means nothing here).
fn remote_owner(role: &str) -> LeaseOwner {
    let mut o = LeaseOwner::this_process(role);
    o.host = "elsewhere".into();
    o.host_identity = Some("another-boot/pid:[1]".into());
    o.pid = 999_999_999;
    o.pid_start = None;
    o
}

fn runs_logs_round_trip(db: &Db) {
    let s = db.open();
    assert!(s.schema_version().unwrap() >= 1);
    s.upsert_integration("sales", Some("nightly sales"))
        .unwrap();
    s.upsert_integration("sales", None).unwrap();
    assert!(s.is_enabled("sales").unwrap());
    assert!(s.is_enabled("never-seen").unwrap());
    let owner = remote_owner("run");
    s.heartbeat(&owner, Duration::from_secs(60), Utc::now())
        .unwrap();
    let a = s
        .create_run(&NewRun {
            lease_owner: Some(owner.id.clone()),
            ..new_run("sales", Owner::Pipe)
        })
        .unwrap();
    let b = s.create_run(&new_run("stock", Owner::External)).unwrap();
    let c = s.create_run(&new_run("sales", Owner::Pipe)).unwrap();
    // A run's folder is made by what writes into it (attached files), not by its start.
    assert!(!s.run_dir(a).exists());
    let sales = s.get_integration("sales").unwrap().unwrap();
    assert_eq!(sales.description.as_deref(), Some("nightly sales"));
    assert_eq!(sales.last_run.as_ref().unwrap().id, c);

    // `a` belongs to a live lease elsewhere: refused unless forced.
    let err = s
        .finish_run(a, Status::Failed, Some("boom"), false)
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("whose lease is live"), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    // `c` belongs to this (live) process.
    let err = s.finish_run(c, Status::Failed, None, false).unwrap_err();
    assert!(
        err.to_string().contains("owned by a live `pipe run`"),
        "{err}"
    );
    s.finish_run(a, Status::Failed, Some("boom"), true).unwrap();
    s.finish_run(b, Status::Warning, None, false).unwrap();
    let err = s.finish_run(a, Status::Succeeded, None, false).unwrap_err();
    assert_eq!(err.to_string(), format!("run {a} is already failed"));
    let err = s
        .finish_run(999, Status::Succeeded, None, false)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)));
    assert_eq!(err.to_string(), "run 999 not found");
    assert!(matches!(
        s.finish_run(b, Status::Running, None, false).unwrap_err(),
        StoreError::Invalid(_)
    ));

    let all = s.list_runs(None, 20).unwrap();
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), vec![c, b, a]);
    assert_eq!(all[0].status, Status::Running);
    assert!(all[0].finished_at.is_none() && all[0].duration_ms.is_none());
    assert_eq!(all[1].status, Status::Warning);
    assert_eq!(all[1].owner, Owner::External);
    assert_eq!(all[1].pid, None);
    assert_eq!(all[2].error.as_deref(), Some("boom"));
    assert_eq!(all[2].params["month"], "2026-10");
    assert_eq!(all[2].pid, Some(i64::from(std::process::id())));
    assert_eq!(all[2].lease_owner.as_deref(), Some(owner.id.as_str()));
    assert_eq!(all[2].attempt, 1);
    let sales = s.list_runs(Some("sales"), 20).unwrap();
    assert_eq!(sales.iter().map(|r| r.id).collect::<Vec<_>>(), vec![c, a]);
    assert_eq!(s.list_runs(None, 1).unwrap().len(), 1);
    let failed = s
        .find_runs(&RunFilter {
            status: Some(Status::Failed),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(failed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a]);
    let older = s
        .find_runs(&RunFilter {
            before_id: Some(c),
            trigger: Some(Trigger::Cli),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(older.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a]);

    let detail = s.get_run(a).unwrap().unwrap();
    assert_eq!(detail.run.status, Status::Failed);
    assert!(detail.steps.is_empty());
    assert!(s.get_run(12345).unwrap().is_none());
    let json = serde_json::to_value(&detail).unwrap();
    assert_eq!(json["id"], a);
    assert_eq!(json["status"], "failed");
    assert!(json["steps"].is_array());
    assert!(json["started_at"].as_str().unwrap().ends_with('Z'));

    for i in 0..3 {
        s.add_log(b, &log(None, &format!("row {i}"))).unwrap();
    }
    let rows = s.logs(b, 0).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(),
        ["row 0", "row 1", "row 2"]
    );
    assert_eq!(s.logs(b, rows[0].id).unwrap().len(), 2);
    assert_eq!(s.get_run(b).unwrap().unwrap().log_count, 3);
    assert_eq!(s.run_status(b).unwrap(), Some(Status::Warning));
    assert_eq!(s.run_status(4242).unwrap(), None);
    // The store survives a reopen.
    drop(s);
    let s = db.open();
    assert_eq!(s.list_runs(None, 0).unwrap().len(), 3);
    assert_eq!(s.consecutive_failures("sales").unwrap(), 1);
}

fn attached_files_are_copied(db: &Db) {
    let s = db.open();
    let id = s.create_run(&new_run("p", Owner::External)).unwrap();
    let src = db.cfg.state_dir.parent().unwrap().join("report.csv");
    std::fs::write(&src, "a,b\n1,2\n").unwrap();
    let mut rec = log(None, "uploaded");
    rec.file = Some(src.to_string_lossy().into_owned());
    s.add_log(id, &rec).unwrap();
    s.add_log(id, &rec).unwrap();
    rec.file = Some(
        src.with_file_name("missing.csv")
            .to_string_lossy()
            .into_owned(),
    );
    assert!(s.add_log(id, &rec).is_err());
    let rows = s.logs(id, 0).unwrap();
    assert_eq!(rows.len(), 2);
    let f0 = std::path::PathBuf::from(rows[0].file.as_ref().unwrap());
    let f1 = std::path::PathBuf::from(rows[1].file.as_ref().unwrap());
    assert_eq!(
        f0,
        std::fs::canonicalize(s.run_dir(id))
            .unwrap()
            .join("report.csv")
    );
    assert_eq!(f1.file_name().unwrap(), "report-1.csv");
    assert_eq!(std::fs::read_to_string(f1).unwrap(), "a,b\n1,2\n");
}

fn step_finished(step: &str, kind: &str, status: Status, rows: Option<u64>) -> RunEvent {
    RunEvent::StepFinished(StepRecord {
        step: step.into(),
        kind: kind.into(),
        status,
        attempts: 1,
        started_at: Some(Utc::now()),
        finished_at: Some(Utc::now()),
        duration_ms: 5,
        rows,
        error: (status == Status::Failed).then(|| "table locked".to_string()),
        outputs: serde_json::json!({"count": rows}),
    })
}

fn writer_records_events_in_batches(db: &Db) {
    let s = db.open();
    let id = s.create_run(&new_run("p", Owner::Pipe)).unwrap();
    let w = Arc::new(HistoryWriter::start(s.clone(), id).unwrap());
    let obs: Arc<dyn Observer> = w.clone();
    let t0 = Utc::now();
    for step in ["extract", "load"] {
        obs.event(&RunEvent::StepStarted {
            step: step.into(),
            attempt: 1,
            at: t0,
        });
    }
    obs.event(&RunEvent::StepRetrying {
        step: "extract".into(),
        attempt: 1,
        error: "HTTP 503".into(),
        delay_ms: 2000,
    });
    obs.event(&RunEvent::StepStarted {
        step: "extract".into(),
        attempt: 2,
        at: Utc::now(),
    });
    for i in 0..1000 {
        obs.event(&RunEvent::Log(log(Some("extract"), &format!("page {i}"))));
    }
    w.flush();
    let live = s.get_run(id).unwrap().unwrap();
    assert_eq!(live.log_count, 1001);
    assert_eq!(live.steps.len(), 2);
    assert_eq!(live.steps[0].status, Status::Running);
    assert_eq!(live.steps[0].attempts, 2);
    // The history as steps see it.
    let reader = HistoryReader {
        store: s.clone(),
        writer: Some(w.clone()),
    };
    obs.event(&step_finished(
        "extract",
        "http.extract",
        Status::Succeeded,
        Some(42),
    ));
    obs.event(&step_finished(
        "load",
        "bigquery.load",
        Status::Failed,
        None,
    ));
    use engine::step::HistoryView;
    assert_eq!(
        reader
            .rows_since("p", "http.extract", t0 - TimeDelta::minutes(1))
            .unwrap(),
        42
    );
    assert_eq!(
        reader
            .rows_since("p", "http.extract", Utc::now() + TimeDelta::minutes(1))
            .unwrap(),
        0
    );
    obs.event(&RunEvent::RunFinished {
        status: Status::Failed,
        error: Some("step load failed".into()),
        at: Utc::now(),
    });
    drop(obs);
    drop(reader);
    Arc::try_unwrap(w).unwrap().finish().unwrap();

    let d = s.get_run(id).unwrap().unwrap();
    assert_eq!(d.run.status, Status::Failed);
    assert_eq!(d.run.error.as_deref(), Some("step load failed"));
    let names: Vec<_> = d.steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(names, ["extract", "load"]);
    assert_eq!(d.steps[0].rows, Some(42));
    assert_eq!(d.steps[0].outputs["count"], 42);
    assert_eq!(d.steps[0].kind.as_deref(), Some("http.extract"));
    assert_eq!(d.steps[1].error.as_deref(), Some("table locked"));
    let logs = s.logs(id, 0).unwrap();
    assert_eq!(logs.len(), 1001);
    assert_eq!(logs[0].level, Level::Warning);
    assert_eq!(
        logs[0].message,
        "attempt 1 failed: HTTP 503; retrying in 2.0s"
    );
    assert_eq!(logs[1000].message, "page 999");
    let last = s.get_integration("p").unwrap().unwrap().last_run.unwrap();
    assert_eq!(last.status, Status::Failed);
    assert_eq!(last.finished_at, d.run.finished_at);
}

fn concurrent_writers_lose_nothing(db: &Db) {
    let s = db.open();
    let runs: Vec<i64> = (0..3)
        .map(|i| {
            s.create_run(&new_run(&format!("p{i}"), Owner::External))
                .unwrap()
        })
        .collect();
    // Each thread opens its own store: its own connections, as another process would.
    let threads: Vec<_> = runs
        .iter()
        .map(|&run| {
            let cfg = db.cfg.clone();
            std::thread::spawn(move || {
                let store = store::open(&cfg).unwrap();
                for i in 0..300 {
                    store
                        .add_log(run, &log(None, &format!("{run}:{i}")))
                        .unwrap();
                    if i % 100 == 0 {
                        store.expire_lost(Utc::now()).unwrap();
                        store.list_runs(None, 10).unwrap();
                    }
                }
            })
        })
        .collect();
    // A batched writer into the same store at the same time.
    let w = HistoryWriter::start(store::open(&db.cfg).unwrap(), runs[0]).unwrap();
    for i in 0..500 {
        w.event(&RunEvent::Log(log(Some("w"), &format!("w:{i}"))));
    }
    for t in threads {
        t.join().unwrap();
    }
    w.finish().unwrap();
    for (n, &run) in runs.iter().enumerate() {
        let rows = s.logs(run, 0).unwrap();
        let mine: Vec<_> = rows.iter().filter(|r| r.step.is_none()).collect();
        assert_eq!(mine.len(), 300);
        for (i, row) in mine.iter().enumerate() {
            assert_eq!(row.message, format!("{run}:{i}"));
        }
        let batched = rows.len() - mine.len();
        assert_eq!(batched, if n == 0 { 500 } else { 0 });
    }
}

fn concurrent_opens_migrate_once(db: &Db) {
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cfg = db.cfg.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let s = store::open(&cfg).unwrap();
                s.create_run(&new_run("p", Owner::External)).unwrap();
                s.schema_version().unwrap()
            })
        })
        .collect();
    let versions: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        versions.iter().all(|&v| v == versions[0] && v >= 1),
        "{versions:?}"
    );
    assert_eq!(db.open().list_runs(None, 0).unwrap().len(), 4);
}

fn item(integration: &str, priority: i64) -> Enqueue {
    Enqueue {
        priority,
        ..Enqueue::new(integration, Trigger::Manual)
    }
}

fn queue_priority_order(db: &Db) {
    let s = db.open();
    let now = t("2026-12-02T06:00:00Z");
    let low = s.enqueue(&item("a", 0), now).unwrap().id;
    let high = s.enqueue(&item("b", 10), now).unwrap().id;
    let high2 = s.enqueue(&item("c", 10), now).unwrap().id;
    let mut other = item("d", 100);
    other.queue = "high_priority_queue".into();
    let other = s.enqueue(&other, now).unwrap().id;
    let lease = Duration::from_secs(30);
    let w = "worker-1";
    let default = vec!["default".to_string()];
    let order: Vec<i64> = (0..3)
        .map(|_| s.claim(w, &default, lease, now).unwrap().unwrap().id)
        .collect();
    assert_eq!(order, vec![high, high2, low]);
    assert!(s.claim(w, &default, lease, now).unwrap().is_none());
    // The other queue is served by a worker of that queue (or of all queues).
    let got = s.claim(w, &[], lease, now).unwrap().unwrap();
    assert_eq!(got.id, other);
    assert_eq!(got.state, QueueState::Claimed);
    assert_eq!(got.claimed_by.as_deref(), Some(w));
    assert_eq!(got.queue, "high_priority_queue");
    s.ack(got.id, AckOutcome::Done, now).unwrap();
    s.ack(got.id, AckOutcome::Done, now).unwrap();
    assert_eq!(s.get_item(got.id).unwrap().unwrap().state, QueueState::Done);
    let queued = s.enqueue(&item("a", 0), now).unwrap().id;
    assert!(matches!(
        s.ack(queued, AckOutcome::Done, now).unwrap_err(),
        StoreError::Conflict(_)
    ));
    assert!(matches!(
        s.ack(99_999, AckOutcome::Done, now).unwrap_err(),
        StoreError::NotFound(_)
    ));
    assert_eq!(s.count_queued("a").unwrap(), 1);
    assert!(s.cancel_item(queued, now).unwrap());
    assert!(!s.cancel_item(queued, now).unwrap());
    assert_eq!(s.count_queued("a").unwrap(), 0);
    let listed = s
        .list_queue(&QueueFilter {
            state: Some(QueueState::Claimed),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(listed.len(), 3);
    // The RunQueue view of the same store.
    let q: Arc<dyn RunQueue> = s.clone();
    let id = q.enqueue(&item("e", 1), now).unwrap().id;
    assert_eq!(q.claim(w, &[], lease, now).unwrap().unwrap().id, id);
}

fn loaded(s: &dyn RunStore, name: &str, max: Option<u32>) {
    let mut f = IntegrationFile::new(name, format!("pipelines/{name}.yaml"), "hash-1");
    f.max_concurrent_runs = max;
    s.load_integration(&f, Utc::now()).unwrap();
}

fn concurrency_cap_in_claim(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    loaded(s.as_ref(), "capped", Some(2));
    for _ in 0..4 {
        s.enqueue(&item("capped", 5), now).unwrap();
    }
    let free = s.enqueue(&item("free", 0), now).unwrap().id;
    let lease = Duration::from_secs(30);
    let a = s.claim("w", &[], lease, now).unwrap().unwrap();
    let b = s.claim("w", &[], lease, now).unwrap().unwrap();
    assert_eq!(
        (a.integration.as_str(), b.integration.as_str()),
        ("capped", "capped")
    );
    // Two claimed: the lower-priority item of another integration comes next.
    let c = s.claim("w", &[], lease, now).unwrap().unwrap();
    assert_eq!(c.id, free);
    assert!(s.claim("w", &[], lease, now).unwrap().is_none());
    assert_eq!(s.count_active("capped").unwrap(), 2);
    // A claimed item's run counts instead of the item; a finished run frees its slot.
    let run = s
        .create_run(&NewRun {
            queue_item: Some(a.id),
            ..NewRun::new("capped", Trigger::Manual, Owner::Pipe)
        })
        .unwrap();
    assert_eq!(s.get_item(a.id).unwrap().unwrap().run_id, Some(run));
    assert_eq!(s.count_active("capped").unwrap(), 2);
    assert!(s.claim("w", &[], lease, now).unwrap().is_none());
    s.write_events(
        run,
        &[RunEvent::RunFinished {
            status: Status::Succeeded,
            error: None,
            at: Utc::now(),
        }],
    )
    .unwrap();
    // The run's end marked its item done.
    assert_eq!(s.get_item(a.id).unwrap().unwrap().state, QueueState::Done);
    let d = s.claim("w", &[], lease, now).unwrap().unwrap();
    assert_eq!(d.integration, "capped");
    // A `pipe run` of the integration counts too.
    s.ack(b.id, AckOutcome::Cancelled, now).unwrap();
    let cli = s.create_run(&new_run("capped", Owner::Pipe)).unwrap();
    assert!(s.claim("w", &[], lease, now).unwrap().is_none());
    s.finish_run(cli, Status::Failed, None, true).unwrap();
    assert!(s.claim("w", &[], lease, now).unwrap().is_some());
    // A run for an item that is no longer claimed is refused.
    let e = s.enqueue(&item("capped", 0), now).unwrap().id;
    s.cancel_item(e, now).unwrap();
    let err = s
        .create_run(&NewRun {
            queue_item: Some(e),
            ..NewRun::new("capped", Trigger::Manual, Owner::Pipe)
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
}

fn concurrent_claims_respect_the_cap(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    loaded(s.as_ref(), "one", Some(1));
    loaded(s.as_ref(), "three", Some(3));
    loaded(s.as_ref(), "backfilled", None);
    let bf = s
        .create_backfill(
            &NewBackfill {
                integration: "backfilled".into(),
                from: now,
                to: now,
                max_parallel: Some(2),
            },
            now,
        )
        .unwrap();
    for _ in 0..10 {
        s.enqueue(&item("one", 1), now).unwrap();
        s.enqueue(&item("three", 1), now).unwrap();
        let mut e = item("backfilled", 1);
        e.backfill_id = Some(bf);
        s.enqueue(&e, now).unwrap();
    }
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|n| {
            let cfg = db.cfg.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = store::open(&cfg).unwrap();
                barrier.wait();
                let mut got = Vec::new();
                for _ in 0..5 {
                    if let Some(i) = s
                        .claim(&format!("w{n}"), &[], Duration::from_secs(30), now)
                        .unwrap()
                    {
                        got.push(i.integration);
                    }
                }
                got
            })
        })
        .collect();
    let got: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let count = |name: &str| got.iter().filter(|g| *g == name).count();
    assert_eq!(count("one"), 1, "{got:?}");
    assert_eq!(count("three"), 3, "{got:?}");
    assert_eq!(count("backfilled"), 2, "{got:?}");
}

fn backfill_max_parallel_in_claim(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    loaded(s.as_ref(), "bf", None);
    let id = s
        .create_backfill(
            &NewBackfill {
                integration: "bf".into(),
                from: t("2026-11-01T00:00:00Z"),
                to: t("2026-11-05T00:00:00Z"),
                max_parallel: Some(2),
            },
            now,
        )
        .unwrap();
    for day in 1..=5 {
        let mut e = item("bf", -10);
        e.trigger = Trigger::Backfill;
        e.backfill_id = Some(id);
        e.logical_date = Some(Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap());
        e.dedup_key = Some(format!("bf@{day}"));
        s.enqueue(&e, now).unwrap();
    }
    let lease = Duration::from_secs(30);
    let a = s.claim("w", &[], lease, now).unwrap().unwrap();
    let b = s.claim("w", &[], lease, now).unwrap().unwrap();
    assert_eq!(a.logical_date, Some(t("2026-11-01T00:00:00Z")));
    assert_eq!(b.logical_date, Some(t("2026-11-02T00:00:00Z")));
    assert!(s.claim("w", &[], lease, now).unwrap().is_none());
    s.ack(a.id, AckOutcome::Done, now).unwrap();
    assert!(s.claim("w", &[], lease, now).unwrap().is_some());
    let listed = s.list_backfills(Some("bf")).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].queued, listed[0].claimed, listed[0].done),
        (2, 2, 1)
    );
    assert_eq!(s.cancel_backfill(id, now).unwrap(), 2);
    let listed = s.list_backfills(None).unwrap();
    assert_eq!(listed[0].state, BackfillState::Cancelled);
    assert_eq!((listed[0].queued, listed[0].cancelled), (0, 2));
    assert!(matches!(
        s.cancel_backfill(999, now).unwrap_err(),
        StoreError::NotFound(_)
    ));
}

fn dedup_merges_queued_items(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    let mut e = item("d", 1);
    e.dedup_key = Some("d@manual".into());
    let first = s.enqueue(&e, now).unwrap();
    assert!(!first.merged);
    e.priority = 7;
    let second = s.enqueue(&e, now).unwrap();
    assert_eq!(
        second,
        Enqueued {
            id: first.id,
            merged: true
        }
    );
    e.priority = 3;
    s.enqueue(&e, now).unwrap();
    let it = s.get_item(first.id).unwrap().unwrap();
    assert_eq!(it.priority, 7, "a merge keeps the higher priority");
    assert_eq!(s.count_queued("d").unwrap(), 1);
    // Once claimed, the key is free again: a new item is queued beside the running one.
    s.claim("w", &[], Duration::from_secs(30), now)
        .unwrap()
        .unwrap();
    let third = s.enqueue(&e, now).unwrap();
    assert!(!third.merged);
    assert_ne!(third.id, first.id);
    // Concurrent enqueues of one key make one item.
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let cfg = db.cfg.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = store::open(&cfg).unwrap();
                barrier.wait();
                let mut e = item("race", 0);
                e.dedup_key = Some("race@1".into());
                (0..5)
                    .map(|_| s.enqueue(&e, Utc::now()).unwrap().id)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ids: Vec<i64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(ids.iter().all(|&i| i == ids[0]), "{ids:?}");
    assert_eq!(s.count_queued("race").unwrap(), 1);
}

fn ticks_are_recorded_once_under_two_planners(db: &Db) {
    let s = db.open();
    loaded(s.as_ref(), "ticker", None);
    assert_eq!(s.schedule_cursor("ticker").unwrap(), None);
    let base = t("2026-12-02T06:00:00Z");
    let ticks: Vec<DateTime<Utc>> = (0..40).map(|i| base + TimeDelta::seconds(i)).collect();
    let barrier = Arc::new(Barrier::new(2));
    let planners: Vec<_> = (0..2)
        .map(|_| {
            let cfg = db.cfg.clone();
            let barrier = barrier.clone();
            let ticks = ticks.clone();
            std::thread::spawn(move || {
                let s = store::open(&cfg).unwrap();
                barrier.wait();
                let mut inserted = 0;
                // Overlapping windows, as two servers planning the same schedule would.
                for w in ticks.chunks(5) {
                    let planned: Vec<PlannedTick> = w
                        .iter()
                        .map(|&at| PlannedTick {
                            scheduled_at: at,
                            enqueue: Some(Enqueue {
                                trigger: Trigger::Schedule,
                                logical_date: Some(at),
                                ..Enqueue::new("ticker", Trigger::Schedule)
                            }),
                            note: None,
                        })
                        .collect();
                    let out = s
                        .record_ticks(
                            "ticker",
                            "cron:* * * * * *",
                            &planned,
                            *w.last().unwrap(),
                            Utc::now(),
                        )
                        .unwrap();
                    for o in &out {
                        assert_eq!(o.inserted, o.queue_item.is_some());
                    }
                    inserted += out.iter().filter(|o| o.inserted).count();
                }
                inserted
            })
        })
        .collect();
    let total: usize = planners.into_iter().map(|p| p.join().unwrap()).sum();
    assert_eq!(total, 40);
    let items = s
        .list_queue(&QueueFilter {
            integration: Some("ticker".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(items.len(), 40);
    let mut dates: Vec<_> = items.iter().map(|i| i.logical_date.unwrap()).collect();
    dates.sort();
    dates.dedup();
    assert_eq!(dates, ticks);
    let recorded = s.list_ticks("ticker", 0).unwrap();
    assert_eq!(recorded.len(), 40);
    assert_eq!(recorded[0].scheduled_at, *ticks.last().unwrap());
    assert!(recorded
        .iter()
        .all(|r| r.state == TickState::Enqueued && r.queue_item.is_some()));
    let cursor = s.schedule_cursor("ticker").unwrap().unwrap();
    assert_eq!(cursor.last_planned, *ticks.last().unwrap());
    assert_eq!(cursor.fingerprint, "cron:* * * * * *");
    // The cursor never goes back; a skipped tick is recorded without an item.
    let out = s
        .record_ticks(
            "ticker",
            "interval:15m",
            &[PlannedTick {
                scheduled_at: base + TimeDelta::hours(1),
                enqueue: None,
                note: Some("overlap: skip".into()),
            }],
            base,
            Utc::now(),
        )
        .unwrap();
    assert_eq!(out[0].queue_item, None);
    assert!(out[0].inserted);
    let cursor = s.schedule_cursor("ticker").unwrap().unwrap();
    assert_eq!(cursor.last_planned, *ticks.last().unwrap());
    assert_eq!(cursor.fingerprint, "interval:15m");
    let last = &s.list_ticks("ticker", 1).unwrap()[0];
    assert_eq!(last.state, TickState::Skipped);
    assert_eq!(last.note.as_deref(), Some("overlap: skip"));
}

fn lease_expiry_marks_runs_abandoned(db: &Db) {
    let s = db.open();
    let t0 = t("2030-01-01T00:00:00Z");
    let ttl = Duration::from_secs(10);
    let worker = remote_owner("worker-1");
    s.heartbeat(&worker, ttl, t0).unwrap();
    loaded(s.as_ref(), "lost", None);
    let it = s.enqueue(&item("lost", 0), t0).unwrap().id;
    let claimed = s.claim(&worker.id, &[], ttl, t0).unwrap().unwrap();
    assert_eq!(claimed.id, it);
    let run = s
        .create_run(&NewRun {
            lease_owner: Some(worker.id.clone()),
            queue_item: Some(it),
            ..NewRun::new("lost", Trigger::Manual, Owner::Pipe)
        })
        .unwrap();
    s.write_events(
        run,
        &[RunEvent::StepStarted {
            step: "extract".into(),
            attempt: 1,
            at: t0,
        }],
    )
    .unwrap();
    let outside = s.create_run(&new_run("lost", Owner::External)).unwrap();
    // Within the lease (renewed at +8 s), nothing is lost.
    assert!(s
        .expire_lost(t0 + TimeDelta::seconds(5))
        .unwrap()
        .is_empty());
    s.heartbeat(&worker, ttl, t0 + TimeDelta::seconds(8))
        .unwrap();
    assert!(s
        .expire_lost(t0 + TimeDelta::seconds(15))
        .unwrap()
        .is_empty());
    let err = s.finish_run(run, Status::Failed, None, false).unwrap_err();
    assert!(err.to_string().contains("worker-1@elsewhere"), "{err}");
    // One lease period after the last heartbeat, the run is abandoned.
    let lost = s.expire_lost(t0 + TimeDelta::seconds(19)).unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].run_id, run);
    assert_eq!(lost[0].pipeline, "lost");
    assert_eq!(lost[0].lease_owner.as_deref(), Some(worker.id.as_str()));
    let item = lost[0].queue_item.as_ref().unwrap();
    assert_eq!((item.id, item.state), (it, QueueState::Done));
    assert!(s
        .expire_lost(t0 + TimeDelta::seconds(20))
        .unwrap()
        .is_empty());
    let d = s.get_run(run).unwrap().unwrap();
    assert_eq!(d.run.status, Status::Abandoned);
    assert!(d.run.finished_at.is_some());
    assert!(
        d.run
            .error
            .as_deref()
            .unwrap()
            .contains("stopped renewing its lease"),
        "{:?}",
        d.run.error
    );
    assert_eq!(d.steps[0].status, Status::Abandoned);
    assert_eq!(s.run_status(outside).unwrap(), Some(Status::Running));
    // A released lease (clean stop) with a run left running: lost at once.
    let quitter = remote_owner("run");
    s.heartbeat(&quitter, ttl, t0).unwrap();
    let left = s
        .create_run(&NewRun {
            lease_owner: Some(quitter.id.clone()),
            ..new_run("lost", Owner::Pipe)
        })
        .unwrap();
    s.release(&quitter.id).unwrap();
    let lost = s.expire_lost(t0).unwrap();
    assert_eq!(
        lost.iter().map(|l| l.run_id).collect::<Vec<_>>(),
        vec![left]
    );
    // A lease owner of this boot and pid namespace whose pid is gone: lost before expiry.
    let mut dead = LeaseOwner::this_process("run");
    dead.pid = 999_999_999;
    s.heartbeat(&dead, ttl, Utc::now()).unwrap();
    let gone = s
        .create_run(&NewRun {
            lease_owner: Some(dead.id.clone()),
            ..new_run("lost", Owner::Pipe)
        })
        .unwrap();
    let me = LeaseOwner::this_process("run");
    s.heartbeat(&me, ttl, Utc::now()).unwrap();
    let alive = s
        .create_run(&NewRun {
            lease_owner: Some(me.id.clone()),
            ..new_run("lost", Owner::Pipe)
        })
        .unwrap();
    let lost = s.expire_lost(Utc::now()).unwrap();
    assert_eq!(
        lost.iter().map(|l| l.run_id).collect::<Vec<_>>(),
        vec![gone]
    );
    assert_eq!(s.run_status(alive).unwrap(), Some(Status::Running));
    assert_eq!(s.mark_abandoned().unwrap(), 0);
    // The leases are listed for people.
    let leases = s.list_leases().unwrap();
    assert!(leases.iter().any(|l| l.name == worker.id
        && l.kind == LeaseKind::Owner
        && l.host.as_deref() == Some("elsewhere")));
    assert!(!leases.iter().any(|l| l.name == quitter.id));
}

fn legacy_runs_are_judged_by_pid(db: &Db) {
    let s = db.open();
    let alive = s.create_run(&new_run("p", Owner::Pipe)).unwrap();
    let insert = |pid: i64, pid_start: &str, owner: &str, host: &str| {
        db.raw(&format!(
            r#"INSERT INTO runs(pipeline, params, "trigger", status, started_at, pid, pid_start,
                               owner, host)
               VALUES ('p', '{{}}', 'cli', 'running', '2026-01-01T00:00:00.000Z', {pid},
                       '{pid_start}', '{owner}', {host})"#
        ));
    };
    insert(999_999_999, "1", "pipe", "NULL");
    insert(
        i64::from(std::process::id()),
        "not-my-start-time",
        "pipe",
        "NULL",
    );
    insert(999_999_999, "1", "external", "NULL");
    insert(999_999_999, "1", "pipe", "'another-boot/pid:[1]'");
    let runs = s.list_runs(None, 0).unwrap();
    let ids: Vec<i64> = runs.iter().map(|r| r.id).rev().collect();
    let (dead, reused, external, elsewhere) = (ids[1], ids[2], ids[3], ids[4]);
    assert_eq!(s.mark_abandoned().unwrap(), 2);
    assert_eq!(s.mark_abandoned().unwrap(), 0);
    let status = |id| s.run_status(id).unwrap().unwrap();
    assert_eq!(status(dead), Status::Abandoned);
    assert_eq!(status(reused), Status::Abandoned);
    assert_eq!(status(external), Status::Running);
    assert_eq!(status(elsewhere), Status::Running);
    assert_eq!(status(alive), Status::Running);
    let d = s.get_run(dead).unwrap().unwrap();
    assert!(d.run.error.unwrap().contains("999999999"));
    let err = s
        .finish_run(elsewhere, Status::Failed, None, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another pid namespace") && err.contains("--force"),
        "{err}"
    );
}

fn claims_of_a_lost_worker_go_back_to_the_queue(db: &Db) {
    let s = db.open();
    let t0 = t("2030-01-01T00:00:00Z");
    let ttl = Duration::from_secs(10);
    let w = remote_owner("worker-2");
    s.heartbeat(&w, ttl, t0).unwrap();
    let mut e = item("rq", 3);
    e.dedup_key = Some("rq@1".into());
    let a = s.enqueue(&e, t0).unwrap().id;
    let b = s.enqueue(&item("rq", 1), t0).unwrap().id;
    assert_eq!(s.claim(&w.id, &[], ttl, t0).unwrap().unwrap().id, a);
    assert_eq!(s.claim(&w.id, &[], ttl, t0).unwrap().unwrap().id, b);
    // Meanwhile the same key is queued again (the claimed `a` no longer holds it) and claimed
    // by a claimer without a lease, which is judged by the claim's own expiry.
    let a2 = s.enqueue(&e, t0).unwrap().id;
    let c = s.enqueue(&item("rq", 0), t0).unwrap().id;
    assert_eq!(s.claim("no-lease", &[], ttl, t0).unwrap().unwrap().id, a2);
    assert!(s
        .expire_lost(t0 + TimeDelta::seconds(5))
        .unwrap()
        .is_empty());
    s.expire_lost(t0 + TimeDelta::seconds(11)).unwrap();
    let state = |id| s.get_item(id).unwrap().unwrap().state;
    // Both claims of the key are lost: the first goes back, the second is merged away.
    assert_eq!(state(a), QueueState::Queued);
    assert_eq!(state(b), QueueState::Queued);
    assert_eq!(state(a2), QueueState::Cancelled);
    assert_eq!(state(c), QueueState::Queued);
    let back = s.get_item(b).unwrap().unwrap();
    assert_eq!(back.claimed_by, None);
    assert_eq!(s.count_queued("rq").unwrap(), 3);
}

fn leader_lease_is_exclusive(db: &Db) {
    let s = db.open();
    let t0 = t("2030-01-01T00:00:00Z");
    let ttl = Duration::from_secs(10);
    let a = remote_owner("serve");
    let b = remote_owner("serve");
    assert!(s.try_lead("scheduler", &a, ttl, t0).unwrap());
    assert!(!s
        .try_lead("scheduler", &b, ttl, t0 + TimeDelta::seconds(1))
        .unwrap());
    assert!(s
        .try_lead("scheduler", &a, ttl, t0 + TimeDelta::seconds(5))
        .unwrap());
    assert!(!s
        .try_lead("scheduler", &b, ttl, t0 + TimeDelta::seconds(14))
        .unwrap());
    // Another name is another lease.
    assert!(s.try_lead("janitor", &b, ttl, t0).unwrap());
    // `a` stopped renewing: `b` takes over after the expiry, and `a` has lost it.
    assert!(s
        .try_lead("scheduler", &b, ttl, t0 + TimeDelta::seconds(16))
        .unwrap());
    assert!(!s
        .try_lead("scheduler", &a, ttl, t0 + TimeDelta::seconds(17))
        .unwrap());
    let row = s
        .list_leases()
        .unwrap()
        .into_iter()
        .find(|l| l.name == "leader:scheduler")
        .unwrap();
    assert_eq!(row.owner, b.id);
    assert_eq!(row.kind, LeaseKind::Leader);
    assert_eq!(row.acquired_at, t0 + TimeDelta::seconds(16));
    // Resigning frees it at once (only for its holder).
    s.resign("scheduler", &a.id).unwrap();
    assert!(!s
        .try_lead("scheduler", &a, ttl, t0 + TimeDelta::seconds(18))
        .unwrap());
    s.resign("scheduler", &b.id).unwrap();
    assert!(s
        .try_lead("scheduler", &a, ttl, t0 + TimeDelta::seconds(18))
        .unwrap());
    // A holder of this pid namespace whose process is gone is replaced before its expiry.
    let mut dead = LeaseOwner::this_process("serve");
    dead.pid = 999_999_999;
    let now = Utc::now();
    assert!(s.try_lead("dead", &dead, ttl, now).unwrap());
    assert!(s.try_lead("dead", &b, ttl, now).unwrap());
    // Many contenders at one instant: exactly one wins.
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let cfg = db.cfg.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let s = store::open(&cfg).unwrap();
                let me = remote_owner("serve");
                barrier.wait();
                s.try_lead("race", &me, Duration::from_secs(10), t0)
                    .unwrap()
            })
        })
        .collect();
    let wins = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|&w| w)
        .count();
    assert_eq!(wins, 1);
}

fn repair_attempts_keep_step_rows(db: &Db) {
    let s = db.open();
    let run = s.create_run(&new_run("rep", Owner::Pipe)).unwrap();
    s.write_events(
        run,
        &[
            step_finished("extract", "http.extract", Status::Succeeded, Some(10)),
            step_finished("load", "sql.load", Status::Failed, None),
            RunEvent::RunFinished {
                status: Status::Failed,
                error: Some("step load failed".into()),
                at: Utc::now(),
            },
        ],
    )
    .unwrap();
    let err = s.start_attempt(4242, None, Utc::now()).unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)));
    assert_eq!(
        s.start_attempt(run, Some("repair-x"), Utc::now()).unwrap(),
        2
    );
    assert!(matches!(
        s.start_attempt(run, None, Utc::now()).unwrap_err(),
        StoreError::Conflict(_)
    ));
    let d = s.get_run(run).unwrap().unwrap();
    assert_eq!((d.run.status, d.run.attempt), (Status::Running, 2));
    assert_eq!(d.run.lease_owner.as_deref(), Some("repair-x"));
    assert_eq!(d.run.error, None);
    s.write_events(
        run,
        &[
            RunEvent::StepStarted {
                step: "load".into(),
                attempt: 1,
                at: Utc::now(),
            },
            step_finished("load", "sql.load", Status::Succeeded, Some(10)),
            RunEvent::RunFinished {
                status: Status::Succeeded,
                error: None,
                at: Utc::now(),
            },
        ],
    )
    .unwrap();
    let d = s.get_run(run).unwrap().unwrap();
    assert_eq!(d.run.status, Status::Succeeded);
    let rows: Vec<(String, u32, Status)> = d
        .steps
        .iter()
        .map(|s| (s.step.clone(), s.run_attempt, s.status))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("extract".to_string(), 1, Status::Succeeded),
            ("load".to_string(), 1, Status::Failed),
            ("load".to_string(), 2, Status::Succeeded),
        ]
    );
    let latest: Vec<(&str, u32)> = d
        .latest_steps()
        .iter()
        .map(|s| (s.step.as_str(), s.run_attempt))
        .collect();
    assert_eq!(latest, vec![("extract", 1), ("load", 2)]);
    assert_eq!(s.consecutive_failures("rep").unwrap(), 0);
}

fn integrations_keep_enabled_across_loads(db: &Db) {
    let s = db.open();
    let t0 = t("2026-12-02T06:00:00Z");
    let mut f = IntegrationFile::new("sales", "pipelines/sales.yaml", "h1");
    f.description = Some("nightly".into());
    f.metadata = serde_json::json!({"group": "finance", "direction": "inward", "tags": ["a"]});
    f.queue = "high_priority_queue".into();
    f.priority = 5;
    s.load_integration(&f, t0).unwrap();
    let i = s.get_integration("sales").unwrap().unwrap();
    assert!(i.enabled && !i.removed);
    assert_eq!(i.metadata["group"], "finance");
    assert_eq!(i.queue, "high_priority_queue");
    assert_eq!((i.priority, i.max_concurrent_runs), (5, Some(1)));
    assert_eq!(i.loaded_at, Some(t0));
    assert!(s.set_enabled("sales", false, t0).unwrap());
    assert!(!s.set_enabled("sales", false, t0).unwrap());
    // An edited file keeps the flag.
    f.content_hash = "h2".into();
    s.load_integration(&f, t0 + TimeDelta::minutes(1)).unwrap();
    let i = s.get_integration("sales").unwrap().unwrap();
    assert!(!i.enabled);
    assert_eq!(i.content_hash.as_deref(), Some("h2"));
    assert!(!s.is_enabled("sales").unwrap());
    // A broken edit is reported; the loaded version stays.
    s.set_load_error(
        "sales",
        Some("sales.yaml:3: unknown key"),
        t0 + TimeDelta::minutes(2),
    )
    .unwrap();
    let i = s.get_integration("sales").unwrap().unwrap();
    assert_eq!(i.load_error.as_deref(), Some("sales.yaml:3: unknown key"));
    assert_eq!(i.load_error_at, Some(t0 + TimeDelta::minutes(2)));
    assert_eq!(i.content_hash.as_deref(), Some("h2"));
    // Re-enabling records the resume instant.
    let back = t0 + TimeDelta::hours(3);
    assert!(s.set_enabled("sales", true, back).unwrap());
    let i = s.get_integration("sales").unwrap().unwrap();
    assert!(i.enabled);
    assert_eq!(i.resumed_at, Some(back));
    s.set_next_run("sales", Some(back + TimeDelta::minutes(15)))
        .unwrap();
    s.set_removed("sales", true, back).unwrap();
    let i = s.get_integration("sales").unwrap().unwrap();
    assert!(i.removed);
    assert_eq!(i.next_run_at, Some(back + TimeDelta::minutes(15)));
    // Loading again clears the error and the removed flag.
    s.load_integration(&f, back).unwrap();
    let i = s.get_integration("sales").unwrap().unwrap();
    assert!(!i.removed && i.load_error.is_none());
    // Survives a reopen; the list has every integration by name with its last run.
    drop(s);
    let s = db.open();
    let run = s.create_run(&new_run("sales", Owner::External)).unwrap();
    s.set_enabled("zeta", false, back).unwrap();
    let all = s.list_integrations().unwrap();
    let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["sales", "zeta"]);
    assert_eq!(all[0].last_run.as_ref().unwrap().id, run);
    assert_eq!(all[0].last_run.as_ref().unwrap().status, Status::Running);
    assert!(!all[1].enabled && all[1].last_run.is_none());
    assert!(s.get_integration("nope").unwrap().is_none());
    let json = serde_json::to_value(&all[0]).unwrap();
    assert_eq!(json["metadata"]["direction"], "inward");
}

fn cancel_requests_and_backfills(db: &Db) {
    let s = db.open();
    let run = s.create_run(&new_run("c", Owner::Pipe)).unwrap();
    assert!(!s.cancel_requested(run).unwrap());
    assert!(s.request_cancel(run, Utc::now()).unwrap());
    assert!(s.cancel_requested(run).unwrap());
    s.finish_run(run, Status::Cancelled, None, true).unwrap();
    assert!(!s.cancel_requested(run).unwrap());
    assert!(!s.request_cancel(run, Utc::now()).unwrap());
    assert!(matches!(
        s.request_cancel(777, Utc::now()).unwrap_err(),
        StoreError::NotFound(_)
    ));
    // Failures in a row, for pause_after_failures.
    for status in [
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
        Status::Failed,
    ] {
        let r = s.create_run(&new_run("f", Owner::External)).unwrap();
        s.finish_run(r, status, None, false).unwrap();
    }
    assert_eq!(s.consecutive_failures("f").unwrap(), 2);
    assert_eq!(s.consecutive_failures("none").unwrap(), 0);
}

/// SQLite only: a history file written by a `pipe` from before the store (schema 3, no
/// migrations table) opens, keeps its rows and gets the new schema.
#[test]
fn an_old_history_file_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let old = rusqlite::Connection::open(state.join(DB_FILE)).unwrap();
    old.execute_batch(
        r#"
CREATE TABLE integrations (name TEXT PRIMARY KEY, description TEXT,
    enabled INTEGER NOT NULL DEFAULT 1, last_run_id INTEGER, last_run_at TEXT);
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}', "trigger" TEXT NOT NULL, status TEXT NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT, logical_date TEXT, error TEXT, pid INTEGER,
    pid_start TEXT, owner TEXT NOT NULL DEFAULT 'pipe');
CREATE INDEX runs_by_pipeline ON runs(pipeline, id);
CREATE INDEX runs_by_status ON runs(status);
CREATE TABLE step_runs (run_id INTEGER NOT NULL REFERENCES runs(id), step TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, started_at TEXT,
    finished_at TEXT, duration_ms INTEGER, "rows" INTEGER, error TEXT, outputs TEXT,
    PRIMARY KEY (run_id, step));
CREATE TABLE logs (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id),
    time TEXT NOT NULL, level TEXT NOT NULL, step TEXT, message TEXT NOT NULL,
    description TEXT, file TEXT);
CREATE INDEX logs_by_run ON logs(run_id, id);
ALTER TABLE step_runs ADD COLUMN kind TEXT;
ALTER TABLE runs ADD COLUMN host TEXT;
PRAGMA user_version = 3;
INSERT INTO integrations(name, description, enabled, last_run_id) VALUES ('old', 'legacy', 0, 1);
INSERT INTO runs(pipeline, "trigger", status, started_at, finished_at, owner)
    VALUES ('old', 'cli', 'succeeded', '2025-01-01T00:00:00.000Z', '2025-01-01T00:01:00.000Z', 'pipe');
INSERT INTO step_runs(run_id, step, status, attempts, "rows", kind, finished_at)
    VALUES (1, 'b', 'succeeded', 1, 5, 'sql.query', '2025-01-01T00:00:30.000Z');
INSERT INTO step_runs(run_id, step, status, attempts, "rows", kind, finished_at)
    VALUES (1, 'a', 'succeeded', 1, 7, 'sql.query', '2025-01-01T00:00:40.000Z');
INSERT INTO logs(run_id, time, level, message) VALUES (1, '2025-01-01T00:00:10.000Z', 'info', 'hello');
"#,
    )
    .unwrap();
    drop(old);
    let s = store::open(&StoreConfig::sqlite(&state)).unwrap();
    let version = s.schema_version().unwrap();
    assert!(version >= 4, "{version}");
    let d = s.get_run(1).unwrap().unwrap();
    assert_eq!(d.run.status, Status::Succeeded);
    assert_eq!(d.run.attempt, 1);
    assert_eq!(d.log_count, 1);
    // Step rows keep their order and move to attempt 1.
    let steps: Vec<(&str, u32)> = d
        .steps
        .iter()
        .map(|s| (s.step.as_str(), s.run_attempt))
        .collect();
    assert_eq!(steps, vec![("b", 1), ("a", 1)]);
    assert_eq!(
        s.rows_since("old", "sql.query", t("2024-01-01T00:00:00Z"))
            .unwrap(),
        12
    );
    let i = s.get_integration("old").unwrap().unwrap();
    assert!(!i.enabled);
    assert_eq!(i.description.as_deref(), Some("legacy"));
    assert_eq!(i.queue, DEFAULT_QUEUE);
    // New runs get new ids; the new tables work.
    let id = s.create_run(&new_run("old", Owner::External)).unwrap();
    assert_eq!(id, 2);
    s.enqueue(&item("old", 0), Utc::now()).unwrap();
    drop(s);
    let c = rusqlite::Connection::open(state.join(DB_FILE)).unwrap();
    let user_version: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(user_version, i64::from(version));
    let applied: Vec<i64> = c
        .prepare("SELECT version FROM schema_migrations ORDER BY version")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(applied, (1..=i64::from(version)).collect::<Vec<_>>());
    // A newer file than this pipe knows is refused, not misread.
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    let err = store::open(&StoreConfig::sqlite(&state))
        .unwrap_err()
        .to_string();
    assert!(err.contains("newer than this pipe knows"), "{err}");
}

#[test]
fn open_rejects_unknown_urls_and_hides_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let err = store::open(&StoreConfig {
        url: Some("mysql://u:p@h/db".into()),
        state_dir: dir.path().into(),
    })
    .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    assert!(
        err.to_string().contains("unknown kind of database `mysql`"),
        "{err}"
    );
    // A server that is not there: the message names it without the password.
    let err = store::open(&StoreConfig {
        url: Some("postgres://pipe:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=2".into()),
        state_dir: dir.path().into(),
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("postgres://pipe@127.0.0.1:1/nowhere"), "{err}");
    assert!(!err.contains("s3cret-pw"), "{err}");
    // `sqlite:PATH` puts the database elsewhere; run folders stay in the state dir.
    let s = store::open(&StoreConfig {
        url: Some(format!(
            "sqlite:{}",
            dir.path().join("db/other.sqlite").display()
        )),
        state_dir: dir.path().join("state"),
    })
    .unwrap();
    let id = s.create_run(&new_run("p", Owner::External)).unwrap();
    assert!(dir.path().join("db/other.sqlite").is_file());
    assert!(s.run_dir(id).starts_with(dir.path().join("state")));
    assert!(s.describe().starts_with("sqlite "), "{}", s.describe());
}

fn prune_keeps_what_is_still_needed(db: &Db) {
    let s = db.open();
    let t0 = t("2026-12-01T00:00:00Z");
    let tick = |at| PlannedTick {
        scheduled_at: at,
        enqueue: None,
        note: None,
    };
    let old_ticks: Vec<_> = (0..3).map(|h| tick(t0 + TimeDelta::hours(h))).collect();
    s.record_ticks("p", "f", &old_ticks, t0 + TimeDelta::hours(2), t0)
        .unwrap();
    // A tick ahead of the cursor (planned early) stays however old the limit.
    s.record_ticks("p", "f", &[tick(t0 + TimeDelta::hours(30))], t0, t0)
        .unwrap();
    let done = s.enqueue(&item("p", 0), t0).unwrap().id;
    s.claim("w", &[], Duration::from_secs(5), t0)
        .unwrap()
        .unwrap();
    s.ack(done, AckOutcome::Done, t0).unwrap();
    let queued = s.enqueue(&item("p", 0), t0).unwrap().id;
    let gone = remote_owner("run");
    s.heartbeat(&gone, Duration::from_secs(5), t0).unwrap();
    let live = remote_owner("run");
    s.heartbeat(&live, Duration::from_secs(3600 * 48), t0)
        .unwrap();
    let cut = t0 + TimeDelta::days(1);
    let pruned = s.prune(cut).unwrap();
    assert_eq!(
        pruned,
        Pruned {
            ticks: 2,
            queue_items: 1,
            leases: 1,
            workers: 0,
        }
    );
    let left: Vec<_> = s
        .list_ticks("p", 0)
        .unwrap()
        .iter()
        .map(|t| t.scheduled_at)
        .collect();
    assert_eq!(
        left,
        vec![t0 + TimeDelta::hours(30), t0 + TimeDelta::hours(2)]
    );
    assert!(s.get_item(done).unwrap().is_none());
    assert!(s.get_item(queued).unwrap().is_some());
    let leases: Vec<String> = s
        .list_leases()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(leases, vec![live.id]);
    assert_eq!(s.prune(cut).unwrap(), Pruned::default());
}

/// The service calls the store from async code: directly (it should not, but must not
/// panic), through `spawn_blocking`, and drops its last handle on a runtime thread.
fn works_from_async_tasks(db: &Db) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = db.cfg.clone();
    rt.block_on(async move {
        let s = store::open(&cfg).unwrap();
        let id = s.create_run(&new_run("a", Owner::External)).unwrap();
        let s2 = s.clone();
        let status = tokio::task::spawn_blocking(move || s2.run_status(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, Some(Status::Running));
        let w = HistoryWriter::start(s.clone(), id).unwrap();
        w.event(&RunEvent::Log(log(None, "from async")));
        w.flush();
        assert_eq!(s.logs(id, 0).unwrap().len(), 1);
        let reader = HistoryReader {
            store: s.clone(),
            writer: Some(Arc::new(w)),
        };
        use engine::step::HistoryView;
        assert_eq!(reader.rows_since("a", "log", Utc::now()).unwrap(), 0);
        let task = tokio::spawn(async move {
            drop(reader);
            drop(s);
        });
        task.await.unwrap();
    });
}

/// A planner's round: many integrations' ticks in one transaction, from two servers at once
/// (in opposite orders), and the counts it reads first.
/// `record_ticks_many` in one round: a tick whose item's dedup key a queued item holds
/// merges into it (as `enqueue` does), an item without a key is queued, a tick seen before
/// queues nothing, a skipped tick is recorded; cursors and next runs move.
fn batched_ticks_merge_and_unkeyed_items_like_enqueue(db: &Db) {
    let s = db.open();
    let at = t("2026-12-02T06:00:00Z");
    let mut held = item("m", 0);
    held.dedup_key = Some("m@06:00".into());
    let held = s.enqueue(&held, at).unwrap().id;
    let tick = |name: &str, key: Option<&str>, enqueue: bool| PlannedTick {
        scheduled_at: at,
        enqueue: enqueue.then(|| {
            let mut e = item(name, 3);
            e.trigger = Trigger::Schedule;
            e.logical_date = Some(at);
            e.dedup_key = key.map(str::to_string);
            e
        }),
        note: (!enqueue).then(|| "skipped: overlap".to_string()),
    };
    let round = |s: &dyn RunStore| {
        let mut batches = Vec::new();
        for (name, key, enqueue) in [
            ("m", Some("m@06:00"), true),
            ("u", None, true),
            ("k", Some("k@06:00"), true),
            ("x", None, false),
        ] {
            let mut b = TickBatch::new(name, "cron:0", at);
            b.ticks = vec![tick(name, key, enqueue)];
            b.next_run = Some(Some(at + TimeDelta::minutes(1)));
            batches.push(b);
        }
        s.record_ticks_many(&batches, at).unwrap()
    };
    let out = round(s.as_ref());
    assert!(out.iter().all(|o| o.len() == 1 && o[0].inserted));
    assert_eq!(
        out[0][0].queue_item,
        Some(held),
        "merged into the queued item"
    );
    let merged = s.get_item(held).unwrap().unwrap();
    assert_eq!(merged.priority, 3, "the merge raised the priority");
    let u = out[1][0].queue_item.expect("an unkeyed item is queued");
    let k = out[2][0].queue_item.expect("a keyed item is queued");
    assert_ne!(u, k);
    assert_eq!(
        s.get_item(k).unwrap().unwrap().dedup_key.as_deref(),
        Some("k@06:00")
    );
    assert_eq!(out[3][0].queue_item, None, "a skipped tick queues nothing");
    let ticks = s.list_ticks("x", 0).unwrap();
    assert_eq!(ticks.len(), 1);
    assert_eq!(s.list_ticks("k", 0).unwrap()[0].queue_item, Some(k));
    let cursors = s.schedule_cursors().unwrap();
    assert_eq!(cursors["m"].last_planned, at);
    assert_eq!(
        s.get_integration("u").unwrap().unwrap().next_run_at,
        Some(at + TimeDelta::minutes(1))
    );
    // The same round again: every tick exists, nothing more is queued.
    let again = round(s.as_ref());
    assert!(again
        .iter()
        .all(|o| !o[0].inserted && o[0].queue_item.is_none()));
    assert_eq!(
        s.list_queue(&QueueFilter::default()).unwrap().len(),
        3,
        "m (merged), u, k"
    );
}

fn batched_ticks_and_counts(db: &Db) {
    let s = db.open();
    let base = t("2026-12-02T06:00:00Z");
    let names: Vec<String> = (0..30).map(|i| format!("int{i:02}")).collect();
    for n in &names {
        loaded(s.as_ref(), n, Some(1));
    }
    assert!(s.schedule_cursors().unwrap().is_empty());
    let batches = |reverse: bool| -> Vec<TickBatch> {
        let mut v: Vec<TickBatch> = names
            .iter()
            .map(|n| {
                let mut b = TickBatch::new(n.clone(), "cron:*", base + TimeDelta::minutes(2));
                b.ticks = (0..3)
                    .map(|m| PlannedTick {
                        scheduled_at: base + TimeDelta::minutes(m),
                        enqueue: Some(Enqueue {
                            logical_date: Some(base + TimeDelta::minutes(m)),
                            ..Enqueue::new(n.clone(), Trigger::Schedule)
                        }),
                        note: None,
                    })
                    .collect();
                b.next_run = Some(Some(base + TimeDelta::minutes(3)));
                b
            })
            .collect();
        if reverse {
            v.reverse();
        }
        v
    };
    let barrier = Arc::new(Barrier::new(2));
    let planners: Vec<_> = [false, true]
        .into_iter()
        .map(|reverse| {
            let cfg = db.cfg.clone();
            let barrier = barrier.clone();
            let batches = batches(reverse);
            std::thread::spawn(move || {
                let s = store::open(&cfg).unwrap();
                barrier.wait();
                let out = s.record_ticks_many(&batches, Utc::now()).unwrap();
                assert_eq!(out.len(), batches.len());
                for (b, o) in batches.iter().zip(&out) {
                    assert_eq!(o.len(), 3);
                    assert_eq!(o[0].scheduled_at, b.ticks[0].scheduled_at);
                }
                out.iter()
                    .flatten()
                    .filter(|o| o.inserted && o.queue_item.is_some())
                    .count()
            })
        })
        .collect();
    let inserted: usize = planners.into_iter().map(|p| p.join().unwrap()).sum();
    assert_eq!(inserted, 90);
    let cursors = s.schedule_cursors().unwrap();
    assert_eq!(cursors.len(), 30);
    assert_eq!(cursors["int07"].last_planned, base + TimeDelta::minutes(2));
    assert_eq!(cursors["int07"].fingerprint, "cron:*");
    let i = s.get_integration("int07").unwrap().unwrap();
    assert_eq!(i.next_run_at, Some(base + TimeDelta::minutes(3)));
    // Counts: three queued each; one claimed (no run yet) and one running elsewhere.
    let now = Utc::now();
    let c = s
        .claim("w", &[], Duration::from_secs(30), now)
        .unwrap()
        .unwrap();
    s.create_run(&new_run("int29", Owner::Pipe)).unwrap();
    let counts = s.integration_counts().unwrap();
    assert_eq!(
        counts[&c.integration],
        IntegrationCounts {
            active: 1,
            queued: 2
        }
    );
    assert_eq!(
        counts["int29"].active,
        if c.integration == "int29" { 2 } else { 1 }
    );
    for n in &names {
        assert_eq!(counts[n].active, s.count_active(n).unwrap(), "{n}");
        assert_eq!(counts[n].queued, s.count_queued(n).unwrap(), "{n}");
    }
}

fn integrations_version_moves_with_the_list(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    let mut seen = vec![s.integrations_version().unwrap()];
    let mut changed = |s: &dyn RunStore, what: &str| {
        let v = s.integrations_version().unwrap();
        assert!(
            !seen.contains(&v),
            "{what}: version {v} seen before ({seen:?})"
        );
        seen.push(v);
    };
    loaded(s.as_ref(), "v", Some(1));
    changed(s.as_ref(), "load");
    s.set_enabled("v", false, now).unwrap();
    changed(s.as_ref(), "disable");
    s.set_enabled("v", true, now).unwrap();
    changed(s.as_ref(), "enable");
    s.set_load_error("v", Some("bad"), now).unwrap();
    changed(s.as_ref(), "load error");
    s.set_removed("v", true, now).unwrap();
    changed(s.as_ref(), "removed");
    s.create_run(&new_run("brand_new", Owner::External))
        .unwrap();
    changed(s.as_ref(), "a run of a new integration");
    // What the list shows as runs does not count; a no-op enable neither.
    let v = s.integrations_version().unwrap();
    s.create_run(&new_run("v", Owner::External)).unwrap();
    s.set_next_run("v", Some(now)).unwrap();
    assert!(!s.set_enabled("v", true, now).unwrap());
    assert_eq!(s.integrations_version().unwrap(), v);
}

/// A store whose last migration is missing (as a `pipe` one version older left it) gets it
/// when opened; what it held stays.
fn a_database_one_version_behind_is_migrated(db: &Db) {
    let s = db.open();
    let version = s.schema_version().unwrap();
    let run = s.create_run(&new_run("kept", Owner::External)).unwrap();
    drop(s);
    // Undo the last four migrations (ended sessions; the API's accounts and credentials;
    // kept pipeline texts; the outbox, fences and workers) as an older pipe left it, with a
    // queued item of that time.
    db.raw(&format!(
        "ALTER TABLE users DROP COLUMN sessions_ended_at;
         DELETE FROM schema_migrations WHERE version = {version};
         DROP TABLE users; DROP TABLE api_tokens; DROP TABLE settings; DROP TABLE credentials;
         DROP INDEX audit_by_target; DROP TABLE audit;
         DELETE FROM schema_migrations WHERE version = {};
         DROP TABLE pipeline_sources; ALTER TABLE runs DROP COLUMN source_hash;
         ALTER TABLE runs DROP COLUMN source_path;
         DELETE FROM schema_migrations WHERE version = {};
         DROP INDEX queue_outbox; DROP INDEX queue_published; DROP TABLE workers;
         ALTER TABLE queue DROP COLUMN published_at; ALTER TABLE queue DROP COLUMN fence;
         ALTER TABLE runs DROP COLUMN fence;
         DELETE FROM schema_migrations WHERE version = {};
         INSERT INTO queue(integration, queue, priority, \"trigger\", params, state, enqueued_at)
         VALUES ('kept', 'default', 0, 'manual', '{{}}', 'queued', '2026-01-01T00:00:00.000Z');",
        version - 1,
        version - 2,
        version - 3
    ));
    if db.cfg.url.is_none() {
        db.raw(&format!("PRAGMA user_version = {};", version - 4));
    }
    let s = db.open();
    assert_eq!(s.schema_version().unwrap(), version);
    assert_eq!(s.run_status(run).unwrap(), Some(Status::Running));
    assert_eq!(s.get_run(run).unwrap().unwrap().run.fence, None);
    assert_eq!(s.run_source(run).unwrap(), None);
    // The item queued before the outbox existed is found unpublished, never claimed.
    let old = s.unpublished(0).unwrap();
    assert_eq!(old.len(), 1);
    assert_eq!((old[0].integration.as_str(), old[0].fence), ("kept", 0));
    assert!(s.list_workers(Utc::now()).unwrap().is_empty());
    let v = s.integrations_version().unwrap();
    loaded(s.as_ref(), "after", None);
    assert_eq!(s.integrations_version().unwrap(), v + 1);
}

fn lost_runs_are_requeued_when_the_integration_says_so(db: &Db) {
    let s = db.open();
    let t0 = t("2020-01-01T00:00:00Z");
    let ttl = Duration::from_secs(10);
    let mut f = IntegrationFile::new("retry", "retry.yaml", "h");
    f.retry_on_lost = true;
    f.metadata = serde_json::json!({"owner": "data"});
    s.load_integration(&f, t0).unwrap();
    let meta = s.get_integration("retry").unwrap().unwrap().metadata;
    assert_eq!(
        meta,
        serde_json::json!({"owner": "data", "retry_on_lost": true})
    );
    loaded(s.as_ref(), "no_retry", None);
    let tick = t("2020-01-01T06:00:00Z");
    let mut e = Enqueue::new("retry", Trigger::Schedule);
    e.logical_date = Some(tick);
    e.priority = 4;
    e.dedup_key = Some("retry@06:00".into());
    e.params = serde_json::json!({"day": "2020-01-01"});
    let mut item_id = s.enqueue(&e, t0).unwrap().id;
    let other = s.enqueue(&item("no_retry", 0), t0).unwrap().id;
    // A worker takes both and dies; the first process to notice (a CLI here) re-queues.
    let mut requeued = Vec::new();
    for round in 0..5 {
        let worker = remote_owner("worker");
        s.heartbeat(&worker, ttl, t0).unwrap();
        let mut mine = vec![item_id];
        if round == 0 {
            mine.push(other);
        }
        for &id in &mine {
            let it = s.claim(&worker.id, &[], ttl, t0).unwrap().unwrap();
            assert_eq!(it.id, id);
            s.create_run(&NewRun {
                lease_owner: Some(worker.id.clone()),
                queue_item: Some(it.id),
                logical_date: it.logical_date,
                ..NewRun::new(it.integration.clone(), it.trigger, Owner::Pipe)
            })
            .unwrap();
        }
        let lost = if round == 0 {
            assert_eq!(s.mark_abandoned().unwrap(), 2);
            s.list_queue(&QueueFilter {
                state: Some(QueueState::Queued),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect::<Vec<_>>()
        } else {
            s.expire_lost(Utc::now())
                .unwrap()
                .into_iter()
                .filter_map(|l| l.requeued)
                .collect()
        };
        match lost.as_slice() {
            [] => break,
            [again] => {
                let it = s.get_item(*again).unwrap().unwrap();
                assert_eq!(it.state, QueueState::Queued);
                assert_eq!(
                    (it.integration.as_str(), it.priority, it.trigger),
                    ("retry", 4, Trigger::Schedule)
                );
                assert_eq!(it.logical_date, Some(tick));
                assert_eq!(it.params, e.params);
                assert_eq!(it.dedup_key, e.dedup_key);
                requeued.push(*again);
                item_id = *again;
            }
            more => panic!("one re-queue expected: {more:?}"),
        }
    }
    // Three retries of one tick, then it stays lost.
    assert_eq!(requeued.len(), 3, "{requeued:?}");
    assert_eq!(s.count_queued("retry").unwrap(), 0);
    assert_eq!(s.count_queued("no_retry").unwrap(), 0);
    let abandoned = s
        .find_runs(&RunFilter {
            pipeline: Some("retry".into()),
            status: Some(Status::Abandoned),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(abandoned.len(), 4);
}

/// More blocked items than a claim reads at once stand before the one that can run: the
/// claim pages on and finds it; a disabled integration's queued items are cancelled on the
/// way, never claimed.
fn claim_walks_past_full_integrations_and_cancels_disabled_ones(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    let lease = Duration::from_secs(30);
    loaded(s.as_ref(), "busy", Some(1));
    loaded(s.as_ref(), "off", None);
    for _ in 0..300 {
        s.enqueue(&item("busy", 9), now).unwrap();
    }
    let first = s.claim("w", &[], lease, now).unwrap().unwrap();
    assert_eq!(first.integration, "busy");
    let off: Vec<i64> = (0..3)
        .map(|_| s.enqueue(&item("off", 8), now).unwrap().id)
        .collect();
    assert!(s.set_enabled("off", false, now).unwrap());
    let free = s.enqueue(&item("free", 1), now).unwrap().id;
    // 299 items of `busy` (full) and 3 of `off` (disabled) come first in claim order.
    let got = s.claim("w", &[], lease, now).unwrap().unwrap();
    assert_eq!(got.id, free);
    for id in off {
        assert_eq!(
            s.get_item(id).unwrap().unwrap().state,
            QueueState::Cancelled
        );
    }
    assert!(s.claim("w", &[], lease, now).unwrap().is_none());
    assert_eq!(s.count_queued("busy").unwrap(), 299);
    s.ack(first.id, AckOutcome::Done, now).unwrap();
    assert_eq!(
        s.claim("w", &[], lease, now).unwrap().unwrap().integration,
        "busy"
    );
}

/// Many threads writing at once share commits (group commit): each still gets its own
/// run id, claim and outcome, and a bad write fails alone.
fn grouped_writes_of_many_threads_each_get_their_own_outcome(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    let lease = Duration::from_secs(30);
    for k in 0..64 {
        s.enqueue(&item(&format!("g{k}"), 0), now).unwrap();
    }
    let results: Vec<(i64, i64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|w| {
                let s = s.clone();
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(it) = s.claim(&format!("w{w}"), &[], lease, now).unwrap() {
                        let run = s
                            .create_run(&NewRun {
                                queue_item: Some(it.id),
                                ..NewRun::new(it.integration.clone(), Trigger::Manual, Owner::Pipe)
                            })
                            .unwrap();
                        s.write_events(
                            run,
                            &[
                                RunEvent::Log(log(None, &format!("run {run} of item {}", it.id))),
                                RunEvent::RunFinished {
                                    status: Status::Succeeded,
                                    error: None,
                                    at: Utc::now(),
                                },
                            ],
                        )
                        .unwrap();
                        // A write that fails (no such item) fails alone.
                        assert!(s.ack(-it.id, AckOutcome::Done, now).is_err());
                        s.ack(it.id, AckOutcome::Done, now).unwrap();
                        mine.push((it.id, run));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(results.len(), 64, "every item claimed once");
    let items: std::collections::HashSet<i64> = results.iter().map(|r| r.0).collect();
    let runs: std::collections::HashSet<i64> = results.iter().map(|r| r.1).collect();
    assert_eq!((items.len(), runs.len()), (64, 64));
    for (item, run) in results {
        let q = s.get_item(item).unwrap().unwrap();
        assert_eq!((q.state, q.run_id), (QueueState::Done, Some(run)));
        let logs = s.logs(run, 0).unwrap();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].message, format!("run {run} of item {item}"));
        assert_eq!(s.run_status(run).unwrap(), Some(Status::Succeeded));
    }
}

fn ids(items: &[QueueItem]) -> Vec<i64> {
    items.iter().map(|i| i.id).collect()
}

/// The outbox: what the store queued is found until marked published, a "crash" between
/// enqueue and publish loses nothing, and items whose publish is old are found again.
fn outbox_finds_what_was_never_published(db: &Db) {
    let s = db.open();
    let t0 = t("2030-01-01T00:00:00Z");
    let a = s.enqueue(&item("o", 1), t0).unwrap().id;
    let b = s.enqueue(&item("o", 5), t0).unwrap().id;
    let c = s.enqueue(&item("o", 1), t0).unwrap().id;
    // Claim order: priority, then age.
    assert_eq!(ids(&s.unpublished(0).unwrap()), vec![b, a, c]);
    assert_eq!(ids(&s.unpublished(2).unwrap()), vec![b, a]);
    // The process dies after queueing `d`, before publishing it: a new one finds it.
    let d = s.enqueue(&item("o", 0), t0).unwrap().id;
    drop(s);
    let s = db.open();
    assert_eq!(ids(&s.unpublished(0).unwrap()), vec![b, a, c, d]);
    let t1 = t0 + TimeDelta::seconds(1);
    assert_eq!(s.mark_published(&[b, a], t1).unwrap(), 2);
    assert_eq!(s.mark_published(&[], t1).unwrap(), 0);
    assert_eq!(ids(&s.unpublished(0).unwrap()), vec![c, d]);
    assert_eq!(s.get_item(b).unwrap().unwrap().published_at, Some(t1));
    // A claimed item is neither marked nor republished.
    let w = remote_owner("worker");
    assert!(matches!(
        s.claim_item(c, &w.id, Duration::from_secs(10), t1).unwrap(),
        ItemClaim::Claimed(_)
    ));
    assert_eq!(s.mark_published(&[c, d], t1).unwrap(), 1);
    assert!(s.unpublished(0).unwrap().is_empty());
    // Publishes older than `before` are found again (strictly older), in claim order.
    assert!(s.stale_published(t1, 0).unwrap().is_empty());
    let later = t1 + TimeDelta::seconds(30);
    assert_eq!(ids(&s.stale_published(later, 0).unwrap()), vec![b, a, d]);
    assert_eq!(ids(&s.stale_published(later, 1).unwrap()), vec![b]);
    assert_eq!(s.mark_published(&[b], later).unwrap(), 1);
    assert_eq!(ids(&s.stale_published(later, 0).unwrap()), vec![a, d]);
    // A claim lost before its run started goes back to the queue, to be published again
    // (its message was acked when it was claimed).
    s.heartbeat(&w, Duration::from_secs(10), t1).unwrap();
    s.expire_lost(t1 + TimeDelta::seconds(11)).unwrap();
    let back = s.get_item(c).unwrap().unwrap();
    assert_eq!((back.state, back.published_at), (QueueState::Queued, None));
    assert_eq!(ids(&s.unpublished(0).unwrap()), vec![c]);
    // A merge that raises the priority is published again (with the new one).
    let mut e = item("o", 1);
    e.dedup_key = Some("o@1".into());
    let k = s.enqueue(&e, t1).unwrap().id;
    s.mark_published(&[c, k], t1).unwrap();
    assert_eq!(
        s.enqueue(&e, t1).unwrap(),
        Enqueued {
            id: k,
            merged: true
        }
    );
    assert!(s.unpublished(0).unwrap().is_empty());
    e.priority = 9;
    assert!(s.enqueue(&e, t1).unwrap().merged);
    let raised = s.unpublished(0).unwrap();
    assert_eq!((ids(&raised), raised[0].priority), (vec![k], 9));
}

/// The outbox publishes no more of an integration than its `max_concurrent_runs` has room
/// for (counting what is in flight), nor more of a backfill than its `max_parallel`; an item
/// a worker found `Full` and unpublished comes back once there is room.
fn outbox_holds_back_what_has_no_room(db: &Db) {
    let s = db.open();
    let now = t("2030-01-01T00:00:00Z");
    let lease = Duration::from_secs(30);
    loaded(s.as_ref(), "capped", Some(2));
    let q: Vec<i64> = (0..4)
        .map(|p| s.enqueue(&item("capped", p), now).unwrap().id)
        .collect();
    let free = s.enqueue(&item("free", 0), now).unwrap().id;
    // Highest priorities first, two of four.
    assert_eq!(ids(&s.unpublished(0).unwrap()), vec![q[3], q[2], free]);
    s.mark_published(&[q[3]], now).unwrap();
    // One in flight: one more has room.
    assert_eq!(ids(&s.unpublished(0).unwrap()), vec![q[2], free]);
    s.mark_published(&[q[2], free], now).unwrap();
    assert!(s.unpublished(0).unwrap().is_empty());
    // Claimed (no run yet) still counts; a third claim finds no room, and the worker hands
    // the message back: unpublished, but not publishable while the two are active.
    let w = remote_owner("worker");
    for id in [q[3], q[2]] {
        assert!(matches!(
            s.claim_item(id, &w.id, lease, now).unwrap(),
            ItemClaim::Claimed(_)
        ));
    }
    s.mark_published(&[q[1]], now).unwrap();
    assert!(matches!(
        s.claim_item(q[1], &w.id, lease, now).unwrap(),
        ItemClaim::Full
    ));
    assert!(s.unpublish(q[1]).unwrap());
    assert!(!s.unpublish(q[3]).unwrap(), "a claimed item is not queued");
    assert!(s.unpublished(0).unwrap().is_empty());
    s.ack(q[3], AckOutcome::Done, now).unwrap();
    assert_eq!(ids(&s.unpublished(0).unwrap()), vec![q[1]]);

    // A backfill of max_parallel 1: one at a time.
    loaded(s.as_ref(), "bf", None);
    let b = s
        .create_backfill(
            &NewBackfill {
                integration: "bf".into(),
                from: t("2026-11-01T00:00:00Z"),
                to: t("2026-11-03T00:00:00Z"),
                max_parallel: Some(1),
            },
            now,
        )
        .unwrap();
    let days: Vec<i64> = (1..=3)
        .map(|day| {
            let mut e = item("bf", 0);
            e.trigger = Trigger::Backfill;
            e.backfill_id = Some(b);
            e.logical_date = Some(Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap());
            s.enqueue(&e, now).unwrap().id
        })
        .collect();
    let of_bf = |v: Vec<QueueItem>| -> Vec<i64> {
        v.into_iter()
            .filter(|i| i.integration == "bf")
            .map(|i| i.id)
            .collect()
    };
    assert_eq!(of_bf(s.unpublished(0).unwrap()), vec![days[0]]);
    s.mark_published(&[days[0]], now).unwrap();
    assert!(of_bf(s.unpublished(0).unwrap()).is_empty());
    assert!(matches!(
        s.claim_item(days[0], &w.id, lease, now).unwrap(),
        ItemClaim::Claimed(_)
    ));
    assert!(of_bf(s.unpublished(0).unwrap()).is_empty());
    s.ack(days[0], AckOutcome::Done, now).unwrap();
    assert_eq!(of_bf(s.unpublished(0).unwrap()), vec![days[1]]);
}

/// `wait_for_queue`: on PostgreSQL an enqueue through another store handle (another
/// process) wakes a waiter; with nothing queued it times out. SQLite only waits.
fn queue_waiters_wake_when_another_process_queues(db: &Db) {
    let waiter = db.open();
    let other = db.open();
    let short = Duration::from_millis(300);
    assert!(!waiter.wait_for_queue(short).unwrap(), "nothing was queued");
    let t0 = std::time::Instant::now();
    let handle = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        other.enqueue(&item("w", 0), Utc::now()).unwrap();
        other
    });
    let woken = waiter.wait_for_queue(Duration::from_secs(20)).unwrap();
    let other = handle.join().unwrap();
    if db.pg_name.is_some() {
        assert!(woken, "the enqueue's NOTIFY woke the waiter");
        assert!(t0.elapsed() < Duration::from_secs(20));
    } else {
        assert!(!woken);
    }
    // Many items in one transaction are one wake-up, and nothing is left over after it.
    if db.pg_name.is_some() {
        let batch: Vec<_> = (0..3)
            .map(|k| {
                let mut b = TickBatch::new(format!("b{k}"), "f", t("2030-01-01T00:00:00Z"));
                b.ticks = vec![PlannedTick {
                    scheduled_at: t("2030-01-01T00:00:00Z"),
                    enqueue: Some(item(&format!("b{k}"), 0)),
                    note: None,
                }];
                b
            })
            .collect();
        other.record_ticks_many(&batch, Utc::now()).unwrap();
        assert!(waiter.wait_for_queue(Duration::from_secs(20)).unwrap());
        assert!(!waiter.wait_for_queue(short).unwrap());
    }
}

fn claim_item_outcomes(db: &Db) {
    let s = db.open();
    let now = t("2030-01-01T00:00:00Z");
    let lease = Duration::from_secs(30);
    loaded(s.as_ref(), "capped", Some(1));
    let x = s.enqueue(&item("capped", 0), now).unwrap().id;
    let y = s.enqueue(&item("capped", 0), now).unwrap().id;
    let got = match s.claim_item(x, "w1", lease, now).unwrap() {
        ItemClaim::Claimed(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!((got.id, got.state, got.fence), (x, QueueState::Claimed, 1));
    assert_eq!(got.claimed_by.as_deref(), Some("w1"));
    assert_eq!(got.claim_expires_at, Some(now + TimeDelta::seconds(30)));
    // A duplicate message of a claimed item.
    assert!(matches!(
        s.claim_item(x, "w2", lease, now).unwrap(),
        ItemClaim::Gone {
            state: QueueState::Claimed
        }
    ));
    // No room under the cap: the item stays queued for a later delivery.
    assert!(matches!(
        s.claim_item(y, "w2", lease, now).unwrap(),
        ItemClaim::Full
    ));
    assert_eq!(s.get_item(y).unwrap().unwrap().state, QueueState::Queued);
    assert_eq!(s.get_item(y).unwrap().unwrap().fence, 0);
    let run = s
        .create_run(&NewRun {
            queue_item: Some(x),
            fence: Some(1),
            lease_owner: Some("w1".into()),
            ..NewRun::new("capped", Trigger::Manual, Owner::Pipe)
        })
        .unwrap();
    assert_eq!(s.get_run(run).unwrap().unwrap().run.fence, Some(1));
    assert!(matches!(
        s.claim_item(y, "w2", lease, now).unwrap(),
        ItemClaim::Full
    ));
    s.write_events_fenced(
        run,
        1,
        &[RunEvent::RunFinished {
            status: Status::Succeeded,
            error: None,
            at: now,
        }],
    )
    .unwrap();
    assert_eq!(s.run_status(run).unwrap(), Some(Status::Succeeded));
    // Redelivered after its run finished.
    assert!(matches!(
        s.claim_item(x, "w2", lease, now).unwrap(),
        ItemClaim::Gone {
            state: QueueState::Done
        }
    ));
    // The slot is free again.
    assert!(matches!(
        s.claim_item(y, "w2", lease, now).unwrap(),
        ItemClaim::Claimed(i) if i.id == y && i.fence == 1
    ));
    let z = s.enqueue(&item("free", 0), now).unwrap().id;
    s.cancel_item(z, now).unwrap();
    assert!(matches!(
        s.claim_item(z, "w2", lease, now).unwrap(),
        ItemClaim::Gone {
            state: QueueState::Cancelled
        }
    ));
    // Disabled after it was queued: cancelled now.
    loaded(s.as_ref(), "off", None);
    let o = s.enqueue(&item("off", 0), now).unwrap().id;
    s.set_enabled("off", false, now).unwrap();
    assert!(matches!(
        s.claim_item(o, "w2", lease, now).unwrap(),
        ItemClaim::Disabled
    ));
    assert_eq!(s.get_item(o).unwrap().unwrap().state, QueueState::Cancelled);
    assert!(matches!(
        s.claim_item(987_654, "w2", lease, now).unwrap(),
        ItemClaim::NotFound
    ));
    // A backfill's max_parallel.
    loaded(s.as_ref(), "bf", None);
    let bf = s
        .create_backfill(
            &NewBackfill {
                integration: "bf".into(),
                from: now,
                to: now,
                max_parallel: Some(1),
            },
            now,
        )
        .unwrap();
    let mut e = item("bf", 0);
    e.backfill_id = Some(bf);
    let (b1, b2) = (
        s.enqueue(&e, now).unwrap().id,
        s.enqueue(&e, now).unwrap().id,
    );
    assert!(matches!(
        s.claim_item(b1, "w2", lease, now).unwrap(),
        ItemClaim::Claimed(_)
    ));
    assert!(matches!(
        s.claim_item(b2, "w3", lease, now).unwrap(),
        ItemClaim::Full
    ));
}

/// Workers on several machines (here: threads with a store each, so no shared process
/// state) claim by item id at once: the integration's cap and each item's single claim
/// hold.
fn claim_item_caps_hold_across_concurrent_claimers(db: &Db) {
    let s = db.open();
    let now = Utc::now();
    loaded(s.as_ref(), "two", Some(2));
    let items: Vec<i64> = (0..12)
        .map(|_| s.enqueue(&item("two", 0), now).unwrap().id)
        .collect();
    let contested = s.enqueue(&item("free", 0), now).unwrap().id;
    let threads = 6;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|n| {
            let (cfg, barrier, items) = (db.cfg.clone(), barrier.clone(), items.clone());
            std::thread::spawn(move || {
                let s = store::open(&cfg).unwrap();
                barrier.wait();
                let (mut claimed, mut contested_won) = (Vec::new(), false);
                // Each starts at another item, as messages would arrive.
                for k in 0..items.len() {
                    let id = items[(k + n * 2) % items.len()];
                    match s
                        .claim_item(id, &format!("w{n}"), Duration::from_secs(30), now)
                        .unwrap()
                    {
                        ItemClaim::Claimed(i) => claimed.push(i.id),
                        ItemClaim::Full | ItemClaim::Gone { .. } => {}
                        other => panic!("{other:?}"),
                    }
                    if k == 0 {
                        contested_won = matches!(
                            s.claim_item(contested, &format!("w{n}"), Duration::from_secs(30), now)
                                .unwrap(),
                            ItemClaim::Claimed(_)
                        );
                    }
                }
                (claimed, contested_won)
            })
        })
        .collect();
    let results: Vec<(Vec<i64>, bool)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let claimed: Vec<i64> = results.iter().flat_map(|r| r.0.clone()).collect();
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    assert_eq!(s.count_active("two").unwrap(), 2);
    assert_eq!(results.iter().filter(|r| r.1).count(), 1);
    let c = s.get_item(contested).unwrap().unwrap();
    assert_eq!((c.state, c.fence), (QueueState::Claimed, 1));
}

/// The fence is the claim count: each claim of an item that went back to the queue gets a
/// higher one, and a run for an older claim is refused.
fn fence_counts_the_claims_of_a_requeued_item(db: &Db) {
    let s = db.open();
    let t0 = t("2030-01-01T00:00:00Z");
    let ttl = Duration::from_secs(10);
    let (w1, w2) = (remote_owner("worker"), remote_owner("worker"));
    s.heartbeat(&w1, ttl, t0).unwrap();
    let it = s.enqueue(&item("f", 0), t0).unwrap().id;
    assert_eq!(s.get_item(it).unwrap().unwrap().fence, 0);
    let first = match s.claim_item(it, &w1.id, ttl, t0).unwrap() {
        ItemClaim::Claimed(i) => i.fence,
        other => panic!("{other:?}"),
    };
    assert_eq!(first, 1);
    // w1 stalls past its lease before creating the run: the item goes back.
    let t1 = t0 + TimeDelta::seconds(11);
    s.expire_lost(t1).unwrap();
    assert_eq!(s.get_item(it).unwrap().unwrap().state, QueueState::Queued);
    s.heartbeat(&w2, ttl, t1).unwrap();
    let second = match s.claim_item(it, &w2.id, ttl, t1).unwrap() {
        ItemClaim::Claimed(i) => i.fence,
        other => panic!("{other:?}"),
    };
    assert_eq!(second, 2);
    // w1 wakes up and tries to start the run of its (old) claim.
    let stale = NewRun {
        queue_item: Some(it),
        fence: Some(first),
        lease_owner: Some(w1.id.clone()),
        ..NewRun::new("f", Trigger::Manual, Owner::Pipe)
    };
    let err = s.create_run(&stale).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert!(err.to_string().contains("fence 1"), "{err}");
    assert!(s.list_runs(Some("f"), 0).unwrap().is_empty());
    let run = s
        .create_run(&NewRun {
            fence: Some(second),
            lease_owner: Some(w2.id.clone()),
            ..stale.clone()
        })
        .unwrap();
    assert_eq!(s.get_run(run).unwrap().unwrap().run.fence, Some(2));
    assert_eq!(s.get_item(it).unwrap().unwrap().run_id, Some(run));
    // A fence without its item is a caller's mistake.
    let err = s
        .create_run(&NewRun {
            queue_item: None,
            ..stale
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    // The polling claim counts too, and an unfenced run records the claim's fence.
    let again = s.enqueue(&item("g", 0), t1).unwrap().id;
    let polled = s.claim(&w2.id, &[], ttl, t1).unwrap().unwrap();
    assert_eq!((polled.id, polled.fence), (again, 1));
    let unfenced = s
        .create_run(&NewRun {
            queue_item: Some(again),
            ..NewRun::new("g", Trigger::Manual, Owner::Pipe)
        })
        .unwrap();
    assert_eq!(s.get_run(unfenced).unwrap().unwrap().run.fence, Some(1));
}

/// A stalled worker whose run was marked abandoned (its lease expired) cannot write to it
/// any more: its late events, its `RunFinished` included, are refused and not written.
fn fenced_writes_of_a_run_taken_away_are_refused(db: &Db) {
    let s = db.open();
    let t0 = Utc::now();
    let ttl = Duration::from_secs(10);
    let w = remote_owner("worker");
    s.heartbeat(&w, ttl, t0).unwrap();
    let it = s.enqueue(&item("fenced", 0), t0).unwrap().id;
    let ItemClaim::Claimed(claim) = s.claim_item(it, &w.id, ttl, t0).unwrap() else {
        panic!("not claimed")
    };
    let run = s
        .create_run(&NewRun {
            queue_item: Some(it),
            fence: Some(claim.fence),
            lease_owner: Some(w.id.clone()),
            ..NewRun::new("fenced", Trigger::Manual, Owner::Pipe)
        })
        .unwrap();
    let writer = HistoryWriter::start_fenced(s.clone(), run, claim.fence).unwrap();
    assert_eq!(writer.fence(), Some(claim.fence));
    writer.event(&RunEvent::StepStarted {
        step: "load".into(),
        attempt: 1,
        at: t0,
    });
    writer.event(&RunEvent::Log(log(Some("load"), "before the stall")));
    writer.flush();
    assert!(!writer.fenced_out());
    let d = s.get_run(run).unwrap().unwrap();
    assert_eq!((d.steps.len(), d.log_count), (1, 1));
    // A write under another fence is refused while the run is running; so is one for a
    // run that does not exist.
    let other = s
        .write_events_fenced(run, claim.fence + 1, &[RunEvent::Log(log(None, "x"))])
        .unwrap_err();
    assert!(matches!(other, StoreError::Fenced(_)), "{other}");
    assert!(other.is_conflict());
    assert!(matches!(
        s.write_events_fenced(987_654, 1, &[RunEvent::Log(log(None, "x"))])
            .unwrap_err(),
        StoreError::NotFound(_)
    ));
    // The worker stalls past its lease: the run is marked abandoned.
    let lost = s.expire_lost(t0 + TimeDelta::seconds(11)).unwrap();
    assert_eq!(lost.len(), 1);
    // It wakes up and goes on: a log row, the step's end and the run's.
    writer.event(&RunEvent::Log(log(Some("load"), "after the stall")));
    writer.event(&step_finished(
        "load",
        "sql.query",
        Status::Succeeded,
        Some(3),
    ));
    writer.event(&RunEvent::RunFinished {
        status: Status::Succeeded,
        error: None,
        at: Utc::now(),
    });
    writer.flush();
    assert!(writer.fenced_out());
    let err = writer.close().unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert!(err.to_string().contains("abandoned"), "{err}");
    let d = s.get_run(run).unwrap().unwrap();
    assert_eq!(d.run.status, Status::Abandoned);
    assert!(d
        .run
        .error
        .as_deref()
        .unwrap()
        .contains("stopped renewing its lease"));
    assert_eq!(d.log_count, 1);
    assert_eq!(d.steps[0].status, Status::Abandoned);
    // A repair attempt is no claim's: the old fence stays refused while it runs.
    s.start_attempt(run, Some("someone"), Utc::now()).unwrap();
    assert_eq!(s.get_run(run).unwrap().unwrap().run.fence, None);
    let err = s
        .write_events_fenced(run, claim.fence, &[RunEvent::Log(log(None, "late"))])
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    // Unfenced writers (a `pipe run`, the embedded service) are as before.
    s.write_events(run, &[RunEvent::Log(log(None, "repair"))])
        .unwrap();
    assert_eq!(s.get_run(run).unwrap().unwrap().log_count, 2);
}

fn workers_register_heartbeat_drain_and_prune(db: &Db) {
    let s = db.open();
    let t0 = t("2030-01-01T00:00:00Z");
    let secs = |n: i64| t0 + TimeDelta::seconds(n);
    let mut one = WorkerInfo::this_process("worker-a", vec!["high".into(), "default".into()], 4);
    one.lease = Duration::from_secs(10);
    one.version = Some("1.2.3".into());
    s.register_worker(&one, t0).unwrap();
    let listed = s.list_workers(t0).unwrap();
    assert_eq!(listed.len(), 1);
    let w = &listed[0];
    assert_eq!(
        (w.id.as_str(), w.slots, w.lease_ms, w.version.as_deref()),
        ("worker-a", 4, 10_000, Some("1.2.3"))
    );
    assert_eq!(w.queues, vec!["high".to_string(), "default".to_string()]);
    assert_eq!(w.pid, Some(i64::from(std::process::id())));
    assert!(w.running.is_empty());
    assert!(w.alive);
    assert_eq!(w.state, WorkerState::Active);
    let hb = s.worker_heartbeat("worker-a", &[7, 8], secs(5)).unwrap();
    assert!(!hb.drain_requested);
    let w = &s.list_workers(secs(5)).unwrap()[0];
    assert_eq!((w.running.clone(), w.heartbeat_at), (vec![7, 8], secs(5)));
    // Drain: asked once, seen at the next heartbeat, kept across a re-registration.
    assert!(s.request_drain("worker-a", secs(6)).unwrap());
    assert!(!s.request_drain("worker-a", secs(6)).unwrap());
    assert!(
        s.worker_heartbeat("worker-a", &[8], secs(7))
            .unwrap()
            .drain_requested
    );
    s.register_worker(&one, secs(7)).unwrap();
    let w = &s.list_workers(secs(7)).unwrap()[0];
    assert_eq!(
        (w.state, w.drain_requested_at, w.started_at),
        (WorkerState::Draining, Some(secs(6)), t0)
    );
    // Silent for longer than its lease: lost.
    let w = &s.list_workers(secs(18)).unwrap()[0];
    assert!(!w.alive);
    assert_eq!(w.state, WorkerState::Lost);
    // Unknown ids.
    for err in [
        s.request_drain("nope", t0).unwrap_err(),
        s.worker_heartbeat("nope", &[], t0).unwrap_err(),
        s.worker_stopped("nope", t0).unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    }
    // A clean stop; a stopped worker is not asked to drain; registering again revives it.
    let mut two = WorkerInfo::this_process("worker-b", vec![], 1);
    two.lease = Duration::from_secs(10);
    s.register_worker(&two, secs(1)).unwrap();
    s.worker_stopped("worker-b", secs(2)).unwrap();
    let listed = s.list_workers(secs(2)).unwrap();
    assert_eq!(
        listed.iter().map(|w| w.id.as_str()).collect::<Vec<_>>(),
        vec!["worker-b", "worker-a"]
    );
    assert_eq!(
        (listed[0].state, listed[0].alive),
        (WorkerState::Stopped, false)
    );
    assert_eq!(listed[0].stopped_at, Some(secs(2)));
    assert!(!s.request_drain("worker-b", secs(3)).unwrap());
    s.register_worker(&two, secs(3)).unwrap();
    let b = s
        .list_workers(secs(3))
        .unwrap()
        .into_iter()
        .find(|w| w.id == "worker-b")
        .unwrap();
    assert_eq!((b.state, b.stopped_at), (WorkerState::Active, None));
    // Prune: stopped or silent since before the cut.
    let mut three = WorkerInfo::this_process("worker-c", vec![], 1);
    three.lease = Duration::from_secs(10);
    s.register_worker(&three, secs(1)).unwrap();
    s.worker_stopped("worker-c", secs(2)).unwrap();
    let pruned = s.prune(secs(4)).unwrap();
    assert_eq!(pruned.workers, 2, "{pruned:?}"); // c stopped at 2, b silent since 3
    let left: Vec<String> = s
        .list_workers(secs(4))
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(left, vec!["worker-a".to_string()]);
}

/// A run's text is kept in the store once per distinct text: written at a run's end
/// (`set_run_source`), referenced at the start of a later run with exactly that text
/// (`create_run_kept` says so), never written at the start (a run may learn a secret that
/// is in it); no run folder is made for a run that attaches nothing.
fn pipeline_texts_are_kept_once_per_text(db: &Db) {
    let s = db.open();
    let source = |text: &str| RunSource {
        text: text.into(),
        path: "/pipelines/p.yaml".into(),
    };
    let with = |text: &str| NewRun {
        source: Some(source(text)),
        ..new_run("kept", Owner::Pipe)
    };
    let first = s.create_run_kept(&with("pipeline: kept\n")).unwrap();
    assert!(
        !first.source_kept,
        "a text the store never held is not written at the start"
    );
    assert_eq!(s.run_source(first.id).unwrap(), None);
    assert_eq!(db.count("SELECT COUNT(*) FROM pipeline_sources"), 0);
    assert!(!s.run_dir(first.id).exists(), "the run got a folder");
    s.set_run_source(first.id, &source("pipeline: kept\n"))
        .unwrap();
    assert_eq!(
        s.run_source(first.id).unwrap(),
        Some(source("pipeline: kept\n"))
    );
    // Later runs of the same text reference it from the start, in this process or another.
    for store in [s.clone(), db.open()] {
        for _ in 0..3 {
            let c = store.create_run_kept(&with("pipeline: kept\n")).unwrap();
            assert!(c.source_kept);
            assert_eq!(
                store.run_source(c.id).unwrap(),
                Some(source("pipeline: kept\n"))
            );
        }
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM pipeline_sources"), 1);
    // Another text is another row, kept again harmlessly; a run without one has none.
    let other = s.create_run_kept(&with("pipeline: kept # v2\n")).unwrap();
    assert!(!other.source_kept);
    for _ in 0..2 {
        s.set_run_source(other.id, &source("pipeline: kept # v2\n"))
            .unwrap();
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM pipeline_sources"), 2);
    let none = s.create_run(&new_run("kept", Owner::Pipe)).unwrap();
    assert_eq!(s.run_source(none).unwrap(), None);
    assert!(matches!(
        s.set_run_source(9999, &source("x")),
        Err(StoreError::NotFound(_))
    ));
}

fn users_tokens_settings_and_their_audit(db: &Db) {
    let s = db.open();
    let a = s.accounts();
    let now = Utc::now();
    a.add_user("ana", "hash-1", Role::Admin, "cli", now)
        .unwrap();
    assert!(matches!(
        a.add_user("ana", "hash-2", Role::Viewer, "cli", now),
        Err(StoreError::Conflict(_))
    ));
    let u = a.get_user("ana").unwrap().unwrap();
    assert_eq!(
        (u.user.role, u.password_hash.as_str()),
        (Role::Admin, "hash-1")
    );
    assert!(!format!("{u:?}").contains("hash-1"), "Debug shows no hash");
    a.set_password("ana", "hash-3", "user:ana", now).unwrap();
    a.set_role("ana", Role::Operator, "user:bo", now).unwrap();
    assert_eq!(
        a.get_user("ana").unwrap().unwrap().user.sessions_ended_at,
        None
    );
    a.end_sessions("ana", "user:ana", now).unwrap();
    a.set_user_disabled("ana", true, "user:bo", now).unwrap();
    let u = a.get_user("ana").unwrap().unwrap();
    assert_eq!(u.password_hash, "hash-3");
    assert_eq!(u.user.role, Role::Operator);
    assert!(u.user.disabled_at.is_some());
    assert_eq!(
        u.user.sessions_ended_at.map(|t| t.timestamp_millis()),
        Some(now.timestamp_millis())
    );
    assert!(matches!(
        a.end_sessions("nobody", "cli", now),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        a.set_role("nobody", Role::Admin, "cli", now),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(a.list_users().unwrap().len(), 1);

    let id = a
        .add_api_token("ci", "sha-1", Role::Viewer, "user:bo", now)
        .unwrap();
    let used = a.use_api_token("sha-1", now).unwrap().unwrap();
    assert_eq!((used.id, used.role), (id, Role::Viewer));
    assert!(a.list_api_tokens().unwrap()[0].last_used_at.is_some());
    assert!(a.use_api_token("sha-2", now).unwrap().is_none());
    assert!(a.revoke_api_token(id, "user:bo", now).unwrap());
    assert!(!a.revoke_api_token(id, "user:bo", now).unwrap());
    assert!(a.use_api_token("sha-1", now).unwrap().is_none());

    assert_eq!(a.setting("k").unwrap(), None);
    assert_eq!(a.setting_or_insert("k", "first").unwrap(), "first");
    assert_eq!(a.setting_or_insert("k", "second").unwrap(), "first");

    assert!(a.delete_user("ana", "user:bo", now).unwrap());
    assert!(!a.delete_user("ana", "user:bo", now).unwrap());
    // Every change left a row, newest first, and no row holds a hash.
    let audit = a.list_audit(None, 100).unwrap();
    let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "user.delete",
            "token.revoke",
            "token.create",
            "user.disable",
            "user.logout",
            "user.role",
            "user.passwd",
            "user.add"
        ]
    );
    assert!(!format!("{audit:?}").contains("hash-") && !format!("{audit:?}").contains("sha-"));
    let page = a.list_audit(Some(audit[2].id), 2).unwrap();
    assert_eq!(page[0].action, "user.disable");
    assert_eq!(page[1].action, "user.logout");
}

fn run_pages_step_batches_and_counts(db: &Db) {
    let s = db.open();
    let a = s.create_run(&new_run("p", Owner::External)).unwrap();
    let b = s.create_run(&new_run("p", Owner::External)).unwrap();
    s.finish_run(a, Status::Failed, Some("x"), true).unwrap();
    for i in 0..5 {
        s.add_log(b, &log(None, &format!("line {i}"))).unwrap();
    }
    let first = s.logs_page(b, 0, 2).unwrap();
    assert_eq!(first.len(), 2);
    let rest = s.logs_page(b, first[1].id, 0).unwrap();
    assert_eq!(rest.len(), 3);
    assert_eq!(rest[0].message, "line 2");
    // The tail: the last rows, oldest first; a run of another run's logs is not mixed in.
    s.add_log(a, &log(None, "a's line")).unwrap();
    let tail: Vec<String> = s
        .logs_tail(b, 2)
        .unwrap()
        .into_iter()
        .map(|r| r.message)
        .collect();
    assert_eq!(tail, ["line 3", "line 4"]);
    assert_eq!(s.logs_tail(b, 50).unwrap().len(), 5);
    assert_eq!(s.logs_tail(a, 50).unwrap().len(), 1);
    let counts: std::collections::HashMap<Status, u64> =
        s.run_counts().unwrap().into_iter().collect();
    assert_eq!(counts.get(&Status::Failed), Some(&1));
    assert_eq!(counts.get(&Status::Running), Some(&1));
    // Time filters: both runs started now.
    let now = Utc::now();
    let since = |t: DateTime<Utc>| {
        s.find_runs(&RunFilter {
            since: Some(t),
            ..Default::default()
        })
        .unwrap()
        .len()
    };
    assert_eq!(since(now - chrono::Duration::hours(1)), 2);
    assert_eq!(since(now + chrono::Duration::hours(1)), 0);
    let until = s
        .find_runs(&RunFilter {
            until: Some(now - chrono::Duration::hours(1)),
            ..Default::default()
        })
        .unwrap();
    assert!(until.is_empty());
    assert!(s.steps_of_runs(&[]).unwrap().is_empty());
    assert!(s.steps_of_runs(&[a, b]).unwrap().is_empty());
}

fn credential<'a>(
    name: &'a str,
    public: &'a serde_json::Value,
    sealed: &'a str,
    previous: Option<&'a str>,
    changed: &'a [String],
) -> CredentialWrite<'a> {
    CredentialWrite {
        name,
        kind: "carol",
        public,
        sealed,
        key_id: "k1",
        previous,
        actor: "alice",
        changed,
    }
}

fn credentials_are_saved_audited_and_resealed(db: &Db) {
    let s = db.open();
    let c = s.credentials();
    let public = serde_json::json!({"tenant": "acme", "connector_id": "c1"});
    let fields = vec!["tenant".to_string(), "api_key".to_string()];
    assert!(c
        .put_credential(
            &credential("carol-prod", &public, "S1", None, &fields),
            t("2026-01-01T00:00:00Z")
        )
        .unwrap());
    // A save based on a stale read is refused; one based on what is stored goes through.
    let e = c
        .put_credential(
            &credential("carol-prod", &public, "S2", None, &fields),
            t("2026-01-02T00:00:00Z"),
        )
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    let e = c
        .put_credential(
            &credential("carol-prod", &public, "S2", Some("S0"), &fields),
            t("2026-01-02T00:00:00Z"),
        )
        .unwrap_err();
    assert!(e.is_conflict(), "{e}");
    let changed = vec!["api_key".to_string()];
    assert!(!c
        .put_credential(
            &credential("carol-prod", &public, "S2", Some("S1"), &changed),
            t("2026-01-02T00:00:00Z")
        )
        .unwrap());
    let other = serde_json::json!({});
    c.put_credential(
        &credential("a-first", &other, "S9", None, &[]),
        t("2026-01-03T00:00:00Z"),
    )
    .unwrap();

    let row = c.get_credential("carol-prod").unwrap().unwrap();
    assert_eq!(row.kind, "carol");
    assert_eq!(row.public, public);
    assert_eq!(row.sealed, "S2");
    assert_eq!(row.key_id, "k1");
    assert_eq!(row.created_at, t("2026-01-01T00:00:00Z"));
    assert_eq!(row.updated_at, t("2026-01-02T00:00:00Z"));
    assert_eq!(row.updated_by, "alice");
    assert!(
        !format!("{row:?}").contains("S2"),
        "Debug shows no sealed text"
    );
    let names: Vec<String> = c
        .list_credentials()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["a-first", "carol-prod"]);

    // Rotation: all or nothing.
    let stale = [Resealed {
        name: "carol-prod".into(),
        previous: "S1".into(),
        sealed: "R".into(),
    }];
    assert!(c
        .reseal_credentials(&stale, "k2", "bob", t("2026-01-04T00:00:00Z"))
        .unwrap_err()
        .is_conflict());
    let partial = [Resealed {
        name: "carol-prod".into(),
        previous: "S2".into(),
        sealed: "R2".into(),
    }];
    // `a-first` would be left under k1.
    assert!(c
        .reseal_credentials(&partial, "k2", "bob", t("2026-01-04T00:00:00Z"))
        .unwrap_err()
        .is_conflict());
    assert_eq!(
        c.get_credential("carol-prod").unwrap().unwrap().sealed,
        "S2"
    );
    let all = [
        Resealed {
            name: "a-first".into(),
            previous: "S9".into(),
            sealed: "R9".into(),
        },
        Resealed {
            name: "carol-prod".into(),
            previous: "S2".into(),
            sealed: "R2".into(),
        },
    ];
    assert_eq!(
        c.reseal_credentials(&all, "k2", "bob", t("2026-01-04T00:00:00Z"))
            .unwrap(),
        2
    );
    let row = c.get_credential("carol-prod").unwrap().unwrap();
    assert_eq!((row.sealed.as_str(), row.key_id.as_str()), ("R2", "k2"));
    // Nothing left to reseal: an empty rotation to the same key is fine.
    assert_eq!(
        c.reseal_credentials(&[], "k2", "bob", t("2026-01-04T00:00:00Z"))
            .unwrap(),
        0
    );

    assert!(c
        .delete_credential("a-first", "carol", t("2026-01-05T00:00:00Z"))
        .unwrap());
    assert!(!c
        .delete_credential("a-first", "carol", t("2026-01-05T00:00:00Z"))
        .unwrap());
    assert!(c.get_credential("a-first").unwrap().is_none());

    // The audit trail: every change, newest first, with field names and no values.
    let audit = c.list_audit("credential:carol-prod", 0).unwrap();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| (a.action.as_str(), a.actor.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("credential.rotate", "bob"),
            ("credential.set", "alice"),
            ("credential.set", "alice")
        ]
    );
    assert_eq!(
        audit[0].detail,
        serde_json::json!({"type": "carol", "from_key": "k1", "to_key": "k2"})
    );
    assert_eq!(
        audit[1].detail,
        serde_json::json!({"type": "carol", "created": false, "fields": ["api_key"]})
    );
    assert_eq!(
        audit[2].detail["fields"],
        serde_json::json!(["tenant", "api_key"])
    );
    assert_eq!(audit[0].target, "credential:carol-prod");
    assert_eq!(audit[0].time, t("2026-01-04T00:00:00Z"));
    let every = c.list_audit("credential:", 0).unwrap();
    assert_eq!(every.len(), 6);
    assert_eq!(every[0].action, "credential.delete");
    assert_eq!(every[0].target, "credential:a-first");
    assert_eq!(c.list_audit("", 2).unwrap().len(), 2);
    assert!(c
        .list_audit("credential:carol-prod-x", 0)
        .unwrap()
        .is_empty());
}
