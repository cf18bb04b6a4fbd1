//! The official `openai` Python client against the server, run by the Python in
//! `TANDEM_PYTHON` (default `python3`; `.ci/run` points it at a venv it makes). When that
//! Python cannot `import openai` the test is skipped with a message, so `cargo test
//! --workspace` passes without Python, except under `CI=true`, where it fails: in CI the
//! client is installed, and a test that silently skips there never runs.

mod common;

use common::{bounded, TestServer, MODEL};
use std::time::Duration;

const SCRIPT: &str = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=60)
model = sys.argv[2]
assert [m.id for m in c.models.list().data] == [model]
r = c.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4, r
r = c.chat.completions.create(model=model, messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
                              max_completion_tokens=3, temperature=0, logprobs=True, top_logprobs=2, n=2, seed=1,
                              extra_body={"ignore_eos": True})
assert len(r.choices) == 2 and r.choices[0].message.role == "assistant", r
assert len(r.choices[0].logprobs.content) == 3 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2, r
full = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].message.content
text, usage = "", None
for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
                                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
    if ch.usage is not None:
        usage = ch.usage
    for choice in ch.choices:
        text += choice.delta.content or ""
assert text == full and usage.completion_tokens == 6, (text, full, usage)
try:
    c.completions.create(model="no-such-model", prompt="x")
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError:
    pass
try:
    c.completions.create(model=model, prompt="x", temperature=-1)
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert "temperature" in str(e), e
print("OPENAI CLIENT OK")
"#;

/// The client with `api_key` against a server that requires one: the right key is served,
/// a wrong one raises `AuthenticationError` (a 401 in OpenAI's shape).
const SCRIPT_KEY: &str = r#"
import sys, openai
base, model, key = sys.argv[1] + "/v1", sys.argv[2], sys.argv[3]
c = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
assert [m.id for m in c.models.list().data] == [model]
r = c.completions.create(model=model, prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
assert r.usage.completion_tokens == 3, r
text, chunks = "", 0
for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                    temperature=0, stream=True, extra_body={"ignore_eos": True}):
    for choice in ch.choices:
        chunks += 1
        text += choice.delta.content or ""
# The stream (greedy) carries the same text as the same request answered whole.
whole = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                  temperature=0, extra_body={"ignore_eos": True})
assert whole.usage.completion_tokens == 3, whole
assert chunks >= 3, chunks
assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
bad = openai.OpenAI(base_url=base, api_key=key + "x", max_retries=0, timeout=60)
for call in (lambda: bad.models.list(),
             lambda: bad.completions.create(model=model, prompt="x", max_tokens=1),
             lambda: bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], stream=True)):
    try:
        call()
        raise SystemExit("expected AuthenticationError")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.code == "invalid_api_key", e
        assert key not in str(e), e
print("OPENAI CLIENT KEY OK")
"#;

/// The Python to run the client with.
fn python() -> String {
    std::env::var("TANDEM_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn have_openai(python: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The Python that has the client, or `None` (after saying so) when the test is skipped:
/// never under `CI=true`, where a missing client fails the test.
fn client_python(test: &str) -> Option<String> {
    let python = python();
    if have_openai(&python) {
        return Some(python);
    }
    let why = format!(
        "{python} cannot import the `openai` package (pip install openai, or set \
         TANDEM_PYTHON to a Python that has it)"
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {why}"
    );
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// Runs `script` with `args` under `python` (bounded) and checks it printed `done`.
async fn run_client(python: &str, script: &str, args: &[&str], done: &str) {
    let child = tokio::process::Command::new(python)
        .args(["-c", script])
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .expect("python finished in time")
        .expect("python ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(done),
        "openai client failed:\n{stdout}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client() {
    let Some(python) = client_python("official_openai_python_client") else {
        return;
    };
    bounded(async {
        let s = TestServer::start(64).await;
        run_client(&python, SCRIPT, &[&s.base, MODEL], "OPENAI CLIENT OK").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client_with_api_key() {
    let Some(python) = client_python("official_openai_python_client_with_api_key") else {
        return;
    };
    bounded(async {
        let key = "sk-tandem-test-key";
        let s = TestServer::start_opts(tandem_server::ServerOptions {
            api_key: Some(tandem_server::ApiKey::new(key, "test").expect("key")),
            ..common::test_options()
        })
        .await;
        run_client(
            &python,
            SCRIPT_KEY,
            &[&s.base, MODEL, key],
            "OPENAI CLIENT KEY OK",
        )
        .await;
    })
    .await;
}

/// A Hermes/Qwen-style chat template that renders `tools`, assistant `tool_calls` and
/// `tool` messages (the fixture's own ChatML template has no tools).
pub const TOOL_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}# Tools
<tools>
{%- for tool in tools %}
{{ tool.function | tojson }}
{%- endfor %}
</tools>
Call: <tool_call>{"name": NAME, "arguments": ARGS}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

/// Tools and structured output through the official client, on random weights: only the
/// constraint can make these calls and this JSON valid.
const SCRIPT_TOOLS: &str = r#"
import sys, json, openai, jsonschema
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0, timeout=60)
model = sys.argv[2]
weather = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
           "days": {"type": "integer", "minimum": 1, "maximum": 5}},
           "required": ["city", "days"], "additionalProperties": False}
clock = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
         "additionalProperties": False}
tools = [{"type": "function", "function": {"name": "weather", "parameters": weather}},
         {"type": "function", "function": {"name": "now", "parameters": clock}}]
schemas = {"weather": weather, "now": clock}
msgs = [{"role": "user", "content": "weather?"}]

def check_calls(calls):
    assert calls, calls
    for tc in calls:
        assert tc.type == "function" and tc.id, tc
        jsonschema.validate(json.loads(tc.function.arguments), schemas[tc.function.name])

for seed in range(3):
    r = c.chat.completions.create(model=model, messages=msgs, tools=tools, tool_choice="required", max_tokens=120,
                                  temperature=1.0, seed=seed, parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert len(ch.message.tool_calls) == 1, ch
    check_calls(ch.message.tool_calls)
r = c.chat.completions.create(model=model, messages=msgs, tools=tools, max_tokens=100, temperature=1.0, seed=5,
                              tool_choice={"type": "function", "function": {"name": "now"}})
calls = r.choices[0].message.tool_calls
assert [t.function.name for t in calls] == ["now"], r
check_calls(calls)

# Streamed calls reassemble to the non-streamed answer (same seed): id, type and name first.
kw = dict(model=model, messages=msgs, tools=tools, tool_choice="required", max_tokens=120, temperature=1.0,
          seed=11, parallel_tool_calls=False)
full = c.chat.completions.create(**kw).choices[0]
acc, finish = {}, None
for chunk in c.chat.completions.create(stream=True, **kw):
    for ch in chunk.choices:
        finish = ch.finish_reason or finish
        for tc in ch.delta.tool_calls or []:
            if tc.index not in acc:
                assert tc.id and tc.type == "function" and tc.function.name, tc
                acc[tc.index] = {"name": tc.function.name, "arguments": ""}
            acc[tc.index]["arguments"] += tc.function.arguments or ""
assert finish == "tool_calls", finish
got = [(a["name"], json.loads(a["arguments"])) for a in acc.values()]
want = [(t.function.name, json.loads(t.function.arguments)) for t in full.message.tool_calls]
assert got == want, (got, want)

# JSON schema output: valid, and ended by the constraint ("stop") within a small max_tokens.
person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
          "age": {"type": "integer", "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}
for seed in range(3):
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "a person"}], max_tokens=100,
                                  temperature=1.0, seed=seed,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "person", "schema": person, "strict": True}})
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch
    try:
        got = json.loads(ch.message.content)
    except ValueError as e:
        raise SystemExit(f"not JSON: {ch.message.content!r} {r}")
    jsonschema.validate(got, person)
r = c.chat.completions.create(model=model, messages=msgs, max_tokens=60, temperature=1.0, seed=3,
                              response_format={"type": "json_object"})
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(r.choices[0].message.content), dict), r
else:
    assert r.choices[0].finish_reason == "length", r
r = c.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=1.0, seed=1,
                              extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop", r

# A tool-result round trip.
call = full.message.tool_calls[0]
history = msgs + [{"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
          "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
r = c.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=5, temperature=0)
assert r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r

# Refusals name the parameter.
for bad, param in [(dict(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
                   (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema":
                        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}), "response_format")]:
    try:
        c.chat.completions.create(model=model, messages=msgs, max_tokens=5, **bad)
        raise SystemExit("expected BadRequestError")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, e.body
print("OPENAI TOOLS OK")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client_tools_and_json() {
    let Some(python) = client_python("official_openai_python_client_tools_and_json") else {
        return;
    };
    if !std::process::Command::new(&python)
        .args(["-c", "import jsonschema"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: {python} cannot import jsonschema"
        );
        eprintln!("SKIPPED: {python} cannot import jsonschema");
        return;
    }
    bounded(async {
        let s = TestServer::start_template(common::test_options(), TOOL_TEMPLATE).await;
        run_client(&python, SCRIPT_TOOLS, &[&s.base, MODEL], "OPENAI TOOLS OK").await;
    })
    .await;
}
