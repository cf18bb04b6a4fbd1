//! `tandem serve`: placeholder until the server lands.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ServeArgs {}

pub fn run(_a: ServeArgs) -> Result<()> {
    anyhow::bail!("tandem serve is not implemented yet")
}
