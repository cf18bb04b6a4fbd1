//! Structured output: token constraints compiled with llguidance.
//!
//! Why llguidance: it is a maintained Rust crate (MIT, used by mistral.rs, llama.cpp,
//! vLLM and SGLang as a backend), it takes every form the API needs (JSON schema with
//! `strict`, regex, choice lists as a Lark grammar, Lark grammars with embedded JSON
//! schemas, which is how tool calls are written), it refuses unsupported schema keywords
//! instead of ignoring them, and its masks are computed lazily over a token trie in tens of
//! microseconds, with no per-schema precompilation over the vocabulary (xgrammar's model),
//! so a new schema costs nothing before its first token. The token trie is built here from
//! the tokenizer's own `tokenizer.json` (llguidance's `token_bytes_from_tokenizer_json`)
//! rather than through `toktrie_hf_tokenizers`, which pins an older `tokenizers`.
//!
//! # Where the mask is computed
//! Each constrained sequence owns a worker thread sharing its llguidance `Matcher`. After
//! the sampler takes a token, [`TokenConstraint::commit`] advances the matcher itself
//! (microseconds, under an uncontended lock; it must say whether the structure is complete)
//! and asks the worker for the *next* mask, which it computes while the replica runs the
//! next forward pass. [`TokenConstraint::apply`] before the next sample only
//! waits when the mask is not ready yet (the time it waits is the mask's cost to decoding).
//!
//! # What it costs (histograms, one sample per constrained token)
//! - [`MASK_SECONDS`]: the time the matcher took to compute the token's mask (on its
//!   thread, overlapped with the forward pass; the first mask is computed when the request
//!   is compiled, before it reaches the engine);
//! - [`MASK_WAIT_SECONDS`]: the time the step waited for that mask after the forward pass
//!   had finished (0 when it was ready): the mask's real cost to decoding;
//! - [`COMMIT_SECONDS`]: the time the step spent advancing the matcher by the sampled token
//!   (it has to know whether the structure is complete).
//!
//! They are recorded with the `metrics` crate (the server exports them on `/metrics`; its
//! upkeep, run every few thousand of its own samples, drains these too).
//!
//! # Bounds
//! JSON is compiled with `whitespace_flexible: false` (`,` and `:` with no spaces, no
//! whitespace between tokens), so a constrained generation cannot spin on whitespace;
//! `maxLength`, `maxItems`, `enum`, `const` and integer bounds are llguidance's own. When
//! the structure is complete only EOS is allowed, and the sequence ends with `stop`.

pub use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_model::Tokenizer;
use tandem_sched::{Commit, TokenConstraint};

/// Histogram: seconds the matcher took to compute one token's mask (see the module docs).
pub const MASK_SECONDS: &str = "tandem_constraint_mask_seconds";
/// Histogram: seconds a step waited for a token's mask after the forward pass.
pub const MASK_WAIT_SECONDS: &str = "tandem_constraint_mask_wait_seconds";
/// Histogram: seconds a step waited for the matcher to take a sampled token.
pub const COMMIT_SECONDS: &str = "tandem_constraint_commit_seconds";

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON schema (OpenAI's `json_schema`, vLLM's `json`).
    JsonSchema(Value),
    /// Any JSON object (`json_object`).
    JsonObject,
    /// A regular expression the whole output matches (Rust `regex` syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax (may embed `%json {schema}`).
    Lark(String),
}

/// Whether the model may reason (`<think>...</think>`) before the constrained part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reasoning {
    /// The constraint starts at the first token.
    #[default]
    None,
    /// The output may start with `<think>...</think>`, unconstrained, then the constraint.
    Optional,
    /// The prompt opened `<think>`: free text up to `</think>`, then the constraint.
    Open,
}

/// Compiles [`ConstraintSpec`]s for one tokenizer (the token trie is built once).
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// A JSON string literal, which is also a Lark string literal.
pub fn lark_str(s: &str) -> String {
    // JSON's escapes are a subset of Lark's; '/' needs none in either.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `schema` with the compact-JSON options (no free whitespace): see the module docs.
pub fn compact_schema(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Value::Object(m) = &mut s {
        m.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"}),
        );
    }
    s
}

impl Grammars {
    /// The token trie of `tok` (its `tokenizer.json`), padded to the model's `vocab` with
    /// placeholders no grammar allows; `eos` are the ids that end a sequence.
    pub fn new(tok: &Tokenizer, eos: &[u32], vocab: usize) -> Result<Self, String> {
        let tj = serde_json::to_value(tok.inner())
            .map_err(|e| format!("cannot read the tokenizer's vocabulary: {e}"))?;
        let mut words = std::panic::catch_unwind(|| {
            llguidance::token_bytes_from_tokenizer_json(&tj).map_err(|e| e.to_string())
        })
        .map_err(|_| "the tokenizer's vocabulary cannot be read as bytes".to_string())?
        .map_err(|e| format!("structured output is not available for this tokenizer: {e}"))?;
        if words.len() > vocab {
            return Err(format!(
                "the tokenizer has {} tokens, more than the model's vocabulary ({vocab})",
                words.len()
            ));
        }
        while words.len() < vocab {
            let mut w = format!(".<[{}]>", words.len()).into_bytes();
            w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(w);
        }
        let first_eos = eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(vocab as u32, first_eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(Env { trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// The Lark grammar (or grammar object) for `spec` after `reasoning`.
    pub fn grammar(spec: &ConstraintSpec, reasoning: Reasoning) -> TopLevelGrammar {
        let body = match spec {
            ConstraintSpec::JsonSchema(s) => {
                if reasoning == Reasoning::None {
                    return TopLevelGrammar::from_json_schema(compact_schema(s));
                }
                format!("%json {}", compact_schema(s))
            }
            ConstraintSpec::JsonObject => {
                let s = json!({"type": "object"});
                if reasoning == Reasoning::None {
                    return TopLevelGrammar::from_json_schema(compact_schema(&s));
                }
                format!("%json {}", compact_schema(&s))
            }
            ConstraintSpec::Regex(r) => {
                if reasoning == Reasoning::None {
                    return TopLevelGrammar::from_regex(r);
                }
                format!("/{}/", llguidance::regex_to_lark(r, ""))
            }
            ConstraintSpec::Choice(c) => c
                .iter()
                .map(|s| lark_str(s))
                .collect::<Vec<_>>()
                .join(" | "),
            ConstraintSpec::Lark(g) => {
                if reasoning == Reasoning::None {
                    return TopLevelGrammar::from_lark(g.clone());
                }
                // The user's grammar under its own start rule, renamed.
                let renamed = g.replacen("start:", "user_start:", 1);
                return TopLevelGrammar::from_lark(format!(
                    "start: {} user_start\n{}\n{renamed}",
                    reasoning_rule_ref(reasoning),
                    reasoning_rules(reasoning)
                ));
            }
        };
        Self::lark(&body, "", reasoning)
    }

    /// A Lark grammar whose `body` rule is `body` (with helper rules `rules`), after the
    /// reasoning `reasoning` allows.
    pub fn lark(body: &str, rules: &str, reasoning: Reasoning) -> TopLevelGrammar {
        TopLevelGrammar::from_lark(format!(
            "start: {}body\nbody: {body}\n{rules}{}",
            reasoning_rule_ref(reasoning),
            reasoning_rules(reasoning)
        ))
    }

    /// Checks `spec` (a bad schema, regex or grammar is an error naming the problem) and
    /// returns a constraint for one sequence.
    pub fn compile(
        &self,
        spec: &ConstraintSpec,
        reasoning: Reasoning,
    ) -> Result<Box<dyn TokenConstraint>, String> {
        if let ConstraintSpec::Choice(c) = spec {
            if c.is_empty() {
                return Err("the choice list is empty".into());
            }
        }
        self.compile_grammar(Self::grammar(spec, reasoning))
    }

    /// A constraint from a grammar object (tool calls build their own).
    pub fn compile_grammar(&self, g: TopLevelGrammar) -> Result<Box<dyn TokenConstraint>, String> {
        let factory = self.factory.clone();
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            factory.create_parser(g)
        }))
        .map_err(|_| "the grammar could not be compiled".to_string())?
        .map_err(|e| e.to_string())?;
        let mut m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(e);
        }
        // An unsatisfiable constraint fails here rather than at the first token.
        let t = Instant::now();
        let first = m.compute_mask().map_err(|e| e.to_string())?;
        let took = t.elapsed();
        if first.num_set() == 0 {
            return Err("the constraint allows no token".into());
        }
        Ok(Box::new(LlgConstraint::spawn(m, first, took)))
    }
}

fn reasoning_rule_ref(r: Reasoning) -> &'static str {
    match r {
        Reasoning::None => "",
        Reasoning::Optional => "(think THINK_SP?)? ",
        Reasoning::Open => "think_rest THINK_SP? ",
    }
}

fn reasoning_rules(r: Reasoning) -> &'static str {
    match r {
        Reasoning::None => "",
        Reasoning::Optional => {
            "think[lazy]: /<think>(.|\\n)*<\\/think>/\nTHINK_SP: /[ \\n]{1,4}/\n"
        }
        Reasoning::Open => "think_rest[lazy]: /(.|\\n)*<\\/think>/\nTHINK_SP: /[ \\n]{1,4}/\n",
    }
}

/// A mask computed on the sequence's thread, and the time the matcher took for it.
type MaskReply = (Result<llguidance::toktrie::SimpleVob, String>, Duration);

/// A sequence's matcher, shared with its own thread (see the module docs).
///
/// The step takes the sampled token itself (`consume_token` under the lock, microseconds):
/// handing it to the thread and waiting for its answer cost a thread wake-up per token,
/// serial over the batch, and on a loaded host that wake-up took milliseconds now and then.
/// The thread only computes masks; the lock is free when the step commits, because the
/// step got the mask (the thread's last use) before it sampled.
struct LlgConstraint {
    matcher: Arc<Mutex<Matcher>>,
    /// Asks the thread for the mask after the last committed token.
    tx: Sender<()>,
    rx: Receiver<MaskReply>,
    mask: Option<llguidance::toktrie::SimpleVob>,
    /// The compute time of the first mask (made before the engine had the request), not
    /// recorded yet: it is recorded with the first token, which waits for nothing.
    first: Option<Duration>,
    /// The matcher refused a token: every later call fails with this (no mask will come).
    failed: Option<String>,
}

impl LlgConstraint {
    fn spawn(m: Matcher, first: llguidance::toktrie::SimpleVob, took: Duration) -> Self {
        let matcher = Arc::new(Mutex::new(m));
        let (tx, cmd_rx) = channel::<()>();
        let (reply_tx, rx) = channel::<MaskReply>();
        let shared = matcher.clone();
        let spawned = std::thread::Builder::new()
            .name("tandem-constraint".into())
            .spawn(move || {
                // The mask after each committed token, computed as soon as it is known.
                while let Ok(()) = cmd_rx.recv() {
                    let t = Instant::now();
                    let mask = match shared.lock() {
                        Ok(mut m) => m.compute_mask_or_eos().map_err(|e| e.to_string()),
                        Err(_) => Err("the constraint's lock is poisoned".to_string()),
                    };
                    if reply_tx.send((mask, t.elapsed())).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a constraint thread: {e}");
        }
        Self {
            matcher,
            tx,
            rx,
            mask: Some(first),
            first: Some(took),
            failed: None,
        }
    }
}

impl TokenConstraint for LlgConstraint {
    fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mask = match self.mask.take() {
            Some(m) => {
                if let Some(took) = self.first.take() {
                    metrics::histogram!(MASK_SECONDS).record(took.as_secs_f64());
                    metrics::histogram!(MASK_WAIT_SECONDS).record(0.0);
                }
                m
            }
            None => {
                let t = Instant::now();
                let (m, took) = self
                    .rx
                    .recv()
                    .map_err(|_| "the constraint's thread stopped".to_string())?;
                metrics::histogram!(MASK_WAIT_SECONDS).record(t.elapsed().as_secs_f64());
                metrics::histogram!(MASK_SECONDS).record(took.as_secs_f64());
                m?
            }
        };
        apply_mask(&mask, logits);
        // Kept until the token is committed (apply may be called again for the same step).
        self.mask = Some(mask);
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<Commit, String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.mask = None;
        self.first = None;
        let t = Instant::now();
        let stopped = match self.matcher.lock() {
            Ok(mut m) => m
                .consume_token(token)
                .map(|()| m.is_stopped())
                .map_err(|e| e.to_string()),
            Err(_) => Err("the constraint's lock is poisoned".to_string()),
        };
        let stopped = match stopped {
            Ok(s) => s,
            Err(e) => {
                self.failed = Some(e.clone());
                return Err(e);
            }
        };
        metrics::histogram!(COMMIT_SECONDS).record(t.elapsed().as_secs_f64());
        // The next mask (only EOS once stopped) while the next forward pass runs.
        self.tx
            .send(())
            .map_err(|_| "the constraint's thread stopped".to_string())?;
        Ok(if stopped {
            Commit::Done
        } else {
            Commit::Continue
        })
    }
}

/// Sets every logit whose token the mask does not allow to `-inf` (tokens past the mask's
/// end too).
fn apply_mask(mask: &llguidance::toktrie::SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX && chunk.len() == 32 {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_follow_the_vob_layout() {
        let mut v = llguidance::toktrie::SimpleVob::alloc(70);
        for t in [0u32, 31, 32, 65] {
            v.allow_token(t);
        }
        let mut l = vec![1.0f32; 70];
        apply_mask(&v, &mut l);
        let allowed: Vec<usize> = (0..70).filter(|&i| l[i].is_finite()).collect();
        assert_eq!(allowed, vec![0, 31, 32, 65]);
    }
}
