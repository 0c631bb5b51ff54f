//! `pipe graph`: the DAG as Mermaid or Graphviz dot.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GraphArgs {
    /// The pipeline file.
    pub path: PathBuf,
    /// mermaid or dot.
    #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
    pub format: GraphFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum GraphFormat {
    Mermaid,
    Dot,
}

pub fn main(args: GraphArgs) -> i32 {
    let display = args.path.display().to_string();
    let outcome = engine::validate::validate_file(&args.path, &display, &super::registry());
    let Some(plan) = outcome.plan else {
        for d in &outcome.diagnostics {
            eprintln!("{d}");
        }
        return 2;
    };
    print!(
        "{}",
        match args.format {
            GraphFormat::Mermaid => plan.mermaid(),
            GraphFormat::Dot => plan.dot(),
        }
    );
    0
}
