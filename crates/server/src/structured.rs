//! The request surface of structured output and tools: OpenAI's `response_format`,
//! vLLM's `structured_outputs`, `tools` and `tool_choice`, checked into a
//! [`ConstraintSpec`] or a tool-call grammar. Every refusal is a 400 naming the parameter.

use crate::chat_out::ToolFormat;
use crate::error::ApiError;
use serde_json::{json, Value};
use tandem_engine::constraint::{compact_schema, lark_str};
use tandem_engine::ConstraintSpec;

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_param(param, format!("{param}: {}", msg.into()))
}

/// OpenAI's `response_format`: `text` (none), `json_object`, or `json_schema` with `name`,
/// `schema`, `strict` and `description`.
pub fn response_format(v: &Value) -> Result<Option<ConstraintSpec>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let Some(o) = v.as_object() else {
        return Err(bad("response_format", "response_format must be an object"));
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ConstraintSpec::JsonObject)),
        Some("json_schema") => {
            let Some(js) = o.get("json_schema").and_then(Value::as_object) else {
                return Err(bad(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a json_schema object",
                ));
            };
            for k in js.keys() {
                if !matches!(k.as_str(), "name" | "schema" | "strict" | "description") {
                    return Err(bad(
                        &format!("response_format.json_schema.{k}"),
                        format!("unknown field {k:?} in response_format.json_schema"),
                    ));
                }
            }
            if js.get("name").is_some_and(|n| !n.is_string()) {
                return Err(bad(
                    "response_format.json_schema.name",
                    "json_schema.name must be a string",
                ));
            }
            match js.get("schema") {
                Some(s @ Value::Object(_)) => Ok(Some(ConstraintSpec::JsonSchema(s.clone()))),
                Some(Value::Bool(true)) | None => Ok(Some(ConstraintSpec::JsonObject)),
                Some(_) => Err(bad(
                    "response_format.json_schema.schema",
                    "json_schema.schema must be a JSON schema object",
                )),
            }
        }
        Some(other) => Err(bad(
            "response_format.type",
            format!("unsupported response_format type {other:?} (text, json_object, json_schema)"),
        )),
        None => Err(bad(
            "response_format.type",
            "response_format needs a type (text, json_object, json_schema)",
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of `json` (a schema, or a string holding one),
/// `json_object: true`, `regex`, `choice` (a list of strings) and `grammar` (llguidance's
/// Lark syntax).
pub fn structured_outputs(v: &Value) -> Result<Option<ConstraintSpec>, ApiError> {
    if v.is_null() {
        return Ok(None);
    }
    let Some(o) = v.as_object() else {
        return Err(bad(
            "structured_outputs",
            "structured_outputs must be an object",
        ));
    };
    let mut found = Vec::new();
    for (k, val) in o {
        let p = format!("structured_outputs.{k}");
        if val.is_null() {
            continue;
        }
        let spec = match k.as_str() {
            "json" => match val {
                Value::Object(_) => ConstraintSpec::JsonSchema(val.clone()),
                Value::String(s) => match serde_json::from_str::<Value>(s) {
                    Ok(s @ Value::Object(_)) => ConstraintSpec::JsonSchema(s),
                    _ => return Err(bad(&p, "json must be a JSON schema (an object or its text)")),
                },
                _ => return Err(bad(&p, "json must be a JSON schema object")),
            },
            "json_object" => match val {
                Value::Bool(true) => ConstraintSpec::JsonObject,
                Value::Bool(false) => continue,
                _ => return Err(bad(&p, "json_object must be a boolean")),
            },
            "regex" => match val.as_str() {
                Some(r) if !r.is_empty() => ConstraintSpec::Regex(r.to_string()),
                _ => return Err(bad(&p, "regex must be a non-empty string")),
            },
            "choice" => {
                let list: Option<Vec<String>> = val.as_array().and_then(|a| {
                    a.iter().map(|x| x.as_str().map(String::from)).collect()
                });
                match list {
                    Some(l) if !l.is_empty() => ConstraintSpec::Choice(l),
                    _ => return Err(bad(&p, "choice must be a non-empty list of strings")),
                }
            }
            "grammar" => match val.as_str() {
                Some(g) if !g.trim().is_empty() => ConstraintSpec::Lark(g.to_string()),
                _ => return Err(bad(&p, "grammar must be a non-empty string (Lark syntax)")),
            },
            other => {
                return Err(bad(
                    &p,
                    format!(
                        "unsupported structured_outputs field {other:?} (json, json_object, regex, choice, grammar)"
                    ),
                ))
            }
        };
        found.push(spec);
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(bad(
            "structured_outputs",
            "give exactly one of json, json_object, regex, choice and grammar",
        )),
    }
}

/// One function of `tools`.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub parameters: Value,
}

/// Checks `tools` (each `{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}`).
pub fn tools(list: &[Value]) -> Result<Vec<Tool>, ApiError> {
    let mut out: Vec<Tool> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let p = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(
                &format!("{p}.type"),
                "only tools of type \"function\" are supported",
            ));
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            return Err(bad(
                &format!("{p}.function"),
                "a tool needs a function object",
            ));
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n)
                if !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') =>
            {
                n.to_string()
            }
            _ => {
                return Err(bad(
                    &format!("{p}.function.name"),
                    "a function name is letters, digits, '_', '-' and '.'",
                ))
            }
        };
        if out.iter().any(|o| o.name == name) {
            return Err(bad(
                &format!("{p}.function.name"),
                format!("duplicate function {name:?}"),
            ));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => {
                return Err(bad(
                    &format!("{p}.function.parameters"),
                    "parameters must be a JSON schema object",
                ))
            }
        };
        out.push(Tool { name, parameters });
    }
    Ok(out)
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

pub fn tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    let c = match v {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("unknown tool_choice {other:?} (none, auto, required or a function)"),
                ))
            }
        },
        Some(o @ Value::Object(_)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) => ToolChoice::Named(n.to_string()),
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ))
                }
            }
        }
        Some(_) => {
            return Err(bad(
                "tool_choice",
                "tool_choice must be a string or an object",
            ))
        }
    };
    match &c {
        ToolChoice::Required | ToolChoice::Auto if tools.is_empty() => {
            Err(bad("tool_choice", "tool_choice needs tools"))
        }
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => Err(bad(
            "tool_choice",
            format!("tool_choice names {n:?}, which is not in tools"),
        )),
        _ => Ok(c),
    }
}

/// The Lark body (rule `body` and its helpers) that only admits calls, in `format`, of the
/// functions `tools` with arguments valid against their schemas: at most `max_calls`.
pub fn tool_call_lark(
    format: ToolFormat,
    tools: &[&Tool],
    max_calls: usize,
) -> Result<(String, String), ApiError> {
    if format != ToolFormat::Hermes {
        return Err(bad(
            "tool_choice",
            format!(
                "tool_choice \"required\" or a named function is enforced for the hermes tool-call format only; this model's is {format:?}"
            ),
        ));
    }
    let variants: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = if variants.len() == 1 {
        variants.into_iter().next().unwrap_or(Value::Null)
    } else {
        json!({"anyOf": variants})
    };
    let body = if max_calls <= 1 {
        "call".to_string()
    } else {
        format!("call (\"\\n\" call){{0,{}}}", max_calls - 1)
    };
    let rules = format!(
        "call: {} %json {} {}\n",
        lark_str("<tool_call>\n"),
        compact_schema(&schema),
        lark_str("\n</tool_call>")
    );
    Ok((body, rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_format_forms_and_refusals() {
        assert_eq!(response_format(&json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            response_format(&json!({"type": "json_object"})).unwrap(),
            Some(ConstraintSpec::JsonObject)
        );
        let s = json!({"type": "object"});
        assert_eq!(
            response_format(&json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}}))
                .unwrap(),
            Some(ConstraintSpec::JsonSchema(s))
        );
        for (v, param) in [
            (json!({"type": "xml"}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": 3}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}, "bogus": 1}}),
                "response_format.json_schema.bogus",
            ),
        ] {
            let e = response_format(&v).expect_err(param);
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
    }

    #[test]
    fn structured_outputs_forms_and_refusals() {
        assert_eq!(
            structured_outputs(&json!({"choice": ["a", "b"]})).unwrap(),
            Some(ConstraintSpec::Choice(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            structured_outputs(&json!({"regex": "[0-9]+"})).unwrap(),
            Some(ConstraintSpec::Regex("[0-9]+".into()))
        );
        assert_eq!(
            structured_outputs(&json!({"json": "{\"type\": \"integer\"}"})).unwrap(),
            Some(ConstraintSpec::JsonSchema(json!({"type": "integer"})))
        );
        for (v, param) in [
            (json!({"choice": []}), "structured_outputs.choice"),
            (json!({"xml": "x"}), "structured_outputs.xml"),
            (json!({"regex": "a", "choice": ["b"]}), "structured_outputs"),
            (json!({"json": 3}), "structured_outputs.json"),
        ] {
            let e = structured_outputs(&v).expect_err(param);
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
    }

    #[test]
    fn tools_and_tool_choice_are_checked() {
        let t = tools(&[json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})])
            .unwrap();
        assert_eq!(tool_choice(None, &t).unwrap(), ToolChoice::Auto);
        assert_eq!(tool_choice(None, &[]).unwrap(), ToolChoice::None);
        assert_eq!(
            tool_choice(
                Some(&json!({"type": "function", "function": {"name": "f"}})),
                &t
            )
            .unwrap(),
            ToolChoice::Named("f".into())
        );
        let e = tool_choice(
            Some(&json!({"type": "function", "function": {"name": "g"}})),
            &t,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = tool_choice(Some(&json!("required")), &[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = tools(&[json!({"type": "function", "function": {"name": "a b"}})]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.name"));
        let e = tools(&[json!({"type": "retrieval"})]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].type"));
        let e = tools(&[json!({"type": "function", "function": {"name": "a", "parameters": []}})])
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.parameters"));
    }
}
