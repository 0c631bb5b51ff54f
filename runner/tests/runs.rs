//! The run path in one process, as a service runs it: one `Runner` (worker), one shared
//! `Arc<Plan>`, several runs at once — each with its own secrets, redactor, connection
//! overrides and history, none seeing another's. (`pipe run`'s own behaviour is tested
//! through the binary in tests/.)

use runner::{ParamValue, PlanSource, PrepareError, RunSpec, Runner, RunnerConfig};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

fn runner(state: &Path) -> Runner {
    steps::init_crypto();
    Runner::new(RunnerConfig::new(state))
}

fn secrets(pairs: &[(&str, &str)]) -> engine::secrets::Secrets {
    engine::secrets::Secrets::new(engine::secrets::MapSecrets(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    ))
}

const CHECK: &str = r#"
pipeline: secret_check
params:
  expected: { type: string }
steps:
  check:
    type: exec
    with:
      command: sh
      args: ["-c", 'test "$GOT" = "$WANT"']
      on_nonzero: fail
      env:
        GOT: "{{ secret('RUNNER_TEST_TOKEN') }}"
        WANT: "{{ params.expected }}"
"#;

fn spec(plan: &Arc<engine::plan::Plan>, expected: &str) -> RunSpec {
    let mut s = RunSpec::new(PlanSource::Plan(plan.clone()));
    s.params = vec![("expected".into(), ParamValue::Text(expected.into()))];
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_at_once_each_read_their_own_secret_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("check.yaml");
    std::fs::write(&file, CHECK).unwrap();
    let worker = runner(&dir.path().join("state"));
    let plan = worker.load(&file, "check.yaml").unwrap().plan;

    let mut a = spec(&plan, "alpha-secret-value");
    a.secrets = Some(secrets(&[("RUNNER_TEST_TOKEN", "alpha-secret-value")]));
    let mut b = spec(&plan, "bravo-secret-value");
    b.secrets = Some(secrets(&[("RUNNER_TEST_TOKEN", "bravo-secret-value")]));
    // The control: a run given the other source fails the same check.
    let mut wrong = spec(&plan, "alpha-secret-value");
    wrong.secrets = Some(secrets(&[("RUNNER_TEST_TOKEN", "bravo-secret-value")]));

    let (pa, pb, pw) = (
        worker.prepare(a).await.unwrap(),
        worker.prepare(b).await.unwrap(),
        worker.prepare(wrong).await.unwrap(),
    );
    let (ra, rb) = (pa.redactor().clone(), pb.redactor().clone());
    let ids = [pa.id().unwrap(), pb.id().unwrap(), pw.id().unwrap()];
    assert!(ids[0] != ids[1] && ids[1] != ids[2]);
    let (ha, hb, hw) = (pa.start(vec![]), pb.start(vec![]), pw.start(vec![]));
    let (oa, ob, ow) = tokio::join!(ha.join(), hb.join(), hw.join());
    assert!(oa.status.is_success(), "{:?}", oa.error);
    assert!(ob.status.is_success(), "{:?}", ob.error);
    assert!(!ow.status.is_success(), "the control run must fail");
    // Each run's redactor knows its own secret only.
    assert_eq!(ra.redact("alpha-secret-value"), "***");
    assert_eq!(ra.redact("bravo-secret-value"), "bravo-secret-value");
    assert_eq!(rb.redact("bravo-secret-value"), "***");
    assert_eq!(rb.redact("alpha-secret-value"), "alpha-secret-value");
    // The plan was shared, never copied or changed.
    assert_eq!(Arc::strong_count(&plan), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_source_is_the_environment_and_says_how_to_set_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("check.yaml");
    std::fs::write(&file, CHECK).unwrap();
    let worker = runner(&dir.path().join("state"));
    let p = worker
        .prepare({
            let mut s = RunSpec::new(PlanSource::File(file.clone()));
            s.params = vec![("expected".into(), ParamValue::Text("x".into()))];
            s
        })
        .await
        .unwrap();
    let out = p.start(vec![]).join().await;
    assert!(!out.status.is_success());
    let err = out.steps[0].error.clone().unwrap_or_default();
    assert!(
        err.contains("secret RUNNER_TEST_TOKEN is not set: set the environment variable RUNNER_TEST_TOKEN or RUNNER_TEST_TOKEN_FILE"),
        "{err}"
    );
    // The validated text is kept with the finished run, and the file's absolute path.
    let store = store::open(&store::StoreConfig::sqlite(dir.path().join("state"))).unwrap();
    let kept = store.run_source(out.run_id).unwrap().unwrap();
    assert_eq!(kept.text, CHECK);
    assert_eq!(kept.path, file.display().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn param_problems_are_typed_errors_and_record_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("check.yaml");
    std::fs::write(&file, CHECK).unwrap();
    let state = dir.path().join("state");
    let worker = runner(&state);
    let plan = worker.load(&file, "check.yaml").unwrap().plan;
    let mut s = RunSpec::new(PlanSource::Plan(plan.clone()));
    s.params = vec![("expectd".into(), ParamValue::Text("x".into()))];
    match worker.prepare(s).await {
        Err(PrepareError::Param(m)) => assert!(
            m.contains("unknown param `expectd`; did you mean `expected`?"),
            "{m}"
        ),
        other => panic!("expected a param error, got {:?}", other.err()),
    }
    match worker.prepare(RunSpec::new(PlanSource::Plan(plan))).await {
        Err(PrepareError::Param(m)) => assert_eq!(
            m,
            "param `expected` is required: pass --param expected=VALUE"
        ),
        other => panic!("expected a param error, got {:?}", other.err()),
    }
    assert!(!state.join("history.sqlite").exists(), "nothing recorded");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "pipeline: x\nsteps: {a: {type: nope}}\n").unwrap();
    match worker.load(&bad, "bad.yaml") {
        Err(PrepareError::Invalid { diagnostics, .. }) => {
            assert!(diagnostics.iter().any(|d| d.to_string().contains("E006")))
        }
        _ => panic!("expected the file to be invalid"),
    }
}

/// Two `--sandbox` runs of one shared plan at once, each with its own fakes: the plan's
/// connections (an ODBC database, a Carol tenant from the environment) are resolved to
/// each run's fakes without being rewritten, and each run's Carol heartbeat says when that
/// run started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_runs_share_an_unchanged_plan_and_heartbeat_their_own_start() {
    let dir = tempfile::tempdir().unwrap();
    let worker = runner(&dir.path().join("state"));
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/carol-staging.yaml");
    let plan = worker.load(&file, "carol-staging.yaml").unwrap().plan;
    let before: Vec<serde_json::Value> = plan
        .connection_nodes
        .values()
        .map(|n| n.to_json())
        .collect();
    assert_eq!(before[0]["type"], "odbc");

    let sandboxed = || {
        let mut s = RunSpec::new(PlanSource::Plan(plan.clone()));
        s.sandbox = true;
        s
    };
    let first = worker.prepare(sandboxed()).await.unwrap();
    // Apart in time, so the two start times differ.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = worker.prepare(sandboxed()).await.unwrap();
    let (h1, h2) = (first.start(vec![]), second.start(vec![]));
    let (o1, o2) = tokio::join!(h1.join(), h2.join());
    for o in [&o1, &o2] {
        assert!(o.status.is_success(), "{:?} {:?}", o.error, o.steps);
        assert!(o.sandbox.is_some());
    }
    let after: Vec<serde_json::Value> = plan
        .connection_nodes
        .values()
        .map(|n| n.to_json())
        .collect();
    assert_eq!(before, after, "the plan is never rewritten");

    // What the Carol fake of each run received: that run's start, not the process's.
    let start_of = |o: &runner::RunOutcome| -> String {
        let beats = &o.sandbox.as_ref().unwrap()["carol_state"]["heartbeats"];
        let beat = match beats {
            serde_json::Value::Object(m) => m.values().next().cloned(),
            serde_json::Value::Array(a) => a.first().cloned(),
            _ => None,
        }
        .unwrap_or_else(|| panic!("no heartbeat in {beats}"));
        beat["mdmHeartbeatData"]["startTime"]
            .as_str()
            .unwrap_or_else(|| panic!("no startTime in {beat}"))
            .to_string()
    };
    let (s1, s2) = (start_of(&o1), start_of(&o2));
    assert!(s2 > s1, "each run reports its own start: {s1} then {s2}");
}

/// A service shares one `Runner` between worker tasks and spawns `prepare` and the run.
#[test]
fn the_run_path_can_be_shared_and_spawned() {
    fn shared<T: Send + Sync>(_: &T) {}
    fn sent<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let worker = runner(dir.path());
    shared(&worker);
    let file = dir.path().join("p.yaml");
    sent(&worker.prepare(RunSpec::new(PlanSource::File(file))));
    fn prepared_is_send(p: runner::PreparedRun) -> impl Send {
        p
    }
    fn handle_is_send(h: runner::RunHandle) -> impl Send {
        h.join()
    }
    let _ = (prepared_is_send, handle_is_send);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_run_that_is_discarded_is_recorded_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("check.yaml");
    std::fs::write(&file, CHECK).unwrap();
    let state = dir.path().join("state");
    let worker = runner(&state);
    let mut s = RunSpec::new(PlanSource::File(file.clone()));
    s.params = vec![("expected".into(), ParamValue::Text("x".into()))];
    let p = worker.prepare(s).await.unwrap();
    let id = p.id().unwrap();
    let store = store::open(&store::StoreConfig::sqlite(&state)).unwrap();
    assert_eq!(
        store.run_status(id).unwrap(),
        Some(engine::status::Status::Running)
    );
    // The text is kept at the run's end (fully redacted), not before it.
    assert_eq!(store.run_source(id).unwrap(), None);
    p.discard("the worker is draining").await.unwrap();
    let run = store.get_run(id).unwrap().unwrap().run;
    assert_eq!(run.status, engine::status::Status::Cancelled);
    assert_eq!(run.error.as_deref(), Some("the worker is draining"));
}
