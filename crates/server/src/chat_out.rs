//! What a chat model wrote, split into reasoning (`<think>...</think>`), content and tool
//! calls, per family format, over a stream of text deltas.
//!
//! The formats ([`ToolFormat`]):
//! * `hermes` (Qwen2.5/Qwen3, Hermes, many others): `<tool_call>\n{"name": .., "arguments":
//!   {..}}\n</tool_call>`, one block per call.
//! * `mistral`: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]` (v3) or
//!   `[TOOL_CALLS]name[ARGS]{..}` (v11+), repeated for parallel calls.
//! * `deepseek_v3`: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n` +
//!   "```json\n{..}\n```" + `<｜tool▁call▁end｜>..<｜tool▁calls▁end｜>`.
//! * `glm45`: `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>..</tool_call>`
//!   (a value that parses as JSON is taken as JSON, otherwise as a string).
//! * `harmony` (GPT-OSS): `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{..}<|call|>`;
//!   its `analysis` channel is reasoning, `final` is content.
//!
//! Text before the first call is content; everything from the first call's marker on is
//! held back and parsed when the choice ends. Output that does not parse (a malformed call,
//! an unknown format) is returned as content, never an error.

use serde_json::{json, Map, Value};

/// A family's tool-call format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Mistral,
    DeepSeekV3,
    Glm45,
    Harmony,
}

impl ToolFormat {
    /// The names `serve --tool-call-parser` takes.
    pub const NAMES: &'static [&'static str] =
        &["hermes", "mistral", "deepseek_v3", "glm45", "harmony"];

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "hermes" | "qwen" | "qwen2" | "qwen3" => Self::Hermes,
            "mistral" => Self::Mistral,
            "deepseek_v3" | "deepseek" => Self::DeepSeekV3,
            "glm45" | "glm4_moe" | "glm" => Self::Glm45,
            "harmony" | "gpt_oss" | "openai" => Self::Harmony,
            _ => return None,
        })
    }

    /// The format a chat template writes calls in, from the markers it contains.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<|channel|>") {
            Some(Self::Harmony)
        } else if template.contains("tool▁calls▁begin") {
            Some(Self::DeepSeekV3)
        } else if template.contains("<arg_key>") {
            Some(Self::Glm45)
        } else if template.contains("[TOOL_CALLS]") {
            Some(Self::Mistral)
        } else if template.contains("<tool_call>") {
            Some(Self::Hermes)
        } else {
            None
        }
    }

    /// The text that starts the first call.
    fn start_marker(self) -> &'static str {
        match self {
            Self::Hermes | Self::Glm45 => "<tool_call>",
            Self::Mistral => "[TOOL_CALLS]",
            Self::DeepSeekV3 => "<｜tool▁calls▁begin｜>",
            Self::Harmony => "<|channel|>commentary",
        }
    }

    /// Parses `text` (starting at the first call's marker): the calls as `(name,
    /// arguments JSON text)`, or `None` when it is malformed.
    pub fn parse(self, text: &str) -> Option<Vec<(String, String)>> {
        let calls = match self {
            Self::Hermes => parse_hermes(text),
            Self::Mistral => parse_mistral(text),
            Self::DeepSeekV3 => parse_deepseek(text),
            Self::Glm45 => parse_glm(text),
            Self::Harmony => parse_harmony(text),
        }?;
        (!calls.is_empty()).then_some(calls)
    }
}

/// `{"name": .., "arguments"|"parameters": {..}}` to `(name, arguments text)`.
fn call_of(v: &Value) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_string(),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => {
            let parsed: Value = serde_json::from_str(s).ok()?;
            parsed.to_string()
        }
        Some(a) if a.is_object() => a.to_string(),
        Some(_) => return None,
    };
    Some((name, args))
}

fn parse_hermes(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let body = rest.strip_prefix("<tool_call>")?;
        let end = body.find("</tool_call>")?;
        let v: Value = serde_json::from_str(body[..end].trim()).ok()?;
        out.push(call_of(&v)?);
        rest = body[end + "</tool_call>".len()..].trim();
    }
    Some(out)
}

fn parse_mistral(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in text.split("[TOOL_CALLS]").skip(1) {
        let part = part.trim();
        if part.starts_with('[') || part.starts_with('{') {
            // v3: a JSON list (or one object) of calls.
            let v: Value = serde_json::from_str(part.trim_end_matches("</s>")).ok()?;
            match v {
                Value::Array(a) => {
                    for c in &a {
                        out.push(call_of(c)?);
                    }
                }
                c => out.push(call_of(&c)?),
            }
        } else {
            // v11+: NAME[ARGS]{..}
            let (name, args) = part.split_once("[ARGS]")?;
            let v: Value = serde_json::from_str(args.trim().trim_end_matches("</s>")).ok()?;
            if !v.is_object() || name.trim().is_empty() {
                return None;
            }
            out.push((name.trim().to_string(), v.to_string()));
        }
    }
    Some(out)
}

fn parse_deepseek(text: &str) -> Option<Vec<(String, String)>> {
    const BEGIN: &str = "<｜tool▁call▁begin｜>";
    const SEP: &str = "<｜tool▁sep｜>";
    const END: &str = "<｜tool▁call▁end｜>";
    let body = text.trim().strip_prefix("<｜tool▁calls▁begin｜>")?;
    let mut out = Vec::new();
    let mut rest = body.trim_start();
    while let Some(r) = rest.strip_prefix(BEGIN) {
        let end = r.find(END)?;
        let call = &r[..end];
        let (_kind, after) = call.split_once(SEP)?;
        let (name, args) = after.split_once('\n')?;
        let args = args.trim();
        let args = args
            .strip_prefix("```json")
            .or_else(|| args.strip_prefix("```"))
            .unwrap_or(args);
        let args = args.trim().strip_suffix("```").unwrap_or(args).trim();
        let v: Value = serde_json::from_str(args).ok()?;
        if !v.is_object() || name.trim().is_empty() {
            return None;
        }
        out.push((name.trim().to_string(), v.to_string()));
        rest = r[end + END.len()..].trim_start();
    }
    let rest = rest.strip_prefix("<｜tool▁calls▁end｜>").unwrap_or(rest);
    rest.trim().is_empty().then_some(out)
}

fn parse_glm(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let body = rest.strip_prefix("<tool_call>")?;
        let end = body.find("</tool_call>")?;
        let call = &body[..end];
        let (name, mut args_text) = match call.find("<arg_key>") {
            Some(i) => (&call[..i], &call[i..]),
            None => (call, ""),
        };
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let mut args = Map::new();
        while !args_text.trim().is_empty() {
            let a = args_text.trim_start().strip_prefix("<arg_key>")?;
            let ke = a.find("</arg_key>")?;
            let key = a[..ke].trim().to_string();
            let v = a[ke + "</arg_key>".len()..]
                .trim_start()
                .strip_prefix("<arg_value>")?;
            let ve = v.find("</arg_value>")?;
            let raw = &v[..ve];
            let val = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
            args.insert(key, val);
            args_text = &v[ve + "</arg_value>".len()..];
        }
        out.push((name.to_string(), Value::Object(args).to_string()));
        rest = body[end + "</tool_call>".len()..].trim();
    }
    Some(out)
}

fn parse_harmony(text: &str) -> Option<Vec<(String, String)>> {
    // Each call: " to=functions.NAME ...<|message|>ARGS<|call|>" (ARGS JSON).
    let mut out = Vec::new();
    for part in text.split(" to=functions.").skip(1) {
        let name_end = part.find(|c: char| c.is_whitespace() || c == '<')?;
        let name = &part[..name_end];
        let m = part.find("<|message|>")?;
        let args = &part[m + "<|message|>".len()..];
        let args = args
            .split("<|call|>")
            .next()
            .unwrap_or(args)
            .split("<|end|>")
            .next()
            .unwrap_or(args);
        let v: Value = serde_json::from_str(args.trim()).ok()?;
        if !v.is_object() || name.is_empty() {
            return None;
        }
        out.push((name.to_string(), v.to_string()));
    }
    Some(out)
}

/// One piece of released output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Content(String),
    Reasoning(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before anything but whitespace: the output may open `<think>`.
    Start,
    Reasoning,
    Content,
    /// From the first tool call's marker on: held back until the end.
    Tools,
}

const THINK: &str = "<think>";
const END_THINK: &str = "</think>";

/// The split of one choice's text, fed delta by delta.
#[derive(Debug)]
pub struct ChatSplitter {
    mode: Mode,
    think: bool,
    tools: Option<ToolFormat>,
    /// Text received but not released (it may be the start of a marker).
    held: String,
    tool_text: String,
    /// Right after `</think>`: whitespace before the content is dropped.
    strip: bool,
}

/// What a choice wrote, once it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub reasoning: String,
    pub calls: Vec<(String, String)>,
}

/// The longest suffix of `s` that is a proper prefix of `marker` (where to hold back).
fn partial_suffix(s: &str, marker: &str) -> usize {
    let max = marker.len().saturating_sub(1).min(s.len());
    (1..=max)
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && marker.starts_with(&s[s.len() - k..]))
        .unwrap_or(0)
}

impl ChatSplitter {
    /// `think`: the model may reason first (`<think>`); `open_think`: the prompt opened
    /// `<think>` already; `tools`: the format to find calls in (`None`: no tool parsing).
    pub fn new(think: bool, open_think: bool, tools: Option<ToolFormat>) -> Self {
        let harmony = tools == Some(ToolFormat::Harmony);
        Self {
            mode: if open_think {
                Mode::Reasoning
            } else if think && !harmony {
                Mode::Start
            } else {
                Mode::Content
            },
            think,
            tools,
            held: String::new(),
            tool_text: String::new(),
            strip: false,
        }
    }

    /// Takes a delta and returns what can be released now.
    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        self.held.push_str(delta);
        let mut out = Vec::new();
        loop {
            match self.mode {
                Mode::Start => {
                    let t = self.held.trim_start();
                    if let Some(after) = t.strip_prefix(THINK) {
                        self.held = after.to_string();
                        self.mode = Mode::Reasoning;
                    } else if THINK.starts_with(t) {
                        return out; // all whitespace or a prefix of <think>: wait
                    } else {
                        self.mode = Mode::Content;
                    }
                }
                Mode::Reasoning => {
                    if let Some(i) = self.held.find(END_THINK) {
                        let r = self.held[..i].to_string();
                        let rest = self.held[i + END_THINK.len()..].to_string();
                        self.strip = true;
                        if !r.is_empty() {
                            out.push(Piece::Reasoning(r));
                        }
                        self.held = rest;
                        self.mode = Mode::Content;
                    } else {
                        let keep = partial_suffix(&self.held, END_THINK);
                        let r: String = self.held.drain(..self.held.len() - keep).collect();
                        if !r.is_empty() {
                            out.push(Piece::Reasoning(r));
                        }
                        return out;
                    }
                }
                Mode::Content => {
                    if self.strip {
                        let t = self.held.trim_start();
                        if t.is_empty() {
                            self.held.clear();
                            return out;
                        }
                        self.held = t.to_string();
                        self.strip = false;
                    }
                    let Some(f) = self.tools else {
                        let c = std::mem::take(&mut self.held);
                        if !c.is_empty() {
                            out.push(Piece::Content(c));
                        }
                        return out;
                    };
                    let marker = f.start_marker();
                    if let Some(i) = self.held.find(marker) {
                        let c = self.held[..i].to_string();
                        self.tool_text = self.held[i..].to_string();
                        self.held.clear();
                        if !c.is_empty() {
                            out.push(Piece::Content(c));
                        }
                        self.mode = Mode::Tools;
                    } else {
                        let keep = partial_suffix(&self.held, marker);
                        let c: String = self.held.drain(..self.held.len() - keep).collect();
                        if !c.is_empty() {
                            out.push(Piece::Content(c));
                        }
                        return out;
                    }
                }
                Mode::Tools => {
                    let t = std::mem::take(&mut self.held);
                    self.tool_text.push_str(&t);
                    return out;
                }
            }
        }
    }

    /// The end of the choice: what was held back, and the tool calls. Malformed calls come
    /// back as content.
    pub fn finish(&mut self) -> (Vec<Piece>, Vec<(String, String)>) {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        match self.mode {
            Mode::Reasoning if !held.is_empty() => out.push(Piece::Reasoning(held)),
            Mode::Start | Mode::Content if !held.is_empty() => out.push(Piece::Content(held)),
            Mode::Tools => self.tool_text.push_str(&held),
            _ => {}
        }
        let mut calls = Vec::new();
        if self.mode == Mode::Tools {
            let text = std::mem::take(&mut self.tool_text);
            match self.tools.and_then(|f| f.parse(&text)) {
                Some(c) => calls = c,
                None => out.push(Piece::Content(text)),
            }
        }
        let _ = self.think;
        (out, calls)
    }

    /// Splits a whole text at once.
    pub fn split_all(mut self, text: &str) -> Parsed {
        let mut p = Parsed::default();
        let mut pieces = self.push(text);
        let (rest, calls) = self.finish();
        pieces.extend(rest);
        for x in pieces {
            match x {
                Piece::Content(c) => p.content.push_str(&c),
                Piece::Reasoning(r) => p.reasoning.push_str(&r),
            }
        }
        p.calls = calls;
        p
    }
}

/// The OpenAI `tool_calls` entry of call `i` of a choice (`id` is unique per response).
pub fn tool_call_json(id: &str, name: &str, args: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(think: bool, open: bool, f: Option<ToolFormat>, text: &str) -> Parsed {
        ChatSplitter::new(think, open, f).split_all(text)
    }

    /// Feeding the text one character at a time gives what one push gives.
    fn streamed(think: bool, open: bool, f: Option<ToolFormat>, text: &str) -> Parsed {
        let mut s = ChatSplitter::new(think, open, f);
        let mut p = Parsed::default();
        let mut pieces = Vec::new();
        for ch in text.chars() {
            pieces.extend(s.push(&ch.to_string()));
        }
        let (rest, calls) = s.finish();
        pieces.extend(rest);
        for x in pieces {
            match x {
                Piece::Content(c) => p.content.push_str(&c),
                Piece::Reasoning(r) => p.reasoning.push_str(&r),
            }
        }
        p.calls = calls;
        p
    }

    fn both(think: bool, open: bool, f: Option<ToolFormat>, text: &str) -> Parsed {
        let a = split(think, open, f, text);
        assert_eq!(a, streamed(think, open, f, text), "{text:?}");
        a
    }

    fn call(n: &str, a: &str) -> (String, String) {
        (n.to_string(), a.to_string())
    }

    #[test]
    fn hermes_calls_and_content_before_them() {
        let p = both(
            false,
            false,
            Some(ToolFormat::Hermes),
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\":\"now\",\"arguments\":{}}\n</tool_call>",
        );
        assert_eq!(p.content, "Let me check.\n");
        assert_eq!(
            p.calls,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("now", "{}")
            ]
        );
    }

    #[test]
    fn malformed_calls_come_back_as_content() {
        for text in [
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call>",
            "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"f\"",
            "<tool_call>{\"name\": \"f\"}</tool_call> trailing",
        ] {
            let p = both(false, false, Some(ToolFormat::Hermes), text);
            assert!(p.calls.is_empty(), "{text}");
            assert_eq!(p.content, text);
        }
        // A marker-like text that never becomes the marker is content.
        let p = both(false, false, Some(ToolFormat::Hermes), "a <tool b");
        assert_eq!((p.content.as_str(), p.calls.len()), ("a <tool b", 0));
    }

    #[test]
    fn reasoning_is_split_off() {
        let p = both(true, false, None, "<think>\nhmm, 2+2</think>\n\nIt is 4.");
        assert_eq!(p.reasoning, "\nhmm, 2+2");
        assert_eq!(p.content, "It is 4.");
        // The prompt opened <think> already.
        let p = both(true, true, None, "so 4</think>4");
        assert_eq!((p.reasoning.as_str(), p.content.as_str()), ("so 4", "4"));
        // Never closed: all reasoning; a model that does not think: all content.
        let p = both(true, true, None, "still thinking");
        assert_eq!(
            (p.reasoning.as_str(), p.content.as_str()),
            ("still thinking", "")
        );
        let p = both(true, false, None, "no thoughts <think> here");
        assert_eq!(
            (p.reasoning.as_str(), p.content.as_str()),
            ("", "no thoughts <think> here")
        );
        // Reasoning, then a call.
        let p = both(
            true,
            false,
            Some(ToolFormat::Hermes),
            "<think>use f</think><tool_call>{\"name\":\"f\",\"arguments\":{\"x\":[1]}}</tool_call>",
        );
        assert_eq!(p.reasoning, "use f");
        assert_eq!(p.calls, vec![call("f", r#"{"x":[1]}"#)]);
    }

    #[test]
    fn mistral_both_versions() {
        let p = both(
            false,
            false,
            Some(ToolFormat::Mistral),
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {}}]",
        );
        assert_eq!(p.calls, vec![call("a", r#"{"x":1}"#), call("b", "{}")]);
        let p = both(
            false,
            false,
            Some(ToolFormat::Mistral),
            "[TOOL_CALLS]a[ARGS]{\"x\": 1}[TOOL_CALLS]b[ARGS]{}",
        );
        assert_eq!(p.calls, vec![call("a", r#"{"x":1}"#), call("b", "{}")]);
        let bad = "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": ";
        let p = both(false, false, Some(ToolFormat::Mistral), bad);
        assert_eq!((p.content.as_str(), p.calls.len()), (bad, 0));
    }

    #[test]
    fn deepseek_v3_calls() {
        let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let p = both(false, false, Some(ToolFormat::DeepSeekV3), text);
        assert_eq!(
            p.calls,
            vec![
                call("get_weather", r#"{"city":"Paris"}"#),
                call("now", "{}")
            ]
        );
        let bad = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\":\n```";
        let p = both(false, false, Some(ToolFormat::DeepSeekV3), bad);
        assert_eq!((p.content.as_str(), p.calls.len()), (bad, 0));
    }

    #[test]
    fn glm45_argument_tags() {
        let text = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>";
        let p = both(false, false, Some(ToolFormat::Glm45), text);
        assert_eq!(
            p.calls,
            vec![call("get_weather", r#"{"city":"Paris","days":3}"#)]
        );
        let bad = "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</tool_call>";
        let p = both(false, false, Some(ToolFormat::Glm45), bad);
        assert_eq!((p.content.as_str(), p.calls.len()), (bad, 0));
    }

    #[test]
    fn harmony_calls() {
        let text = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>";
        let p = both(false, false, Some(ToolFormat::Harmony), text);
        assert_eq!(p.calls, vec![call("get_weather", r#"{"city":"Paris"}"#)]);
        assert_eq!(p.content, "");
        let bad = "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{\"a\"<|call|>";
        let p = both(false, false, Some(ToolFormat::Harmony), bad);
        assert_eq!((p.content.as_str(), p.calls.len()), (bad, 0));
    }

    #[test]
    fn formats_are_detected_from_templates() {
        assert_eq!(
            ToolFormat::detect("{{ '<tool_call>' }}"),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolFormat::detect("<tool_call>{{ name }}<arg_key>"),
            Some(ToolFormat::Glm45)
        );
        assert_eq!(
            ToolFormat::detect("[TOOL_CALLS]"),
            Some(ToolFormat::Mistral)
        );
        assert_eq!(
            ToolFormat::detect("<｜tool▁calls▁begin｜>"),
            Some(ToolFormat::DeepSeekV3)
        );
        assert_eq!(ToolFormat::detect("<|channel|>"), Some(ToolFormat::Harmony));
        assert_eq!(ToolFormat::detect("plain chatml"), None);
        for n in ToolFormat::NAMES {
            assert!(ToolFormat::from_name(n).is_some(), "{n}");
        }
    }
}
