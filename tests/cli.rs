//! CLI basics.

use crate::util::Env;

#[test]
fn version_prints_and_exits_0() {
    let env = Env::new();
    let out = env.run(&["--version"]);
    out.expect_code(0);
    assert_eq!(
        out.stdout().trim(),
        format!("pipe {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn no_arguments_is_a_usage_error() {
    let env = Env::new();
    let out = env.run(&[]);
    out.expect_code(2);
    assert!(out.stderr().contains("Usage"), "{}", out.stderr());
    assert!(out.stdout().is_empty(), "{}", out.stdout());
}

#[test]
fn running_a_missing_file_is_a_usage_error_naming_the_path() {
    let env = Env::new();
    let missing = env.path().join("nowhere/missing.yaml");
    let out = env.run(&["run", missing.to_str().unwrap()]);
    out.expect_code(2);
    assert!(
        out.stderr().contains(missing.to_str().unwrap()),
        "{}",
        out.stderr()
    );
    assert!(!env.state().join("history.sqlite").exists());
}

#[test]
fn a_param_without_equals_is_a_usage_error() {
    let env = Env::new();
    let p = env.write(
        "p.yaml",
        "pipeline: params\nparams:\n  days: { type: integer, default: 3 }\nsteps:\n  a: { type: exec, with: { command: touch, args: [ran] } }\n",
    );
    let out = env.run(&["run", p.to_str().unwrap(), "--param", "days"]);
    out.expect_code(2);
    assert!(out.stderr().contains("NAME=VALUE"), "{}", out.stderr());
    assert!(out.stderr().contains("`days`"), "{}", out.stderr());
    assert!(!env.path().join("ran").exists());
    // The same file with a proper param runs.
    env.run(&["run", p.to_str().unwrap(), "--quiet", "--param", "days=4"])
        .expect_code(0);
    assert!(env.path().join("ran").exists());
}

#[test]
fn a_yaml_syntax_error_is_reported_with_its_position() {
    let env = Env::new();
    let p = env.write(
        "broken.yaml",
        "pipeline: broken\nsteps:\n  a:\n    type: log\n    with: { message: [unclosed }\n",
    );
    let out = env.run(&["run", p.to_str().unwrap()]);
    out.expect_code(2);
    let err = out.stderr();
    let prefix = format!("{}:", p.display());
    let line = err
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(": error[E001]"))
        .unwrap_or_else(|| panic!("no `file:line:col: error[E001]` line:\n{err}"));
    let pos: Vec<&str> = line[prefix.len()..]
        .split(": error[E001]")
        .next()
        .unwrap()
        .split(':')
        .collect();
    assert_eq!(pos.len(), 2, "{line}");
    assert!(
        pos.iter().all(|n| n.parse::<u32>().is_ok_and(|n| n > 0)),
        "{line}"
    );
    assert!(!env.state().join("history.sqlite").exists());
}

#[test]
fn showing_a_run_of_an_empty_history_fails() {
    let env = Env::new();
    let out = env.run(&["runs", "show", "999"]);
    out.expect_code(1);
    assert!(
        out.stderr().contains("run 999 not found"),
        "{}",
        out.stderr()
    );
    let out = env.run(&["runs", "list"]);
    out.expect_code(0);
    assert!(out.stdout().contains("no runs"), "{}", out.stdout());
}

#[test]
fn a_pipeline_given_by_bare_file_name_runs_in_its_folder() {
    let env = Env::new();
    env.write(
        "p.yaml",
        "pipeline: here\nsteps:\n  a: { type: exec, with: { command: touch, args: [ran] } }\n",
    );
    // Relative to the current directory (the env's temp dir), without any `/`.
    let out = env.run(&["run", "p.yaml", "--format", "json"]);
    out.expect_code(0);
    assert_eq!(out.json()["status"], "succeeded");
    assert!(env.path().join("ran").exists());
}
