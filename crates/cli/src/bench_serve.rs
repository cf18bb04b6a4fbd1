//! `tandem bench serve`: placeholder until the load generator lands.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchServeArgs {}

pub fn run(_a: BenchServeArgs) -> Result<()> {
    anyhow::bail!("tandem bench serve is not implemented yet")
}
