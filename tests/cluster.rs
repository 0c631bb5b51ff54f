//! A cluster through the real binary: `pipe serve --workers 0 --broker` publishing to the
//! machine's RabbitMQ (`PIPE_TEST_AMQP`, default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `pipe worker`s consuming, a fresh PostgreSQL database per test as the store
//! (`PIPE_TEST_POSTGRES_URL`). Each test has its own RabbitMQ queue prefix, so tests never
//! see each other's messages. A missing broker or database fails the test.
//!
//! Waits are generous polls; no assertion is about how long something took.

use crate::util::{Daemon, Env, PgDb};
use std::time::{Duration, Instant};

/// Hang guard for each wait.
const PATIENCE: Duration = Duration::from_secs(180);

fn amqp_url() -> String {
    std::env::var("PIPE_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// One test's cluster: its database, broker URL and queue prefix.
struct Cluster {
    db: PgDb,
    broker: String,
    prefix: String,
}

impl Cluster {
    fn new() -> Cluster {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Cluster {
            db: PgDb::new(),
            broker: amqp_url(),
            prefix: format!("test.{}.{}.", std::process::id(), nanos % 1_000_000_000_000),
        }
    }

    /// `pipe ARGS` in the background against this cluster (through `broker` if given).
    fn daemon(&self, env: &Env, name: &str, args: &[&str], broker: Option<&str>) -> Daemon {
        Daemon::spawn(
            env,
            name,
            args,
            &[
                ("PIPE_DB", &self.db.url),
                ("PIPE_BROKER", broker.unwrap_or(&self.broker)),
                ("PIPE_QUEUE_PREFIX", &self.prefix),
            ],
        )
    }

    /// `pipe ARGS` against this cluster's store; fails the test unless it exits 0.
    fn pipe(&self, env: &Env, args: &[&str]) -> String {
        let out = env
            .cmd()
            .args(args)
            .env("PIPE_DB", &self.db.url)
            .output()
            .expect("run pipe");
        assert!(
            out.status.success(),
            "pipe {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A count from the store's database; -1 before the server created its tables.
    /// `pipe serve --workers 0` on `pipelines/`, once it has loaded `integration`.
    fn scheduler(&self, env: &Env, integration: &str) -> Daemon {
        let serve = self.daemon(
            env,
            "serve",
            &["serve", "pipelines", "--workers", "0"],
            None,
        );
        wait_for("the integration", &[&serve], || {
            (self.count(&format!(
                "SELECT COUNT(*) FROM integrations WHERE name = '{integration}'"
            )) == 1)
                .then_some(())
        });
        serve
    }

    fn count(&self, sql: &str) -> i64 {
        match self.db.client().query_one(sql, &[]) {
            Ok(row) => row.get(0),
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => -1,
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    fn broker_config(&self) -> broker::BrokerConfig {
        let mut cfg = broker::BrokerConfig::new(self.broker.clone());
        cfg.queue_prefix = self.prefix.clone();
        cfg
    }
}

/// Poll `f` until it returns `Some`; past the hang guard, fail with `what` and the logs.
fn wait_for<T>(what: &str, logs: &[&Daemon], mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > until {
            let logs: Vec<String> = logs.iter().map(|d| d.output()).collect();
            panic!(
                "timed out waiting for {what}; logs:\n{}",
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pipeline(env: &Env, name: &str, queue: &str) {
    env.write(
        &format!("pipelines/{name}.yaml"),
        &format!(
            "pipeline: {name}\nintegration: {{ queue: {queue} }}\nsteps:\n  s: {{ type: log, with: {{ message: \"{name} ran\" }} }}\n"
        ),
    );
}

fn workers(c: &Cluster, env: &Env, all: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["workers", "list", "--format", "json"];
    if all {
        args.push("--all");
    }
    serde_json::from_str::<serde_json::Value>(&c.pipe(env, &args))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn workers_take_their_own_queues_in_priority_order_and_drain_on_request() {
    let env = Env::new();
    let c = Cluster::new();
    for n in 1..=5 {
        pipeline(&env, &format!("p{n}"), "default");
    }
    for n in 1..=2 {
        pipeline(&env, &format!("h{n}"), "high");
    }
    let mut serve = c.daemon(
        &env,
        "serve",
        &["serve", "pipelines", "--workers", "0"],
        None,
    );
    wait_for("7 integrations", &[&serve], || {
        (c.count("SELECT COUNT(*) FROM integrations WHERE content_hash IS NOT NULL") == 7)
            .then_some(())
    });
    // Queued one by one with rising priorities, each published before the next: a FIFO
    // queue would run p1 first; a priority queue runs p5 first. (RabbitMQ's levels are
    // pipe priorities on a log2 scale: 1, 2, 4, 8, 16 are five levels.)
    for n in 1..=5 {
        c.pipe(
            &env,
            &[
                "trigger",
                &format!("p{n}"),
                "--priority",
                &(1 << (n - 1)).to_string(),
            ],
        );
        wait_for("the trigger to be published", &[&serve], || {
            (c.count(&format!(
                "SELECT COUNT(*) FROM queue WHERE integration = 'p{n}' AND published_at IS NOT NULL"
            )) == 1)
                .then_some(())
        });
    }
    c.pipe(&env, &["trigger", "h1"]);
    c.pipe(&env, &["trigger", "h2"]);
    let mut a = c.daemon(
        &env,
        "a",
        &["worker", "pipelines", "--queues", "default", "--slots", "1"],
        None,
    );
    let mut b = c.daemon(
        &env,
        "b",
        &["worker", "pipelines", "--queues", "high", "--slots", "2"],
        None,
    );
    wait_for("7 finished runs", &[&serve, &a, &b], || {
        (c.count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'") == 7).then_some(())
    });
    let mut pg = c.db.client();
    let order: Vec<String> = pg
        .query(
            "SELECT pipeline FROM runs WHERE pipeline LIKE 'p%' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order, ["p5", "p4", "p3", "p2", "p1"], "{}", a.output());

    // Each worker ran its own queue's runs, as the workers table says.
    let listed = workers(&c, &env, false);
    assert_eq!(listed.len(), 2, "{listed:?}");
    let id_of = |queue: &str| -> String {
        listed
            .iter()
            .find(|w| w["queues"] == serde_json::json!([queue]))
            .unwrap_or_else(|| panic!("no worker of {queue}: {listed:?}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a_id, b_id) = (id_of("default"), id_of("high"));
    for w in &listed {
        assert_eq!(w["state"], "active", "{w}");
        assert!(w["host"].as_str().is_some_and(|h| !h.is_empty()), "{w}");
    }
    let mut owners = |like: &str| -> Vec<String> {
        pg.query(
            &format!(
                "SELECT DISTINCT lease_owner FROM runs WHERE pipeline LIKE '{like}' ORDER BY 1"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert_eq!(owners("p%"), std::slice::from_ref(&a_id));
    assert_eq!(owners("h%"), std::slice::from_ref(&b_id));

    // `pipe workers drain` stops a worker without a signal.
    let said = c.pipe(&env, &["workers", "drain", &a_id]);
    assert!(said.contains("asked to drain"), "{said}");
    let code = wait_for("worker a to stop after the drain request", &[], || {
        a.exited()
    });
    assert_eq!(code, 0, "{}", a.output());
    assert!(a.output().contains("drain requested"), "{}", a.output());
    let running = workers(&c, &env, false);
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0]["id"], b_id.as_str());
    let all = workers(&c, &env, true);
    let stopped = all.iter().find(|w| w["id"] == a_id.as_str()).unwrap();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let text = c.pipe(&env, &["workers", "list"]);
    assert!(text.contains(&b_id) && text.contains("high"), "{text}");
    assert_eq!(b.stop(), 0, "{}", b.output());
    assert_eq!(serve.stop(), 0, "{}", serve.output());
}

#[test]
fn a_runs_secrets_and_params_never_travel_through_the_broker() {
    let env = Env::new();
    let c = Cluster::new();
    env.write(
        "pipelines/secretive.yaml",
        "pipeline: secretive\nparams:\n  note: { type: string, default: x }\nsteps:\n  s: { type: log, with: { message: \"{{ secret('CLUSTER_CANARY') }} {{ params.note }}\" } }\n",
    );
    let canary = "canary-7f3a9e-secret";
    let param = "canary-param-51c0";
    let mut serve = Daemon::spawn(
        &env,
        "serve",
        &["serve", "pipelines", "--workers", "0"],
        &[
            ("PIPE_DB", &c.db.url),
            ("PIPE_BROKER", &c.broker),
            ("PIPE_QUEUE_PREFIX", &c.prefix),
            ("CLUSTER_CANARY", canary),
        ],
    );
    wait_for("the integration", &[&serve], || {
        (c.count("SELECT COUNT(*) FROM integrations WHERE name = 'secretive'") == 1).then_some(())
    });
    c.pipe(
        &env,
        &["trigger", "secretive", "--param", &format!("note={param}")],
    );
    let item: i64 = wait_for("the publish", &[&serve], || {
        c.db.client()
            .query_opt("SELECT id FROM queue WHERE published_at IS NOT NULL", &[])
            .unwrap()
            .map(|r| r.get(0))
    });
    // Read what sits in RabbitMQ, exactly.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let messages = rt.block_on(async {
        let b = broker::Broker::connect(c.broker_config()).await.unwrap();
        let mut all = Vec::new();
        while let Some(m) = broker::testing::take_raw(&b, "default").await.unwrap() {
            all.push(m);
        }
        b.close().await;
        all
    });
    assert_eq!(messages.len(), 1, "{messages:?}");
    let m = &messages[0];
    assert_eq!(
        String::from_utf8_lossy(&m.body),
        format!("{{\"item\":{item}}}")
    );
    assert!(m.headers.is_empty(), "{m:?}");
    assert_eq!(m.delivery_mode, Some(2), "persistent");
    let raw = format!("{m:?}");
    assert!(!raw.contains(canary) && !raw.contains(param), "{raw}");
    // The message was taken away: the republisher sends it again once the queue is empty
    // and the publish is old. Until then a worker started now has nothing to run; mark it
    // unpublished, as a lost message would be found, and the publisher sends it again.
    c.db.client()
        .execute("UPDATE queue SET published_at = NULL", &[])
        .unwrap();
    let mut w = Daemon::spawn(
        &env,
        "w",
        &["worker", "pipelines"],
        &[
            ("PIPE_DB", &c.db.url),
            ("PIPE_BROKER", &c.broker),
            ("PIPE_QUEUE_PREFIX", &c.prefix),
            ("CLUSTER_CANARY", canary),
        ],
    );
    wait_for("the run", &[&serve, &w], || {
        (c.count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'") == 1).then_some(())
    });
    assert_eq!(w.stop(), 0, "{}", w.output());
    assert_eq!(serve.stop(), 0, "{}", serve.output());
    for (who, log) in [("serve", serve.output()), ("worker", w.output())] {
        assert!(!log.contains(canary), "{who} logged the secret:\n{log}");
    }
}

#[test]
fn max_concurrent_runs_holds_across_all_workers() {
    let env = Env::new();
    let c = Cluster::new();
    env.write(
        "pipelines/capped.yaml",
        "pipeline: capped
schedule: { cron: \"0 0 1 1 *\", max_concurrent_runs: 2, on_overlap: queue }
steps:
  s: { type: exec, with: { command: sleep, args: [\"0.6\"] } }
",
    );
    let mut serve = c.scheduler(&env, "capped");
    let mut pool: Vec<Daemon> = (0..3)
        .map(|n| {
            c.daemon(
                &env,
                &format!("w{n}"),
                &["worker", "pipelines", "--slots", "4"],
                None,
            )
        })
        .collect();
    for _ in 0..10 {
        c.pipe(&env, &["trigger", "capped"]);
    }
    let logs: Vec<&Daemon> = std::iter::once(&serve).chain(pool.iter()).collect();
    wait_for("10 runs", &logs, || {
        (c.count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'") == 10).then_some(())
    });
    drop(logs);
    // At no instant were more than two running: sweep the (start, end) edges.
    let mut edges: Vec<(String, i32)> = Vec::new();
    for r in
        c.db.client()
            .query("SELECT started_at, finished_at FROM runs", &[])
            .unwrap()
    {
        edges.push((r.get(0), 1));
        edges.push((r.get(1), -1));
    }
    // Ends sort before starts at the same instant (RFC 3339 text sorts by time).
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in &edges {
        now += d;
        most = most.max(now);
    }
    assert_eq!(
        most, 2,
        "at most max_concurrent_runs at once, and the cap was reached"
    );
    let owners = c.count("SELECT COUNT(DISTINCT lease_owner) FROM runs");
    assert!(
        owners >= 2,
        "the runs were spread over the workers ({owners})"
    );
    for w in &mut pool {
        assert_eq!(w.stop(), 0, "{}", w.output());
    }
    assert_eq!(serve.stop(), 0, "{}", serve.output());
}

#[test]
fn a_worker_cut_off_from_postgresql_stops_claiming_and_resumes() {
    let env = Env::new();
    let c = Cluster::new();
    env.write(
        "pipelines/n.yaml",
        "pipeline: n\nschedule: { cron: \"0 0 1 1 *\", max_concurrent_runs: 10, on_overlap: queue }\nsteps:\n  s: { type: log, with: { message: hi } }\n",
    );
    let mut serve = c.scheduler(&env, "n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = rt.block_on(broker::testing::CutProxy::start(pg)).unwrap();
    let via_proxy = proxy.url_for(&c.db.url);
    let mut w = Daemon::spawn(
        &env,
        "w",
        &["worker", "pipelines"],
        &[
            ("PIPE_DB", &via_proxy),
            ("PIPE_BROKER", &c.broker),
            ("PIPE_QUEUE_PREFIX", &c.prefix),
        ],
    );
    wait_for("the worker", &[&w], || {
        (c.count("SELECT COUNT(*) FROM workers WHERE stopped_at IS NULL") == 1).then_some(())
    });
    proxy.set_down(true);
    for _ in 0..3 {
        c.pipe(&env, &["trigger", "n"]);
    }
    wait_for("the publishes", &[&serve, &w], || {
        (c.count("SELECT COUNT(*) FROM queue WHERE published_at IS NOT NULL") == 3).then_some(())
    });
    wait_for("the worker to notice", &[&w], || {
        w.output().contains("cannot reach the store").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.count("SELECT COUNT(*) FROM runs"),
        0,
        "nothing claimed meanwhile"
    );
    assert_eq!(
        c.count("SELECT COUNT(*) FROM queue WHERE state = 'queued'"),
        3
    );
    proxy.set_down(false);
    wait_for("the runs after the store came back", &[&serve, &w], || {
        (c.count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'") == 3).then_some(())
    });
    assert!(
        w.output().contains("the store answers again"),
        "{}",
        w.output()
    );
    assert_eq!(w.stop(), 0, "{}", w.output());
    assert_eq!(serve.stop(), 0, "{}", serve.output());
}

/// The seed of the chaos test's choices (`PIPE_TEST_SEED` to replay one).
fn seed() -> u64 {
    std::env::var("PIPE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// xorshift64*: enough randomness for picking victims and pauses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn chaos_killed_and_cut_off_workers_run_every_run_exactly_once() {
    const RUNS: usize = 500;
    const WORKERS: usize = 3;
    let seed = seed();
    eprintln!("chaos seed: {seed} (PIPE_TEST_SEED={seed} replays its choices)");
    let mut rng = Rng(seed | 1);
    let env = Env::new();
    let c = Cluster::new();
    c.db.client()
        .batch_execute(
            "CREATE TABLE chaos_rows (run_id BIGINT NOT NULL, at TIMESTAMPTZ DEFAULT now())",
        )
        .unwrap();
    env.write(
        "pipelines/chaos.yaml",
        &format!(
            r#"pipeline: chaos
integration: {{ retry_on_lost: true, max_lost_retries: 50 }}
schedule: {{ cron: "0 0 1 1 *", max_concurrent_runs: 100, on_overlap: queue }}
connections:
  db: {{ type: postgres, url: "{}" }}
steps:
  pause: {{ type: exec, with: {{ command: sleep, args: ["0.2"] }} }}
  write:
    type: sql.query
    connection: db
    needs: [pause]
    with: {{ query: "INSERT INTO chaos_rows (run_id) VALUES ({{{{ run.id }}}}) RETURNING run_id" }}
  settle: {{ type: exec, needs: [write], with: {{ command: sleep, args: ["0.1"] }} }}
"#,
            c.db.url
        ),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream: std::net::SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let proxy = rt
        .block_on(broker::testing::CutProxy::start(upstream))
        .unwrap();
    let via_proxy = proxy.url_for(&c.broker);
    let mut serve = c.scheduler(&env, "chaos");
    let start_worker = |n: usize, generation: usize| {
        c.daemon(
            &env,
            &format!("w{n}-{generation}"),
            &[
                "worker",
                "pipelines",
                "--slots",
                "4",
                "--drain-timeout",
                "30s",
            ],
            Some(&via_proxy),
        )
    };
    let mut pool: Vec<Daemon> = (0..WORKERS).map(|n| start_worker(n, 0)).collect();
    let mut generations = [0usize; WORKERS];

    // Queue the runs from several threads, as many operators or tools would.
    std::thread::scope(|s| {
        for part in 0..10 {
            let (c, env) = (&c, &env);
            s.spawn(move || {
                for _ in 0..RUNS / 10 {
                    c.pipe(env, &["trigger", "chaos"]);
                }
                let _ = part;
            });
        }
    });

    let (mut kills, mut cuts) = (0, 0);
    let chaos_until = Instant::now() + Duration::from_secs(40);
    let done = |c: &Cluster| {
        c.count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'") as usize >= RUNS
    };
    while Instant::now() < chaos_until && !done(&c) {
        std::thread::sleep(Duration::from_millis(1000 + rng.below(2500)));
        let victim = rng.below(WORKERS as u64) as usize;
        pool[victim].kill9();
        kills += 1;
        generations[victim] += 1;
        pool[victim] = start_worker(victim, generations[victim]);
        if kills % 3 == 0 {
            proxy.cut();
            cuts += 1;
        }
    }
    let logs: Vec<&Daemon> = std::iter::once(&serve).chain(pool.iter()).collect();
    wait_for("every run to finish", &logs, || {
        let open = c.count(
            "SELECT (SELECT COUNT(*) FROM queue WHERE state IN ('queued', 'claimed'))
                  + (SELECT COUNT(*) FROM runs WHERE status = 'running')",
        );
        (open == 0 && done(&c)).then_some(())
    });
    // A worker restarted at the last moment may still be starting: a drain is what is
    // checked here, so each one is stopped once it consumes.
    for w in &mut pool {
        wait_for("the worker to consume", &[&*w], || {
            w.output().contains(" consuming ").then_some(())
        });
        assert_eq!(w.stop(), 0, "{}", w.output());
    }
    assert_eq!(serve.stop(), 0, "{}", serve.output());

    let succeeded = c.count("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'");
    let abandoned = c.count("SELECT COUNT(*) FROM runs WHERE status = 'abandoned'");
    let other = c.count("SELECT COUNT(*) FROM runs WHERE status NOT IN ('succeeded', 'abandoned')");
    let rows = c.count("SELECT COUNT(*) FROM chaos_rows");
    let items = c.count("SELECT COUNT(*) FROM queue");
    eprintln!(
        "chaos: {RUNS} runs queued, {kills} workers killed with SIGKILL, {cuts} broker connection cuts; \
         {succeeded} runs succeeded, {abandoned} abandoned (their owner was killed) and queued again, \
         {other} other; {items} queue items; {rows} rows written"
    );
    // Every queued run succeeded once; every re-execution belongs to a run marked lost.
    assert_eq!(succeeded, RUNS as i64);
    assert_eq!(other, 0);
    assert_eq!(
        items,
        RUNS as i64 + abandoned,
        "each lost run was queued again once"
    );
    assert_eq!(
        c.count("SELECT COUNT(*) FROM (SELECT run_id FROM chaos_rows GROUP BY run_id HAVING COUNT(*) > 1) d"),
        0,
        "a run's body ran twice"
    );
    assert_eq!(
        c.count("SELECT COUNT(*) FROM runs r WHERE r.status = 'succeeded' AND NOT EXISTS (SELECT 1 FROM chaos_rows w WHERE w.run_id = r.id)"),
        0,
        "a succeeded run wrote no row"
    );
    assert_eq!(
        c.count("SELECT COUNT(*) FROM chaos_rows w JOIN runs r ON r.id = w.run_id WHERE r.status <> 'succeeded' AND r.status <> 'abandoned'"),
        0
    );
    assert_eq!(
        c.count("SELECT COUNT(*) FROM chaos_rows w WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = w.run_id)"),
        0
    );
    assert_eq!(
        c.count("SELECT COUNT(*) FROM runs r WHERE NOT EXISTS (SELECT 1 FROM queue q WHERE q.run_id = r.id)"),
        0,
        "every run came from exactly one claim"
    );
    assert!(kills > 0);
    drop(proxy);
}
