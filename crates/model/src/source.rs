//! Where a model's weights, config and tokenizer come from: a Hugging Face checkpoint
//! directory or a llama.cpp GGUF file. The path is classified once, where it enters the
//! program ([`ModelSource::of_path`]); everything after takes the resolved source and matches
//! on it instead of looking at the path's extension again.

use std::path::{Path, PathBuf};

/// A model's source, resolved from its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A checkpoint directory: `config.json`, `*.safetensors`, `tokenizer.json`.
    HfDir(PathBuf),
    /// A GGUF file (`*.gguf`): tensors, the metadata `config.json` stands for, the tokenizer.
    Gguf(PathBuf),
}

impl ModelSource {
    /// The one place a path is classified: a path ending in `.gguf` (any case) is a GGUF
    /// file, anything else a checkpoint directory. Nothing is read; a missing file or
    /// directory is reported by whatever opens it.
    pub fn of_path(path: &Path) -> Self {
        let gguf = path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
        if gguf {
            Self::Gguf(path.to_path_buf())
        } else {
            Self::HfDir(path.to_path_buf())
        }
    }

    /// The directory or file.
    pub fn path(&self) -> &Path {
        match self {
            Self::HfDir(p) | Self::Gguf(p) => p,
        }
    }

    /// The GGUF file, if this is one.
    pub fn gguf(&self) -> Option<&Path> {
        match self {
            Self::Gguf(p) => Some(p),
            Self::HfDir(_) => None,
        }
    }

    /// A short name for the model: a directory's name, or a GGUF file's name without
    /// `.gguf`.
    pub fn name(&self) -> Option<String> {
        let n = match self {
            Self::HfDir(p) => p.file_name(),
            Self::Gguf(p) => p.file_stem(),
        };
        n.map(|n| n.to_string_lossy().into_owned())
    }

    /// Whether the path names what its kind says: a GGUF path an existing file, a
    /// directory path something that is not a plain file. `Err` says what is wrong, naming
    /// the path (callers prefix the flag it came from).
    pub fn check_exists(&self) -> std::result::Result<(), String> {
        match self {
            Self::Gguf(p) if !p.is_file() => Err(format!("{}: no such GGUF file", p.display())),
            Self::HfDir(p) if p.is_file() => Err(format!(
                "{}: a file, but not a GGUF one (*.gguf); pass a checkpoint directory or a \
                 .gguf file",
                p.display()
            )),
            _ => Ok(()),
        }
    }

    /// True when the source has a tokenizer [`crate::Tokenizer::load`] can read: a GGUF file
    /// or a directory with `tokenizer.json`.
    pub fn has_tokenizer(&self) -> bool {
        match self {
            Self::Gguf(_) => true,
            Self::HfDir(d) => d.join("tokenizer.json").exists(),
        }
    }
}

/// A path given where a source is taken (`Model::load(&dir)`): classified here, by
/// [`ModelSource::of_path`]. A resolved source is passed as itself (`Model::load(src)`).
impl<P: AsRef<Path> + ?Sized> From<&P> for ModelSource {
    fn from(p: &P) -> Self {
        Self::of_path(p.as_ref())
    }
}

impl From<PathBuf> for ModelSource {
    fn from(p: PathBuf) -> Self {
        Self::of_path(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_extension_once() {
        assert_eq!(
            ModelSource::of_path(Path::new("m/q.GGUF")),
            ModelSource::Gguf("m/q.GGUF".into())
        );
        assert_eq!(
            ModelSource::of_path(Path::new("m/qwen")),
            ModelSource::HfDir("m/qwen".into())
        );
        assert_eq!(
            ModelSource::of_path(Path::new("m/q.gguf"))
                .name()
                .as_deref(),
            Some("q")
        );
        assert_eq!(
            ModelSource::of_path(Path::new("m/qwen")).name().as_deref(),
            Some("qwen")
        );
    }

    #[test]
    fn check_exists_names_the_path() {
        let tmp = std::env::temp_dir().join(format!("tandem-source-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let missing = ModelSource::of_path(&tmp.join("absent.gguf"));
        let e = missing.check_exists().unwrap_err();
        assert!(
            e.contains("absent.gguf") && e.contains("no such GGUF file"),
            "{e}"
        );
        let file = tmp.join("weights.bin");
        std::fs::write(&file, b"x").unwrap();
        let e = ModelSource::of_path(&file).check_exists().unwrap_err();
        assert!(e.contains("not a GGUF one"), "{e}");
        assert!(ModelSource::of_path(&tmp).check_exists().is_ok());
        assert!(!ModelSource::of_path(&tmp).has_tokenizer());
        assert!(missing.has_tokenizer());
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
