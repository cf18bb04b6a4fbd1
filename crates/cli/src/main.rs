//! The `tandem` binary: parses flags and wires the crates together. Logic lives in the
//! library crates (see ARCHITECTURE.md); this crate may not hold any (it stays under 1,500
//! lines).

mod bench;
mod generate;
mod k8s_cmd;
mod launch_cmd;
mod models;
mod plan_cmd;
mod profile_cmd;
mod serve_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Serve Mixture-of-Experts models with disaggregated expert parallelism"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up: the size of the largest variant (plan's flags, with the
// manifests' flags of --k8s) costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Start the OpenAI-compatible server (default: the embedded demo model, disaggregated
    /// in-process).
    Serve(serve_cmd::ServeArgs),
    /// Generate text for one or more prompts (batched) and print it.
    Generate(generate::GenerateArgs),
    /// Write the embedded demo model (random weights, locally trained tokenizer) to DIR.
    InitDemo(models::InitDemoArgs),
    /// Benchmarks (JSON output).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Search deployment plans for a model, an SLO and a hardware pair (MegaScale-Infer 4.2).
    Plan(plan_cmd::PlanArgs),
    /// Discrete-event simulation of a plan's ping-pong pipeline.
    Simulate(plan_cmd::SimulateArgs),
    /// Start every worker of a multi-process deployment on this host (child processes).
    Launch(launch_cmd::LaunchArgs),
    /// Show whether every worker of a multi-process deployment is up (JSON).
    Status(tandem_deploy::StatusArgs),
    /// Write Kubernetes manifests (StatefulSets per role, Services, ConfigMap, PDBs) for a
    /// deployment file: `kubectl apply -k OUT`.
    K8s(k8s_cmd::K8sCmdArgs),
    /// Measure this machine's stage and transport times into a profile for the planner
    /// (--calibrate: then predict and measure three engine shapes).
    Profile(profile_cmd::ProfileCmdArgs),
    /// Write a GGUF file with random weights in the exact shapes of a named model
    /// (qwen3-30b-a3b, gpt-oss-20b, deepseek-v2-lite, mixtral-8x7b) and a working tokenizer,
    /// which tandem and llama.cpp both load: a real-size benchmark without a download.
    SynthGguf(tandem_bench::synth::SynthArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    match cli.cmd {
        Cmd::Generate(a) => {
            let sub = matches
                .subcommand_matches("generate")
                .ok_or_else(|| anyhow::anyhow!("generate: no arguments"))?;
            generate::run(a, sub)
        }
        Cmd::InitDemo(a) => models::init_demo(a),
        Cmd::Serve(a) => serve_cmd::run(a),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Plan(a) => plan_cmd::plan(a),
        Cmd::Simulate(a) => plan_cmd::simulate(a),
        Cmd::Launch(a) => launch_cmd::launch(a),
        Cmd::Status(a) => tandem_deploy::status(a),
        Cmd::Profile(a) => profile_cmd::run(a),
        Cmd::K8s(a) => k8s_cmd::run(a),
        Cmd::SynthGguf(a) => tandem_bench::synth::run(&a),
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks over every subcommand (unique argument and group names,
    /// valid defaults): they run only in debug builds and only for the subcommand parsed, so
    /// a clash in a rarely used command would otherwise surface as a panic on a user's first
    /// `--help`.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// `generate` and `serve` given the same shape flags run the same shape: one rule decides
    /// what the flags leave open (`tandem_core::default_micro_batches`).
    #[test]
    fn generate_and_serve_run_the_same_shape() {
        use clap::Parser;
        let src = tandem_model::ModelSource::HfDir("unused".into());
        let shape = |cmd: &str, flags: &[&str]| {
            let mut argv = vec!["tandem", cmd];
            argv.extend(flags);
            let s = match super::Cli::try_parse_from(argv).unwrap().cmd {
                super::Cmd::Generate(a) => a.shape,
                super::Cmd::Serve(a) => a.shape,
                _ => unreachable!(),
            };
            s.deployment_or_default(false, &src).unwrap()
        };
        for (flags, m) in [
            (&["--expert-workers", "1"][..], 2),
            (
                &["--expert-workers", "2", "--attention-replicas", "2"][..],
                2,
            ),
            (&["--expert-workers", "0"][..], 1),
            (&["--expert-workers", "1", "--micro-batches", "3"][..], 3),
            (&["--threads-per-worker", "2"][..], 2),
        ] {
            let g = shape("generate", flags);
            assert_eq!(g, shape("serve", flags), "{flags:?}");
            assert_eq!(g.micro_batches, m, "{flags:?}");
        }
    }
}
