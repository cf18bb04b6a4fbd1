//! Test harness for the scheduler: request factories, a fake model over a fake paged KV
//! cache, a reference generator and a driver loop. No tensors, no real model: the scheduler
//! is tested alone.
//!
//! The fake model writes each scheduled token into its KV slot (tagged with its position)
//! and computes the next token as a hash of the context it *reads back through the block
//! table*. So wrong block tables, wrong positions, a bad prefix-cache hit or a write into a
//! shared block all change the generated tokens, and comparing against [`reference`] (the
//! same function applied to the true context) catches them.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use tandem_core::RequestId;
use tandem_sched::{
    FinishReason, FinishedSeq, SamplingParams, SchedError, Scheduler, SchedulerConfig,
    SchedulerOutput, Sequence,
};

pub const VOCAB: u32 = 64;
pub const EOS: u32 = 0;

pub fn rid(n: u64) -> RequestId {
    RequestId(n)
}

/// Deterministic next token of a context: FNV-1a of the tokens, mod `VOCAB`.
pub fn next_token(ctx: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in ctx {
        h ^= u64::from(t);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 29)) as u32 % VOCAB
}

/// Prompt tokens that never contain EOS (deterministic in `seed`).
pub fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1 + (x % u64::from(VOCAB - 1)) as u32
        })
        .collect()
}

pub fn params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

/// A request with EOS = `EOS`.
pub fn request(id: u64, prompt: Vec<u32>, params: SamplingParams) -> Sequence {
    Sequence::new(rid(id), prompt, params, vec![EOS])
}

/// A request that ignores EOS and generates exactly `max_tokens` (context permitting).
pub fn fixed_request(id: u64, prompt_len: usize, max_tokens: usize) -> Sequence {
    let p = SamplingParams {
        ignore_eos: true,
        ..params(max_tokens)
    };
    request(id, prompt(id, prompt_len), p)
}

pub fn config(num_blocks: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        block_size,
        num_blocks,
        enable_prefix_caching: true,
        long_prefill_chunk: None,
        max_model_len: None,
    }
}

/// What a request generates when run alone: same stop rules as the scheduler.
pub fn reference(
    prompt: &[u32],
    params: &SamplingParams,
    eos: &[u32],
    max_model_len: usize,
) -> (Vec<u32>, FinishReason) {
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    loop {
        let t = next_token(&ctx);
        ctx.push(t);
        out.push(t);
        if out.len() >= params.min_tokens
            && ((!params.ignore_eos && eos.contains(&t)) || params.stop_token_ids.contains(&t))
        {
            return (out, FinishReason::Stop);
        }
        if params.max_tokens.is_some_and(|m| out.len() >= m) || ctx.len() >= max_model_len {
            return (out, FinishReason::Length);
        }
    }
}

/// The fake model: a paged KV cache of `(token, position)` per slot.
pub struct FakeModel {
    pub block_size: usize,
    pub kv: Vec<Option<(u32, usize)>>,
    /// Tokens computed over all steps.
    pub computed_tokens: usize,
}

impl FakeModel {
    pub fn new(cfg: &SchedulerConfig) -> Self {
        Self {
            block_size: cfg.block_size,
            kv: vec![None; cfg.num_blocks * cfg.block_size],
            computed_tokens: 0,
        }
    }

    /// Executes one step; returns a token for every sequence that samples. Panics (test
    /// failure) on any inconsistency it can see.
    pub fn run(&mut self, sched: &Scheduler, out: &SchedulerOutput) -> Vec<(RequestId, u32)> {
        let bs = self.block_size;
        assert_eq!(out.block_size, bs);
        // No block written this step may be held by another live sequence.
        for s in &out.seqs {
            let slots = s.slot_mapping(bs);
            assert_eq!(
                slots.len(),
                s.token_ids.len(),
                "block table too short for {}",
                s.id
            );
            for &slot in &slots {
                let block = (slot / bs) as u32;
                for &other in sched.running_ids() {
                    if other == s.id {
                        continue;
                    }
                    let table = sched.block_manager().block_table(other).unwrap_or(&[]);
                    assert!(
                        !table.contains(&block),
                        "{} writes block {block} shared with {other}",
                        s.id
                    );
                }
            }
            for (i, slot) in slots.into_iter().enumerate() {
                self.kv[slot] = Some((s.token_ids[i], s.start_pos + i));
            }
            self.computed_tokens += s.token_ids.len();
        }
        out.seqs
            .iter()
            .filter(|s| s.samples)
            .map(|s| {
                let ctx: Vec<u32> = (0..s.context_len())
                    .map(|p| {
                        let slot = s.block_table[p / bs] as usize * bs + p % bs;
                        match self.kv[slot] {
                            Some((t, pos)) if pos == p => t,
                            other => panic!("{}: slot of position {p} holds {other:?}", s.id),
                        }
                    })
                    .collect();
                (s.id, next_token(&ctx))
            })
            .collect()
    }
}

/// A request to inject at a given step.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub step: usize,
    pub seq: Sequence,
}

/// Everything a run produced.
pub struct RunResult {
    pub finished: BTreeMap<RequestId, FinishedSeq>,
    pub outputs: Vec<SchedulerOutput>,
    pub steps: usize,
    pub computed_tokens: usize,
}

/// Checks one step's output against the configuration.
pub fn check_output(cfg: &SchedulerConfig, out: &SchedulerOutput) {
    let total: usize = out.seqs.iter().map(|s| s.token_ids.len()).sum();
    assert_eq!(total, out.num_batched_tokens);
    assert!(total <= cfg.max_num_batched_tokens, "budget exceeded");
    assert!(out.seqs.len() <= cfg.max_num_seqs);
    let mut ids: Vec<RequestId> = out.seqs.iter().map(|s| s.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), out.seqs.len(), "a sequence scheduled twice");
    for s in &out.seqs {
        assert!(!s.token_ids.is_empty());
        if let Some(chunk) = cfg.long_prefill_chunk {
            assert!(s.token_ids.len() <= chunk.max(1));
        }
    }
}

/// The last step at which a request arrives or is aborted.
fn last_event(arrivals: &[Arrival], aborts: &[(usize, RequestId)]) -> usize {
    let a = arrivals.iter().map(|a| a.step).max().unwrap_or(0);
    a.max(aborts.iter().map(|a| a.0).max().unwrap_or(0))
}

/// Arrivals grouped by the step they join at.
fn by_step(arrivals: Vec<Arrival>) -> HashMap<usize, Vec<Sequence>> {
    let mut pending: HashMap<usize, Vec<Sequence>> = HashMap::new();
    for a in arrivals {
        pending.entry(a.step).or_default().push(a.seq);
    }
    pending
}

/// Records a finished request; a request may finish only once.
fn record(f: FinishedSeq, finished: &mut BTreeMap<RequestId, FinishedSeq>) {
    let id = f.id;
    assert!(finished.insert(id, f).is_none(), "{id} finished twice");
}

/// Drives the scheduler with the fake model until every request has finished. `aborts`:
/// (step, id) pairs applied before scheduling that step.
pub fn drive(
    cfg: SchedulerConfig,
    arrivals: Vec<Arrival>,
    aborts: &[(usize, RequestId)],
    max_steps: usize,
) -> Result<RunResult, SchedError> {
    let mut sched = Scheduler::new(cfg.clone())?;
    let mut model = FakeModel::new(&cfg);
    let mut finished: BTreeMap<RequestId, FinishedSeq> = BTreeMap::new();
    let mut outputs = Vec::new();
    let last = last_event(&arrivals, aborts);
    let mut pending = by_step(arrivals);
    let mut step = 0;
    loop {
        for seq in pending.remove(&step).unwrap_or_default() {
            sched.add(seq)?;
        }
        for &(_, id) in aborts.iter().filter(|a| a.0 == step) {
            if let Some(f) = sched.abort(id)? {
                assert_eq!(f.reason, FinishReason::Abort);
                record(f, &mut finished);
            }
        }
        sched.check_invariants()?;
        if step > last && !sched.has_unfinished() {
            break;
        }
        assert!(step < max_steps, "no progress after {max_steps} steps");
        let out = sched.schedule()?;
        sched.check_invariants()?;
        check_output(&cfg, &out);
        if out.is_empty() && step > last {
            panic!(
                "stalled: nothing scheduled with {} live requests",
                sched.num_waiting()
            );
        }
        let sampled = model.run(&sched, &out);
        for f in sched.update(&sampled)? {
            record(f, &mut finished);
        }
        sched.check_invariants()?;
        outputs.push(out);
        step += 1;
    }
    assert_eq!(sched.num_free_blocks(), cfg.num_blocks, "KV blocks leaked");
    assert_eq!(sched.num_running() + sched.num_waiting(), 0);
    Ok(RunResult {
        finished,
        outputs,
        steps: step,
        computed_tokens: model.computed_tokens,
    })
}

/// Asserts every request in `seqs` finished once, as it would have alone.
pub fn assert_matches_reference(seqs: &[Sequence], res: &RunResult, max_model_len: usize) {
    assert_eq!(res.finished.len(), seqs.len(), "requests lost or invented");
    for s in seqs {
        let f = &res.finished[&s.id()];
        let (want, reason) = reference(
            s.prompt_token_ids(),
            s.params(),
            s.eos_token_ids(),
            max_model_len,
        );
        assert_eq!(
            f.output_token_ids,
            want,
            "{} generated other tokens",
            s.id()
        );
        assert_eq!(f.reason, reason, "{}", s.id());
        assert_eq!(f.prompt_len, s.prompt_len());
    }
}

/// [`drive`] with the scheduler split into `lanes` lanes stepped in rotation, the way a
/// pipelining attention replica does: lane `k` is scheduled (and the fake model writes its
/// KV, as the replica's layers do within the same round) while every other lane's step is in
/// flight; its tokens reach `update_lane` only when its turn comes again. Aborts are applied
/// at once, also to sequences in flight (their KV is written by then, as in the replica).
pub fn drive_lanes(
    cfg: SchedulerConfig,
    lanes: usize,
    arrivals: Vec<Arrival>,
    aborts: &[(usize, RequestId)],
    max_steps: usize,
) -> Result<RunResult, SchedError> {
    let mut sched = Scheduler::new(cfg.clone())?;
    sched.set_lanes(lanes)?;
    let mut model = FakeModel::new(&cfg);
    let mut finished: BTreeMap<RequestId, FinishedSeq> = BTreeMap::new();
    let mut outputs = Vec::new();
    let last = last_event(&arrivals, aborts);
    let mut pending = by_step(arrivals);
    // Per lane: the step in flight and the tokens it sampled.
    type Step = (SchedulerOutput, Vec<(RequestId, u32)>);
    let mut in_flight: Vec<Option<Step>> = vec![None; lanes];
    let mut idle_lanes = 0;
    let mut step = 0;
    loop {
        let lane = step % lanes;
        // Close this lane's step (tokens of sequences aborted meanwhile are ignored).
        if let Some((out, sampled)) = in_flight[lane].take() {
            for f in sched.update_lane(lane, &sampled)? {
                record(f, &mut finished);
            }
            outputs.push(out);
        }
        for seq in pending.remove(&step).unwrap_or_default() {
            sched.add(seq)?;
        }
        for &(_, id) in aborts.iter().filter(|a| a.0 == step) {
            if let Some(f) = sched.abort(id)? {
                assert_eq!(f.reason, FinishReason::Abort);
                record(f, &mut finished);
            }
        }
        sched.check_invariants()?;
        let quiet = step > last;
        if quiet && !sched.has_unfinished() && in_flight.iter().all(Option::is_none) {
            break;
        }
        assert!(step < max_steps, "no progress after {max_steps} steps");
        let shared = sched
            .running_ids()
            .iter()
            .any(|id| sched.sequence(*id).is_some_and(|s| s.lane() != lane));
        let out = sched.schedule_lane(lane)?;
        sched.check_invariants()?;
        check_output(&cfg, &out);
        if shared {
            assert!(
                out.num_batched_tokens <= cfg.max_num_batched_tokens.div_ceil(lanes),
                "a lane went over its share of the budget"
            );
        }
        idle_lanes = if out.is_empty() { idle_lanes + 1 } else { 0 };
        if quiet && idle_lanes > lanes && in_flight.iter().all(Option::is_none) {
            panic!(
                "stalled: no lane scheduled anything with {} live requests",
                sched.num_waiting() + sched.num_running()
            );
        }
        if !out.is_empty() {
            let sampled = model.run(&sched, &out);
            in_flight[lane] = Some((out, sampled));
        }
        step += 1;
    }
    assert_eq!(sched.num_free_blocks(), cfg.num_blocks, "KV blocks leaked");
    assert_eq!(sched.num_running() + sched.num_waiting(), 0);
    Ok(RunResult {
        finished,
        outputs,
        steps: step,
        computed_tokens: model.computed_tokens,
    })
}
