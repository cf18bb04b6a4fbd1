//! Where models come from: a checkpoint directory, a llama.cpp GGUF file, or the embedded demo
//! model.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use tandem_model::demo::{default_demo_dir, ensure_demo, write_demo, DemoSpec};
use tandem_model::weights::LinearType;
use tandem_model::ModelSource;

/// How the linear layers' weights are held in memory (`serve`, `generate`, `bench`).
#[derive(Args, Clone, Debug)]
pub struct WeightArgs {
    /// Weight type of the linear layers: `auto` (the checkpoint's own: bf16 stays bf16, f32
    /// stays f32, f16 becomes f32), `f32` or `bf16`. Activations are f32 in every case.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Quantize the linear layers at load: `q8_0` or `q4_0` (llama.cpp's block formats; wins
    /// over --dtype).
    #[arg(long)]
    pub quantization: Option<String>,
}

impl WeightArgs {
    pub fn linear_type(&self) -> Result<LinearType> {
        LinearType::from_flags(&self.dtype, self.quantization.as_deref())
            .map_err(anyhow::Error::msg)
    }

    /// The flags again, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec!["--dtype".to_string(), self.dtype.clone()];
        if let Some(q) = &self.quantization {
            v.extend(["--quantization".to_string(), q.clone()]);
        }
        v
    }
}

#[derive(Args)]
pub struct InitDemoArgs {
    /// Directory to write the checkpoint to.
    pub dir: PathBuf,
    /// `default` (~490M parameters, 8 layers: the benchmark model), `deep` (~460M in 32
    /// narrower layers: ping-pong where the step boundary does not dominate) or `tiny` (for
    /// tests).
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

/// `--model DIR` or `--model FILE.gguf`, or the default demo model (written on first use),
/// resolved to its source: the one place the CLI classifies a model path.
pub fn resolve(model: &Option<PathBuf>) -> Result<ModelSource> {
    match model {
        Some(p) => {
            let src = ModelSource::of_path(p);
            src.check_exists()
                .map_err(|e| anyhow::anyhow!("--model {e}"))?;
            Ok(src)
        }
        None => {
            let dir = default_demo_dir();
            ensure_demo(&dir, &DemoSpec::DEFAULT)
                .with_context(|| format!("writing the demo model to {}", dir.display()))?;
            Ok(ModelSource::HfDir(dir))
        }
    }
}
