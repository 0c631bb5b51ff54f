//! `pipe validate [PATH…]`: the CI gate. Every problem in every file, in one pass.

use engine::diag::{Diagnostic, Severity};
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

/// The pipeline files under the given paths: `.yaml`/`.yml` files, folders searched recursively.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut files).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(format!("{}: no such file or folder", p.display()));
        }
    }
    files.sort();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
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
                    d.file,
                    d.line,
                    d.column,
                    d.code,
                    d.message
                        .replace('%', "%25")
                        .replace('\r', "%0D")
                        .replace('\n', "%0A")
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
