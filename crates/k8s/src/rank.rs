//! A worker's rank inside a StatefulSet: the ordinal at the end of its pod name
//! (`--rank-from-hostname`) or the pod-index label passed through the downward API
//! (`TANDEM_RANK`). An explicit `--rank` wins over both.

use crate::K8sError;

/// The environment variable the pod specs fill from the pod-index label.
pub const RANK_ENV: &str = "TANDEM_RANK";
/// The label Kubernetes (1.28+) puts on every StatefulSet pod: its ordinal.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// The ordinal of a StatefulSet pod name: the digits after its last `-`
/// (`tandem-expert-12` -> 12). A fully qualified host name is cut at its first dot.
pub fn rank_from_hostname(host: &str) -> Result<u32, K8sError> {
    let short = host.trim().split('.').next().unwrap_or_default();
    let bad = || {
        K8sError::Rank(format!(
            "--rank-from-hostname: the host name {host:?} does not end in -N (a StatefulSet pod \
         is named <statefulset>-<ordinal>); pass --rank instead"
        ))
    };
    let (_, digits) = short.rsplit_once('-').ok_or_else(bad)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    digits.parse().map_err(|_| bad())
}

/// This host's name: `$HOSTNAME` (which container runtimes set to the pod name), else the
/// kernel's.
pub fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The rank: `explicit` (`--rank`) if given; else the host name's ordinal when
/// `from_hostname`, which must equal `env` (`TANDEM_RANK`) when that is set too; else `env`;
/// else 0. An empty `env` counts as unset (the downward API gives an empty value when the
/// pod-index label is missing, as on clusters older than 1.28).
pub fn resolve_rank(
    explicit: Option<u32>,
    from_hostname: bool,
    host: Option<String>,
    env: Option<String>,
) -> Result<u32, K8sError> {
    let env = env.map(|e| e.trim().to_string()).filter(|e| !e.is_empty());
    let env_rank = env
        .map(|e| {
            e.parse::<u32>().map_err(|_| {
                K8sError::Rank(format!("{RANK_ENV}={e:?} is not a rank (a whole number)"))
            })
        })
        .transpose()?;
    if let Some(r) = explicit {
        return Ok(r);
    }
    if from_hostname {
        let host = host.ok_or_else(|| {
            K8sError::Rank("--rank-from-hostname: this host has no name to read".into())
        })?;
        let r = rank_from_hostname(&host)?;
        if let Some(e) = env_rank.filter(|e| *e != r) {
            return Err(K8sError::Rank(format!(
                "the host name {host:?} says rank {r} but {RANK_ENV} says {e}"
            )));
        }
        return Ok(r);
    }
    Ok(env_rank.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ordinal_is_the_trailing_number() {
        assert_eq!(rank_from_hostname("tandem-expert-0").unwrap(), 0);
        assert_eq!(rank_from_hostname("tandem-expert-12\n").unwrap(), 12);
        assert_eq!(
            rank_from_hostname("my-llm-attention-3.my-llm-attention.ns.svc.cluster.local").unwrap(),
            3
        );
        for bad in [
            "tandem",
            "tandem-expert",
            "tandem-expert-",
            "expert-1a",
            "",
            "a-99999999999",
        ] {
            let e = rank_from_hostname(bad).unwrap_err().to_string();
            assert!(e.contains("does not end in -N"), "{bad}: {e}");
        }
    }

    #[test]
    fn precedence_explicit_then_hostname_then_env() {
        let h = || Some("t-expert-2".to_string());
        assert_eq!(
            resolve_rank(Some(5), true, h(), Some("2".into())).unwrap(),
            5
        );
        assert_eq!(resolve_rank(None, true, h(), None).unwrap(), 2);
        assert_eq!(resolve_rank(None, true, h(), Some("2".into())).unwrap(), 2);
        assert_eq!(
            resolve_rank(None, true, h(), Some(String::new())).unwrap(),
            2
        );
        assert_eq!(
            resolve_rank(None, false, None, Some("7".into())).unwrap(),
            7
        );
        assert_eq!(resolve_rank(None, false, h(), None).unwrap(), 0);
        let e = resolve_rank(None, true, h(), Some("1".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2") && e.contains("says 1"), "{e}");
        let e = resolve_rank(None, false, None, Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("TANDEM_RANK"), "{e}");
        assert!(resolve_rank(None, true, None, None).is_err());
    }
}
