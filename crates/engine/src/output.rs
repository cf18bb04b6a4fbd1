//! What a request's stream carries, and the per-request output state on its replica
//! (incremental detokenizer, stop strings).

use tandem_core::RequestId;
use tandem_model::tokenizer::IncrementalDecoder;
use tandem_model::Tokenizer;
use tandem_sched::{FinishReason, FinishedSeq, StopMatcher};
use tokio::sync::mpsc::UnboundedSender;

/// One event of a request: a new token (with its text delta), or the end.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub id: RequestId,
    pub token: Option<u32>,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
    /// Text released by this event (held back while it could still become a stop string).
    pub text: String,
    pub finish: Option<Finish>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub preemptions: u32,
}

pub struct RequestState {
    tx: UnboundedSender<RequestOutput>,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    prompt_len: usize,
}

impl RequestState {
    pub fn new(
        tx: UnboundedSender<RequestOutput>,
        stops: &[String],
        include_stop: bool,
        prompt_len: usize,
    ) -> Self {
        Self {
            tx,
            decoder: IncrementalDecoder::new(),
            stop: StopMatcher::new(stops, include_stop),
            prompt_len,
        }
    }

    /// Text for a new token and whether it completed a stop string.
    pub fn push_token(
        &mut self,
        tok: Option<&Tokenizer>,
        token: u32,
        is_final: bool,
    ) -> Result<(String, bool), tandem_model::ModelError> {
        let Some(tk) = tok else {
            return Ok((String::new(), false));
        };
        if self.stop.stopped() {
            return Ok((String::new(), true));
        }
        let delta = self.decoder.push(tk, token)?;
        let p = self.stop.push(&delta);
        let mut text = p.emit;
        if is_final && !p.stopped {
            text.push_str(&self.stop.flush());
        }
        Ok((text, p.stopped))
    }

    /// False when the client has gone away.
    pub fn send(&self, o: RequestOutput) -> bool {
        self.tx.send(o).is_ok()
    }

    pub fn finish(mut self, f: FinishedSeq) {
        let text = if self.stop.stopped() {
            String::new()
        } else {
            self.stop.flush()
        };
        let _ = self.tx.send(RequestOutput {
            id: f.id,
            token: None,
            logprob: None,
            top_logprobs: vec![],
            text,
            finish: Some(Finish {
                reason: f.reason,
                prompt_tokens: f.prompt_len,
                completion_tokens: f.output_token_ids.len(),
                cached_tokens: f.num_cached_tokens,
                preemptions: f.num_preemptions,
            }),
        });
    }

    pub fn finish_error(self, id: RequestId, msg: String) {
        let _ = self.tx.send(RequestOutput {
            id,
            token: None,
            logprob: None,
            top_logprobs: vec![],
            text: String::new(),
            finish: Some(Finish {
                reason: FinishReason::Error(msg),
                prompt_tokens: self.prompt_len,
                completion_tokens: 0,
                cached_tokens: 0,
                preemptions: 0,
            }),
        });
    }
}
