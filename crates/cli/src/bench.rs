//! `tandem bench ...`: the subcommands and their wiring; the harnesses are in `tandem-bench`.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tandem_bench::{kernels, m2n};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Decode steps of the colocated model at a fixed batch: tokens/s, ms/step and the
    /// fraction of the memory-bandwidth roofline reached.
    Decode(DecodeCmdArgs),
    /// Prompt processing speed (`llama-bench -p 512 -n 0`): prompt tokens/s per weight type
    /// and prompt length, each prompt one forward pass into an empty KV cache.
    Prefill(PrefillCmdArgs),
    /// Offline throughput of the engine: N requests through one or more deployment shapes,
    /// measured one after another in the same run.
    Engine(EngineCmdArgs),
    /// Load generator for any OpenAI-compatible server, compatible with `vllm bench serve`.
    Serve(tandem_bench::serve::BenchServeArgs),
    /// M2N exchange between M sender and N receiver processes (one dispatch and one combine
    /// per round), over tandem's TCP transport or, with --baseline mpi, MPI_Alltoallv.
    M2n(m2n::M2nArgs),
    /// A sender or receiver process of `bench m2n` (internal).
    #[command(hide = true)]
    M2nPeer(m2n::M2nPeerArgs),
    /// One MPI rank of `bench m2n --baseline mpi` (internal; started by mpirun).
    #[command(hide = true)]
    M2nMpiRank(m2n::M2nMpiRankArgs),
    /// The hot CPU kernels alone: memory read bandwidth, the small-batch matmul against
    /// candle's GEMM on the demo model's expert shapes, and paged attention decode.
    Kernels(kernels::KernelsArgs),
}

#[derive(Args)]
// Named apart from `tandem_bench::engine::EngineArgs`: clap names an argument group after
// its struct, and two groups of one name in a command fail its debug assertions.
pub struct EngineCmdArgs {
    /// Checkpoint directory or llama.cpp GGUF file; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub bench: tandem_bench::engine::EngineArgs,
    #[command(flatten)]
    pub shape: tandem_deploy::ShapeArgs,
    #[command(flatten)]
    pub weights: crate::models::WeightArgs,
}

#[derive(Args)]
pub struct PrefillCmdArgs {
    /// Checkpoint directory or llama.cpp GGUF file; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub bench: tandem_bench::prefill::PrefillArgs,
}

#[derive(Args)]
pub struct DecodeCmdArgs {
    /// Checkpoint directory or llama.cpp GGUF file; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub bench: tandem_bench::engine::DecodeArgs,
    #[command(flatten)]
    pub weights: crate::models::WeightArgs,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Decode(a) => {
            let src = crate::models::resolve(&a.model)?;
            tandem_bench::engine::decode(&src, a.weights.linear_type()?, &a.bench)
        }
        BenchCmd::Prefill(a) => {
            // The flags first: a typo fails before the demo model is written or loaded.
            tandem_bench::prefill::check(&a.bench)?;
            let dir = crate::models::resolve(&a.model)?;
            tandem_bench::prefill::run(&dir, &a.bench)
        }
        BenchCmd::Engine(a) => {
            let src = crate::models::resolve(&a.model)?;
            let ty = a.weights.linear_type()?;
            tandem_bench::engine::engine(&src, ty, a.shape.deployment()?, &a.bench)
        }
        BenchCmd::Serve(a) => tandem_bench::serve::run(a),
        BenchCmd::M2n(a) => m2n::run(a),
        BenchCmd::M2nPeer(a) => m2n::peer(a),
        BenchCmd::M2nMpiRank(a) => m2n::mpi_rank(a),
        BenchCmd::Kernels(a) => kernels::run(a),
    }
}
