//! `tandem profile`: the model to profile; the measurements are `tandem_bench::profile`.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ProfileArgs {
    /// Checkpoint directory or llama.cpp GGUF file; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub profile: tandem_bench::profile::ProfileArgs,
}

pub fn run(a: ProfileArgs) -> Result<()> {
    let dir = crate::models::resolve(&a.model)?;
    tandem_bench::profile::run(&dir, &a.profile)
}
