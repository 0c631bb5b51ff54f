//! How many no-op runs a second the store itself carries (the path of one queued run:
//! enqueue, claim, create, three events, ack), from N threads, on SQLite or PostgreSQL:
//!
//!     cargo run -p store --example throughput -- [DB_URL] [THREADS] [RUNS]
//!
//! Without a URL, SQLite in a temp dir. Not a test: numbers for BENCHMARKS.md.

use chrono::Utc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::*;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args.first().filter(|u| u.contains("://")).cloned();
    let rest = if url.is_some() { &args[1..] } else { &args[..] };
    let threads: usize = rest.first().and_then(|s| s.parse().ok()).unwrap_or(4);
    let runs: usize = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let dir = std::env::temp_dir().join(format!("pipe-throughput-{}", std::process::id()));
    let cfg = StoreConfig {
        url,
        state_dir: dir.clone(),
    };
    let s = store::open(&cfg).expect("open the store");
    for i in 0..threads {
        let mut f = IntegrationFile::new(format!("noop{i}"), "noop.yaml", "h");
        f.max_concurrent_runs = Some(4);
        s.load_integration(&f, Utc::now()).unwrap();
    }
    let owner = LeaseOwner::this_process("bench");
    s.heartbeat(&owner, Duration::from_secs(60), Utc::now())
        .unwrap();
    let clock = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let s: Arc<dyn RunStore> = s.clone();
            let owner = owner.id.clone();
            std::thread::spawn(move || {
                for _ in 0..runs / threads {
                    let now = Utc::now();
                    s.enqueue(&Enqueue::new(format!("noop{i}"), Trigger::Schedule), now)
                        .unwrap();
                    let Some(item) = s.claim(&owner, &[], Duration::from_secs(30), now).unwrap()
                    else {
                        continue;
                    };
                    let run = s
                        .create_run(&NewRun {
                            lease_owner: Some(owner.clone()),
                            queue_item: Some(item.id),
                            ..NewRun::new(item.integration.clone(), Trigger::Schedule, Owner::Pipe)
                        })
                        .unwrap();
                    let at = Utc::now();
                    s.write_events(
                        run,
                        &[
                            RunEvent::StepStarted {
                                step: "noop".into(),
                                attempt: 1,
                                at,
                            },
                            RunEvent::StepFinished(StepRecord {
                                step: "noop".into(),
                                kind: "log".into(),
                                status: Status::Succeeded,
                                attempts: 1,
                                started_at: Some(at),
                                finished_at: Some(at),
                                duration_ms: 0,
                                rows: None,
                                error: None,
                                outputs: serde_json::Value::Null,
                            }),
                            RunEvent::RunFinished {
                                status: Status::Succeeded,
                                error: None,
                                at,
                            },
                        ],
                    )
                    .unwrap();
                    s.ack(item.id, AckOutcome::Done, Utc::now()).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = clock.elapsed();
    let done = s.list_runs(None, 0).unwrap().len();
    println!(
        "{}: {done} runs from {threads} threads in {:.2}s = {:.0} runs/s",
        s.describe(),
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64()
    );
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}
