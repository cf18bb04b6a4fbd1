//! Continuous-batching scheduler (vLLM v1 / nano-vllm style) over a paged KV cache.
//!
//! One engine step is `schedule()` -> run the model on the [`SchedulerOutput`] -> sample ->
//! `update()`. The scheduler never sees a tensor: its output is plain token ids, positions and
//! block tables. An attention replica that pipelines micro-batches across iterations splits
//! the scheduler into lanes ([`Scheduler::set_lanes`]) whose steps are in flight at the same
//! time; the policy below then holds per lane (preemption picks the lane's newest sequence).
//!
//! # Policy
//! * **FCFS.** Requests get an arrival number at [`Scheduler::add`]. The running list and the
//!   waiting queue are both kept in arrival order, and every running request arrived before
//!   every waiting one.
//! * **Running first.** Each running sequence gets its next tokens: the rest of its prompt
//!   (chunked, see below) or one decode token. If a decode needs a new block and none is free,
//!   the *most recently arrived* running sequence is preempted by recompute: its blocks are
//!   freed and it goes back to the waiting queue (at the front, by arrival order) keeping its
//!   outputs, so that its recompute prompt is prompt + outputs so far. That may be the
//!   sequence being scheduled itself. The oldest running sequence therefore always progresses.
//! * **Then admission**, in order, while `max_num_seqs`, the token budget and the free blocks
//!   allow, and only in steps that preempted nothing. Admission is strictly in order: if the
//!   head of the queue does not fit, nobody behind it is admitted.
//! * **Blocks.** An admitted sequence gets blocks for its whole (recompute) prompt at once,
//!   sharing cached full blocks of its prefix ([`BlockManager::allocate`]); decodes grow the
//!   table one block at a time. Prefix-cache hits count as computed tokens and are skipped.
//! * **Chunked prefill.** A prompt is computed in pieces of at most the remaining token
//!   budget (and at most `long_prefill_chunk` tokens per step, if set); a token is sampled
//!   only when the last prompt token is computed ([`ScheduledSeq::samples`]).
//! * **Never deadlocks.** [`Scheduler::add`] rejects a prompt of `max_model_len` tokens or
//!   more (capped by the cache's `num_blocks * block_size` slots) and a sequence finishes with
//!   [`FinishReason::Length`] when it reaches that length, so one sequence alone always fits.
//!
//! # KV-cache layout
//! The token at position `p` of a sequence lives in block `block_table[p / block_size]` at
//! offset `p % block_size` (flat slot `block_table[p / block_size] * block_size + p %
//! block_size`). A step writes the KV of `token_ids` at positions `start_pos..start_pos +
//! token_ids.len()` and attends over positions `0..start_pos + token_ids.len()`.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use tandem_core::RequestId;
use thiserror::Error;

use crate::block_manager::{BlockError, BlockId, BlockManager, PrefixCacheStats};
use crate::constraint::{Commit, ConstraintSlot, TokenConstraint};
use crate::sampling::{
    RequestRng, SampleError, Sampled, Sampler, SamplingParams, SamplingParamsError,
};

/// Limits of one replica's scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Most sequences running at once (holding KV blocks).
    pub max_num_seqs: usize,
    /// Most tokens computed in one step, over all sequences.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// KV-cache blocks of this replica.
    pub num_blocks: usize,
    /// Share computed full blocks between sequences with the same prefix.
    pub enable_prefix_caching: bool,
    /// Most prompt tokens one sequence computes per step (`None`: limited by the budget only).
    pub long_prefill_chunk: Option<usize>,
    /// Longest sequence (prompt + output) the model supports (`None`: the cache size).
    pub max_model_len: Option<usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            num_blocks: 1024,
            enable_prefix_caching: true,
            long_prefill_chunk: None,
            max_model_len: None,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// EOS, a stop token id, or a stop string (reported by the caller through `finish`).
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
    /// Cancelled by the client.
    Abort,
    /// Failed (e.g. the model produced no usable logits).
    Error(String),
}

impl FinishReason {
    /// OpenAI's `finish_reason` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error(_) => "error",
        }
    }
}

/// Where a live sequence is. Finished sequences leave the scheduler (as [`FinishedSeq`]), so
/// there is no "finished" state to observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceStatus {
    /// Queued: no KV blocks. A preempted sequence is waiting again.
    Waiting,
    /// Holding KV blocks; scheduled each step as budget allows.
    Running,
}

/// One request as the scheduler tracks it.
#[derive(Debug, Clone)]
pub struct Sequence {
    id: RequestId,
    /// Prompt then outputs.
    token_ids: Vec<u32>,
    prompt_len: usize,
    num_computed_tokens: usize,
    status: SequenceStatus,
    params: SamplingParams,
    eos_token_ids: Vec<u32>,
    rng: RequestRng,
    arrival: u64,
    num_preemptions: u32,
    num_cached_tokens: Option<usize>,
    /// The lane a running sequence is scheduled in (see [`Scheduler::set_lanes`]).
    lane: usize,
    /// Structured output: the constraint on its tokens, if any.
    constraint: ConstraintSlot,
    /// The constraint said the structure is complete (ends the sequence with `stop`).
    constraint_done: bool,
    /// The constraint failed (ends the sequence with an error).
    constraint_error: Option<String>,
}

impl Sequence {
    /// A new request. `eos_token_ids` are the model's end-of-sequence ids (ignored when
    /// `params.ignore_eos`). The request's RNG is seeded from `params.seed` (random if none).
    pub fn new(
        id: RequestId,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        let rng = RequestRng::for_params(&params);
        Self {
            id,
            prompt_len: prompt_token_ids.len(),
            token_ids: prompt_token_ids,
            num_computed_tokens: 0,
            status: SequenceStatus::Waiting,
            params,
            eos_token_ids,
            rng,
            arrival: 0,
            num_preemptions: 0,
            num_cached_tokens: None,
            lane: 0,
            constraint: ConstraintSlot::default(),
            constraint_done: false,
            constraint_error: None,
        }
    }

    /// Constrains this sequence's tokens (structured output): see [`crate::constraint`].
    pub fn with_constraint(mut self, c: Box<dyn TokenConstraint>) -> Self {
        self.constraint = ConstraintSlot::new(c);
        self
    }

    /// Whether a constraint applies to this sequence's tokens.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Prompt followed by the outputs so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.token_ids[..self.prompt_len]
    }

    pub fn output_token_ids(&self) -> &[u32] {
        &self.token_ids[self.prompt_len..]
    }

    /// Prompt + output length.
    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    /// Never true for a sequence accepted by [`Scheduler::add`].
    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.prompt_len
    }

    /// Leading tokens whose KV is in the cache.
    pub fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }

    pub fn status(&self) -> SequenceStatus {
        self.status
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The lane a running sequence is scheduled in (0 with one lane; meaningless while
    /// waiting).
    pub fn lane(&self) -> usize {
        self.lane
    }

    /// Times this sequence was preempted.
    pub fn num_preemptions(&self) -> u32 {
        self.num_preemptions
    }

    /// Prompt tokens found in the prefix cache at first admission (`None` before it).
    pub fn num_cached_tokens(&self) -> Option<usize> {
        self.num_cached_tokens
    }

    /// What the sampler needs for this sequence, with its RNG borrowed mutably.
    pub fn sampling_inputs(&mut self) -> SamplingInputs<'_> {
        let (prompt, output) = self.token_ids.split_at(self.prompt_len);
        SamplingInputs {
            params: &self.params,
            prompt_ids: prompt,
            output_ids: output,
            rng: &mut self.rng,
        }
    }

    /// Finish reason after appending a token, if any; `Some(token)` as the second field when
    /// it was an EOS / stop token.
    fn check_finished(&self, max_model_len: usize) -> Option<(FinishReason, Option<u32>)> {
        let out = self.num_output_tokens();
        if out == 0 {
            return None;
        }
        let last = *self.token_ids.last()?;
        if let Some(e) = &self.constraint_error {
            return Some((FinishReason::Error(e.clone()), None));
        }
        if self.constraint_done {
            let eos =
                self.eos_token_ids.contains(&last) || self.params.stop_token_ids.contains(&last);
            return Some((FinishReason::Stop, eos.then_some(last)));
        }
        if out >= self.params.min_tokens {
            let eos = !self.params.ignore_eos && self.eos_token_ids.contains(&last);
            if eos || self.params.stop_token_ids.contains(&last) {
                return Some((FinishReason::Stop, Some(last)));
            }
        }
        if self.params.max_tokens.is_some_and(|m| out >= m) || self.len() >= max_model_len {
            return Some((FinishReason::Length, None));
        }
        None
    }
}

/// Borrowed inputs of [`Sampler::sample`] for one sequence.
#[derive(Debug)]
pub struct SamplingInputs<'a> {
    pub params: &'a SamplingParams,
    pub prompt_ids: &'a [u32],
    pub output_ids: &'a [u32],
    pub rng: &'a mut RequestRng,
}

/// A sequence's work in one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// Tokens to compute this step (prompt chunk, or the one last sampled token).
    pub token_ids: Vec<u32>,
    /// Position of `token_ids[0]` (= tokens already in the KV cache).
    pub start_pos: usize,
    /// The sequence's whole block table (covers at least `start_pos + token_ids.len()`).
    pub block_table: Vec<BlockId>,
    /// A token is sampled from the last position: the step completes the prompt, or decodes.
    pub samples: bool,
}

impl ScheduledSeq {
    /// Positions attended over after this step: `start_pos + token_ids.len()`.
    pub fn context_len(&self) -> usize {
        self.start_pos + self.token_ids.len()
    }

    /// Flat KV slot of each of `token_ids`: `block_table[p / block_size] * block_size + p %
    /// block_size` for `p` in `start_pos..context_len()`. Positions beyond the table (never
    /// produced by the scheduler) are skipped.
    pub fn slot_mapping(&self, block_size: usize) -> Vec<usize> {
        let bs = block_size.max(1);
        (self.start_pos..self.context_len())
            .filter_map(|p| {
                self.block_table
                    .get(p / bs)
                    .map(|&b| b as usize * bs + p % bs)
            })
            .collect()
    }
}

/// One step's plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Sequences to run, oldest first; running ones before newly admitted ones.
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted this step (their blocks were freed; they are waiting again).
    pub preempted: Vec<RequestId>,
    /// `sum(seqs[i].token_ids.len())`.
    pub num_batched_tokens: usize,
    /// Tokens per block, to map positions to slots.
    pub block_size: usize,
}

impl SchedulerOutput {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Sequences that sample a token this step, in order: `update` expects one token each.
    pub fn sampling_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.seqs.iter().filter(|s| s.samples).map(|s| s.id)
    }
}

/// A sequence that left the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedSeq {
    pub id: RequestId,
    pub reason: FinishReason,
    pub prompt_len: usize,
    /// Every generated token, including an EOS / stop token that ended it.
    pub output_token_ids: Vec<u32>,
    /// The EOS / stop token id that ended it (the last of `output_token_ids`), if any.
    pub stop_token_id: Option<u32>,
    /// Prompt tokens served from the prefix cache at first admission (0 if never admitted).
    pub num_cached_tokens: usize,
    pub num_preemptions: u32,
}

/// Scheduler errors: bad configuration, bad requests, and engine/scheduler protocol errors.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SchedError {
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    #[error("request {0} is already queued or running")]
    DuplicateRequest(RequestId),
    #[error("request {0} has an empty prompt")]
    EmptyPrompt(RequestId),
    #[error("request {id}: prompt of {len} tokens does not fit; prompts must be shorter than {max} tokens (model context / KV cache capacity)")]
    PromptTooLong {
        id: RequestId,
        len: usize,
        max: usize,
    },
    #[error("request {id}: {source}")]
    InvalidParams {
        id: RequestId,
        source: SamplingParamsError,
    },
    #[error("schedule() called while the previous step awaits update()")]
    StepInFlight,
    #[error("update() got sampled tokens but no step is in flight")]
    NoStepInFlight,
    #[error("update(): request {0} sampled twice")]
    DuplicateSample(RequestId),
    #[error("update(): request {0} was not scheduled to sample this step")]
    UnexpectedSample(RequestId),
    #[error("update(): no sampled token for request {0}")]
    MissingSample(RequestId),
    #[error("request {0} is not queued or running")]
    UnknownRequest(RequestId),
    #[error("request {id}: sampling failed: {source}")]
    Sample { id: RequestId, source: SampleError },
    #[error("KV block manager: {0}")]
    Block(#[from] BlockError),
    #[error("scheduler invariant violated: {0}")]
    Invariant(String),
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: RequestId,
    arrival: u64,
    num_new: usize,
    samples: bool,
}

/// The continuous-batching scheduler of one attention replica.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    max_model_len: usize,
    blocks: BlockManager,
    seqs: HashMap<RequestId, Sequence>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    next_arrival: u64,
    /// Per lane: the step between `schedule_lane` and `update_lane`.
    in_flight: Vec<Option<Vec<InFlight>>>,
    num_preemptions: u64,
}

impl Scheduler {
    /// A scheduler with an empty KV cache.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedError> {
        let bad = |m: &str| Err(SchedError::InvalidConfig(m.to_string()));
        if config.max_num_seqs == 0 {
            return bad("max_num_seqs must be at least 1");
        }
        if config.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens must be at least 1");
        }
        if config.long_prefill_chunk == Some(0) {
            return bad("long_prefill_chunk must be at least 1 (or unset)");
        }
        if config.max_model_len.is_some_and(|m| m < 2) {
            return bad("max_model_len must be at least 2");
        }
        let blocks = BlockManager::new(
            config.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
        )?;
        let capacity = config.num_blocks.saturating_mul(config.block_size);
        let max_model_len = config.max_model_len.map_or(capacity, |m| m.min(capacity));
        if max_model_len < 2 {
            return bad("the KV cache must hold at least 2 tokens");
        }
        Ok(Self {
            config,
            max_model_len,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            in_flight: vec![None],
            num_preemptions: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Longest sequence (prompt + output): `min(max_model_len, num_blocks * block_size)`.
    /// Prompts must be shorter.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Queues a request. Rejects empty prompts, invalid parameters, duplicate ids and prompts
    /// that could never run (`>= max_model_len()` tokens).
    pub fn add(&mut self, mut seq: Sequence) -> Result<(), SchedError> {
        let id = seq.id;
        if self.seqs.contains_key(&id) {
            return Err(SchedError::DuplicateRequest(id));
        }
        if seq.token_ids.is_empty() {
            return Err(SchedError::EmptyPrompt(id));
        }
        seq.params
            .validate()
            .map_err(|source| SchedError::InvalidParams { id, source })?;
        if seq.token_ids.len() >= self.max_model_len {
            return Err(SchedError::PromptTooLong {
                id,
                len: seq.token_ids.len(),
                max: self.max_model_len,
            });
        }
        seq.arrival = self.next_arrival;
        self.next_arrival += 1;
        seq.status = SequenceStatus::Waiting;
        seq.num_computed_tokens = 0;
        self.waiting.push_back(id);
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Plans the next step (of lane 0). Errors only if the previous step was not `update`d,
    /// or on an internal inconsistency.
    pub fn schedule(&mut self) -> Result<SchedulerOutput, SchedError> {
        self.schedule_lane(0)
    }

    /// Splits the scheduler into `n` lanes that step independently: each running sequence
    /// belongs to one lane, and lane `k`'s step (`schedule_lane(k)` ... `update_lane(k)`)
    /// may be in flight while the other lanes schedule and update theirs. This is what lets
    /// an attention replica start micro-batch `k` of the next iteration as soon as micro-batch
    /// `k`'s tokens are sampled. Each lane gets `ceil(max_num_batched_tokens / n)` tokens
    /// per step (all of them while no other lane holds a running sequence, so that a lone
    /// long prompt is not prefilled at a fraction of the budget) and admits new sequences so
    /// that the lanes hold similar numbers of them; it preempts only its own sequences (the
    /// others' steps may be in flight). With `n = 1` (the default) this is the plain
    /// scheduler. Fails while a step is in flight.
    pub fn set_lanes(&mut self, n: usize) -> Result<(), SchedError> {
        if n == 0 {
            return Err(SchedError::InvalidConfig("at least one lane".into()));
        }
        if self.in_flight.iter().any(Option::is_some) {
            return Err(SchedError::StepInFlight);
        }
        self.in_flight = vec![None; n];
        for s in self.seqs.values_mut() {
            s.lane %= n;
        }
        Ok(())
    }

    /// Lanes (1 unless [`Scheduler::set_lanes`] said otherwise).
    pub fn num_lanes(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether lane `lane` has a step awaiting `update_lane`.
    pub fn lane_in_flight(&self, lane: usize) -> bool {
        self.in_flight.get(lane).is_some_and(Option::is_some)
    }

    /// Plans lane `lane`'s next step: its running sequences first, then admission from the
    /// (shared, FCFS) waiting queue into this lane. Errors if the lane's previous step was not
    /// updated, on a lane that does not exist, or on an internal inconsistency.
    pub fn schedule_lane(&mut self, lane: usize) -> Result<SchedulerOutput, SchedError> {
        let lanes = self.num_lanes();
        match self.in_flight.get(lane) {
            None => {
                return Err(SchedError::Invariant(format!(
                    "lane {lane} of {lanes} scheduled"
                )))
            }
            Some(Some(_)) => return Err(SchedError::StepInFlight),
            Some(None) => {}
        }
        let in_lane = |s: &Self, id: &RequestId| s.seqs.get(id).is_some_and(|q| q.lane == lane);
        let alone = self.running.iter().all(|r| in_lane(self, r));
        let lane_budget = if alone {
            self.config.max_num_batched_tokens
        } else {
            self.config.max_num_batched_tokens.div_ceil(lanes)
        };
        let mut budget = lane_budget;
        // (id, start, num_new)
        let mut planned: Vec<(RequestId, usize, usize)> = Vec::new();
        let mut preempted = Vec::new();

        // This lane's running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            if !in_lane(self, &id) {
                i += 1;
                continue;
            }
            let (start, len) = {
                let s = self.seq(id)?;
                (s.num_computed_tokens, s.len())
            };
            let num_new = self.num_new_tokens(len - start, budget);
            let mut fits = false;
            loop {
                match self.blocks.append_slots(id, start + num_new) {
                    Ok(_) => {
                        fits = true;
                        break;
                    }
                    Err(BlockError::OutOfBlocks { .. }) => {
                        // The lane's most recent sequence (at or after `i`).
                        let Some(pos) = self.running.iter().rposition(|r| in_lane(self, r)) else {
                            break;
                        };
                        let victim = self.running.remove(pos);
                        self.preempt(victim)?;
                        preempted.push(victim);
                        if victim == id {
                            break;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !fits {
                break;
            }
            planned.push((id, start, num_new));
            budget -= num_new;
            i += 1;
        }

        // Admission, strictly in order, only if nothing was preempted; a lane takes its share
        // of the sequences there are to run.
        let share = (self.running.len() + self.waiting.len())
            .min(self.config.max_num_seqs)
            .div_ceil(lanes);
        let mut held = self.running.iter().filter(|r| in_lane(self, r)).count();
        if preempted.is_empty() {
            while self.running.len() < self.config.max_num_seqs && budget > 0 && held < share {
                let Some(&id) = self.waiting.front() else {
                    break;
                };
                let seq = self
                    .seqs
                    .get(&id)
                    .ok_or_else(|| SchedError::Invariant(format!("waiting {id} unknown")))?;
                let outcome = match self.blocks.allocate(id, &seq.token_ids) {
                    Ok(o) => o,
                    Err(BlockError::OutOfBlocks { .. }) => break,
                    Err(e) => return Err(e.into()),
                };
                let len = seq.len();
                let start = outcome.num_cached_tokens;
                let num_new = self.num_new_tokens(len - start, budget);
                self.waiting.pop_front();
                let seq = self.seq_mut(id)?;
                seq.status = SequenceStatus::Running;
                seq.num_computed_tokens = start;
                seq.num_cached_tokens.get_or_insert(start);
                seq.lane = lane;
                held += 1;
                let arrival = seq.arrival;
                let pos = self.running_insert_pos(arrival);
                self.running.insert(pos, id);
                planned.push((id, start, num_new));
                budget -= num_new;
            }
        }

        let mut out = SchedulerOutput {
            seqs: Vec::with_capacity(planned.len()),
            preempted,
            num_batched_tokens: lane_budget - budget,
            block_size: self.config.block_size,
        };
        let mut in_flight = Vec::with_capacity(planned.len());
        for (id, start, num_new) in planned {
            let seq = self.seq(id)?;
            let samples = start + num_new == seq.len();
            let block_table = self
                .blocks
                .block_table(id)
                .ok_or(BlockError::UnknownSequence(id))?
                .to_vec();
            out.seqs.push(ScheduledSeq {
                id,
                token_ids: seq.token_ids[start..start + num_new].to_vec(),
                start_pos: start,
                block_table,
                samples,
            });
            in_flight.push(InFlight {
                id,
                arrival: seq.arrival,
                num_new,
                samples,
            });
        }
        if !in_flight.is_empty() {
            self.in_flight[lane] = Some(in_flight);
        }
        Ok(out)
    }

    /// Applies the step's results: `sampled` has one `(id, token)` for every scheduled
    /// sequence with `samples == true` that is still live (tokens of sequences finished since
    /// `schedule()` are ignored). Marks the step's tokens computed, registers full blocks for
    /// prefix caching, appends the tokens and returns the sequences that finished (EOS unless
    /// `ignore_eos`, stop token ids, both only from `min_tokens` on; `max_tokens`; full
    /// context). Validates everything before changing anything.
    pub fn update(&mut self, sampled: &[(RequestId, u32)]) -> Result<Vec<FinishedSeq>, SchedError> {
        self.update_lane(0, sampled)
    }

    /// [`Scheduler::update`] for lane `lane`'s step.
    pub fn update_lane(
        &mut self,
        lane: usize,
        sampled: &[(RequestId, u32)],
    ) -> Result<Vec<FinishedSeq>, SchedError> {
        let Some(step) = self.in_flight.get(lane).and_then(Option::as_ref) else {
            return if sampled.is_empty() {
                Ok(Vec::new())
            } else {
                Err(SchedError::NoStepInFlight)
            };
        };
        let live = |e: &InFlight| self.seqs.get(&e.id).is_some_and(|s| s.arrival == e.arrival);
        let by_id: HashMap<RequestId, &InFlight> = step.iter().map(|e| (e.id, e)).collect();
        let mut tokens: HashMap<RequestId, u32> = HashMap::with_capacity(sampled.len());
        for &(id, t) in sampled {
            if tokens.insert(id, t).is_some() {
                return Err(SchedError::DuplicateSample(id));
            }
            match by_id.get(&id) {
                Some(e) if e.samples || !live(e) => {}
                Some(_) => return Err(SchedError::UnexpectedSample(id)),
                None if self.seqs.contains_key(&id) => {
                    return Err(SchedError::UnexpectedSample(id))
                }
                None => {}
            }
        }
        if let Some(e) = step
            .iter()
            .find(|e| e.samples && live(e) && !tokens.contains_key(&e.id))
        {
            return Err(SchedError::MissingSample(e.id));
        }

        let step = self.in_flight[lane].take().unwrap_or_default();
        let mut finished = Vec::new();
        for e in step {
            let max_model_len = self.max_model_len;
            let Some(seq) = self.seqs.get_mut(&e.id) else {
                continue;
            };
            if seq.arrival != e.arrival || seq.status != SequenceStatus::Running {
                continue;
            }
            seq.num_computed_tokens += e.num_new;
            self.blocks
                .register_computed(e.id, &seq.token_ids, seq.num_computed_tokens)?;
            if !e.samples {
                continue;
            }
            let Some(&t) = tokens.get(&e.id) else {
                continue;
            };
            seq.token_ids.push(t);
            if let Some((reason, stop_token_id)) = seq.check_finished(max_model_len) {
                if let Some(f) = self.remove(e.id, reason, stop_token_id)? {
                    finished.push(f);
                }
            }
        }
        Ok(finished)
    }

    /// Samples the next token of live sequence `id` from its `logits` row with its own
    /// parameters, history and RNG. A convenience over [`Scheduler::sampling_inputs`].
    pub fn sample(
        &mut self,
        id: RequestId,
        sampler: &Sampler,
        logits: &mut [f32],
    ) -> Result<Sampled, SchedError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(SchedError::UnknownRequest(id))?;
        let constraint = seq.constraint.clone();
        // A failed constraint is the sequence's own error, never the batch's: it samples
        // unconstrained this once and ends with the error at `update`.
        if seq.constraint_error.is_none() && !seq.constraint_done {
            if let Some(Err(e)) = constraint.with(|c| c.apply(logits)) {
                seq.constraint_error = Some(format!("structured output: {e}"));
            }
        }
        let inputs = seq.sampling_inputs();
        let s = sampler
            .sample(
                logits,
                inputs.params,
                inputs.prompt_ids,
                inputs.output_ids,
                inputs.rng,
            )
            .map_err(|source| SchedError::Sample { id, source })?;
        if seq.constraint_error.is_none() && !seq.constraint_done {
            match constraint.with(|c| c.commit(s.token)) {
                None | Some(Ok(Commit::Continue)) => {}
                Some(Ok(Commit::Done)) => seq.constraint_done = true,
                Some(Err(e)) => seq.constraint_error = Some(format!("structured output: {e}")),
            }
        }
        Ok(s)
    }

    /// Sampling inputs of a live sequence.
    pub fn sampling_inputs(&mut self, id: RequestId) -> Option<SamplingInputs<'_>> {
        self.seqs.get_mut(&id).map(Sequence::sampling_inputs)
    }

    /// Ends a live sequence (waiting or running) for `reason`, freeing its blocks; e.g. a stop
    /// string found by the caller (`FinishReason::Stop`) or a failure. `None` if `id` is not
    /// live. If `id` is part of the step in flight, `update` ignores its token. Errors only on
    /// an internal inconsistency of the block manager.
    pub fn finish(
        &mut self,
        id: RequestId,
        reason: FinishReason,
    ) -> Result<Option<FinishedSeq>, SchedError> {
        self.remove(id, reason, None)
    }

    /// `finish(id, FinishReason::Abort)`: works whether `id` is waiting or running.
    pub fn abort(&mut self, id: RequestId) -> Result<Option<FinishedSeq>, SchedError> {
        self.finish(id, FinishReason::Abort)
    }

    /// A live sequence.
    pub fn sequence(&self, id: RequestId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Queued sequences (including preempted ones).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences holding KV blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether any request is live.
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Ids of waiting sequences, in queue order.
    pub fn waiting_ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.iter().copied()
    }

    /// Ids of running sequences, oldest first.
    pub fn running_ids(&self) -> &[RequestId] {
        &self.running
    }

    /// Free KV blocks (cached blocks with no reference included).
    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free_blocks()
    }

    /// KV blocks in use.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.num_used_blocks()
    }

    /// Fraction of KV blocks in use, in [0, 1].
    pub fn kv_cache_usage(&self) -> f64 {
        self.blocks.num_used_blocks() as f64 / self.blocks.num_blocks() as f64
    }

    /// Preemptions since start.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Prefix-cache counters (tokens).
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.blocks.prefix_cache_stats()
    }

    /// The block manager (read-only), e.g. for block tables and its own invariant check.
    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    /// Checks the bookkeeping: the block manager's invariants; waiting and running partition
    /// the live sequences with no duplicates; both are in arrival order and (with one lane)
    /// every running sequence arrived before every waiting one; statuses match; running
    /// sequences hold blocks covering their computed tokens and have a token left to compute;
    /// waiting ones hold no blocks; `running <= max_num_seqs`; a lane's step in flight holds
    /// only that lane's sequences.
    pub fn check_invariants(&self) -> Result<(), SchedError> {
        let bad = |m: String| Err(SchedError::Invariant(m));
        self.blocks.check_invariants()?;
        let mut seen = HashSet::new();
        for id in self.waiting.iter().chain(&self.running) {
            if !seen.insert(*id) {
                return bad(format!("{id} queued twice"));
            }
        }
        if seen.len() != self.seqs.len() || self.seqs.keys().any(|id| !seen.contains(id)) {
            return bad("waiting + running != live sequences".into());
        }
        if self.running.len() > self.config.max_num_seqs {
            return bad(format!("{} running > max_num_seqs", self.running.len()));
        }
        let arrivals = |ids: &mut dyn Iterator<Item = &RequestId>| -> Result<Vec<u64>, SchedError> {
            ids.map(|id| self.seq(*id).map(|s| s.arrival)).collect()
        };
        let run = arrivals(&mut self.running.iter())?;
        let wait = arrivals(&mut self.waiting.iter())?;
        if run.windows(2).any(|w| w[0] >= w[1]) || wait.windows(2).any(|w| w[0] >= w[1]) {
            return bad("queues out of arrival order".into());
        }
        // With lanes, a lane preempts its own newest sequence, which may be older than
        // another lane's.
        if let (Some(r), Some(w), 1) = (run.last(), wait.first(), self.num_lanes()) {
            if r > w {
                return bad("a running sequence arrived after a waiting one".into());
            }
        }
        for (lane, step) in self.in_flight.iter().enumerate() {
            for e in step.iter().flatten() {
                if let Some(s) = self.seqs.get(&e.id) {
                    if s.arrival == e.arrival
                        && s.status == SequenceStatus::Running
                        && s.lane != lane
                    {
                        return bad(format!(
                            "{} in flight in lane {lane} but in lane {}",
                            e.id, s.lane
                        ));
                    }
                }
            }
        }
        for id in &self.running {
            let s = self.seq(*id)?;
            let slots =
                self.blocks.block_table(*id).map_or(0, <[u32]>::len) * self.config.block_size;
            if s.status != SequenceStatus::Running
                || !self.blocks.contains(*id)
                || s.num_computed_tokens > slots
                || s.num_computed_tokens >= s.len()
            {
                return bad(format!("running {id} in a bad state"));
            }
        }
        for id in &self.waiting {
            let s = self.seq(*id)?;
            if s.status != SequenceStatus::Waiting
                || self.blocks.contains(*id)
                || s.num_computed_tokens != 0
            {
                return bad(format!("waiting {id} in a bad state"));
            }
        }
        Ok(())
    }

    fn seq(&self, id: RequestId) -> Result<&Sequence, SchedError> {
        self.seqs
            .get(&id)
            .ok_or_else(|| SchedError::Invariant(format!("unknown sequence {id}")))
    }

    fn seq_mut(&mut self, id: RequestId) -> Result<&mut Sequence, SchedError> {
        self.seqs
            .get_mut(&id)
            .ok_or_else(|| SchedError::Invariant(format!("unknown sequence {id}")))
    }

    /// Tokens to compute for a sequence with `remaining` uncomputed tokens.
    fn num_new_tokens(&self, remaining: usize, budget: usize) -> usize {
        let mut n = remaining.min(budget);
        if remaining > 1 {
            if let Some(chunk) = self.config.long_prefill_chunk {
                n = n.min(chunk);
            }
        }
        n
    }

    fn running_insert_pos(&self, arrival: u64) -> usize {
        self.running
            .partition_point(|id| self.seqs.get(id).is_some_and(|s| s.arrival < arrival))
    }

    /// Frees `id`'s blocks and queues it again (by arrival order: at the front in practice).
    fn preempt(&mut self, id: RequestId) -> Result<(), SchedError> {
        self.blocks.free(id)?;
        let seq = self.seq_mut(id)?;
        seq.status = SequenceStatus::Waiting;
        seq.num_computed_tokens = 0;
        seq.num_preemptions += 1;
        let arrival = seq.arrival;
        let pos = self
            .waiting
            .partition_point(|w| self.seqs.get(w).is_some_and(|s| s.arrival < arrival));
        self.waiting.insert(pos, id);
        self.num_preemptions += 1;
        Ok(())
    }

    /// Removes a live sequence, freeing its blocks. `Ok(None)` if it is not live.
    fn remove(
        &mut self,
        id: RequestId,
        reason: FinishReason,
        stop_token_id: Option<u32>,
    ) -> Result<Option<FinishedSeq>, SchedError> {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return Ok(None);
        };
        match seq.status {
            SequenceStatus::Running => {
                self.running.retain(|&r| r != id);
                self.blocks.free(id)?;
            }
            SequenceStatus::Waiting => self.waiting.retain(|&w| w != id),
        }
        let output_token_ids = seq.token_ids.split_off(seq.prompt_len);
        Ok(Some(FinishedSeq {
            id,
            reason,
            prompt_len: seq.prompt_len,
            output_token_ids,
            stop_token_id,
            num_cached_tokens: seq.num_cached_tokens.unwrap_or(0),
            num_preemptions: seq.num_preemptions,
        }))
    }
}
