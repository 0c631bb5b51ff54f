//! `pipe schema`: print the JSON Schema of the pipeline format (or, with `--steps-markdown`,
//! the README's step reference, made from the same structs).

#[derive(clap::Args)]
pub struct SchemaArgs {
    /// Print the step reference as Markdown (the README section) instead of the JSON Schema.
    #[arg(long)]
    pub steps_markdown: bool,
}

pub fn main(args: SchemaArgs) -> i32 {
    let registry = super::registry();
    if args.steps_markdown {
        print!("{}", engine::schema::steps_markdown(&registry));
    } else {
        let schema = engine::schema::pipeline_schema(&registry);
        println!(
            "{}",
            serde_json::to_string_pretty(&schema).expect("a schema is JSON")
        );
    }
    0
}
