//! Errors of the planner library. The CLI wraps them with `anyhow` context.

/// Everything that can go wrong in `tandem-plan`. Every variant says which input was bad.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("unknown hardware {name:?}; the catalog has: {known}")]
    UnknownHardware { name: String, known: String },
    #[error(
        "unknown model {name:?}: not a catalog name ({known}) and not a path to a config.json \
         or a directory holding one"
    )]
    UnknownModel { name: String, known: String },
    #[error("model config {path}: {msg}")]
    BadModel { path: String, msg: String },
    #[error(
        "hardware {hw} has no {unit} price in the catalog; add `{field}` to it (--hw-catalog) \
         or rank by --objective gpu"
    )]
    NoPrice {
        hw: String,
        unit: &'static str,
        field: &'static str,
    },
    #[error("performance profile {path}: {msg}")]
    Profile { path: String, msg: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no feasible plan: {0}")]
    Infeasible(String),
    /// A least-squares fit that cannot be made (too few or degenerate points).
    #[error("{0}")]
    Fit(String),
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;

pub(crate) fn read_file(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| PlanError::Io {
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn write_file(path: &std::path::Path, contents: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| PlanError::Write {
                path: dir.display().to_string(),
                source,
            })?;
        }
    }
    std::fs::write(path, contents).map_err(|source| PlanError::Write {
        path: path.display().to_string(),
        source,
    })
}
