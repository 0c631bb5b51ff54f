//! Repairing a finished run (`pipe runs repair ID`, Databricks' "repair run"): which steps
//! run again and which keep what an earlier attempt produced.
//!
//! The rule, in order:
//! 1. Every step that did not succeed (failed, cancelled, skipped, or never settled) runs
//!    again, and so does everything downstream of it: its inputs are about to change.
//! 2. A succeeded step that a re-run step depends on is reused (its recorded outputs are what
//!    `steps.<id>` shows), unless what the re-run step needs of it was not kept:
//!    - its table, when the re-run step reads it (`input`/`inputs`) and the pipeline did not
//!      keep tables (`keep_tables: true`) or the file is missing;
//!    - its outputs, when they were recorded masked (a `secret: true` output, or a value the
//!      redactor knew as a secret): history never holds a secret, so it cannot give it back.
//!
//!    Such a step runs again too, and the same rule applies to what it depends on. A
//!    teardown step (`always: true`) that depends on such a step runs again too: a login
//!    that runs again opens a new session, which its logout must close.
//! 3. Every other succeeded step is reused as it is.

use crate::plan::Plan;
use crate::status::Status;
use std::collections::BTreeSet;

/// What an earlier attempt left of one step.
#[derive(Debug, Clone)]
pub struct PreviousStep {
    pub status: Status,
    /// Its recorded outputs (redacted).
    pub outputs: serde_json::Value,
    /// Whether its table was kept in the run folder and can be read back.
    pub table_kept: bool,
}

/// The steps a repair runs again and the ones it reuses, each with its reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Plan indexes of the steps that run again, with why.
    pub rerun: Vec<(usize, String)>,
    /// Plan indexes of the steps whose earlier result is reused.
    pub reuse: Vec<usize>,
}

impl Selection {
    pub fn reruns(&self, i: usize) -> bool {
        self.rerun.iter().any(|(k, _)| *k == i)
    }
}

/// Choose what a repair runs. `previous(id)` is what the earlier attempt recorded of a step
/// (`None` for a step it never recorded, e.g. one added since: it runs).
pub fn select(plan: &Plan, previous: &dyn Fn(&str) -> Option<PreviousStep>) -> Selection {
    let n = plan.steps.len();
    let prev: Vec<Option<PreviousStep>> = plan.steps.iter().map(|s| previous(&s.id)).collect();
    let mut why: Vec<Option<String>> = vec![None; n];
    // 1. What did not succeed, in plan (topological) order, and what is downstream of it.
    for i in 0..n {
        if why[i].is_some() {
            continue;
        }
        why[i] = match &prev[i] {
            None => Some("not recorded by the earlier attempt".to_string()),
            Some(p) if !p.status.is_success() => {
                Some(format!("it did not succeed ({})", p.status.label()))
            }
            Some(_) => plan.steps[i]
                .deps
                .iter()
                .find(|&&d| why[d].is_some())
                .map(|&d| format!("it depends on `{}`, which runs again", plan.steps[d].id)),
        };
    }
    // 2. Succeeded steps whose kept result a re-run step cannot use, until nothing changes.
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in plan.steps.iter().enumerate() {
        for &d in &s.deps {
            dependents[d].push(i);
        }
    }
    let mut queue: Vec<usize> = (0..n).filter(|&i| why[i].is_some()).collect();
    while let Some(i) = queue.pop() {
        let step = &plan.steps[i];
        let reads: BTreeSet<&str> = step
            .spec
            .input
            .iter()
            .chain(step.spec.inputs.iter())
            .map(String::as_str)
            .collect();
        for &d in &step.deps {
            if why[d].is_some() {
                continue;
            }
            let Some(p) = &prev[d] else { continue };
            let dep = &plan.steps[d].id;
            let reason = if reads.contains(dep.as_str()) && !p.table_kept {
                Some(format!(
                    "`{}` reads its table, which was not kept (keep_tables: true keeps it)",
                    step.id
                ))
            } else if masked(&p.outputs) || plan.steps[d].spec.outputs.values().any(|o| o.secret())
            {
                Some(format!(
                    "`{}` needs its outputs, and secret outputs are not kept",
                    step.id
                ))
            } else {
                None
            };
            if let Some(r) = reason {
                why[d] = Some(r);
                queue.push(d);
                // What a re-run step opens (a session), its teardown closes again.
                for &k in &dependents[d] {
                    if why[k].is_none() && plan.steps[k].spec.always {
                        why[k] = Some(format!(
                            "it is a teardown step after `{dep}`, which runs again"
                        ));
                        queue.push(k);
                    }
                }
            }
        }
    }
    let mut selection = Selection::default();
    for (i, w) in why.into_iter().enumerate() {
        match w {
            Some(w) => selection.rerun.push((i, w)),
            None => selection.reuse.push(i),
        }
    }
    selection
}

/// Whether recorded outputs hold a masked value anywhere.
fn masked(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains(crate::secrets::MASK),
        serde_json::Value::Array(a) => a.iter().any(masked),
        serde_json::Value::Object(m) => m.values().any(masked),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::{
        Registry, StaticInfo, StepConfig, StepContext, StepError, StepKind, StepOutput,
    };
    use serde_json::json;

    /// A step type that does nothing; `table: true` says it produces a table.
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Nop {
        #[serde(default)]
        #[allow(dead_code)]
        value: Option<String>,
        #[serde(default)]
        table: bool,
    }

    #[async_trait::async_trait]
    impl StepConfig for Nop {
        const TYPE: &'static str = "nop";
        const SUMMARY: &'static str = "nothing";
        fn static_info(&self) -> StaticInfo {
            StaticInfo {
                produces_table: self.table,
                ..Default::default()
            }
        }
        async fn run(self, _: StepContext) -> Result<StepOutput, StepError> {
            Ok(StepOutput::default())
        }
    }

    fn plan(yaml: &str) -> Plan {
        let dir = tempfile_dir();
        let path = dir.join("p.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut registry = Registry::new();
        registry.register(StepKind::of::<Nop>());
        let out = crate::validate::validate_file(&path, "p.yaml", &registry);
        let _ = std::fs::remove_dir_all(&dir);
        out.plan.unwrap_or_else(|| {
            panic!(
                "{:?}",
                out.diagnostics
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
            )
        })
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pipe-repair-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn ids(p: &Plan, idx: impl IntoIterator<Item = usize>) -> Vec<String> {
        let mut v: Vec<String> = idx.into_iter().map(|i| p.steps[i].id.clone()).collect();
        v.sort();
        v
    }

    const PIPE: &str = r#"
pipeline: p
steps:
  login:
    type: nop
    outputs:
      token: { value: "{{ result.value }}", secret: true }
  extract:
    type: nop
    with: { table: true }
    needs: [login]
  shape:
    type: nop
    with: { table: true }
    input: extract
  load:
    type: nop
    input: shape
  logout:
    type: nop
    always: true
    with: { value: "{{ steps.login.outputs.token }}" }
"#;

    fn prev(statuses: &[(&str, Status)], kept: bool) -> impl Fn(&str) -> Option<PreviousStep> {
        let map: std::collections::HashMap<String, Status> =
            statuses.iter().map(|(k, s)| (k.to_string(), *s)).collect();
        move |id: &str| {
            map.get(id).map(|s| PreviousStep {
                status: *s,
                outputs: json!({}),
                table_kept: kept,
            })
        }
    }

    #[test]
    fn a_failed_load_with_kept_tables_reruns_the_load_and_the_logout_and_its_login() {
        let p = plan(PIPE);
        let s = select(
            &p,
            &prev(
                &[
                    ("login", Status::Succeeded),
                    ("extract", Status::Succeeded),
                    ("shape", Status::Succeeded),
                    ("load", Status::Failed),
                    ("logout", Status::Succeeded),
                ],
                true,
            ),
        );
        // logout is downstream of nothing failed, but it needs login's secret token; the
        // load needs shape's table, which was kept.
        assert_eq!(
            ids(&p, s.rerun.iter().map(|(i, _)| *i)),
            vec!["load".to_string()]
        );
        assert_eq!(ids(&p, s.reuse.clone()).len(), 4);
    }

    #[test]
    fn without_kept_tables_the_chain_of_tables_runs_again() {
        let p = plan(PIPE);
        let s = select(
            &p,
            &prev(
                &[
                    ("login", Status::Succeeded),
                    ("extract", Status::Succeeded),
                    ("shape", Status::Succeeded),
                    ("load", Status::Failed),
                    ("logout", Status::Succeeded),
                ],
                false,
            ),
        );
        // extract runs again for its table; it needs login's secret token, so login runs
        // again, and so does logout, which closes login's new session.
        assert_eq!(
            ids(&p, s.rerun.iter().map(|(i, _)| *i)),
            vec!["extract", "load", "login", "logout", "shape"]
        );
    }

    #[test]
    fn a_failed_extract_reruns_its_secret_upstream_and_everything_downstream() {
        let p = plan(PIPE);
        let s = select(
            &p,
            &prev(
                &[
                    ("login", Status::Succeeded),
                    ("extract", Status::Failed),
                    ("shape", Status::Skipped),
                    ("load", Status::Skipped),
                    ("logout", Status::Succeeded),
                ],
                true,
            ),
        );
        // extract needs login's token (a secret output): login runs again, and so does
        // logout, the teardown of login's session.
        assert_eq!(
            ids(&p, s.rerun.iter().map(|(i, _)| *i)),
            vec!["extract", "load", "login", "logout", "shape"]
        );
        let why = &s
            .rerun
            .iter()
            .find(|(i, _)| p.steps[*i].id == "login")
            .unwrap()
            .1;
        assert!(why.contains("secret outputs"), "{why}");
    }

    #[test]
    fn masked_recorded_outputs_are_never_reused() {
        let p = plan(
            r#"
pipeline: p
steps:
  a:
    type: nop
  b:
    type: nop
    with: { value: "{{ steps.a.outputs.value }}" }
"#,
        );
        let s = select(&p, &|id: &str| {
            Some(PreviousStep {
                status: if id == "a" {
                    Status::Succeeded
                } else {
                    Status::Failed
                },
                outputs: json!({"value": format!("x{}y", crate::secrets::MASK)}),
                table_kept: false,
            })
        });
        assert_eq!(ids(&p, s.rerun.iter().map(|(i, _)| *i)), vec!["a", "b"]);
    }

    #[test]
    fn a_step_the_earlier_attempt_never_recorded_runs() {
        let p = plan(PIPE);
        let s = select(&p, &|_: &str| None);
        assert_eq!(s.rerun.len(), p.steps.len());
        assert!(s.reuse.is_empty());
    }
}
