//! Fidelity of the Google fakes: Google's own Python clients (`google-auth` for the
//! service-account OAuth flow, `google-api-python-client` for Sheets v4,
//! `google-cloud-bigquery` for BigQuery), which nobody here wrote, drive
//! `pipe sandbox serve` through `tests/python/sheets_fidelity.py`,
//! `tests/python/gspread_fidelity.py` (gspread, the Sheets client users reach for) and
//! `tests/python/bigquery_fidelity.py`. If they work, the fakes speak the real protocol
//! rather than only agreeing with pipe's client.
//!
//! The interpreter is `PIPE_TEST_PYTHON`, a venv with `tests/python/requirements.txt`
//! that `.ci/run` prepares. Without it the test FAILS (it never skips): a fidelity check
//! that silently does not run proves nothing.

use crate::util::{pipe_bin, repo_root, wait_with_deadline, Env};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The venv's interpreter, or a failure that says how to get one.
pub(crate) fn python() -> PathBuf {
    match std::env::var_os("PIPE_TEST_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.exists(),
                "PIPE_TEST_PYTHON={} does not exist; run .ci/run (it prepares the venv), or \
                 python3 -m venv DIR && DIR/bin/pip install -r tests/python/requirements.txt \
                 and set PIPE_TEST_PYTHON=DIR/bin/python",
                p.display()
            );
            p
        }
        None => panic!(
            "PIPE_TEST_PYTHON is not set: this test drives the Google fakes with Google's \
             official Python clients and needs their venv. Run .ci/run (it prepares the venv \
             and sets the variable), or: python3 -m venv DIR && DIR/bin/pip install -r \
             tests/python/requirements.txt && export PIPE_TEST_PYTHON=DIR/bin/python"
        ),
    }
}

/// A running `pipe sandbox serve`; SIGTERM (then SIGKILL) when dropped, so a failing
/// test does not leave it behind.
pub(crate) struct Served {
    child: Child,
    /// The `export NAME=VALUE` lines, unquoted.
    pub(crate) exports: HashMap<String, String>,
    /// The Google fake's base URL (`http://127.0.0.1:PORT`).
    google_url: String,
}

impl Served {
    pub(crate) fn start(args: &[&str]) -> Served {
        let mut child = Command::new(pipe_bin())
            .args(["sandbox", "serve"])
            .args(args)
            .env_remove("PIPE_SANDBOX")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pipe sandbox serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut served = Served {
            child,
            exports: HashMap::new(),
            google_url: String::new(),
        };
        let mut seen = Vec::new();
        loop {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => line,
                Err(e) => panic!(
                    "no `sandbox ready` from pipe sandbox serve ({e}); it printed:\n{}",
                    seen.join("\n")
                ),
            };
            seen.push(line.clone());
            if line == "sandbox ready" {
                break;
            }
            if let Some(rest) = line.strip_prefix("export ") {
                let (name, value) = rest.split_once('=').expect("export NAME=VALUE");
                served.exports.insert(name.to_string(), unquote(value));
            } else if let Some(rest) = line.strip_prefix("google ") {
                served.google_url = rest.split_whitespace().next().unwrap_or("").to_string();
            }
        }
        assert!(
            served.google_url.starts_with("http://127.0.0.1:"),
            "no google URL in:\n{}",
            seen.join("\n")
        );
        for name in [
            "GOOGLE_APPLICATION_CREDENTIALS",
            "OTP_SHEET_ID",
            "TIFLUX_URL",
        ] {
            assert!(
                served.exports.contains_key(name),
                "no export {name} in:\n{}",
                seen.join("\n")
            );
        }
        served
    }

    /// Apply the exports (and GOOGLE_URL) to a command.
    fn envs(&self, cmd: &mut Command) {
        cmd.envs(&self.exports).env("GOOGLE_URL", &self.google_url);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SIGTERM lets the server remove its key file's temp dir; SIGKILL if it lingers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Undo `shell_quote` of `pipe sandbox serve`: `'a'\''b'` → `a'b`; bare words as they are.
fn unquote(s: &str) -> String {
    if !s.starts_with('\'') {
        return s.to_string();
    }
    s.split(r"'\''")
        .map(|part| part.trim_start_matches('\'').trim_end_matches('\''))
        .collect::<Vec<_>>()
        .join("'")
}

/// Run one of `tests/python/*.py` against the served fakes; its JSON summary after
/// checking it exited 0.
fn run_script(served: &Served, script: &str) -> serde_json::Value {
    let python = python();
    let script = repo_root().join("tests/python").join(script);
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // Google's clients must reach the fake directly, never through a proxy.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    served.envs(&mut cmd);
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}); run .ci/run to prepare the venv",
            python.display()
        )
    });
    let out = wait_with_deadline(child, Duration::from_secs(120));
    assert_eq!(
        out.code(),
        0,
        "the official Google clients disagree with the fakes ({})\nstdout:\n{}\nstderr:\n{}",
        script.display(),
        out.stdout(),
        out.stderr()
    );
    out.json()
}

/// The summary's `failed` is empty and every one of `checks` passed.
fn assert_checks(summary: &serde_json::Value, checks: &[&str]) {
    assert_eq!(summary["failed"], serde_json::json!([]), "{summary}");
    let passed: Vec<&str> = summary["passed"]
        .as_array()
        .expect("passed")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for check in checks {
        assert!(
            passed.contains(check),
            "check {check} did not pass: {summary}"
        );
    }
}

#[test]
fn official_google_clients_accept_the_fakes() {
    python(); // fail before starting anything when the venv is missing
    let served = Served::start(&["--otp-delay", "100ms", "--tickets", "10"]);
    let summary = run_script(&served, "sheets_fidelity.py");
    assert_checks(
        &summary,
        &[
            "token_from_key_file",
            "update_raw_then_get",
            "empty_range_has_no_values",
            "otp_mailed_by_the_web_login_is_readable",
            "unknown_spreadsheet_is_404",
            "bad_range_is_400",
            "forbidden_spreadsheet_is_403",
            "rejected_token_is_refreshed_and_retried",
            "expired_token_is_refreshed_before_the_request",
        ],
    );
}

/// gspread (the Sheets client most Python users pick) against the Sheets fake:
/// `open_by_key` and `worksheet()` through spreadsheets.get, values read and written,
/// appends after a table, batch get/clear/update, tabs added, renamed, resized and
/// deleted, field masks and grid data, and Google's errors for what the fake refuses.
#[test]
fn gspread_accepts_the_sheets_fake() {
    python();
    let served = Served::start(&["--otp-delay", "100ms", "--tickets", "10"]);
    let summary = run_script(&served, "gspread_fidelity.py");
    assert_checks(
        &summary,
        &[
            "open_by_key_reads_the_metadata",
            "worksheet_by_title_and_its_values",
            "add_worksheet_update_and_read_back",
            "append_rows_after_the_table",
            "batch_get_clear_and_update",
            "update_title_resize_clear_and_delete",
            "metadata_masks_and_grid_data",
            "errors_are_googles",
        ],
    );
}

/// google-cloud-bigquery against the BigQuery fake: datasets, tables, multipart and
/// chunked resumable Parquet loads, list_rows types (TIMESTAMP included), insertAll row
/// errors, NotFound, queries (COUNT, MERGE, DDL) and a failed load job.
#[test]
fn official_bigquery_client_accepts_the_fake() {
    python(); // fail before starting anything when the venv is missing
    let served = Served::start(&["--tickets", "10"]);
    for name in [
        "BIGQUERY_PROJECT",
        "QOCKPIT_BASE_ENDPOINT",
        "QOCKPIT_API_TOKEN",
        "CAROL_URL",
        "CAROL_API_KEY",
        "CAROL_ORGANIZATION",
        "CAROL_CONNECTOR_NAME",
        "CAROL_USERNAME",
        "CAROL_PASSWORD",
        "GOOGLE_URL",
        "SHEETS_URL",
        "DEMO_DB",
    ] {
        assert!(
            served.exports.contains_key(name),
            "no export {name}: {:?}",
            served.exports
        );
    }
    let summary = run_script(&served, "bigquery_fidelity.py");
    assert_checks(
        &summary,
        &[
            "create_dataset_and_table",
            "load_parquet_multipart",
            "load_parquet_resumable_in_chunks",
            "list_rows_values_and_types",
            "insert_rows_json_reports_row_errors",
            "missing_table_is_not_found",
            "query_count",
            "merge_updates_and_inserts",
            "invalid_query_is_bad_request",
            "load_with_a_new_column_fails_without_field_addition",
            "write_truncate_replaces_and_drop_table",
        ],
    );
}

/// The same served fakes, through pipe's own client: only the exports `pipe sandbox serve`
/// prints, no `--sandbox` wiring.
#[test]
fn pipe_reads_the_served_sheet_with_the_exports_alone() {
    let served = Served::start(&["--tickets", "10"]);
    let env = Env::new();
    let pipeline = env.write(
        "sheet.yaml",
        r#"pipeline: served-sheet
connections:
  google:
    type: google_service_account
    key_file: "{{ secret('GOOGLE_APPLICATION_CREDENTIALS') }}"
    sheets_base_url: "{{ env('GOOGLE_URL') }}/"
steps:
  header:
    type: sheets.read
    connection: google
    with:
      spreadsheet: "{{ secret('OTP_SHEET_ID') }}"
      range: "OTP!A1:C3"
"#,
    );
    let mut cmd = env.cmd();
    served.envs(&mut cmd);
    let out = crate::util::Out(
        cmd.args(["run", pipeline.to_str().unwrap(), "--format", "json"])
            .output()
            .expect("run pipe"),
    );
    out.expect_code(0);
    let outputs: String = crate::util::history(&env.state())
        .query_row(
            "select outputs from step_runs where step = 'header'",
            [],
            |r| r.get(0),
        )
        .expect("the header step's outputs");
    let outputs: serde_json::Value = serde_json::from_str(&outputs).expect("outputs JSON");
    assert_eq!(
        outputs["values"],
        serde_json::json!([["code", "received_at"]]),
        "{outputs}"
    );
}

#[test]
fn exports_are_unquoted() {
    assert_eq!(unquote("/tmp/a.json"), "/tmp/a.json");
    assert_eq!(unquote("'a b'"), "a b");
    assert_eq!(unquote(r"'a b'\''c'"), "a b'c");
}

/// A TLS front for the Carol fake (pycarol only speaks https): a self-signed certificate
/// for 127.0.0.1 made with `openssl`, a rustls acceptor on 127.0.0.1:0, each connection
/// piped to the fake. Returns the port and the certificate's path (REQUESTS_CA_BUNDLE).
async fn carol_tls_front(backend: String, dir: &std::path::Path) -> (u16, PathBuf) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = (dir.join("carol-cert.pem"), dir.join("carol-key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (the tests need it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = vec![CertificateDer::from_pem_file(&cert).expect("certificate PEM")];
    let key = PrivateKeyDer::from_pem_file(&key).expect("key PEM");
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, cert)
}

/// TOTVS's pycarol against the Carol fake, behind a TLS front: password and API-key
/// logins, the tenant, schemas created from records, gzip batch sends ("intake" with the
/// batch summary), upserts, an uncompressed DataFrame send, a token refresh, a drop; then
/// the Rust side checks what the fake stored.
#[test]
fn official_pycarol_client_accepts_the_carol_fake() {
    let python = python();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let env = Env::new();
    let sbx = rt
        .block_on(sandbox::Sandbox::start(sandbox::Options {
            tickets: 1,
            ..Default::default()
        }))
        .expect("start the sandbox");
    let backend = sbx.carol_url().trim_start_matches("http://").to_string();
    let (port, cert) = rt.block_on(carol_tls_front(backend, env.path()));
    let v = sbx.values();
    let c = &v["carol"];
    let s = |k: &str| c[k].as_str().expect(k).to_string();
    let tmp = env.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let child = Command::new(&python)
        .arg(repo_root().join("tests/python/carol_fidelity.py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("REQUESTS_CA_BUNDLE", &cert)
        .env("SSL_CERT_FILE", &cert)
        // pycarol caches tokens under the temp dir: a fresh one per run.
        .env("TMPDIR", &tmp)
        .env("CAROL_HOST", "127.0.0.1")
        .env("CAROL_PORT", port.to_string())
        .env("CAROL_TENANT", s("tenant"))
        .env("CAROL_ORGANIZATION", s("organization"))
        .env("CAROL_CONNECTOR_ID", s("connector_id"))
        .env("CAROL_USER", s("username"))
        .env("CAROL_PASSWORD", s("password"))
        .env("CAROL_API_KEY", s("api_key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} ({e})", python.display()));
    let out = wait_with_deadline(child, Duration::from_secs(180));
    assert_eq!(
        out.code(),
        0,
        "pycarol disagrees with the Carol fake\nstdout:\n{}\nstderr:\n{}",
        out.stdout(),
        out.stderr()
    );
    assert_checks(
        &out.json(),
        &[
            "password_login_and_current_tenant",
            "wrong_password_is_rejected",
            "create_schema_from_records",
            "send_gzip_records_in_a_batch",
            "send_upserts_by_crosswalk",
            "send_a_dataframe_uncompressed",
            "api_key_login_sends",
            "current_user_and_connector_lookups",
            "send_to_a_table_without_schema_fails",
            "expired_token_is_refreshed",
            "drop_staging",
        ],
    );
    let records = sbx.carol_records("fidelity");
    let ids: Vec<i64> = records.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 6, 7], "{records:?}");
    assert_eq!(records[1]["name"], serde_json::json!("Bruno Souza"));
    assert_eq!(records[5]["name"], serde_json::json!("Fábio"));
    let stats = sbx.stats().carol;
    assert!(
        stats.gzip_requests >= 5,
        "gzip bodies: {stats:?}\n{}",
        out.stderr()
    );
    assert!(sbx.carol_schema("scratch").is_none());
    // Every send of pycarol ended with a batch summary that matches what arrived.
    let summaries = sbx.carol_batch_summaries();
    assert!(summaries.len() >= 5, "{summaries:?}");
    assert!(
        summaries
            .iter()
            .all(|s| s["matches"] == serde_json::json!(true)),
        "{summaries:?}"
    );
    drop(sbx);
    drop(rt);
}
