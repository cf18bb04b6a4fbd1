//! Bearer-token authentication (`serve --api-key`, `TANDEM_API_KEY`, `--api-key-file`).
//!
//! The key is kept only as its SHA-256 digest. A presented token is hashed and the two
//! digests are compared with [`subtle::ConstantTimeEq`], so neither the time of the
//! comparison nor the length of the token tells a client how much of the key it guessed.
//! Every route except `/health` and `/metrics` needs the key when one is set (see
//! [`crate::routes::gate`]).

use crate::error::ApiError;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// Why a key could not be set up (a start-up error, never a request error).
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("the API key from {source_name} is empty")]
    Empty { source_name: String },
    #[error(
        "the API key from {source_name} contains whitespace or a control character (a bearer \
         token cannot carry them)"
    )]
    BadCharacter { source_name: String },
    #[error("cannot read the API key file {}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API key file {} is not UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
}

/// A required API key, held as its SHA-256 digest. `Debug` never shows it.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl ApiKey {
    /// A key given on the command line or in the environment; `source_name` names where it
    /// came from in the error.
    pub fn new(key: &str, source_name: &str) -> Result<Self, ApiKeyError> {
        if key.is_empty() {
            return Err(ApiKeyError::Empty {
                source_name: source_name.into(),
            });
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ApiKeyError::BadCharacter {
                source_name: source_name.into(),
            });
        }
        Ok(Self {
            digest: sha256(key.as_bytes()),
        })
    }

    /// A key in a file (a secret mounted as a file): its trailing line ending is dropped.
    pub fn from_file(path: &Path) -> Result<Self, ApiKeyError> {
        let bytes = std::fs::read(path).map_err(|source| ApiKeyError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ApiKeyError::NotUtf8 {
            path: path.to_path_buf(),
        })?;
        let key = text
            .strip_suffix('\n')
            .map(|k| k.strip_suffix('\r').unwrap_or(k))
            .unwrap_or(&text);
        Self::new(key, &format!("the file {}", path.display()))
    }

    /// Whether `token` is the key, in time independent of where they differ.
    pub fn matches(&self, token: &[u8]) -> bool {
        sha256(token).ct_eq(&self.digest).into()
    }

    /// Checks a request's `Authorization: Bearer KEY` header.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            ));
        };
        let token = bearer_token(value.as_bytes()).ok_or_else(|| {
            ApiError::unauthorized(
                "The Authorization header must be of the form `Bearer YOUR_KEY`.",
            )
        })?;
        if self.matches(token) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("Incorrect API key provided."))
        }
    }
}

/// The token of a `Bearer TOKEN` header value (the scheme is case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.starts_with(b" ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn key_checks() {
        let k = ApiKey::new("s3cret", "test").unwrap();
        assert!(k.matches(b"s3cret"));
        assert!(!k.matches(b"s3cre"));
        assert!(!k.matches(b"s3cret "));
        assert!(!k.matches(b""));
        assert!(format!("{k:?}").contains("redacted"));
        assert!(!format!("{k:?}").contains("s3cret"));
        assert!(matches!(
            ApiKey::new("", "x"),
            Err(ApiKeyError::Empty { .. })
        ));
        assert!(matches!(
            ApiKey::new("a b", "x"),
            Err(ApiKeyError::BadCharacter { .. })
        ));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bear"), None);
        let k = ApiKey::new("abc", "test").unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(k.check(&h).unwrap_err().status.as_u16(), 401);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abd"),
        );
        let e = k.check(&h).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (401, Some("invalid_api_key")));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert!(k.check(&h).is_ok());
    }

    #[test]
    fn key_file_trims_one_line_ending() {
        let dir = std::env::temp_dir().join(format!("tandem-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key");
        std::fs::write(&f, "abc\r\n").unwrap();
        assert!(ApiKey::from_file(&f).unwrap().matches(b"abc"));
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(
            ApiKey::from_file(&f),
            Err(ApiKeyError::Empty { .. })
        ));
        assert!(matches!(
            ApiKey::from_file(&dir.join("missing")),
            Err(ApiKeyError::Unreadable { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
