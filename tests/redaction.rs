//! The secret canary: secrets are planted, pipelines fail in every way while using them, and
//! then every byte `pipe` printed or left in the state dir is searched for them.

use crate::util::{base64, history, percent_encode, Env, Out};
use std::path::Path;

const TOKEN: &str = "canary-5f2b9e1d-secret";
const FILE_SECRET: &str = "canary-file-7c3a91e4-secret";

/// The forms of a secret that must never appear: as is, base64 (standard and URL-safe, alone
/// and after a `user:` of each length modulo 3, as a script builds Basic auth), every way a
/// URL can percent-encode it, and SQL-quoted.
fn forms(secret: &str) -> Vec<String> {
    let mut v = vec![
        secret.to_string(),
        base64(secret.as_bytes(), false),
        base64(secret.as_bytes(), true),
        percent_encode(secret),
        secret.replace('\'', "''"),
    ];
    for user in ["a:", "ab:", "abc:"] {
        for url_safe in [false, true] {
            v.push(base64(format!("{user}{secret}").as_bytes(), url_safe));
        }
    }
    v.extend(url_forms(secret));
    v.sort();
    v.dedup();
    v
}

/// The characters (besides ASCII letters and digits) that URL encoders leave as they are:
/// strict, RFC 3986 unreserved, JavaScript's `encodeURIComponent`, HTML forms, a URL path,
/// a URL's userinfo.
const URL_KEEPS: &[&str] = &[
    "",
    "-_.~",
    "-_.~!*'()",
    "*-._",
    "!$&'()*+,-./:;=@_~",
    "!$&'()*+,-._~",
];

/// `secret` percent-encoded keeping `keep`, hex in `lower` or upper case, a space as `+`
/// when `plus`.
fn url_encode(secret: &str, keep: &str, lower: bool, plus: bool) -> String {
    secret
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || keep.as_bytes().contains(&b) {
                (b as char).to_string()
            } else if b == b' ' && plus {
                "+".to_string()
            } else if lower {
                format!("%{b:02x}")
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Every URL encoding of `secret` ([`URL_KEEPS`] × hex case × space as `%20` or `+`).
fn url_forms(secret: &str) -> Vec<String> {
    let mut v = Vec::new();
    for keep in URL_KEEPS {
        for lower in [false, true] {
            for plus in [false, true] {
                v.push(url_encode(secret, keep, lower, plus));
            }
        }
    }
    v
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every file under `dir`, as (path, bytes).
fn files_under(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

/// Collects everything `pipe` printed, to search it at the end.
pub(crate) struct Canary {
    pub(crate) env: Env,
    captured: Vec<(String, Vec<u8>)>,
    /// More environment variables for every `pipe` command (secrets, encoded forms).
    vars: Vec<(String, String)>,
}

impl Canary {
    pub(crate) fn new() -> Canary {
        let env = Env::new();
        env.write("secrets/file-secret", &format!("{FILE_SECRET}\n"));
        Canary {
            env,
            captured: Vec::new(),
            vars: Vec::new(),
        }
    }

    pub(crate) fn var(&mut self, name: &str, value: &str) -> &mut Self {
        self.vars.push((name.to_string(), value.to_string()));
        self
    }

    pub(crate) fn run(&mut self, args: &[&str]) -> Out {
        let out = Out(self
            .env
            .cmd()
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .env("CANARY_TOKEN", TOKEN)
            .env(
                "CANARY_FILE_FILE",
                self.env.path().join("secrets/file-secret"),
            )
            .env_remove("CANARY_FILE")
            .args(args)
            .output()
            .expect("run pipe"));
        let what = args.join(" ");
        self.captured
            .push((format!("stdout of `{what}`"), out.0.stdout.clone()));
        self.captured
            .push((format!("stderr of `{what}`"), out.0.stderr.clone()));
        out
    }

    /// `runs show` and `runs logs` of a run, as text and JSON.
    pub(crate) fn inspect(&mut self, id: i64) {
        let id = id.to_string();
        for cmd in ["show", "logs"] {
            for format in ["text", "json"] {
                self.run(&["runs", cmd, &id, "--format", format])
                    .expect_code(0);
            }
        }
    }

    /// Search every captured output and every file under the state dir for `secrets`.
    pub(crate) fn assert_absent(&self, secrets: &[&str]) {
        let mut places = self.captured.clone();
        files_under(&self.env.state(), &mut places);
        assert!(
            places.iter().any(|(p, _)| p.ends_with("history.sqlite")),
            "no database to search"
        );
        let mut leaks = Vec::new();
        for secret in secrets {
            for form in forms(secret) {
                for (place, bytes) in &places {
                    if contains(bytes, &form) {
                        leaks.push(format!("`{form}` in {place}"));
                    }
                }
            }
        }
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    }
}

fn logs_of(state: &Path, run_id: i64) -> Vec<(String, Option<String>, String, Option<String>)> {
    let db = history(state);
    let mut stmt = db
        .prepare("select level, step, message, description from logs where run_id = ?1 order by id")
        .unwrap();
    stmt.query_map([run_id], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn step_error(summary: &serde_json::Value, id: &str) -> String {
    summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {summary}"))["error"]
        .as_str()
        .unwrap_or_else(|| panic!("step {id} has no error: {summary}"))
        .to_string()
}

const LEAKY: &str = r#"
pipeline: leaky
concurrency: 1
steps:
  shout:
    type: exec
    with:
      shell: true
      command: |
        [ "$T" = "$CANARY_TOKEN" ] && touch got-token
        [ "$F" = "$(cat "$CANARY_FILE_FILE")" ] && touch got-file
        echo "stdout token=$T"
        echo "stderr token=$T" >&2
        echo "file=$F"
        exit 3
      env: { T: "{{ secret('CANARY_TOKEN') }}", F: "{{ secret('CANARY_FILE') }}" }
      on_nonzero: fail
  encoded:
    type: exec
    with:
      shell: true
      command: |
        printf %s "$T" | base64
        printf %s "$F" | base64
        printf %s "$T" | sed 's/-/%2D/g'; echo
        echo "url=$(printf %s "$T" | sed 's/-/%2D/g')"
        printf '%s\n' "$T" >&2
      env: { T: "{{ secret('CANARY_TOKEN') }}", F: "{{ secret('CANARY_FILE') }}" }
  spawn_fail:
    type: exec
    with: { command: "/nope/{{ secret('CANARY_TOKEN') }}" }
  bad_template:
    type: log
    with: { message: "{{ secret('CANARY_TOKEN') | parse('%Y-%m-%d') }}" }
  bad_if:
    type: log
    if: "{{ env(secret('CANARY_FILE')) }}"
    with: { message: never }
  log_error:
    type: log
    with:
      level: error
      message: "login failed for {{ secret('CANARY_TOKEN') }}"
      description: "with {{ secret('CANARY_FILE') }}"
  slow:
    type: exec
    timeout: 2s
    with:
      shell: true
      command: 'echo "slow $T"; echo "slow err $T" >&2; sleep 30'
      env: { T: "{{ secret('CANARY_TOKEN') }}" }
  teardown:
    type: log
    always: true
    needs: [shout, slow]
    with: { message: "teardown {{ secret('CANARY_TOKEN') }} {{ steps.shout.error }}", level: warning }
"#;

#[test]
fn secrets_never_leak_from_failing_steps_summaries_or_history() {
    let mut c = Canary::new();
    let p = c.env.write("leaky.yaml", LEAKY);
    let path = p.to_str().unwrap().to_string();

    // Dry runs, text and JSON: nothing is looked up, secrets show as `***`.
    let out = c.run(&["run", &path, "--dry-run"]);
    out.expect_code(0);
    assert!(out.stdout().contains("/nope/***"), "{}", out.stdout());
    c.run(&["run", &path, "--dry-run", "--format", "json"])
        .expect_code(0);

    // The real run, JSON summary.
    let out = c.run(&["run", &path, "--format", "json", "-v"]);
    out.expect_code(1);
    let summary = out.json();
    let id = summary["run_id"].as_i64().unwrap();
    assert!(
        c.env.path().join("got-token").exists() && c.env.path().join("got-file").exists(),
        "the steps did not receive the real secrets"
    );
    assert!(
        step_error(&summary, "shout").contains("last stderr: stderr token=***"),
        "{summary}"
    );
    assert!(
        step_error(&summary, "spawn_fail").contains("/nope/***"),
        "{summary}"
    );
    assert!(
        step_error(&summary, "bad_template").contains("`***`"),
        "{summary}"
    );
    assert!(
        step_error(&summary, "bad_if").contains("environment variable *** is not set"),
        "{summary}"
    );
    assert_eq!(step_error(&summary, "log_error"), "login failed for ***");
    assert!(
        step_error(&summary, "slow").contains("timed out"),
        "{summary}"
    );
    // Info rows went to stderr too (-v).
    assert!(
        out.stderr().contains("stdout token=***"),
        "{}",
        out.stderr()
    );

    // The log rows hold the masked text where the secrets were.
    let rows = logs_of(&c.env.state(), id);
    let has = |level: &str, step: &str, message: &str| {
        rows.iter()
            .any(|r| r.0 == level && r.1.as_deref() == Some(step) && r.2 == message)
    };
    assert!(has("info", "shout", "stdout token=***"), "{rows:?}");
    assert!(has("error", "shout", "stderr token=***"), "{rows:?}");
    assert!(has("info", "shout", "file=***"), "{rows:?}");
    assert!(has("info", "encoded", "url=***"), "{rows:?}");
    assert!(has("error", "encoded", "***"), "{rows:?}");
    assert_eq!(
        rows.iter()
            .filter(|r| r.1.as_deref() == Some("encoded") && r.2 == "***")
            .count(),
        4,
        "base64 ×2, percent-encoded, raw on stderr: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.1.as_deref() == Some("log_error")
            && r.2 == "login failed for ***"
            && r.3.as_deref() == Some("with ***")),
        "{rows:?}"
    );
    assert!(has("info", "slow", "slow ***"), "{rows:?}");
    assert!(has("error", "slow", "slow err ***"), "{rows:?}");
    assert!(
        rows.iter()
            .any(|r| r.1.as_deref() == Some("teardown") && r.2.starts_with("teardown *** ")),
        "{rows:?}"
    );

    // The same run with the text summary.
    let out = c.run(&["run", &path]);
    out.expect_code(1);
    assert!(out.stdout().contains("error: step `"), "{}", out.stdout());
    let text_id: i64 = out
        .stdout()
        .lines()
        .find_map(|l| {
            l.strip_prefix("run ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("run id in the summary");

    for run in [id, text_id] {
        c.inspect(run);
    }
    c.run(&["runs", "list", "--format", "json"]).expect_code(0);
    c.run(&["runs", "list"]).expect_code(0);
    let out = c.run(&["runs", "show", &id.to_string()]);
    assert!(out.stdout().contains("***"), "{}", out.stdout());

    c.assert_absent(&[TOKEN, FILE_SECRET]);
}

#[test]
fn a_secret_output_is_masked_everywhere_including_the_row_that_printed_it() {
    const MINTED: &str = "tok-3e8f1a9c7b2d4e6f";
    let mut c = Canary::new();
    let p = c.env.write(
        "mint.yaml",
        &format!(
            r#"
pipeline: mint
steps:
  mint:
    type: exec
    with: {{ shell: true, command: "echo minting; echo {MINTED}" }}
    outputs:
      token: {{ value: "{{{{ result.stdout_last_line }}}}", secret: true }}
      code: "{{{{ result.exit_code }}}}"
  use:
    type: exec
    needs: [mint]
    with:
      shell: true
      command: 'echo "using $T"; printf %s "$T" | base64; echo "Bearer $T"; exit 1'
      env: {{ T: "{{{{ steps.mint.token }}}}" }}
      on_nonzero: fail
  note:
    type: log
    needs: [mint]
    with: {{ message: "token is {{{{ steps.mint.token }}}}", level: error }}
"#
        ),
    );
    let out = c.run(&["run", p.to_str().unwrap(), "--format", "json"]);
    out.expect_code(1);
    let id = out.json()["run_id"].as_i64().unwrap();
    c.inspect(id);

    // Later steps: masked.
    let rows = logs_of(&c.env.state(), id);
    let messages: Vec<(Option<&str>, &str)> = rows
        .iter()
        .map(|r| (r.1.as_deref(), r.2.as_str()))
        .collect();
    for want in [
        (Some("use"), "using ***"),
        (Some("use"), "***"),
        (Some("use"), "Bearer ***"),
        (Some("note"), "token is ***"),
    ] {
        assert!(messages.contains(&want), "{want:?} not in {messages:?}");
    }
    // The stored outputs: the secret one masked, the other kept.
    let outputs: String = history(&c.env.state())
        .query_row(
            "select outputs from step_runs where run_id = ?1 and step = 'mint'",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    let outputs: serde_json::Value = serde_json::from_str(&outputs).unwrap();
    assert_eq!(outputs["token"], "***", "{outputs}");
    assert_eq!(outputs["code"], 0, "{outputs}");

    // Nowhere at all, including the `mint` step's own stdout row.
    c.assert_absent(&[MINTED]);
}

#[test]
fn scripts_mask_values_with_add_mask_and_set_secret() {
    const MASKED: &str = "pw-77d1c0ffee42";
    const SET: &str = "sess-9a8b7c6d5e4f";
    let mut c = Canary::new();
    let p = c.env.write(
        "mask.yaml",
        &format!(
            r#"
pipeline: mask
steps:
  script:
    type: exec
    with:
      shell: true
      command: |
        echo "::add-mask::{MASKED}"
        echo "password is {MASKED}"
        echo "::set-secret name=session::{SET}"
        echo "session is {SET}"
  later:
    type: log
    with: {{ message: "got {{{{ steps.script.session }}}}" }}
"#
        ),
    );
    let out = c.run(&["run", p.to_str().unwrap(), "--format", "json", "-v"]);
    out.expect_code(0);
    let id = out.json()["run_id"].as_i64().unwrap();
    c.inspect(id);
    let rows = logs_of(&c.env.state(), id);
    let messages: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    for want in ["password is ***", "session is ***", "got ***"] {
        assert!(messages.contains(&want), "{want:?} not in {messages:?}");
    }
    c.assert_absent(&[MASKED, SET]);
}

/// The Carol connector key and the QOCKPIT platform token (the sandbox's, which `pipe
/// sandbox serve` prints for the same seed) appear nowhere: not in what the two pipelines
/// print, not in any byte of the state directory (history, logs, outputs).
#[test]
fn carol_and_qockpit_credentials_never_reach_output_or_state() {
    let served = crate::fidelity::Served::start(&[]);
    let secrets: Vec<String> = ["CAROL_API_KEY", "QOCKPIT_API_TOKEN"]
        .iter()
        .map(|n| served.exports[*n].clone())
        .collect();
    drop(served);
    assert!(secrets.iter().all(|s| s.len() >= 16), "{secrets:?}");
    let env = Env::new();
    let mut printed: Vec<(String, Vec<u8>)> = Vec::new();
    for (run_id, pipeline) in [("1", "carol-staging.yaml"), ("2", "qockpit-kpi.yaml")] {
        let path = crate::util::repo_root().join("pipelines").join(pipeline);
        let out = env
            .cmd()
            .args(["run", path.to_str().unwrap(), "--sandbox", "-v"])
            .env("PIPE_SANDBOX", "{}")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{pipeline}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        printed.push((format!("{pipeline} stdout"), out.stdout));
        printed.push((format!("{pipeline} stderr"), out.stderr));
        let logs = env.run(&["runs", "logs", run_id]);
        assert!(
            logs.code() == 0 && !logs.0.stdout.is_empty(),
            "{pipeline}: no log rows"
        );
        printed.push((format!("{pipeline} runs logs"), logs.0.stdout));
    }
    files_under(&env.state(), &mut printed);
    assert!(printed.len() > 6, "the state dir has files");
    for (what, bytes) in &printed {
        for s in &secrets {
            assert!(!contains(bytes, s), "a credential leaked into {what}");
        }
    }
}

/// The messages of a step's log rows, in order.
fn messages_of(state: &Path, run_id: i64, step: &str) -> Vec<String> {
    logs_of(state, run_id)
        .into_iter()
        .filter(|r| r.1.as_deref() == Some(step))
        .map(|r| r.2)
        .collect()
}

/// Run `pipeline` (JSON summary), then `runs show`/`runs logs`; the summary and run id.
fn run_and_inspect(
    c: &mut Canary,
    name: &str,
    pipeline: &str,
    code: i32,
) -> (serde_json::Value, i64) {
    let p = c.env.write(name, pipeline);
    let out = c.run(&["run", p.to_str().unwrap(), "--format", "json", "-v"]);
    out.expect_code(code);
    let summary = out.json();
    let id = summary["run_id"].as_i64().unwrap();
    c.inspect(id);
    (summary, id)
}

/// A secret with every character a URL encoder treats differently.
const URL_SECRET: &str = "Ur1-s_e.c~r*e!t=v@l ue";

#[test]
fn a_secret_in_a_url_query_path_or_userinfo_is_masked_in_every_encoding() {
    let mut c = Canary::new();
    c.var("URL_SECRET", URL_SECRET)
        .var("LOWER", &url_encode(URL_SECRET, "", true, false))
        .var("FORM", &url_encode(URL_SECRET, "*-._", false, true))
        .var("JS", &url_encode(URL_SECRET, "-_.~!*'()", true, false));
    let (summary, id) = run_and_inspect(
        &mut c,
        "urls.yaml",
        r#"
pipeline: urls
concurrency: 1
steps:
  query:
    type: http.request
    with:
      url: "http://127.0.0.1:9/q"
      query: { key: "{{ secret('URL_SECRET') }}" }
      retries: 0
  path:
    type: http.request
    with: { url: "http://127.0.0.1:9/p/{{ secret('URL_SECRET') }}/x", retries: 0 }
  userinfo:
    type: http.request
    with: { url: "http://me:{{ secret('URL_SECRET') }}@127.0.0.1:9/u", retries: 0 }
  printed:
    type: exec
    with:
      shell: true
      command: |
        for v in "$LOWER" "$FORM" "$JS"; do echo "url=http://h/?k=$v"; echo "::set-output name=v::$v"; done
    outputs: { line: "{{ result.stdout_last_line }}" }
"#,
        1,
    );
    for step in ["query", "path", "userinfo"] {
        let e = step_error(&summary, step);
        assert!(e.contains("127.0.0.1:9"), "{step}: {e}");
    }
    assert!(
        step_error(&summary, "path").contains("/p/***/x"),
        "{summary}"
    );
    assert!(
        step_error(&summary, "userinfo").contains("me:***@"),
        "{summary}"
    );
    let rows = messages_of(&c.env.state(), id, "printed");
    assert_eq!(
        rows.iter().filter(|m| *m == "url=http://h/?k=***").count(),
        3,
        "{rows:?}"
    );
    c.assert_absent(&[URL_SECRET]);
}

#[test]
fn a_secret_printed_before_the_step_that_calls_secret_is_masked() {
    const CONN: &str = "conn-tok-4d9e2b7a1c";
    let mut c = Canary::new();
    c.var("CANARY_CONN", CONN);
    let (_, id) = run_and_inspect(
        &mut c,
        "early.yaml",
        r#"
pipeline: early
concurrency: 1
connections:
  api: { type: http, base_url: "http://127.0.0.1:9", auth: { type: bearer, token: "{{ env('CANARY_CONN') }}" } }
steps:
  early:
    type: exec
    with: { shell: true, command: 'echo "early token $CANARY_TOKEN"; echo "early conn $CANARY_CONN"' }
  late:
    type: log
    needs: [early]
    with: { message: "late {{ secret('CANARY_TOKEN') }}" }
  call:
    type: http.request
    needs: [early]
    connection: api
    with: { path: /x, retries: 0 }
"#,
        1,
    );
    let rows = messages_of(&c.env.state(), id, "early");
    for want in ["early token ***", "early conn ***"] {
        assert!(rows.iter().any(|m| m == want), "{want:?} not in {rows:?}");
    }
    c.assert_absent(&[TOKEN, CONN]);
}

#[test]
fn a_bound_sql_value_with_a_quote_is_masked_in_the_statement_log() {
    const SQL_SECRET: &str = "it's-a-s3cret-quoted";
    let mut c = Canary::new();
    c.var("SQL_SECRET", SQL_SECRET);
    let (_, id) = run_and_inspect(
        &mut c,
        "sqlq.yaml",
        r#"
pipeline: sqlq
connections:
  db: { type: sqlite, path: q.db }
steps:
  q:
    type: sql.query
    connection: db
    with: { query: "SELECT 1 AS x WHERE 'a' <> {{ secret('SQL_SECRET') }}" }
"#,
        0,
    );
    let rows = messages_of(&c.env.state(), id, "q");
    assert!(
        rows.iter()
            .any(|m| m.starts_with("query on ") && m.contains("'***'")),
        "{rows:?}"
    );
    c.assert_absent(&[SQL_SECRET]);
}

#[test]
fn dry_run_masks_auth_passwords_and_credential_headers() {
    const PW: &str = "dry-pw-8c1f5a2e";
    const BEARER: &str = "dry-bearer-6b0d3f9a";
    const KEY: &str = "dry-key-2e7a4c1b";
    let mut c = Canary::new();
    c.var("DRY_PW", PW)
        .var("DRY_BEARER", BEARER)
        .var("DRY_KEY", KEY);
    let p = c.env.write(
        "dry.yaml",
        r#"
pipeline: dry
steps:
  call:
    type: http.request
    with:
      url: "http://127.0.0.1:9/x"
      retries: 0
      headers: { Authorization: "Bearer {{ env('DRY_BEARER') }}", X-Api-Key: "{{ env('DRY_KEY') }}" }
      auth: { type: basic, username: me, password: "{{ env('DRY_PW') }}" }
"#,
    );
    let path = p.to_str().unwrap().to_string();
    for format in ["text", "json"] {
        let out = c.run(&["run", &path, "--dry-run", "--format", format]);
        out.expect_code(0);
        assert!(out.stdout().contains("***"), "{}", out.stdout());
        assert!(out.stdout().contains("me"), "{}", out.stdout());
    }
    // The real run masks them too (and leaves a history to search).
    let out = c.run(&["run", &path, "--format", "json"]);
    out.expect_code(1);
    c.inspect(out.json()["run_id"].as_i64().unwrap());
    c.assert_absent(&[PW, BEARER, KEY]);
}

#[test]
fn a_secret_straddling_the_split_of_a_long_exec_line_is_masked() {
    let mut c = Canary::new();
    // 1 MiB rows: the secret starts 5 bytes before the split.
    let (_, id) = run_and_inspect(
        &mut c,
        "long.yaml",
        r#"
pipeline: long
steps:
  long:
    type: exec
    with:
      shell: true
      command: 'head -c 1048571 /dev/zero | tr "\0" a; printf "%s\n" "$T"'
      env: { T: "{{ secret('CANARY_TOKEN') }}" }
"#,
        0,
    );
    let rows = messages_of(&c.env.state(), id, "long");
    let text: String = rows.concat();
    assert!(
        rows.len() >= 2,
        "the line was not split: {} rows",
        rows.len()
    );
    assert!(
        text.ends_with("***"),
        "{}",
        &text[text.len().saturating_sub(80)..]
    );
    assert!(!text.contains(TOKEN), "the secret is in the rows");
    c.assert_absent(&[TOKEN]);
}

#[test]
fn file_command_refuses_proc_sys_and_dev() {
    let mut c = Canary::new();
    let (summary, id) = run_and_inspect(
        &mut c,
        "attach.yaml",
        r#"
pipeline: attach
steps:
  attach:
    type: exec
    with:
      shell: true
      command: |
        echo "::file::/proc/self/environ"
        ln -s /proc/self/environ env-link
        echo "::file::env-link"
        echo ok > report.txt
        echo "::file::report.txt"
"#,
        0,
    );
    assert_eq!(
        crate::util::step(&summary, "attach")["status"],
        "warning",
        "{summary}"
    );
    let rows = messages_of(&c.env.state(), id, "attach");
    for path in ["/proc/self/environ", "env-link"] {
        assert!(
            rows.iter()
                .any(|m| m.starts_with(&format!("file {path}: cannot attach"))
                    && m.contains("/proc")),
            "{path} not refused: {rows:?}"
        );
    }
    assert!(rows.iter().any(|m| m == "file report.txt"), "{rows:?}");
    c.assert_absent(&[TOKEN]);
}

#[test]
fn base64_of_user_colon_secret_built_by_a_script_is_masked() {
    let mut c = Canary::new();
    let (_, id) = run_and_inspect(
        &mut c,
        "basic.yaml",
        r#"
pipeline: basic
steps:
  basic:
    type: exec
    with:
      shell: true
      command: |
        printf '%s' "a:$T" | base64
        echo "Authorization: Basic $(printf '%s' "ab:$T" | base64)"
        printf '%s' "abc:$T" | base64 | tr '+/' '-_' | tr -d '='
      env: { T: "{{ secret('CANARY_TOKEN') }}" }
"#,
        0,
    );
    let rows = messages_of(&c.env.state(), id, "basic");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|m| m.contains("***")), "{rows:?}");
    c.assert_absent(&[TOKEN]);
}
