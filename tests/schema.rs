//! `pipe schema` equals the checked-in schemas/pipeline.schema.json (no drift), and it
//! describes every step type's config.

use crate::util::{repo_root, Env};

#[test]
fn checked_in_schema_matches_the_binary() {
    let env = Env::new();
    let out = env.run(&["schema"]);
    out.expect_code(0);
    let generated = out.json();
    let file = std::fs::read_to_string(repo_root().join("schemas/pipeline.schema.json"))
        .expect("schemas/pipeline.schema.json exists");
    let checked_in: serde_json::Value = serde_json::from_str(&file).unwrap();
    assert!(
        generated == checked_in,
        "schemas/pipeline.schema.json is stale: run `just schema`"
    );
}

#[test]
fn schema_documents_steps_and_their_configs() {
    let env = Env::new();
    let v = env.run(&["schema"]).json();
    let step = &v["definitions"]["StepSpec"];
    let types: Vec<&str> = step["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"exec") && types.contains(&"log"),
        "{types:?}"
    );
    let rules = step["allOf"].as_array().unwrap();
    assert_eq!(rules.len(), types.len());
    let exec = &v["definitions"]["Exec"];
    assert_eq!(exec["additionalProperties"], false);
    assert!(
        exec["properties"]["command"]["description"]
            .as_str()
            .unwrap()
            .len()
            > 10
    );
    assert!(step["properties"]["retry"].is_object());
    assert!(v["properties"]["steps"].is_object());
}

#[test]
fn readme_step_reference_is_generated_from_the_structs() {
    let env = Env::new();
    let out = env.run(&["schema", "--steps-markdown"]);
    out.expect_code(0);
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("<!-- steps:begin")
        .expect("README has the steps:begin marker");
    let start = start + readme[start..].find('\n').unwrap() + 1;
    let end = readme
        .find("<!-- steps:end -->")
        .expect("README has the steps:end marker");
    assert!(
        readme[start..end] == out.stdout(),
        "README's step reference is stale: run `just docs`"
    );
}

/// A merge that left conflict markers in a document the user reads (it happened once, in
/// README.md) fails here instead of reaching them.
#[test]
fn documents_hold_no_merge_conflict_markers() {
    let root = repo_root();
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for dir in ["docs/decisions", "pipelines"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let marker =
                ["<<<<<<< ", ">>>>>>> "].iter().any(|m| line.starts_with(m)) || line == "=======";
            assert!(
                !marker,
                "{}:{}: a merge conflict marker: {line}",
                f.display(),
                i + 1
            );
        }
    }
}

#[test]
fn readme_lists_every_diagnostic_code_with_an_example() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for code in engine::diag::Code::ALL {
        let row = format!("| {} | ", code.as_str());
        let line = readme
            .lines()
            .find(|l| l.starts_with(&row))
            .unwrap_or_else(|| panic!("README does not list {}", code.as_str()));
        assert!(
            line.contains(&format!("[{}]", code.as_str())),
            "README's row for {} has no example: {line}",
            code.as_str()
        );
    }
}
