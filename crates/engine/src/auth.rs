//! The cluster secret that M2N peers prove to each other (issue #17).
//!
//! Every process of a deployment may hold the same secret: `--cluster-secret-file PATH`, else
//! `TANDEM_CLUSTER_SECRET` (the secret itself), else `[security] cluster_secret_file` in the
//! deployment file ([`ClusterSecret::resolve`]). The handshake in [`crate::net`] is a mutual
//! challenge-response: each side sends a fresh random nonce, the replica answers the worker's
//! with an HMAC-SHA256 over both nonces and what it claims (role, rank, model and deployment
//! hashes, wire dtype, the worker it talks to), and the worker proves itself back with the
//! same transcript under another domain tag. The secret never crosses the wire, a recorded
//! handshake is useless on a new connection (the worker's nonce differs), and a proof of one
//! direction cannot be reflected as the other (the tags differ).
//!
//! The secret is held as bytes in memory only; `Debug` never shows it.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// The environment variable that carries the secret itself.
pub const SECRET_ENV: &str = "TANDEM_CLUSTER_SECRET";

/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;

/// Domain tags: a proof made for one purpose never verifies for another.
pub(crate) const TAG_PEER: &[u8] = b"tandem m2n v2: peer proof";
pub(crate) const TAG_WORKER: &[u8] = b"tandem m2n v2: worker proof";

/// Secrets shorter than this are accepted with a warning: a recorded handshake lets an
/// eavesdropper try guesses offline.
const SHORT_SECRET: usize = 16;

/// Why a cluster secret could not be set up (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the cluster secret from {source_name} is empty")]
    Empty { source_name: String },
    #[error("cannot read the cluster secret file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the secret in use came from (for the start-up log; never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `--cluster-secret-file`.
    Flag(PathBuf),
    /// [`SECRET_ENV`].
    Env,
    /// `[security] cluster_secret_file` of the deployment file (already resolved against
    /// the file's directory).
    Deployment(PathBuf),
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Flag(p) => write!(f, "--cluster-secret-file {}", p.display()),
            SecretSource::Env => write!(f, "the {SECRET_ENV} environment variable"),
            SecretSource::Deployment(p) => {
                write!(f, "[security] cluster_secret_file {}", p.display())
            }
        }
    }
}

/// The shared secret of a deployment's M2N peers.
#[derive(Clone)]
pub struct ClusterSecret {
    key: Vec<u8>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// A secret given as bytes; `source_name` names where it came from in the error.
    pub fn new(key: impl Into<Vec<u8>>, source_name: &str) -> Result<Self, SecretError> {
        let key = key.into();
        if key.is_empty() {
            return Err(SecretError::Empty {
                source_name: source_name.into(),
            });
        }
        if key.len() < SHORT_SECRET {
            tracing::warn!(
                "the cluster secret from {source_name} has only {} bytes: use at least 32 \
                 random ones (e.g. `head -c 32 /dev/urandom | base64`)",
                key.len()
            );
        }
        Ok(Self { key })
    }

    /// A secret in a file (a mounted secret): one trailing `\n` or `\r\n` is dropped.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let key = bytes
            .strip_suffix(b"\r\n")
            .or_else(|| bytes.strip_suffix(b"\n"))
            .unwrap_or(&bytes);
        Self::new(key, &format!("the file {}", path.display()))
    }

    /// The secret in use, by precedence: the flag's file, else the environment variable's
    /// value (`env`: the caller reads [`SECRET_ENV`], so tests need not touch the process
    /// environment), else the deployment file's `[security] cluster_secret_file`. `None`:
    /// none configured. A source that is given but bad is an error, never a fall-through to
    /// the next one.
    pub fn resolve(
        flag: Option<&Path>,
        env: Option<String>,
        deployment_file: Option<&Path>,
    ) -> Result<Option<(Self, SecretSource)>, SecretError> {
        if let Some(p) = flag {
            return Ok(Some((Self::from_file(p)?, SecretSource::Flag(p.into()))));
        }
        if let Some(v) = env {
            return Ok(Some((
                Self::new(
                    v.into_bytes(),
                    &format!("the {SECRET_ENV} environment variable"),
                )?,
                SecretSource::Env,
            )));
        }
        if let Some(p) = deployment_file {
            return Ok(Some((
                Self::from_file(p)?,
                SecretSource::Deployment(p.into()),
            )));
        }
        Ok(None)
    }

    fn mac(&self, tag: &[u8], transcript: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        m.update(&(tag.len() as u32).to_le_bytes());
        m.update(tag);
        m.update(transcript);
        m
    }

    /// HMAC-SHA256(secret, tag || transcript).
    pub(crate) fn prove(&self, tag: &[u8], transcript: &[u8]) -> [u8; 32] {
        self.mac(tag, transcript).finalize().into_bytes().into()
    }

    /// Whether `proof` is [`Self::prove`]'s, compared in constant time (a proof of another
    /// length is simply wrong).
    pub(crate) fn verify(&self, tag: &[u8], transcript: &[u8], proof: &[u8]) -> bool {
        let want = self.prove(tag, transcript);
        bool::from(want.as_slice().ct_eq(proof))
    }
}

/// A fresh random nonce from the operating system.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], String> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| format!("no randomness for a handshake nonce: {e}"))?;
    Ok(n)
}

/// Appends length-prefixed fields: the transcript is unambiguous whatever the fields hold.
#[derive(Default)]
pub(crate) struct Transcript(Vec<u8>);

impl Transcript {
    pub(crate) fn field(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

pub(crate) fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, contents: &[u8]) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-secret-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    fn key(s: &ClusterSecret) -> &[u8] {
        &s.key
    }

    #[test]
    fn precedence_is_flag_then_env_then_deployment() {
        let flag = tmp("flag", b"from-the-flag-file\n");
        let dep = tmp("dep", b"from-the-deployment-file\n");
        let env = Some("from-the-environment".to_string());
        let (s, src) = ClusterSecret::resolve(Some(&flag), env.clone(), Some(&dep))
            .unwrap()
            .unwrap();
        assert_eq!(key(&s), b"from-the-flag-file");
        assert_eq!(src, SecretSource::Flag(flag.clone()));
        let (s, src) = ClusterSecret::resolve(None, env.clone(), Some(&dep))
            .unwrap()
            .unwrap();
        assert_eq!(key(&s), b"from-the-environment");
        assert_eq!(src, SecretSource::Env);
        let (s, src) = ClusterSecret::resolve(None, None, Some(&dep))
            .unwrap()
            .unwrap();
        assert_eq!(key(&s), b"from-the-deployment-file");
        assert_eq!(src, SecretSource::Deployment(dep.clone()));
        assert!(ClusterSecret::resolve(None, None, None).unwrap().is_none());
    }

    #[test]
    fn one_trailing_newline_is_dropped_and_nothing_else() {
        for (contents, want) in [
            (&b"abc\n"[..], &b"abc"[..]),
            (b"abc\r\n", b"abc"),
            (b"abc", b"abc"),
            (b"abc\n\n", b"abc\n"),
            (b" abc ", b" abc "),
        ] {
            let p = tmp("nl", contents);
            assert_eq!(key(&ClusterSecret::from_file(&p).unwrap()), want);
        }
    }

    #[test]
    fn empty_or_unreadable_secrets_are_refused_naming_the_source() {
        let empty = tmp("empty", b"\n");
        let e = ClusterSecret::from_file(&empty).unwrap_err().to_string();
        assert!(
            e.contains("empty") && e.contains(&empty.display().to_string()),
            "{e}"
        );
        let missing = std::env::temp_dir().join("tandem-secret-does-not-exist/secret");
        let e = ClusterSecret::resolve(Some(&missing), Some("env-secret".into()), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read") && e.contains("does-not-exist"),
            "{e}"
        );
        // A bad higher-precedence source is an error, not a fall-through.
        let e = ClusterSecret::resolve(None, Some(String::new()), Some(&empty))
            .unwrap_err()
            .to_string();
        assert!(e.contains(SECRET_ENV) && e.contains("empty"), "{e}");
        let e = ClusterSecret::resolve(None, None, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does-not-exist"), "{e}");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = ClusterSecret::new("hunter2-hunter2-hunter2", "test").unwrap();
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2"), "{d}");
    }

    #[test]
    fn proofs_depend_on_secret_tag_and_every_byte_of_the_transcript() {
        let a = ClusterSecret::new("secret-a-0123456789abcdef", "test").unwrap();
        let b = ClusterSecret::new("secret-b-0123456789abcdef", "test").unwrap();
        let t = Transcript::default().field(b"nonce").field(b"replica");
        let p = a.prove(TAG_PEER, t.bytes());
        assert!(a.verify(TAG_PEER, t.bytes(), &p));
        assert!(!b.verify(TAG_PEER, t.bytes(), &p), "another secret");
        assert!(!a.verify(TAG_WORKER, t.bytes(), &p), "another tag");
        assert!(
            !a.verify(TAG_PEER, t.bytes(), &p[..31]),
            "a truncated proof"
        );
        for i in 0..t.bytes().len() {
            let mut m = t.bytes().to_vec();
            m[i] ^= 1;
            assert!(!a.verify(TAG_PEER, &m, &p), "byte {i} changed");
        }
        // Length prefixes: moving a byte from one field to the next changes the transcript.
        let t2 = Transcript::default().field(b"nonc").field(b"ereplica");
        assert_ne!(t.bytes(), t2.bytes());
    }

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
        assert!(from_hex("éé").is_none());
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
