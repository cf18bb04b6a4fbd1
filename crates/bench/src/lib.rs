//! tandem's measurement harnesses, each printing one JSON report: the OpenAI serving load
//! generator (`serve`), the colocated decode and engine throughput benches (`engine`), the
//! M2N exchange between processes (`m2n`), the CPU kernels alone (`kernels`) and the hardware
//! profiler behind `tandem profile` (`profile`). The `tandem` binary resolves models and
//! deployment shapes and calls them; each harness owns the flags of its own.
//!
//! `m2n` starts child processes of the running binary (`bench m2n-peer`, `bench m2n-mpi-rank`
//! under mpirun), so it is only usable from the `tandem` binary.
//!
//! Owns: measuring and reporting. May not be a dependency of the serving path (server, engine,
//! deploy): what both need, such as machine facts, lives in `tandem_core::machine`.

pub mod engine;
pub mod kernels;
pub mod m2n;
pub mod prefill;
pub mod profile;
pub mod prom;
pub mod serve;
pub mod stats;
pub mod synth;
pub mod sysinfo;
