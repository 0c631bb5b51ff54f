//! `pipe validate [PATH…]`: the CI gate. Every problem in every file, in one pass.

use engine::diag::{github_data, github_property, Diagnostic, Severity};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// Pipeline files or folders (default: pipelines/).
    pub paths: Vec<PathBuf>,
    /// text, json (an array of diagnostics) or github (workflow annotations).
    #[arg(long, value_enum, default_value_t = DiagFormat::Text)]
    pub format: DiagFormat,
    /// Treat warnings as errors (exit 1 when there are any).
    #[arg(long)]
    pub deny_warnings: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiagFormat {
    Text,
    Json,
    Github,
}

/// The pipeline files under the given paths: `.yaml`/`.yml` files, folders searched
/// recursively (each folder once, however symlinks lead back to it). Finding none is an
/// error: a mistyped path must not pass CI as "0 errors".
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let mut seen = HashSet::new();
    for p in paths {
        if p.is_dir() {
            let before = files.len();
            // A folder an earlier argument already walked (`pipelines pipelines/nightly`)
            // added its files then.
            let walked = std::fs::canonicalize(p).is_ok_and(|c| seen.contains(&c));
            walk(p, &mut files, &mut seen)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            if !walked && files.len() == before {
                return Err(format!(
                    "{}: no pipeline files (*.yaml, *.yml) in this folder",
                    p.display()
                ));
            }
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(format!("{}: no such file or folder", p.display()));
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> std::io::Result<()> {
    // A folder reached again (a symlink to a parent) is not walked twice.
    if !seen.insert(std::fs::canonicalize(dir)?) {
        return Ok(());
    }
    // `collect` sorts the whole list at the end.
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    for path in entries {
        if path.is_dir() {
            walk(&path, out, seen)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

pub fn main(args: ValidateArgs) -> i32 {
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from("pipelines")]
    } else {
        args.paths
    };
    let files = match collect(&paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let registry = super::registry();
    let items: Vec<(PathBuf, String)> = files
        .iter()
        .map(|f| (f.clone(), f.display().to_string()))
        .collect();
    let mut all: Vec<Diagnostic> = engine::validate::validate_files(&items, &registry)
        .into_iter()
        .flat_map(|o| o.diagnostics)
        .collect();
    all.sort();
    let count = |s: Severity| all.iter().filter(|d| d.severity == s).count();
    let (errors, warnings, notes) = (
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Note),
    );
    let totals = if notes > 0 {
        format!("{errors} errors, {warnings} warnings, {notes} notes")
    } else {
        format!("{errors} errors, {warnings} warnings")
    };
    match args.format {
        DiagFormat::Text => {
            for d in &all {
                println!("{d}");
            }
            println!("{totals}");
        }
        DiagFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("diagnostics are JSON")
        ),
        DiagFormat::Github => {
            for d in &all {
                let level = match d.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                    Severity::Note => "notice",
                };
                println!(
                    "::{level} file={},line={},col={},title={}::{}",
                    github_property(&d.file),
                    d.line,
                    d.column,
                    d.code,
                    github_data(&d.message)
                );
            }
            println!("{totals}");
        }
    }
    if errors > 0 || (args.deny_warnings && warnings > 0) {
        1
    } else {
        0
    }
}
