//! `pipe schema`: the JSON Schema of the pipeline format, from the parser's own structs.
//!
//! The document's structs give the envelope; each registered step type contributes the
//! schema of its `with:` config, attached by an `if type == X then with: X's schema` rule so
//! an editor (yaml-language-server) completes and documents the right keys per step.

use crate::model::PipelineDoc;
use crate::step::Registry;
use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut g = SchemaSettings::draft07().into_generator();
    let configs: Vec<(&str, &str, Value)> = registry
        .kinds()
        .map(|k| (k.name, k.summary, (k.schema)(&mut g).to_value()))
        .collect();
    let mut root = g.root_schema_for::<PipelineDoc>().to_value();
    root["$id"] = json!("https://github.com/pipe-dev/pipe/schemas/pipeline.schema.json");
    let defs = root
        .get_mut("definitions")
        .and_then(Value::as_object_mut)
        .expect("the document has definitions");
    if let Some(step) = defs.get_mut("StepSpec") {
        let names: Vec<&str> = configs.iter().map(|c| c.0).collect();
        let described: Vec<Value> = configs
            .iter()
            .map(|(n, s, _)| json!({ "const": n, "description": s }))
            .collect();
        step["properties"]["type"] = json!({
            "description": "The step type.",
            "enum": names,
            "oneOf": described,
        });
        let rules: Vec<Value> = configs
            .iter()
            .map(|(name, _, schema)| {
                json!({
                    "if": { "properties": { "type": { "const": name } }, "required": ["type"] },
                    "then": { "properties": { "with": schema } }
                })
            })
            .collect();
        step["allOf"] = Value::Array(rules);
    }
    root
}
