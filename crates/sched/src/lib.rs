//! tandem-sched: what runs when, with no tensors in sight.
//!
//! * [`block_manager`]: the paged KV-cache allocator with prefix caching.
//! * [`scheduler`]: the continuous-batching scheduler; its [`SchedulerOutput`] is a plain
//!   struct (token ids, positions, block tables) that the model runner executes.
//! * [`sampling`]: request sampling parameters, the per-request RNG and the sampler.
//! * [`stop`]: stop strings over streamed text.
//! * [`constraint`]: per-sequence token constraints (structured output), masked before sampling.
//!
//! An engine step is `schedule()` -> run the model -> sample each sequence with
//! `samples == true` -> `update()` (the shape of nano-vllm's `LLMEngine.step`).
//!
//! Layout of a sequence in the KV cache: the token at position `p` lives in block
//! `block_table[p / block_size]` at offset `p % block_size`.
//!
//! Owns: admission, KV block accounting, sampling and constraints. May not touch model
//! weights, threads or the transport; its only kernel is `tandem-kernels`' `sum_exp`.

pub mod block_manager;
pub mod constraint;
pub mod sampling;
pub mod scheduler;
pub mod stop;

pub use block_manager::{AllocOutcome, BlockError, BlockId, BlockManager, PrefixCacheStats};
pub use constraint::{Commit, TokenConstraint};
pub use sampling::{
    RequestRng, SampleError, Sampled, Sampler, SamplingParams, SamplingParamsError,
    GREEDY_TEMPERATURE, MAX_LOGPROBS,
};
pub use scheduler::{
    FinishReason, FinishedSeq, SamplingInputs, SchedError, ScheduledSeq, Scheduler,
    SchedulerConfig, SchedulerOutput, Sequence, SequenceStatus,
};
pub use stop::{StopMatcher, StopPush};
