//! `notify:` through the real binary: webhooks to a receiver inside the test (it checks
//! the body and verifies the HMAC signature with its own HMAC code), retries, a receiver
//! that is down (the run's status is untouched, a warning row is logged), `duration_over`
//! while the run goes on, and e-mail to a real SMTP server (aiosmtpd, from the test venv:
//! `PIPE_TEST_PYTHON`, else `$PIPE_CI_VENV` or `~/.cache/pipe-ci/venv`; the test fails
//! when there is none). No secret of a URL, key or password may appear in the output, the
//! history or a body.

use crate::util::{history, repo_root, Env};
use hmac::{KeyInit, Mac};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HOOK_KEY: &str = "hk-5d1f0c9e-signing-key";
const HOOK_TOKEN: &str = "tok-8b2e44a1-in-the-path";
const SMTP_PASSWORD: &str = "pw-3c7d9e21-smtp";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub(crate) path: String,
    /// Lower-case names.
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no header {name} in {:?}", self.headers))
    }
}

/// What the receiver answers: status and extra headers, given the request's index.
pub(crate) type Script =
    dyn Fn(usize, &Request) -> (u16, Vec<(&'static str, String)>) + Send + Sync;

/// An HTTP/1.1 receiver on 127.0.0.1 (one request per connection), stopped when dropped.
pub(crate) struct Receiver {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    pub(crate) fn start(script: Box<Script>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = serve(stream, &reqs, script.as_ref());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Receiver {
            port,
            requests,
            stop,
        }
    }
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
    pub(crate) fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Request>>, script: &Script) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let req = Request {
        path,
        headers,
        body,
    };
    let n = {
        let mut log = log.lock().unwrap();
        log.push(req.clone());
        log.len() - 1
    };
    let (status, extra) = script(n, &req);
    let text = format!("receiver says {status}");
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        text.len()
    );
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&text);
    let mut stream = stream;
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// HMAC-SHA256 of `timestamp.body`, as the receiver checks it (its own code, not pipe's).
fn expected_signature(key: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

#[track_caller]
fn assert_signed(req: &Request) {
    let ts = req.header("x-pipe-timestamp");
    let t: i64 = ts.parse().expect("a unix timestamp");
    assert!((t - chrono::Utc::now().timestamp()).abs() < 3600, "{ts}");
    assert_eq!(
        req.header("x-pipe-signature"),
        expected_signature(HOOK_KEY, ts, &req.body),
        "signature of {}",
        String::from_utf8_lossy(&req.body)
    );
}

/// Fail when any file under `dir` holds one of `secrets`.
#[track_caller]
fn assert_no_secret_in_files(dir: &Path, secrets: &[&str]) {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                files += 1;
                let text = String::from_utf8_lossy(&bytes);
                for s in secrets {
                    assert!(!text.contains(s), "{} holds a secret", p.display());
                }
            }
        }
    }
    assert!(files > 0, "nothing under {}", dir.display());
}

/// The run's log rows as (level, message).
fn log_rows(state: &Path, run_id: i64) -> Vec<(String, String)> {
    let db = history(state);
    let mut stmt = db
        .prepare("SELECT level, message FROM logs WHERE run_id = ?1 ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([run_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows
}

fn run_json(env: &Env, file: &Path, envs: &[(&str, &str)]) -> (i32, serde_json::Value, String) {
    let out = env
        .cmd()
        .args(["run", file.to_str().unwrap(), "--format", "json"])
        .envs(envs.iter().copied())
        .output()
        .expect("run pipe");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for s in [HOOK_KEY, HOOK_TOKEN, SMTP_PASSWORD] {
        assert!(
            !stdout.contains(s) && !stderr.contains(s),
            "a secret in the output:\n{stdout}\n{stderr}"
        );
    }
    let v = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

const SECRETS: &[(&str, &str)] = &[
    ("HOOK_KEY", HOOK_KEY),
    ("HOOK_TOKEN", HOOK_TOKEN),
    ("SMTP_PASSWORD", SMTP_PASSWORD),
];

#[test]
fn a_failed_run_posts_a_signed_summary_and_the_secrets_stay_out() {
    let rx = Receiver::start(Box::new(|_, _| (200, vec![])));
    let env = Env::new();
    let file = env.write(
        "p.yaml",
        &format!(
            r#"pipeline: hooked
params:
  team: {{ type: string, default: data-eng }}
steps:
  extract:
    type: exec
    with: {{ command: sh, args: ["-c", "echo one"] }}
  load:
    type: exec
    needs: [extract]
    with: {{ command: sh, args: ["-c", "echo broken >&2; exit 3"], on_nonzero: fail }}
notify:
  - on: [failure]
    webhook:
      url: "{}/hook/{{{{ secret('HOOK_TOKEN') }}}}"
      secret: "{{{{ secret('HOOK_KEY') }}}}"
      headers:
        X-Team: "{{{{ params.team }}}}"
        X-Event: "{{{{ event }}}}-{{{{ status }}}}"
  - on: success
    webhook:
      url: "{}/never"
"#,
            rx.url(""),
            rx.url("")
        ),
    );
    let (code, summary, stderr) = run_json(&env, &file, SECRETS);
    assert_eq!(code, 1, "{summary}\n{stderr}");
    let run_id = summary["run_id"].as_i64().unwrap();
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "only the failure entry is sent: {reqs:?}");
    let req = &reqs[0];
    assert_eq!(req.path, format!("/hook/{HOOK_TOKEN}"));
    assert_eq!(req.header("content-type"), "application/json");
    assert_eq!(req.header("x-pipe-event"), "failure");
    assert_eq!(req.header("x-pipe-delivery"), format!("{run_id}.1.failure"));
    assert_eq!(req.header("x-team"), "data-eng");
    assert_eq!(req.header("x-event"), "failure-failed");
    assert_signed(req);
    let body = req.json();
    assert_eq!(body["event"], "failure");
    assert_eq!(body["pipeline"], "hooked");
    assert_eq!(body["run_id"], run_id);
    assert_eq!(body["status"], "failed");
    assert_eq!(body["trigger"], "cli");
    assert!(body["error"].as_str().unwrap().contains("load"), "{body}");
    assert!(body["finished_at"].is_string() && body["logical_date"].is_string());
    let steps = body["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{body}");
    assert_eq!(steps[0]["id"], "extract");
    assert_eq!(steps[0]["status"], "succeeded");
    assert_eq!(steps[1]["id"], "load");
    assert_eq!(steps[1]["status"], "failed");
    let text = String::from_utf8_lossy(&req.body);
    assert!(
        !text.contains(HOOK_KEY) && !text.contains(HOOK_TOKEN),
        "{text}"
    );
    // The delivery is in the run's history, named without the URL's path (the token).
    let rows = log_rows(&env.state(), run_id);
    let sent = format!(
        "notification (failure) sent: webhook http://127.0.0.1:{}",
        rx.port
    );
    assert!(
        rows.iter().any(|(l, m)| l == "info" && m == &sent),
        "{rows:?}"
    );
    assert_no_secret_in_files(&env.state(), &[HOOK_KEY, HOOK_TOKEN]);
}

#[test]
fn a_webhook_is_retried_on_5xx_honouring_retry_after() {
    // 503 with Retry-After: 1, then 500, then 200.
    let rx = Receiver::start(Box::new(|n, _| match n {
        0 => (503, vec![("Retry-After", "1".to_string())]),
        1 => (500, vec![]),
        _ => (200, vec![]),
    }));
    let env = Env::new();
    let file = env.write(
        "p.yaml",
        &format!(
            r#"pipeline: retried
steps:
  a:
    type: log
    with: {{ message: hello }}
notify:
  - on: success
    webhook:
      url: "{}"
      secret: "{{{{ secret('HOOK_KEY') }}}}"
"#,
            rx.url("/h")
        ),
    );
    let (code, summary, stderr) = run_json(&env, &file, SECRETS);
    assert_eq!(code, 0, "{summary}\n{stderr}");
    let run_id = summary["run_id"].as_i64().unwrap();
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    for r in &reqs {
        assert_signed(r);
        assert_eq!(r.header("x-pipe-delivery"), format!("{run_id}.1.success"));
        assert_eq!(r.json()["status"], "succeeded");
    }
    let rows = log_rows(&env.state(), run_id);
    assert!(
        rows.iter()
            .any(|(l, m)| l == "info" && m.contains("sent") && m.contains("after 3 attempts")),
        "{rows:?}"
    );
}

#[test]
fn a_notification_that_cannot_be_sent_is_a_warning_and_never_fails_the_run() {
    // A port nobody listens on.
    let down = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = Receiver::start(Box::new(|_, _| (401, vec![])));
    let env = Env::new();
    let file = env.write(
        "p.yaml",
        &format!(
            r#"pipeline: unheard
steps:
  a:
    type: log
    with: {{ message: hello }}
notify:
  - on: [success, failure]
    webhook:
      url: "http://127.0.0.1:{down}/h/{{{{ secret('HOOK_TOKEN') }}}}"
      secret: "{{{{ secret('HOOK_KEY') }}}}"
      retries: 1
  - on: success
    webhook:
      url: "{}"
  - on: success
    webhook:
      url: "{}"
      secret: "{{{{ secret('NOT_SET_ANYWHERE') }}}}"
"#,
            refused.url("/denied"),
            refused.url("/never")
        ),
    );
    let (code, summary, stderr) = run_json(&env, &file, SECRETS);
    assert_eq!(code, 0, "{summary}\n{stderr}");
    assert_eq!(summary["status"], "succeeded");
    let run_id = summary["run_id"].as_i64().unwrap();
    // A 4xx is not retried; the entry whose secret is unset sends nothing.
    let reqs = refused.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].path, "/denied");
    let rows = log_rows(&env.state(), run_id);
    let warnings: Vec<&String> = rows
        .iter()
        .filter(|(l, _)| l == "warning")
        .map(|(_, m)| m)
        .collect();
    assert_eq!(warnings.len(), 3, "{rows:?}");
    let down_prefix = format!("notification (success) not sent: webhook http://127.0.0.1:{down}: ");
    assert!(
        warnings
            .iter()
            .any(|m| m.starts_with(&down_prefix) && m.ends_with("(after 2 attempts)")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(
            |m| m.contains(&format!("127.0.0.1:{}: HTTP 401", refused.port))
                && m.contains("not retried")
        ),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|m| m.contains("NOT_SET_ANYWHERE") && m.contains("webhook.secret")),
        "{warnings:?}"
    );
    // The warnings reach the terminal too.
    assert!(stderr.contains(&down_prefix), "{stderr}");
    assert_no_secret_in_files(&env.state(), &[HOOK_KEY, HOOK_TOKEN]);
}

#[test]
fn duration_over_fires_once_while_the_run_is_still_going() {
    let env = Env::new();
    let flag = env.path().join("duration-notified");
    let flag_for_rx = flag.clone();
    // The step waits for the flag the receiver writes when `duration_over` arrives, so the
    // run is still going when it is sent, however slow the machine.
    let rx = Receiver::start(Box::new(move |_, req| {
        if req.json()["event"] == "duration_over" {
            std::fs::write(&flag_for_rx, b"1").unwrap();
        }
        (200, vec![])
    }));
    let file = env.write(
        "p.yaml",
        &format!(
            r#"pipeline: slow
steps:
  wait:
    type: exec
    with:
      command: sh
      args: ["-c", "i=0; while [ ! -f '{}' ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; test -f '{}'"]
      on_nonzero: fail
notify:
  - on: [duration_over: 1s]
    webhook: {{ url: "{}", secret: "{{{{ secret('HOOK_KEY') }}}}" }}
  - on: success
    webhook: {{ url: "{}" }}
"#,
            flag.display(),
            flag.display(),
            rx.url("/late"),
            rx.url("/done")
        ),
    );
    let (code, summary, stderr) = run_json(&env, &file, SECRETS);
    assert_eq!(code, 0, "{summary}\n{stderr}");
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 2, "one duration_over, one success: {reqs:?}");
    let late = reqs
        .iter()
        .find(|r| r.path == "/late")
        .expect("duration_over sent");
    assert_signed(late);
    let body = late.json();
    assert_eq!(body["event"], "duration_over");
    assert_eq!(body["status"], "running");
    assert_eq!(body["duration_over_ms"], 1000);
    assert!(body["duration_ms"].as_u64().unwrap() >= 1000, "{body}");
    let done = reqs
        .iter()
        .find(|r| r.path == "/done")
        .expect("success sent");
    assert_eq!(done.json()["event"], "success");
}

/// The venv's Python (with aiosmtpd), or a failure that says how to get one.
fn python() -> PathBuf {
    let candidates = [
        std::env::var_os("PIPE_TEST_PYTHON").map(PathBuf::from),
        std::env::var_os("PIPE_CI_VENV").map(|v| PathBuf::from(v).join("bin/python")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pipe-ci/venv/bin/python")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or_else(|| {
            panic!(
                "no test venv: this test sends e-mail to a real SMTP server (aiosmtpd). Run \
                 scripts/test (it prepares the venv), or: python3 -m venv DIR && DIR/bin/pip \
                 install -r tests/python/requirements.txt && export PIPE_TEST_PYTHON=DIR/bin/python"
            )
        })
}

/// `tests/python/smtp_sink.py` running; killed when dropped.
struct SmtpSink {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl SmtpSink {
    fn start(dir: &Path, login: Option<(&str, &str)>) -> SmtpSink {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = std::process::Command::new(python());
        cmd.arg(repo_root().join("tests/python/smtp_sink.py"))
            .arg(dir);
        if let Some((u, p)) = login {
            cmd.args([u, p]);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the SMTP sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!("the SMTP sink did not start (it said {line:?}); is aiosmtpd in the venv?")
            });
        SmtpSink {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    /// The messages received: (envelope JSON, raw message).
    fn messages(&self) -> Vec<(serde_json::Value, String)> {
        let mut out = Vec::new();
        for n in 1.. {
            let meta = self.dir.join(format!("{n}.json"));
            let Ok(text) = std::fs::read_to_string(&meta) else {
                break;
            };
            let raw = std::fs::read_to_string(self.dir.join(format!("{n}.eml"))).unwrap();
            out.push((serde_json::from_str(&text).unwrap(), raw));
        }
        out
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A header of a raw message (unfolded).
fn mail_header(raw: &str, name: &str) -> String {
    let raw = raw.replace("\r\n", "\n");
    let head = raw.split("\n\n").next().unwrap_or(&raw);
    let unfolded = head.replace("\n ", " ").replace("\n\t", " ");
    unfolded
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} header in\n{raw}"))
}

#[test]
fn a_failed_run_sends_an_email_through_a_real_smtp_server() {
    let env = Env::new();
    let sink = SmtpSink::start(&env.path().join("mail"), Some(("pipe-bot", SMTP_PASSWORD)));
    let file = env.write(
        "p.yaml",
        &format!(
            r#"pipeline: mailer
connections:
  mail:
    type: smtp
    host: 127.0.0.1
    port: {port}
    tls: none
    username: pipe-bot
    password: "{{{{ secret('SMTP_PASSWORD') }}}}"
  wrong_login:
    type: smtp
    host: 127.0.0.1
    port: {port}
    tls: none
    username: pipe-bot
    password: "{{{{ secret('WRONG_PASSWORD') }}}}"
steps:
  extract:
    type: exec
    with: {{ command: sh, args: ["-c", "exit 4"], on_nonzero: fail }}
notify:
  - on: failure
    email:
      connection: mail
      to: ["Ops Team <ops@example.com>", dev@example.com]
      from: "pipe <pipe@example.com>"
      subject: "{{{{ run.pipeline }}}} {{{{ status }}}} ({{{{ event }}}})"
  - on: failure
    email:
      connection: wrong_login
      to: [ops@example.com]
      from: pipe@example.com
"#,
            port = sink.port
        ),
    );
    let mut envs = SECRETS.to_vec();
    envs.push(("WRONG_PASSWORD", "not-the-password"));
    let (code, summary, stderr) = run_json(&env, &file, &envs);
    assert_eq!(code, 1, "{summary}\n{stderr}");
    let run_id = summary["run_id"].as_i64().unwrap();
    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "only the good login sends: {messages:?}");
    let (envelope, raw) = &messages[0];
    assert_eq!(envelope["mail_from"], "pipe@example.com");
    assert_eq!(
        envelope["rcpt_tos"],
        serde_json::json!(["ops@example.com", "dev@example.com"])
    );
    assert_eq!(envelope["login"], "pipe-bot");
    let to = mail_header(raw, "To");
    assert!(
        to.contains("<ops@example.com>") && to.contains("dev@example.com"),
        "{to}"
    );
    assert!(mail_header(raw, "From").contains("<pipe@example.com>"));
    assert_eq!(mail_header(raw, "Subject"), "mailer failed (failure)");
    assert_eq!(mail_header(raw, "X-Pipe-Run"), run_id.to_string());
    assert_eq!(mail_header(raw, "X-Pipe-Event"), "failure");
    let normalized = raw.replace("\r\n", "\n");
    let body = normalized
        .split_once("\n\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        body.contains(&format!("Run {run_id} of mailer failed.")),
        "{raw}"
    );
    assert!(body.contains("extract failed"), "{raw}");
    assert!(!raw.contains(SMTP_PASSWORD));
    // The wrong login is a warning of the run, which stays failed for its own reason.
    let rows = log_rows(&env.state(), run_id);
    assert!(
        rows.iter().any(|(l, m)| l == "warning"
            && m.starts_with(
                "notification (failure) not sent: email to ops@example.com: smtp 127.0.0.1"
            )),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|(l, m)| l == "info"
            && m.contains("sent: email to Ops Team <ops@example.com>, dev@example.com")),
        "{rows:?}"
    );
    assert_no_secret_in_files(&env.state(), &[SMTP_PASSWORD, "not-the-password"]);
}

#[test]
fn validate_locates_every_notify_problem() {
    let env = Env::new();
    let file = env.write(
        "p.yaml",
        r#"pipeline: v
connections:
  api:
    type: http
    base_url: https://example.com
  mail:
    type: smtp
    host: mail.example.com
    tsl: starttls
steps:
  a:
    type: log
    with: { message: hi }
notify:
  - on: falure
    webhook: { url: "https://x.example/h" }
  - on: [success, duration_over: soon]
    webhook: { url: "ftp://x.example/h", retries: 50 }
  - on: failure
  - on: failure
    email: { connection: api, to: [], from: nobody }
  - on: success
    email: { connection: mial, to: [a@b.example], from: x@y.example, subject: "{{ statuss }}" }
  - on: failure
    webhook: { url: "https://x.example", secret: literal-key }
    email: { connection: mail, to: [a@b.example], from: x@y.example }
"#,
    );
    let out = env.run(&["validate", file.to_str().unwrap(), "--format", "json"]);
    let diags = out.diagnostics();
    let has = |line: u64, text: &str| {
        assert!(
            diags.iter().any(|(l, _, m)| *l == line && m.contains(text)),
            "no `{text}` at line {line}: {diags:#?}"
        )
    };
    has(9, "unknown key `tsl`");
    has(15, "unknown value `falure` (did you mean `failure`?)");
    has(17, "soon");
    has(18, "must be an http:// or https:// URL");
    has(18, "`webhook.retries` of notify entry 2 is at most 10");
    has(19, "notify entry 3 needs `webhook:` or `email:`");
    has(
        21,
        "names connection `api` of type `http`; e-mail needs a connection of type `smtp`",
    );
    has(21, "`email.to` of notify entry 4 lists no recipient");
    has(21, "`nobody` in notify entry 4 is not an e-mail address");
    has(23, "unknown connection `mial`; did you mean `mail`?");
    has(23, "unknown variable `statuss`; did you mean `status`?");
    has(25, "`webhook.secret` of notify entry 6 is a literal value");
    has(26, "notify entry 6 has both `webhook:` and `email:`");
    assert_eq!(out.code(), 1, "{}", out.stderr());

    // A good file validates, and `pipe schema` knows the keys.
    let good = env.write(
        "good.yaml",
        r#"pipeline: g
connections:
  mail: { type: smtp, host: mail.example.com, username: u, password: "{{ secret('P') }}" }
steps:
  a: { type: log, with: { message: hi } }
notify:
  - on: [failure, duration_over: 30m]
    webhook: { url: "https://hooks.example/{{ secret('T') }}", secret: "{{ secret('K') }}", retries: 5, timeout: 5s }
  - on: paused
    email: { connection: mail, to: [ops@example.com], from: pipe@example.com, subject: "{{ run.pipeline }} {{ event }}" }
"#,
    );
    env.run(&["validate", good.to_str().unwrap()])
        .expect_code(0);
    let schema = env.run(&["schema"]).json();
    let text = schema.to_string();
    assert!(
        text.contains("NotifySpec") && text.contains("SmtpConnection"),
        "schema lacks notify"
    );
}

#[test]
fn nothing_is_sent_under_sandbox() {
    let rx = Receiver::start(Box::new(|_, _| (200, vec![])));
    let env = Env::new();
    let file = env.write(
        "p.yaml",
        &format!(
            r#"pipeline: offline
steps:
  a:
    type: log
    with: {{ message: hello }}
notify:
  - on: [success, failure, duration_over: 0s]
    webhook: {{ url: "{}" }}
"#,
            rx.url("/h")
        ),
    );
    let out = env.run(&[
        "run",
        file.to_str().unwrap(),
        "--sandbox",
        "--format",
        "json",
    ]);
    out.expect_code(0);
    // The run is over: anything it would send has been sent.
    assert!(rx.requests().is_empty(), "{:?}", rx.requests());
    // The same file without --sandbox does notify (the receiver works).
    env.run(&["run", file.to_str().unwrap(), "--format", "json"])
        .expect_code(0);
    let events: Vec<String> = rx
        .requests()
        .iter()
        .map(|r| r.json()["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events.contains(&"success".to_string()) && events.contains(&"duration_over".to_string())
    );
}

/// A stored `smtp` credential (`pipe credentials set`) logs the notification in: the
/// e-mail renders its connection through the run's overrides, as steps do.
#[test]
fn a_notification_logs_in_with_a_stored_smtp_credential() {
    let env = Env::new();
    let password = "smtp-9e4d-stored-private";
    let sink = SmtpSink::start(&env.path().join("mail"), Some(("pipe-bot", password)));
    let port = format!("port={}", sink.port);
    crate::credentials::with_stdin(
        &env,
        &[
            "credentials",
            "set",
            "mail",
            "--type",
            "smtp",
            "--public",
            "host=127.0.0.1",
            "--public",
            &port,
            "--public",
            "tls=none",
            "--public",
            "username=pipe-bot",
        ],
        &format!("password={password}\n"),
        &[],
    )
    .expect_code(0);
    let file = env.write(
        "p.yaml",
        r#"pipeline: mailer
connections:
  mail: { type: smtp, credential: mail }
steps:
  extract:
    type: exec
    with: { command: sh, args: ["-c", "exit 4"], on_nonzero: fail }
notify:
  - on: failure
    email: { connection: mail, to: [ops@example.com], from: pipe@example.com }
"#,
    );
    let out = env.run(&["run", file.to_str().unwrap()]);
    out.expect_code(1);
    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "{}", out.stderr());
    assert_eq!(messages[0].0["login"], "pipe-bot");
    assert!(!out.stdout().contains(password) && !out.stderr().contains(password));
}
