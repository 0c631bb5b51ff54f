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
        let diags = out.json();
        let got: Vec<(usize, usize, String, String)> = diags
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
            .collect();
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
    let p = env.write("w.yaml", "pipeline: w\nconnections:\n  c: { type: http, token: abc123 }\nsteps:\n  a:\n    type: log\n    with: { message: hi }\n");
    let out = env.run(&["validate", "--format", "github", p.to_str().unwrap()]);
    out.expect_code(0);
    assert!(
        out.stdout().contains(&format!(
            "::warning file={},line=3,col=27,title=W001::",
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
