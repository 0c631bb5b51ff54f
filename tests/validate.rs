//! `pipe validate`: the corpus of broken pipelines, formats, exit codes.

use crate::util::{repo_root, Env};

/// Each file in tests/corpus starts with `# expect: LINE:COL CODE [text]` lines; validate
/// must report exactly those diagnostics (and the message must contain the text).
#[test]
fn corpus_of_broken_pipelines_reports_code_line_and_column() {
    let env = Env::new();
    let dir = repo_root().join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 14, "corpus is missing files");
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expected: Vec<(usize, usize, String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| {
                let mut parts = l.splitn(3, ' ');
                let pos = parts.next().unwrap();
                let code = parts.next().unwrap().to_string();
                let needle = parts.next().unwrap_or("").to_string();
                let (line, col) = pos.split_once(':').unwrap();
                (line.parse().unwrap(), col.parse().unwrap(), code, needle)
            })
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no expectations",
            file.display()
        );
        let out = env.run(&["validate", "--format", "json", file.to_str().unwrap()]);
        let got = diag_rows(&out);
        for (line, col, code, needle) in &expected {
            if !got.iter().any(|(l, c, k, m)| {
                l == line && c == col && k == code && m.contains(needle.as_str())
            }) {
                failures.push(format!(
                    "{}: expected {line}:{col} {code} `{needle}`, got {got:?}",
                    file.display()
                ));
            }
        }
        if got.len() != expected.len() {
            failures.push(format!(
                "{}: expected {} diagnostics, got {got:?}",
                file.display(),
                expected.len()
            ));
        }
        let has_error = expected.iter().any(|e| e.2.starts_with('E'));
        let code = out.code();
        if code != if has_error { 1 } else { 0 } {
            failures.push(format!("{}: exit code {code}", file.display()));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn text_format_is_path_line_col_and_a_count() {
    let env = Env::new();
    let p = env.write("p.yaml", "pipeline: x\nsteps:\n  a:\n    type: exce\n  b:\n    type: log\n    with: { message: hi, levle: info }\n");
    let out = env.run(&["validate", p.to_str().unwrap()]);
    out.expect_code(1);
    let lines: Vec<&str> = out
        .0
        .stdout
        .split(|&b| b == b'\n')
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    let path = p.to_str().unwrap();
    assert!(
        lines[0].starts_with(&format!(
            "{path}:4:11: error[E006]: unknown step type `exce`"
        )),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{path}:7:26: error[E003]: unknown key `levle`; did you mean `level`?"
        )),
        "{lines:?}"
    );
    assert_eq!(lines[2], "2 errors, 0 warnings");
}

#[test]
fn github_format_and_deny_warnings() {
    let env = Env::new();
    let p = env.write("w.yaml", "pipeline: w\nconnections:\n  c: { type: http, base_url: \"https://x\", auth: { type: bearer, token: abc123 } }\nsteps:\n  a:\n    type: log\n    with: { message: hi }\n");
    let out = env.run(&["validate", "--format", "github", p.to_str().unwrap()]);
    out.expect_code(0);
    assert!(
        out.stdout().contains(&format!(
            "::warning file={},line=3,col=72,title=W001::",
            p.display()
        )),
        "{}",
        out.stdout()
    );
    env.run(&["validate", "--deny-warnings", p.to_str().unwrap()])
        .expect_code(1);
}

#[test]
fn folders_are_searched_and_a_missing_path_is_a_usage_error() {
    let env = Env::new();
    env.write(
        "pipes/a.yaml",
        "pipeline: a\nsteps:\n  s: { type: log, with: { message: hi } }\n",
    );
    env.write(
        "pipes/sub/b.yml",
        "pipeline: b\nsteps:\n  s: { type: log, with: { mesage: hi } }\n",
    );
    let out = env.run(&["validate", "pipes"]);
    out.expect_code(1);
    assert!(
        out.stdout().contains("pipes/sub/b.yml:3:27: error[E003]"),
        "{}",
        out.stdout()
    );
    env.run(&["validate", "nope/"]).expect_code(2);
}

#[test]
fn every_pipeline_in_the_repo_is_valid() {
    let env = Env::new();
    let out = env.run(&[
        "validate",
        "--deny-warnings",
        repo_root().join("pipelines").to_str().unwrap(),
    ]);
    out.expect_code(0);
    // Notes (N001: the QOCKPIT pipeline runs the platform's SQL) are fine.
    let last = out.stdout().lines().last().unwrap_or_default().to_string();
    assert!(
        last == "0 errors, 0 warnings" || last.starts_with("0 errors, 0 warnings, "),
        "{}",
        out.stdout()
    );
}

/// `pipe ARGS` in `env` with at most 2 GB of address space and 60 s: hostile input must
/// fail fast and small, so a regression fails the test instead of the machine.
fn bounded(env: &Env, args: &[&str]) -> crate::util::Out {
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2000000 && exec \"$0\" \"$@\"")
        .arg(crate::util::pipe_bin())
        .args(args)
        .current_dir(env.path())
        .env("PIPE_HOME", env.state())
        .env_remove("RUST_BACKTRACE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pipe");
    crate::util::wait_with_deadline(child, std::time::Duration::from_secs(60))
}

/// (line, column, code, message) of each diagnostic `pipe validate --format json` printed.
fn diag_rows(out: &crate::util::Out) -> Vec<(usize, usize, String, String)> {
    out.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["line"].as_u64().unwrap() as usize,
                d["column"].as_u64().unwrap() as usize,
                d["code"].as_str().unwrap().to_string(),
                d["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The diagnostics of `pipe validate --format json PATH`, bounded; the exit code must be 1.
fn hostile_diags(env: &Env, path: &str) -> Vec<(usize, usize, String, String)> {
    let out = bounded(env, &["validate", "--format", "json", path]);
    assert_eq!(
        out.code(),
        1,
        "stdout:\n{}\nstderr:\n{}",
        out.stdout(),
        out.stderr()
    );
    assert!(!out.stderr().contains("panicked"), "{}", out.stderr());
    diag_rows(&out)
}

#[test]
fn an_alias_bomb_is_a_located_syntax_error_in_bounded_memory() {
    let env = Env::new();
    let mut text = String::from("pipeline: bomb\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for w in names.windows(2) {
        let list = vec![format!("*{}", w[0]); 9].join(",");
        text.push_str(&format!("{}: &{} [{list}]\n", w[1], w[1]));
    }
    text.push_str("steps: { s: { type: log, with: { message: \"*i\" } } }\n");
    assert!(text.len() < 700, "{}", text.len());
    let p = env.write("bomb.yaml", &text);
    let diags = hostile_diags(&env, p.to_str().unwrap());
    // Anchors and aliases copy a: 10 nodes, b: 91, c: 820, d: 7381, e: 66430; the anchors
    // a to d and their 36 aliases copy 16,591, `e`'s nine aliases 66,429, and keeping `e`'s
    // own copy would pass 100,000: the list anchored at line 6, column 7.
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(&diags[0].2, "E001", "{diags:?}");
    assert_eq!((diags[0].0, diags[0].1), (6, 7), "{diags:?}");
    assert!(diags[0].3.contains("alias"), "{diags:?}");
}

#[test]
fn deeply_nested_collections_are_a_located_syntax_error() {
    let env = Env::new();
    let block = env.write("block.yaml", &("- ".repeat(100_000) + "x\n"));
    let flow = env.write(
        "flow.yaml",
        &format!("pipeline: f\nsteps: {}\n", "[".repeat(100_000)),
    );
    // Block collections stop at pipe's limit (the 65th `- `); flow ones at the YAML
    // scanner's own, which it checks before pipe sees them (the 256th `[`).
    for (p, pos, text) in [
        (&block, (1, 129), "nest more than 64"),
        (&flow, (2, 263), "recursion limit"),
    ] {
        let diags = hostile_diags(&env, p.to_str().unwrap());
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(&diags[0].2, "E001", "{diags:?}");
        assert_eq!((diags[0].0, diags[0].1), pos, "{diags:?}");
        assert!(diags[0].3.contains(text), "{diags:?}");
    }
}

#[test]
fn huge_durations_are_e016_at_the_value_in_validate_and_run() {
    let env = Env::new();
    let p = env.write(
        "d.yaml",
        "pipeline: d\nsteps:\n  a:\n    type: log\n    timeout: 9223372036854775807d\n    retry: { attempts: 2, backoff: 1e308, max_backoff: 18446744073709551615s }\n    with: { message: hi }\n",
    );
    let mut diags = hostile_diags(&env, p.to_str().unwrap());
    diags.sort();
    let got: Vec<(usize, usize, &str)> = diags.iter().map(|d| (d.0, d.1, d.2.as_str())).collect();
    assert_eq!(
        got,
        [(5, 14, "E016"), (6, 36, "E016"), (6, 56, "E016")],
        "{diags:?}"
    );
    assert!(diags.iter().all(|d| d.3.contains("too long")), "{diags:?}");
    let out = bounded(&env, &["run", p.to_str().unwrap()]);
    assert_eq!(out.code(), 2, "{}", out.stderr());
    assert!(out.stderr().contains("error[E016]"), "{}", out.stderr());
    assert!(!out.stderr().contains("panicked"), "{}", out.stderr());
}

#[test]
fn an_endless_pipeline_file_is_cut_at_64_mb() {
    let env = Env::new();
    for cmd in ["validate", "run"] {
        let out = bounded(&env, &[cmd, "/dev/zero"]);
        assert_ne!(out.code(), 0, "{}", out.stdout());
        let all = out.stdout() + &out.stderr();
        assert!(
            all.contains("/dev/zero:1:1: error[E021]: /dev/zero is larger than 64 MB"),
            "{cmd}: {all}"
        );
    }
}

#[test]
fn a_folder_without_pipelines_is_an_error() {
    let env = Env::new();
    std::fs::create_dir_all(env.path().join("empty/sub")).unwrap();
    env.write("empty/notes.txt", "not a pipeline");
    let out = env.run(&["validate", "empty"]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("empty: no pipeline files"),
        "{}",
        out.stderr()
    );
    assert!(!out.stdout().contains("0 errors"), "{}", out.stdout());
}

#[test]
fn symlink_loops_are_walked_once() {
    let env = Env::new();
    env.write(
        "p/a.yaml",
        "pipeline: a\nsteps:\n  s: { type: log, with: { mesage: hi } }\n",
    );
    std::os::unix::fs::symlink("..", env.path().join("p/up")).unwrap();
    std::os::unix::fs::symlink("self", env.path().join("p/self")).unwrap();
    let out = bounded(&env, &["validate", "p"]);
    assert_eq!(out.code(), 1, "{}{}", out.stdout(), out.stderr());
    assert_eq!(
        out.stdout().matches("error[E003]").count(),
        1,
        "{}",
        out.stdout()
    );
    assert!(
        out.stdout().ends_with("2 errors, 0 warnings\n"),
        "{}",
        out.stdout()
    );
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_first_key() {
    let env = Env::new();
    let p = env.write(
        "bom.yaml",
        "\u{feff}pipeline: bom\nsteps:\n  s: { type: log, with: { message: hi } }\n",
    );
    let out = env.run(&["validate", p.to_str().unwrap()]);
    out.expect_code(0);
    assert_eq!(out.stdout(), "0 errors, 0 warnings\n");
}

#[test]
fn invalid_utf8_is_reported_at_its_byte() {
    let env = Env::new();
    let p = env.path().join("latin1.yaml");
    std::fs::write(
        &p,
        b"pipeline: x\nsteps:\n  s: { type: log, with: { message: caf\xe9 } }\n",
    )
    .unwrap();
    let diags = hostile_diags(&env, p.to_str().unwrap());
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(
        (diags[0].0, diags[0].1, diags[0].2.as_str()),
        (3, 39, "E001"),
        "{diags:?}"
    );
    assert!(diags[0].3.contains("UTF-8"), "{diags:?}");
}

#[test]
fn crafted_keys_and_file_names_cannot_inject_log_lines_or_workflow_commands() {
    let env = Env::new();
    let text = "pipeline: x\nsteps:\n  s:\n    type: log\n    \"a\\n::add-mask::x\\r\\n::error file=f,line=1::fake\": 1\n    with: { message: hi }\n";
    let p = env.write("evil,name:\n::error::x.yaml", text);
    let path = p.to_str().unwrap();
    let out = env.run(&["validate", "--format", "github", path]);
    out.expect_code(1);
    let stdout = out.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("::error file="), "{lines:?}");
    let props = lines[0].split("::").nth(1).unwrap();
    assert!(
        props.contains("evil%2Cname%3A%0A%3A%3Aerror%3A%3Ax.yaml,line=5,col=5,title=E003"),
        "{props}"
    );
    assert!(
        lines[0].contains("unknown key `a%0A::add-mask::x%0D%0A::error file=f,line=1::fake`"),
        "{lines:?}"
    );
    assert_eq!(lines[1], "1 errors, 0 warnings");
    let out = env.run(&["validate", path]);
    out.expect_code(1);
    let lines: Vec<String> = out.stdout().lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let dir = env.path().to_str().unwrap();
    assert!(
        lines[0].starts_with(&format!("{dir}/evil,name:\\n::error::x.yaml:5:5: error[E003]: unknown key `a\\n::add-mask::x\\r\\n::error")),
        "{lines:?}"
    );
}

#[test]
fn unknown_filters_fail_validate_and_common_ones_exist() {
    let env = Env::new();
    let p = env.write(
        "f.yaml",
        "pipeline: f\nparams:\n  q: { type: string, default: \"a b&c\" }\nsteps:\n  s: { type: log, with: { message: \"{{ params.q | urlencod }}\" } }\n  t: { type: log, with: { message: \"{{ params.q | no_such_filter }}\" } }\n",
    );
    let out = env.run(&["validate", "--format", "json", p.to_str().unwrap()]);
    out.expect_code(1);
    let got: Vec<(usize, usize, String, String)> = diag_rows(&out);
    let unknown = |line, message: &str| (line, 36, "E022".to_string(), message.to_string());
    assert_eq!(
        got,
        [
            unknown(5, "unknown filter `urlencod`; did you mean `urlencode`?"),
            unknown(6, "unknown filter `no_such_filter`"),
        ]
    );
    let ok = env.write(
        "ok.yaml",
        "pipeline: ok\nparams:\n  q: { type: string, default: \"a b&c\" }\nsteps:\n  s: { type: log, with: { message: \"{{ params.q | urlencode }} {{ [1, 2] | tojson }}\" } }\n",
    );
    env.run(&["run", ok.to_str().unwrap()]).expect_code(0);
    let logs = env.run(&["runs", "logs", "1"]);
    logs.expect_code(0);
    assert!(
        logs.stdout().contains("a%20b%26c [1,2]"),
        "{}",
        logs.stdout()
    );
}

/// The Sheets and Carol steps' own config checks run in `pipe validate`, at their keys (they
/// used to fail only at run time), and a templated value is left to the run.
#[test]
fn sheets_and_carol_config_mistakes_are_found_by_validate_at_their_keys() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"pipeline: checked
params:
  level: { type: integer, default: 3 }
connections:
  google: { type: google_service_account, key_file: key.json }
  carol: { type: carol, tenant: t, organization: o, connector_id: c, api_key: "{{ secret('K') }}" }
steps:
  otp:
    type: sheets.read
    connection: google
    with:
      spreadsheet: s
      range: OTP!A2:B2
      wait: { until: "{{ values }}", every: 0s }
  send:
    type: carol.send
    connection: carol
    input: table
    with: { table: t, gzip_level: 12 }
  templated:
    type: carol.send
    connection: carol
    input: table
    with: { table: t, gzip_level: "{{ params.level }}" }
  table:
    type: sheets.read
    connection: google
    with: { spreadsheet: s, range: A1, as: table }
"#,
    );
    let out = env.run(&["validate", "--format", "json", p.to_str().unwrap()]);
    let found = out.diagnostics();
    assert!(
        found
            .iter()
            .any(|(l, c, m)| (*l, *c) == (14, 38)
                && m.contains("`wait.every` must be longer than 0s")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(l, c, m)| (*l, *c) == (19, 23) && m.contains("`gzip_level` must be 1 to 9")),
        "{found:?}"
    );
    assert_eq!(
        found.len(),
        2,
        "the templated gzip_level is left to the run: {found:?}"
    );
    assert_eq!(out.code(), 1, "{found:?}");
}

/// Rules between a connection's keys are found by `pipe validate` at the keys, not only when
/// a step logs in.
#[test]
fn connection_key_rules_are_found_by_validate() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        r#"pipeline: logins
connections:
  carol: { type: carol, tenant: t, connector_id: c, username: u }
  both: { type: carol, tenant: t, connector_id: c, username: u, password: "{{ secret('P') }}", api_key: "{{ secret('K') }}" }
  google: { type: google_service_account, key_file: key.json, key_json: "{}" }
  templated: { type: carol, tenant: t, connector_id: c, api_key: "{{ secret('K') }}" }
steps:
  hb:
    type: log
    with: { message: hi }
"#,
    );
    let out = env.run(&["validate", "--format", "json", p.to_str().unwrap()]);
    let found = out.diagnostics();
    // Each at a key the rule rests on (the lone `username`, `username` beside an
    // `api_key`, `key_json`), not at the line's start.
    for (line, key, text) in [
        (
            3,
            "username: u",
            "needs either `username` and `password` or `api_key`",
        ),
        (4, "username: u", "not both"),
        (5, "key_json:", "has both `key_file` and `key_json`"),
    ] {
        let text_line = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .nth(line - 1)
            .unwrap()
            .to_string();
        let col = text_line.find(key).unwrap() as u64 + 1;
        assert!(
            found
                .iter()
                .any(|(l, c, m)| (*l, *c) == (line as u64, col) && m.contains(text)),
            "expected {line}:{col} `{text}` in {found:?}"
        );
    }
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(out.code(), 1);
}

/// A folder named twice (or inside another argument) is not "a folder without pipelines".
#[test]
fn overlapping_paths_are_not_an_empty_folder() {
    let env = Env::new();
    env.write(
        "p/a.yaml",
        "pipeline: a\nsteps:\n  s:\n    type: log\n    with: { message: hi }\n",
    );
    env.write(
        "p/sub/b.yaml",
        "pipeline: b\nsteps:\n  s:\n    type: log\n    with: { message: hi }\n",
    );
    let out = env.run(&["validate", "p", "p/sub", "p"]);
    assert_eq!(out.code(), 0, "{}{}", out.stdout(), out.stderr());
    assert!(out.stdout().contains("0 errors"), "{}", out.stdout());
}
