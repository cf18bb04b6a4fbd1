//! `tandem profile`: the model to profile; the measurements are `tandem_bench::profile`.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
// Named apart from `tandem_bench::profile::ProfileArgs`: clap names an argument group after
// its struct, and two groups of one name in a command fail its debug assertions.
pub struct ProfileCmdArgs {
    /// Checkpoint directory or llama.cpp GGUF file; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub profile: tandem_bench::profile::ProfileArgs,
}

pub fn run(a: ProfileCmdArgs) -> Result<()> {
    let src = crate::models::resolve(&a.model)?;
    tandem_bench::profile::run(&src, &a.profile)
}
