//! `pipe credentials` and pipelines that use stored credentials, through the real binary:
//! set/list/show/delete/rotate-key, errors that name the field, a wrong key's message, runs
//! against real PostgreSQL and a local echo server, and the canary: a value planted in every
//! private field of every credential type never shows anywhere.

use crate::redaction::Canary;
use crate::util::{Env, Out, PgDb};
use std::io::{Read, Write};
use std::process::Stdio;

/// `pipe ARGS` with `stdin` as its standard input.
pub(crate) fn with_stdin(env: &Env, args: &[&str], stdin: &str, envs: &[(&str, &str)]) -> Out {
    let mut child = env
        .cmd()
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pipe");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    Out(child.wait_with_output().unwrap())
}

fn show(env: &Env, name: &str, envs: &[(&str, &str)]) -> serde_json::Value {
    let out = Out(env
        .cmd()
        .envs(envs.iter().copied())
        .args(["credentials", "show", name, "--format", "json"])
        .output()
        .unwrap());
    out.expect_code(0);
    out.json()
}

#[test]
fn set_list_show_delete_with_write_only_private_fields() {
    let env = Env::new();
    let out = with_stdin(
        &env,
        &[
            "credentials",
            "set",
            "carol-prod",
            "--type",
            "carol",
            "--public",
            "tenant=acme",
            "--public",
            "connector_id=c1",
        ],
        "# the connector token\napi_key=ak-5d1e-private\n",
        &[],
    );
    out.expect_code(0);
    assert!(
        out.stdout().contains("credential carol-prod created"),
        "{}",
        out.stdout()
    );
    assert!(
        out.stderr().contains("created the master key"),
        "{}",
        out.stderr()
    );
    let key = env.state().join("master.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let c = show(&env, "carol-prod", &[]);
    assert_eq!(c["type"], "carol");
    assert_eq!(
        c["public"],
        serde_json::json!({"tenant": "acme", "connector_id": "c1"})
    );
    assert_eq!(c["private_fields"], serde_json::json!(["api_key"]));
    // The public part changes; the stored key stays (nothing on stdin).
    let out = with_stdin(
        &env,
        &[
            "credentials",
            "set",
            "carol-prod",
            "-t",
            "carol",
            "--public",
            "tenant=acme2",
            "--public",
            "connector_id=c1",
        ],
        "",
        &[],
    );
    out.expect_code(0);
    assert!(
        out.stdout().contains("saved (carol; changed: tenant)"),
        "{}",
        out.stdout()
    );
    assert_eq!(
        show(&env, "carol-prod", &[])["private_fields"],
        serde_json::json!(["api_key"])
    );
    // A JSON object on stdin; a public number is typed by the schema.
    with_stdin(
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
            "port=2525",
            "--public",
            "username=ops",
        ],
        r#"{"password": "smtp-8c2f-private"}"#,
        &[],
    )
    .expect_code(0);
    assert_eq!(
        show(&env, "mail", &[])["public"]["port"],
        2525,
        "typed by the schema"
    );

    let list = env.run(&["credentials", "list", "--format", "json"]);
    list.expect_code(0);
    let names: Vec<String> = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["carol-prod", "mail"]);
    let text = env.run(&["credentials", "list"]);
    assert!(
        text.stdout().contains("carol-prod  carol"),
        "{}",
        text.stdout()
    );
    let shown = env.run(&["credentials", "show", "mail"]);
    assert!(
        shown
            .stdout()
            .contains("private (set, write-only): password"),
        "{}",
        shown.stdout()
    );
    let audit = env.run(&["credentials", "audit", "carol-prod", "--format", "json"]);
    audit.expect_code(0);
    let rows = audit.json();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[0]["detail"]["fields"], serde_json::json!(["tenant"]));
    assert!(rows[0]["actor"].as_str().unwrap().starts_with("cli:"));

    for out in [&list, &text, &shown, &audit] {
        for secret in ["ak-5d1e-private", "smtp-8c2f-private"] {
            assert!(!out.stdout().contains(secret) && !out.stderr().contains(secret));
        }
    }
    env.run(&["credentials", "delete", "mail"]).expect_code(0);
    let gone = env.run(&["credentials", "show", "mail"]);
    gone.expect_code(1);
    assert!(
        gone.stderr().contains("no credential `mail`"),
        "{}",
        gone.stderr()
    );
    env.run(&["credentials", "delete", "mail"]).expect_code(1);

    let types = env.run(&["credentials", "types", "--format", "json"]);
    types.expect_code(0);
    let carol = types
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "carol")
        .cloned()
        .unwrap();
    assert_eq!(
        carol["private_schema"]["properties"]["api_key"]["writeOnly"],
        true
    );
    assert!(carol["public_schema"]["properties"]["tenant"].is_object());
}

#[test]
fn saving_refuses_what_does_not_fit_the_type_naming_the_field() {
    let env = Env::new();
    let refused = |args: &[&str], stdin: &str, needle: &str| {
        let out = with_stdin(&env, args, stdin, &[]);
        out.expect_code(1);
        assert!(out.stderr().contains(needle), "{args:?}: {}", out.stderr());
        assert!(!out.stderr().contains("hunter2-x") && !out.stdout().contains("hunter2-x"));
    };
    let set =
        |name: &'static str, kind: &'static str| vec!["credentials", "set", name, "--type", kind];
    let carol = |public: &[&'static str]| {
        let mut args = set("c", "carol");
        for p in public {
            args.extend(["--public", p]);
        }
        args
    };
    let login = ["tenant=a", "connector_id=c"];
    // A private value never comes from an argument.
    refused(&carol(&["api_key=hunter2-x"]), "", "`api_key` is private");
    refused(
        &carol(&["tenant=a", "conector_id=x"]),
        "api_key=hunter2-x",
        "`conector_id`: unknown key `conector_id` of a carol credential; did you mean `connector_id`?",
    );
    refused(
        &carol(&["tenant=a"]),
        "api_key=hunter2-x",
        "`connector_id`: missing required key `connector_id`",
    );
    refused(
        &carol(&login),
        "api_key=hunter2-x\npassword=hunter2-x\n",
        "not both",
    );
    refused(&carol(&login), "tenant=hunter2-x", "`tenant` is public");
    refused(
        &[&set("db", "postgres")[..], &["--public", "port=many"]].concat(),
        "",
        "`port`:",
    );
    refused(
        &set("db", "postgress"),
        "",
        "unknown credential type `postgress` (did you mean `postgres`?)",
    );
    refused(&set("Prod DB", "postgres"), "", "is not a credential name");
    refused(
        &set("db", "postgres"),
        "not a line",
        "stdin, line 1: expected `key=value`",
    );
    let out = env.run(&["credentials", "list", "--format", "json"]);
    assert_eq!(out.json(), serde_json::json!([]), "nothing was saved");
}

fn new_key(env: &Env, file: &str) -> String {
    let out = env.run(&["credentials", "new-key", file]);
    out.expect_code(0);
    out.stdout().split_whitespace().nth(3).unwrap().to_string()
}

fn pg_pipeline(env: &Env, credential: &str) -> String {
    env.write(
        "pg.yaml",
        &format!(
            r#"pipeline: stored
connections:
  db: {{ type: postgres, credential: {credential} }}
steps:
  one:
    type: sql.query
    connection: db
    with: {{ query: "SELECT 1 AS one" }}
"#
        ),
    )
    .display()
    .to_string()
}

/// A `postgres` credential for the test database: the password is stored (trust auth
/// ignores it).
fn pg_credential(env: &Env, db: &PgDb, name: &str, password: &str, envs: &[(&str, &str)]) {
    let cfg: postgres::Config = db.url.parse().unwrap();
    let host = match &cfg.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => h.clone(),
        postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let public = [
        format!("host={host}"),
        format!("port={}", cfg.get_ports().first().copied().unwrap_or(5432)),
        format!("user={}", cfg.get_user().unwrap_or("postgres")),
        format!("database={}", cfg.get_dbname().unwrap()),
    ];
    let mut args = vec!["credentials", "set", name, "--type", "postgres"];
    for p in &public {
        args.extend(["--public", p.as_str()]);
    }
    with_stdin(env, &args, &format!("password={password}\n"), envs).expect_code(0);
}

#[test]
fn a_pipeline_uses_a_stored_credential_and_fails_early_without_it() {
    let env = Env::new();
    let db = PgDb::new();
    let key_id = new_key(&env, "k1.key");
    let k1 = env.path().join("k1.key").display().to_string();
    let with_k1 = [("PIPE_MASTER_KEY_FILE", k1.as_str())];
    pg_credential(&env, &db, "pg-test", "pg-4b7a-private", &with_k1);
    assert!(
        !env.state().join("master.key").exists(),
        "a key was given: none is created"
    );
    assert_eq!(show(&env, "pg-test", &[])["key_id"], key_id.as_str());

    let file = pg_pipeline(&env, "pg-test");
    // validate needs neither the store nor the key, and asks for no key the credential gives.
    env.run(&["validate", &file]).expect_code(0);
    let run = |envs: &[(&str, &str)]| {
        Out(env
            .cmd()
            .envs(envs.iter().copied())
            .args(["run", &file, "--format", "json"])
            .output()
            .unwrap())
    };
    let out = run(&with_k1);
    out.expect_code(0);
    let summary = out.json();
    assert_eq!(summary["status"], "succeeded", "{summary}");
    assert!(!out.stdout().contains("pg-4b7a-private") && !out.stderr().contains("pg-4b7a-private"));

    // Another key: the message names both ids, and no run starts.
    let other = new_key(&env, "k2.key");
    let k2 = env.path().join("k2.key").display().to_string();
    let out = run(&[("PIPE_MASTER_KEY_FILE", k2.as_str())]);
    out.expect_code(2);
    assert!(
        out.stderr().contains(&format!(
            "connection `db`: credential `pg-test`: credential pg-test was sealed with key {key_id}, PIPE_MASTER_KEY is {other}"
        )),
        "{}",
        out.stderr()
    );
    // No key at all.
    let out = run(&[]);
    out.expect_code(2);
    assert!(
        out.stderr()
            .contains("connection `db`: credential `pg-test`: no master key: set PIPE_MASTER_KEY"),
        "{}",
        out.stderr()
    );
    // A missing credential.
    let missing = pg_pipeline(&env, "pg-nope");
    let out = Out(env
        .cmd()
        .envs(with_k1)
        .args(["run", &missing])
        .output()
        .unwrap());
    out.expect_code(2);
    assert!(
        out.stderr()
            .contains("connection `db`: credential `pg-nope`: no credential `pg-nope`"),
        "{}",
        out.stderr()
    );
    // A credential of another type.
    with_stdin(
        &env,
        &[
            "credentials",
            "set",
            "mail",
            "-t",
            "smtp",
            "--public",
            "host=h",
        ],
        "",
        &with_k1,
    )
    .expect_code(0);
    let wrong = pg_pipeline(&env, "mail");
    let out = Out(env
        .cmd()
        .envs(with_k1)
        .args(["run", &wrong])
        .output()
        .unwrap());
    out.expect_code(2);
    assert!(
        out.stderr()
            .contains("it is a `smtp` credential, and the connection is of type `postgres`"),
        "{}",
        out.stderr()
    );
    // Only the first run was recorded: the others failed before anything started.
    let runs = env.run(&["runs", "list", "--format", "json"]);
    assert_eq!(
        runs.json().as_array().unwrap().len(),
        1,
        "{}",
        runs.stdout()
    );

    // --sandbox wins: the fake database stands in, no key needed.
    let out = Out(env
        .cmd()
        .args(["run", &file, "--sandbox", "--format", "json"])
        .output()
        .unwrap());
    out.expect_code(0);
}

#[test]
fn rotate_key_reseals_every_credential_and_replaces_the_default_key_file() {
    let env = Env::new();
    let db = PgDb::new();
    pg_credential(&env, &db, "pg-a", "pg-a-private", &[]);
    with_stdin(
        &env,
        &[
            "credentials",
            "set",
            "mail",
            "-t",
            "smtp",
            "--public",
            "host=h",
            "--public",
            "username=u",
        ],
        "password=mail-private\n",
        &[],
    )
    .expect_code(0);
    let old = show(&env, "pg-a", &[])["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let old_key = std::fs::read_to_string(env.state().join("master.key")).unwrap();

    let out = env.run(&["credentials", "rotate-key", "--new-key-file", "new.key"]);
    out.expect_code(0);
    assert!(
        out.stdout().contains("2 credential(s) sealed again"),
        "{}",
        out.stdout()
    );
    let new = show(&env, "pg-a", &[])["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    assert_eq!(show(&env, "mail", &[])["key_id"], new.as_str());
    assert_eq!(
        std::fs::read_to_string(env.state().join("master.key")).unwrap(),
        std::fs::read_to_string(env.path().join("new.key")).unwrap(),
        "the default key file holds the new key"
    );
    let file = pg_pipeline(&env, "pg-a");
    env.run(&["run", &file]).expect_code(0);
    // The old key opens nothing any more.
    let out = Out(env
        .cmd()
        .env("PIPE_MASTER_KEY", old_key.trim())
        .args(["run", &file])
        .output()
        .unwrap());
    out.expect_code(2);
    assert!(
        out.stderr().contains(&format!(
            "was sealed with key {new}, PIPE_MASTER_KEY is {old}"
        )),
        "{}",
        out.stderr()
    );
    let audit = env
        .run(&["credentials", "audit", "--format", "json"])
        .json();
    let rotations = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "credential.rotate")
        .count();
    assert_eq!(rotations, 2);
    // Rotating to the same key is refused.
    env.run(&["credentials", "rotate-key", "--new-key-file", "new.key"])
        .expect_code(1);
}

/// A local HTTP server that answers every request with the request's own head as a JSON
/// body (`/fail`: with status 500): whatever credential the client sends comes back.
fn echo_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(50) {
            let Ok(mut s) = stream else { continue };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let status = if head.starts_with("GET /fail") {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let body = serde_json::json!({ "request": head }).to_string();
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// The canary: a unique value in every private field of every credential type, a run that
/// sends one to a server that echoes it into outputs, logs, a script's output and an error,
/// and then every byte `pipe` printed or left in the state dir is searched for all of them.
#[test]
fn the_canary_planted_in_every_private_field_never_shows() {
    let mut c = Canary::new();
    let port = echo_server();
    let db = PgDb::new();
    // Every private field of every type (the type list is pipe's own: a new type or field
    // fails here until it has a canary too).
    let types = c.run(&["credentials", "types", "--format", "json"]).json();
    let mut planted: Vec<String> = Vec::new();
    let mut canary = |what: &str| {
        let v = format!("canary-{what}-{:08x}-private", planted.len() * 7919 + 40503);
        planted.push(v.clone());
        v
    };
    let pg = db.url.parse::<postgres::Config>().unwrap();
    let pg_host = match &pg.get_hosts()[0] {
        postgres::config::Host::Tcp(h) => h.clone(),
        postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    // (name, type, public, private) — private values hold canaries at every depth.
    let mut credentials: Vec<(String, String, Vec<String>, serde_json::Value)> = vec![
        (
            "echo-api".into(),
            "http".into(),
            vec![format!("base_url=http://127.0.0.1:{port}")],
            serde_json::json!({"auth": {"type": "bearer", "token": canary("http-token")}}),
        ),
        (
            "basic-api".into(),
            "http".into(),
            vec![format!("base_url=http://127.0.0.1:{port}")],
            serde_json::json!({"auth": {"type": "oauth2", "grant": "password", "token_url": "http://127.0.0.1:9/t",
             "client_id": "cid", "client_secret": canary("oauth-client-secret"), "username": "u",
             "password": canary("oauth-password"), "refresh_token": canary("oauth-refresh")}}),
        ),
        (
            "google".into(),
            "google_service_account".into(),
            vec![],
            serde_json::json!({"key_json": canary("google-key")}),
        ),
        (
            "bq".into(),
            "bigquery".into(),
            vec!["project=p".into()],
            serde_json::json!({"key_json": {"type": "service_account", "private_key": canary("bq-private-key")}}),
        ),
        (
            "carol-key".into(),
            "carol".into(),
            vec!["tenant=t".into(), "connector_id=c".into()],
            serde_json::json!({"api_key": canary("carol-api-key")}),
        ),
        (
            "carol-login".into(),
            "carol".into(),
            vec![
                "tenant=t".into(),
                "connector_id=c".into(),
                "username=bot".into(),
            ],
            serde_json::json!({"password": canary("carol-password")}),
        ),
        (
            "mail".into(),
            "smtp".into(),
            vec!["host=127.0.0.1".into(), "username=ops".into()],
            serde_json::json!({"password": canary("smtp-password")}),
        ),
        (
            "pg-run".into(),
            "postgres".into(),
            vec![
                format!("host={pg_host}"),
                format!("port={}", pg.get_ports().first().copied().unwrap_or(5432)),
                format!("user={}", pg.get_user().unwrap_or("postgres")),
                format!("database={}", pg.get_dbname().unwrap()),
            ],
            serde_json::json!({"password": canary("pg-run-password")}),
        ),
    ];
    // Every SQL type (and alias: postgresql, mariadb …) with all three private fields.
    let sql_types: Vec<String> = types
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| {
            t["private_schema"]["properties"]
                .get("connection_string")
                .is_some()
        })
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(sql_types.len() >= 5, "{sql_types:?}");
    for sql in &sql_types {
        credentials.push((
            format!("{sql}-all"),
            sql.into(),
            vec![],
            serde_json::json!({
                "url": canary(&format!("{sql}-url")),
                "password": canary(&format!("{sql}-password")),
                "connection_string": canary(&format!("{sql}-connection-string")),
            }),
        ));
    }
    for t in types.as_array().unwrap() {
        for field in t["private_schema"]["properties"]
            .as_object()
            .unwrap()
            .keys()
        {
            assert!(
                credentials.iter().any(|(_, kind, _, private)| kind == &t["name"] && private.get(field).is_some()),
                "no canary in `{field}` of type `{}`",
                t["name"]
            );
        }
    }
    for (i, (name, kind, public, private)) in credentials.iter().enumerate() {
        let file = c
            .env
            .write(&format!("private-{i}.json"), &private.to_string());
        let mut args = vec![
            "credentials".to_string(),
            "set".into(),
            name.clone(),
            "--type".into(),
            kind.clone(),
            "--private-from".into(),
            file.display().to_string(),
        ];
        for p in public {
            args.extend(["--public".to_string(), p.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.run(&args).expect_code(0);
    }
    for cmd in [
        &["credentials", "list"][..],
        &["credentials", "list", "--format", "json"],
        &["credentials", "audit", "--format", "json"],
        &["credentials", "types"],
    ] {
        c.run(cmd).expect_code(0);
    }
    for (name, ..) in &credentials {
        c.run(&["credentials", "show", name]).expect_code(0);
        c.run(&["credentials", "show", name, "--format", "json"])
            .expect_code(0);
    }

    let pipeline = c.env.write(
        "canary.yaml",
        r#"pipeline: canary
connections:
  api: { type: http, credential: echo-api }
  db: { type: postgres, credential: pg-run }
steps:
  call:
    type: http.request
    connection: api
    with: { method: GET, path: /echo }
    outputs:
      echoed: "{{ response.body }}"
      auth: "{{ response.json.request }}"
  show:
    type: log
    with: { message: "the server saw {{ steps.call.echoed }}" }
  script:
    type: exec
    with: { command: echo, args: ["{{ steps.call.auth }}"] }
  query:
    type: sql.query
    connection: db
    with: { query: "SELECT 1 AS one" }
  fail:
    type: http.request
    connection: api
    needs: [script, query]
    with: { method: GET, path: /fail }
"#,
    );
    let p = pipeline.display().to_string();
    c.run(&["validate", &p]).expect_code(0);
    let out = c.run(&["run", &p, "--format", "json"]);
    out.expect_code(1);
    let summary = out.json();
    let step = |id: &str| {
        crate::util::step(&summary, id)["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(step("call"), "succeeded", "{summary}");
    assert_eq!(step("query"), "succeeded", "{summary}");
    assert_eq!(step("fail"), "failed", "{summary}");
    // The server did see the token (so the masking had something to mask).
    let echoed = crate::util::step(&summary, "call")["outputs"]["echoed"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        echoed.to_lowercase().contains("authorization: bearer ***"),
        "{echoed}"
    );
    let id = summary["run_id"].as_i64().unwrap();
    c.inspect(id);
    c.run(&["runs", "list", "--format", "json"]).expect_code(0);
    let refs: Vec<&str> = planted.iter().map(String::as_str).collect();
    c.assert_absent(&refs);
}

#[test]
fn validate_asks_no_key_of_a_credential_but_still_knows_the_keys() {
    let env = Env::new();
    let ok = env.write(
        "ok.yaml",
        r#"pipeline: ok
connections:
  carol: { type: carol, credential: carol-prod }
  db: { type: postgres, credential: erp-db, database: reporting }
steps:
  q:
    type: sql.query
    connection: db
    with: { query: "SELECT 1" }
"#,
    );
    let out = env.run(&["validate", "--format", "json", ok.to_str().unwrap()]);
    out.expect_code(0);
    assert!(out.diagnostics().is_empty(), "{:?}", out.diagnostics());
    let bad = env.write(
        "bad.yaml",
        r#"pipeline: bad
connections:
  carol: { type: carol, credential: carol-prod, tenat: x }
  db: { type: postgres, credential: "{{ env('DB') }}", port: many }
steps:
  q:
    type: sql.query
    connection: db
    with: { query: "SELECT 1" }
"#,
    );
    let out = env.run(&["validate", "--format", "json", bad.to_str().unwrap()]);
    out.expect_code(1);
    let messages: Vec<String> = out.diagnostics().into_iter().map(|d| d.2).collect();
    let all = messages.join("\n");
    assert!(
        all.contains("unknown key `tenat`; did you mean `tenant`?"),
        "{all}"
    );
    assert!(
        all.contains("`credential` names a stored credential"),
        "{all}"
    );
    assert!(all.contains("`many`"), "{all}");
    assert!(!all.contains("missing required key"), "{all}");
}

/// `pipe serve` runs go through the same runner: a triggered run uses the stored
/// credential; one whose credential is missing starts nothing and the log says why.
#[test]
fn serve_runs_resolve_stored_credentials() {
    let env = Env::new();
    let db = PgDb::new();
    pg_credential(&env, &db, "pg-serve", "pg-serve-private", &[]);
    let text = std::fs::read_to_string(pg_pipeline(&env, "pg-serve")).unwrap();
    env.write("pipelines/stored.yaml", &text);
    env.write(
        "pipelines/missing.yaml",
        &text
            .replace("pipeline: stored", "pipeline: missing")
            .replace("pg-serve", "pg-gone"),
    );
    let mut server = crate::util::Daemon::start(&env, "serve", &["pipelines"]);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        while !f() {
            assert!(
                std::time::Instant::now() < until,
                "timed out waiting for {what}:\n{}",
                server.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    wait("the integrations", &mut || {
        env.run(&["integrations", "show", "missing"]).code() == 0
    });
    env.run(&["trigger", "stored"]).expect_code(0);
    env.run(&["trigger", "missing"]).expect_code(0);
    wait("the stored run", &mut || {
        let out = env.run(&["runs", "list", "--pipeline", "stored", "--format", "json"]);
        out.json()
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == "succeeded")
    });
    // The run that could not start is a failed run with the reason, where operators look
    // (runs list, its log, the API and the dashboard), not only a line in the server's log.
    let why = "connection `db`: credential `pg-gone`: no credential `pg-gone`";
    let mut failed = serde_json::Value::Null;
    wait("the missing credential's failed run", &mut || {
        let out = env.run(&["runs", "list", "--pipeline", "missing", "--format", "json"]);
        match out.json().as_array().unwrap().first() {
            Some(r) if r["status"] == "failed" => {
                failed = r.clone();
                true
            }
            _ => false,
        }
    });
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("could not start") && error.contains(why),
        "{failed}"
    );
    assert_eq!(failed["trigger"], "manual", "{failed}");
    let id = failed["id"].as_i64().unwrap().to_string();
    let logs = env.run(&["runs", "logs", &id]);
    logs.expect_code(0);
    assert!(logs.stdout().contains(why), "{}", logs.stdout());
    assert!(!server.output().contains("pg-serve-private"));
    assert_eq!(server.stop(), 0, "{}", server.output());
}
