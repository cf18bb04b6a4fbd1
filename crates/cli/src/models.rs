//! Where models come from: a checkpoint directory, or the embedded demo model.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use tandem_model::demo::{default_demo_dir, ensure_demo, write_demo, DemoSpec};

#[derive(Args)]
pub struct InitDemoArgs {
    /// Directory to write the checkpoint to.
    pub dir: PathBuf,
    /// `default` (~490M parameters, the benchmark model) or `tiny` (for tests).
    #[arg(long, default_value = "default")]
    pub preset: String,
}

pub fn init_demo(a: InitDemoArgs) -> Result<()> {
    let spec = DemoSpec::preset(&a.preset)?;
    let t = std::time::Instant::now();
    write_demo(&a.dir, &spec)
        .with_context(|| format!("writing demo model to {}", a.dir.display()))?;
    eprintln!(
        "wrote {} demo model to {} in {:.1}s",
        a.preset,
        a.dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--model DIR`, or the default demo model (written on first use).
pub fn resolve(model: &Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.clone()),
        None => {
            let dir = default_demo_dir();
            ensure_demo(&dir, &DemoSpec::DEFAULT)
                .with_context(|| format!("writing the demo model to {}", dir.display()))?;
            Ok(dir)
        }
    }
}
