//! `http.extract` against hostile paginated APIs: the sandbox's tickets endpoint in other
//! paging styles (`tickets_api`) and with hostile habits (silent page-size clamps, empty and
//! short pages mid-walk, a fixed-window rate limit, an oversized body), through the real
//! `pipe run --sandbox`. Nothing may be lost while the run says it succeeded.

use crate::util::{step, Env, Out};

/// A pipeline that logs in to the Tiflux fake (two-factor, as pipelines/tiflux.yaml does),
/// extracts `/api/v2/tickets` with `with` (YAML lines indented for the `with:` mapping), hands
/// the table to a transform, and logs out, always.
fn pipeline(env: &Env, with: &str) -> String {
    let text = format!(
        r#"pipeline: hostile-api
connections:
  tiflux: {{ type: http, base_url: "https://app.example-helpdesk.com", sandbox: tiflux }}
  google: {{ type: google_service_account, key_file: "{{{{ secret('GOOGLE_APPLICATION_CREDENTIALS') }}}}" }}
sandbox:
  secrets:
    TIFLUX_USER: "{{{{ sandbox.tiflux.user }}}}"
    TIFLUX_PASSWORD: "{{{{ sandbox.tiflux.password }}}}"
    OTP_SHEET_ID: "{{{{ sandbox.sheets.otp_spreadsheet }}}}"
steps:
  login:
    type: http.request
    connection: tiflux
    with:
      method: POST
      path: /api/login
      json: {{ email: "{{{{ secret('TIFLUX_USER') }}}}", password: "{{{{ secret('TIFLUX_PASSWORD') }}}}" }}
    outputs:
      tmp: "{{{{ response.json.tmp }}}}"
  otp:
    type: sheets.read
    connection: google
    with:
      spreadsheet: "{{{{ secret('OTP_SHEET_ID') }}}}"
      range: "OTP!A2:B2"
      wait:
        until: "{{{{ values and values[0][1] >= steps.login.started_at }}}}"
        every: 100ms
        timeout: 20s
    outputs:
      code: {{ value: "{{{{ values[0][0] }}}}", secret: true }}
  session:
    type: http.request
    connection: tiflux
    with:
      method: POST
      path: /api/login/otp
      json: {{ tmp: "{{{{ steps.login.tmp }}}}", otp: "{{{{ steps.otp.code }}}}" }}
    outputs:
      token: {{ value: "{{{{ response.headers.authorization }}}}", secret: true }}
  tickets:
    type: http.extract
    connection: tiflux
    with:
      path: /api/v2/tickets
      headers: {{ Authorization: "{{{{ steps.session.token }}}}" }}
{with}
  numbers:
    type: transform
    input: tickets
    with:
      - select: [ticket_number]
  logout:
    type: http.request
    connection: tiflux
    always: true
    needs: [numbers]
    if: "{{{{ steps.session.succeeded }}}}"
    with:
      method: POST
      path: /api/logout
      headers: {{ Authorization: "{{{{ steps.session.token }}}}" }}
"#
    );
    env.write("hostile.yaml", &text).display().to_string()
}

/// `pipe run <pipeline> --sandbox --format json` with these sandbox options.
fn run(env: &Env, pipeline: &str, sandbox: &str) -> Out {
    Out(env
        .cmd()
        .env("PIPE_SANDBOX", sandbox)
        .args(["run", pipeline, "--sandbox", "--format", "json"])
        .output()
        .expect("run pipe"))
}

/// [`pipeline`] with `with`, run with these sandbox options, in a fresh [`Env`].
fn extract(with: &str, sandbox: &str) -> (Env, Out) {
    let env = Env::new();
    let p = pipeline(&env, with);
    let out = run(&env, &p, sandbox);
    (env, out)
}

/// The ticket numbers the walk extracted arrive once each, in order, none missing.
#[track_caller]
fn all_tickets(v: &serde_json::Value, n: u64) {
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(step(v, "tickets")["rows"], n, "{v}");
    assert_eq!(step(v, "numbers")["rows"], n, "{v}");
}

#[test]
fn a_cursor_walk_goes_on_past_empty_and_short_pages() {
    let (_env, out) = extract(
        "      records: data
      paginate: { type: cursor, cursor_param: cursor, cursor_path: next_cursor, size: 50,
                  total_header: X-Total-Items }",
        r#"{"tickets": 500, "otp_delay_ms": 0, "tickets_api": {"paging": "cursor"},
            "faults": [{"endpoint": "tickets", "page": 2, "kind": {"type": "empty_page"}},
                       {"endpoint": "tickets", "page": 4, "kind": {"type": "short_page", "records": 3}}]}"#,
    );
    out.expect_code(0);
    let v = out.json();
    all_tickets(&v, 500);
    // 10 full pages, the empty one, and one more for the 47 the short page left.
    assert_eq!(step(&v, "tickets")["outputs"]["pages"], 12, "{v}");
}

#[test]
fn a_cursor_walk_may_opt_in_to_ending_at_a_short_page() {
    let (_env, out) = extract(
        "      records: data
      paginate: { type: cursor, cursor_param: cursor, cursor_path: next_cursor, size: 50,
                  stop_on_short_page: true }",
        r#"{"tickets": 500, "otp_delay_ms": 0, "tickets_api": {"paging": "cursor"},
            "faults": [{"endpoint": "tickets", "page": 2, "kind": {"type": "short_page", "records": 3}}]}"#,
    );
    out.expect_code(0);
    assert_eq!(step(&out.json(), "tickets")["rows"], 53);
}

#[test]
fn a_silently_clamped_page_size_is_learned_for_pages_and_offsets() {
    for (paging, kind, concurrency, total) in [
        ("page", "page, page_param: offset", 4, true),
        ("page", "page, page_param: offset", 1, false),
        ("page", "page, page_param: offset", 3, false),
        ("offset", "offset", 4, true),
        ("offset", "offset", 1, false),
    ] {
        let env = Env::new();
        let total_key = if total {
            ", total_header: X-Total-Items"
        } else {
            ""
        };
        let p = pipeline(
            &env,
            &format!(
                "      paginate: {{ type: {kind}, size_param: limit, size: 200, concurrency: {concurrency}{total_key} }}"
            ),
        );
        let out = run(
            &env,
            &p,
            &format!(
                r#"{{"tickets": 1000, "otp_delay_ms": 0,
                    "tickets_api": {{"paging": "{paging}", "max_page_size": 100}}}}"#
            ),
        );
        out.expect_code(0);
        let v = out.json();
        all_tickets(&v, 1000);
        if total {
            assert_eq!(
                v["sandbox"]["requests"]["tickets"], 10,
                "{paging}/{concurrency}: the total and the served size say 10 pages: {v}"
            );
        }
    }
}

#[test]
fn offsets_advance_by_the_records_received() {
    let (_env, out) = extract(
        "      paginate: { type: offset, size: 100, stop_on_short_page: false,
                  total_header: X-Total-Items }",
        r#"{"tickets": 1000, "otp_delay_ms": 0, "tickets_api": {"paging": "offset"},
            "faults": [{"endpoint": "tickets", "page": 3, "kind": {"type": "short_page", "records": 10}}]}"#,
    );
    out.expect_code(0);
    all_tickets(&out.json(), 1000);
}

#[test]
fn a_total_that_does_not_match_fails_before_anything_downstream() {
    let sandbox = r#"{"tickets": 1000, "otp_delay_ms": 0,
        "faults": [{"endpoint": "tickets", "page": 2, "kind": {"type": "short_page", "records": 50}}]}"#;
    let (_env, out) = extract(
        "      paginate: { type: page, page_param: offset, size: 200, total_header: X-Total-Items }",
        sandbox,
    );
    out.expect_code(1);
    let v = out.json();
    let tickets = step(&v, "tickets");
    assert_eq!(tickets["status"], "failed", "{v}");
    let error = tickets["error"].as_str().unwrap();
    assert!(
        error.contains("the API announced 1000 records; 250 arrived"),
        "{error}"
    );
    assert_eq!(step(&v, "numbers")["status"], "skipped", "{v}");
    assert_eq!(step(&v, "logout")["status"], "succeeded", "{v}");

    // Fetched ahead, the pages after the short one still hold records: the step fails
    // rather than drop them, whatever `on_total_mismatch` says.
    let (_env, out) = extract(
        "      paginate: { type: page, page_param: offset, size: 200, total_header: X-Total-Items,
                  concurrency: 4, on_total_mismatch: warn }",
        sandbox,
    );
    out.expect_code(1);
    let v = out.json();
    let error = step(&v, "tickets")["error"].as_str().unwrap().to_string();
    assert!(error.contains("the API's page size varies"), "{error}");
    assert_eq!(step(&v, "numbers")["status"], "skipped", "{v}");

    // `warn` keeps what arrived and says so.
    let (_env, out) = extract(
        "      paginate: { type: page, page_param: offset, size: 200, total_header: X-Total-Items,
                  on_total_mismatch: warn }",
        sandbox,
    );
    out.expect_code(0);
    let v = out.json();
    assert_eq!(step(&v, "tickets")["status"], "warning", "{v}");
    assert_eq!(step(&v, "numbers")["rows"], 250, "{v}");
}

#[test]
fn a_stripe_style_walk_follows_the_id_of_the_last_record() {
    let (_env, out) = extract(
        "      records: data
      paginate: { type: cursor, cursor_param: starting_after, cursor_field: ticket_number,
                  has_more_path: has_more, size_param: limit, size: 100 }",
        r#"{"tickets": 1000, "otp_delay_ms": 0, "tickets_api": {"paging": "stripe"},
            "faults": [{"endpoint": "tickets", "page": 3, "kind": {"type": "short_page", "records": 7}}]}"#,
    );
    out.expect_code(0);
    let v = out.json();
    all_tickets(&v, 1000);
    // Pages 1-2, then 7 tickets a page while the fault's page 3 (skip 200..300) lasts, then
    // full pages from 305: 2 + 15 + 7.
    assert_eq!(v["sandbox"]["requests"]["tickets"], 24, "{v}");
}

#[test]
fn retry_after_under_concurrency_holds_every_slot_and_the_run_succeeds() {
    let (_env, out) = extract(
        "      retries: 2
      paginate: { type: page, page_param: offset, size_param: limit, size: 50,
                  total_header: X-Total-Items, concurrency: 8 }",
        r#"{"tickets": 500, "otp_delay_ms": 0,
            "tickets_api": {"rate_limit": {"requests": 3, "window_ms": 1000}}}"#,
    );
    out.expect_code(0);
    let v = out.json();
    all_tickets(&v, 500);
    let limited = v["sandbox"]["rate_limited"].as_u64().unwrap();
    assert!(limited > 0, "the test must hit the rate limit: {v}");
}

#[test]
fn an_oversized_body_fails_the_step_and_the_teardown_still_runs() {
    let (env, out) = extract(
        "      max_body: 1MB
      paginate: { type: page, page_param: offset, size: 200, total_header: X-Total-Items }",
        r#"{"tickets": 1000, "otp_delay_ms": 0,
            "faults": [{"endpoint": "tickets", "page": 2, "kind": {"type": "oversized_body", "bytes": 50000000}}]}"#,
    );
    out.expect_code(1);
    let v = out.json();
    let tickets = step(&v, "tickets");
    assert_eq!(tickets["status"], "failed", "{v}");
    assert!(
        tickets["error"]
            .as_str()
            .unwrap()
            .contains("larger than max_body"),
        "{v}"
    );
    assert_eq!(step(&v, "logout")["status"], "succeeded", "{v}");
    assert_eq!(v["sandbox"]["logouts"], 1, "{v}");
    let runs = env.run(&["runs", "list", "--format", "json"]);
    runs.expect_code(0);
    assert_eq!(runs.json()[0]["status"], "failed", "{}", runs.stdout());
}

#[test]
fn validate_names_paginate_mistakes_at_their_keys() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"pipeline: paged
params:
  size: { type: integer, default: 100 }
connections:
  api: { type: http, base_url: "https://example.com" }
steps:
  offsets:
    type: http.extract
    connection: api
    with:
      path: /a
      paginate: { type: offset }
  cursor:
    type: http.extract
    connection: api
    with:
      path: /b
      paginate:
        type: cursor
        cursor_path: next
  next:
    type: http.extract
    connection: api
    with:
      path: /c
      paginate:
        type: next_url
  zero:
    type: http.extract
    connection: api
    with:
      path: /d
      paginate:
        type: page
        size: 0
  templated:
    type: http.extract
    connection: api
    with:
      path: /e
      paginate: { type: offset, size: "{{ params.size }}", concurrency: "{{ params.size }}" }
"#,
    );
    let out = env.run(&["validate", "--format", "json", p.to_str().unwrap()]);
    out.expect_code(1);
    let got = out.diagnostics();
    let expect = [
        (12, 19, "`offset` pagination needs `size`"),
        (19, 9, "`cursor` pagination needs `cursor_param`"),
        (27, 9, "`next_url` pagination needs `next_url_path`"),
        (35, 9, "`size` must be at least 1"),
    ];
    for (line, col, text) in expect {
        assert!(
            got.iter()
                .any(|(l, c, m)| *l == line && *c == col && m.contains(text)),
            "expected {line}:{col} `{text}` in {got:?}"
        );
    }
    assert_eq!(
        got.len(),
        expect.len(),
        "templated values are left to the run: {got:?}"
    );
}

#[test]
fn validate_names_the_http_steps_own_mistakes_at_their_keys() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"pipeline: checked
connections:
  api: { type: http, base_url: "https://example.com" }
steps:
  both:
    type: http.request
    connection: api
    with:
      url: https://example.com/x
      path: /x
      max_body: lots
      json: { a: 1 }
      form: { b: 2 }
  send:
    type: http.send
    connection: api
    input: both
    with:
      path: /y
      batch: { rows: 0 }
      timeout: "{{ params.nothing }}"
"#,
    );
    let out = env.run(&["validate", "--format", "json", p.to_str().unwrap()]);
    let got = out.diagnostics();
    for (line, col, text) in [
        (10, 7, "set either `url` or `path`"),
        (11, 7, "`max_body`"),
        (13, 7, "at most one of `json`, `form` and `body`"),
        (20, 16, "`batch.rows` must be at least 1"),
    ] {
        assert!(
            got.iter()
                .any(|(l, c, m)| *l == line && *c == col && m.contains(text)),
            "expected {line}:{col} `{text}` in {got:?}"
        );
    }
}
