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
    let connections: Vec<(&str, &str, Value)> = registry
        .connections
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
        step["properties"]["type"] = typed_enum("The step type.", &configs);
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
    // A connection is its kind's struct as a whole (`type` included); with `credential:`
    // the stored credential provides the rest, so no key of the kind is required.
    if let (Some(conn), false) = (defs.get_mut("ConnectionSpec"), connections.is_empty()) {
        conn["properties"]["type"] = typed_enum("The connection type.", &connections);
        conn["properties"][crate::connection::CREDENTIAL_KEY] = json!({
            "description": "A stored credential of this type (`pipe credentials list`) that provides the keys the connection does not write itself.",
            "type": "string",
            "pattern": "^[a-z0-9][a-z0-9_.-]{0,63}$"
        });
        let rules: Vec<Value> = connections
            .iter()
            .map(|(name, _, schema)| {
                json!({
                    "if": { "properties": { "type": { "const": name } }, "required": ["type"] },
                    "then": {
                        "if": { "required": [crate::connection::CREDENTIAL_KEY] },
                        "else": schema
                    }
                })
            })
            .collect();
        conn["allOf"] = Value::Array(rules);
    }
    root
}

/// `type:` as one of the registered names, each described.
fn typed_enum(description: &str, kinds: &[(&str, &str, Value)]) -> Value {
    let names: Vec<&str> = kinds.iter().map(|c| c.0).collect();
    let described: Vec<Value> = kinds
        .iter()
        .map(|(n, s, _)| json!({ "const": n, "description": s }))
        .collect();
    json!({ "description": description, "enum": names, "oneOf": described })
}

/// The README's step reference, from the same structs as the schema: one section per step
/// type with its summary and a table of its `with:` keys. A test keeps README in step.
pub fn steps_markdown(registry: &Registry) -> String {
    let schema = pipeline_schema(registry);
    let defs = &schema["definitions"];
    let mut out = String::new();
    out.push_str("#### The step envelope (keys every step has)\n\n");
    out.push_str(&fields_table(&defs["StepSpec"], defs));
    for kind in registry.kinds() {
        let mut g = SchemaSettings::draft07().into_generator();
        let reference = (kind.schema)(&mut g).to_value();
        let name = reference["$ref"]
            .as_str()
            .and_then(|r| r.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        let own_defs = Value::Object(g.take_definitions(true));
        let def = if name.is_empty() {
            &reference
        } else {
            &own_defs[&name]
        };
        out.push_str(&format!(
            "\n#### `{}`\n\n{}.",
            kind.name,
            kind.summary.trim_end_matches('.')
        ));
        if def["type"] == "array" {
            // A list of operations (transform): one row per kind of item.
            out.push_str("\n\n`with:` is a list; each item is one of:\n\n");
            out.push_str(&variants_table(&def["items"], &own_defs));
        } else {
            out.push_str(&format!(
                "\n\n`with:` keys (the result object that `outputs:` templates read is `{}`):\n\n",
                kind.result_name
            ));
            out.push_str(&fields_table(def, &own_defs));
        }
    }
    out
}

/// One row per variant of a list item (`- rename: {...}`): its key, value type and meaning.
fn variants_table(items: &Value, defs: &Value) -> String {
    let def = match items["$ref"].as_str() {
        Some(r) => &defs[r.rsplit('/').next().unwrap_or_default()],
        None => items,
    };
    let mut out = String::from("| item | value | description |\n|---|---|---|\n");
    for variant in def["oneOf"].as_array().into_iter().flatten() {
        let Some(props) = variant["properties"].as_object() else {
            continue;
        };
        for (key, prop) in props {
            out.push_str(&format!(
                "| `{key}` | {} | {} |\n",
                type_name(prop, defs),
                variant["description"]
                    .as_str()
                    .or(prop["description"].as_str())
                    .unwrap_or("")
                    .replace('\n', " ")
                    .replace('|', "\\|"),
            ));
        }
    }
    out
}

fn fields_table(def: &Value, defs: &Value) -> String {
    let required: Vec<&str> = def["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out =
        String::from("| key | type | required | default | description |\n|---|---|---|---|---|\n");
    if let Some(props) = def["properties"].as_object() {
        for (key, prop) in props {
            let default = match &prop["default"] {
                Value::Null => String::new(),
                v => format!("`{v}`"),
            };
            out.push_str(&format!(
                "| `{key}` | {} | {} | {default} | {} |\n",
                type_name(prop, defs),
                if required.contains(&key.as_str()) {
                    "yes"
                } else {
                    ""
                },
                prop["description"]
                    .as_str()
                    .unwrap_or("")
                    .replace('\n', " ")
                    .replace('|', "\\|"),
            ));
        }
    }
    out
}

fn type_name(prop: &Value, defs: &Value) -> String {
    if let Some(r) = prop["$ref"]
        .as_str()
        .or_else(|| prop["allOf"][0]["$ref"].as_str())
    {
        let name = r.rsplit('/').next().unwrap_or_default();
        let def = &defs[name];
        if let Some(values) = def["enum"].as_array() {
            return values
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" \\| ");
        }
        if let Some(one_of) = def["oneOf"].as_array() {
            let names: Vec<String> = one_of
                .iter()
                .flat_map(|v| {
                    v["enum"]
                        .as_array()
                        .cloned()
                        .unwrap_or_else(|| vec![v["const"].clone()])
                })
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            if !names.is_empty() {
                return names.join(" \\| ");
            }
        }
        if def["anyOf"].is_array() {
            return def["anyOf"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| type_name(v, defs))
                .collect::<Vec<_>>()
                .join(" or ");
        }
        return name.to_string();
    }
    if let Some(values) = prop["enum"].as_array() {
        return values
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" \\| ");
    }
    match &prop["type"] {
        Value::String(t) if t == "array" => format!("list of {}", type_name(&prop["items"], defs)),
        Value::String(t) if t == "object" => match &prop["additionalProperties"] {
            Value::Object(_) => {
                format!("map of {}", type_name(&prop["additionalProperties"], defs))
            }
            _ => "mapping".to_string(),
        },
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ if prop["anyOf"].is_array() => prop["anyOf"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["type"] != "null")
            .map(|v| type_name(v, defs))
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".to_string(),
    }
}
