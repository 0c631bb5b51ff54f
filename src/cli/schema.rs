//! `pipe schema`: print the JSON Schema of the pipeline format.

pub fn main() -> i32 {
    let schema = engine::schema::pipeline_schema(&super::registry());
    println!(
        "{}",
        serde_json::to_string_pretty(&schema).expect("a schema is JSON")
    );
    0
}
