//! Limits an operator sets on `serve` (see [`crate::ServerOptions`]) and their refusals.
//!
//! Each refusal is a [`LimitError`] variant turned into an [`ApiError`] in one place:
//! body size 413, prompt length / `max_tokens` / `n` 400 naming the parameter, in-flight
//! requests per client address 429 with `Retry-After`. The per-address count lives in
//! [`PerIp`]; a request holds an [`IpSlot`] until its response body is finished or dropped
//! (a stream holds it for its whole length).

use crate::error::ApiError;
use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// A request beyond an operator limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "the request body is larger than {limit} bytes, the most this server accepts \
         (serve --max-body-bytes)"
    )]
    BodyTooLarge { limit: usize },
    #[error(
        "the prompt has {tokens} tokens; this server accepts at most {limit} prompt tokens \
         (serve --max-prompt-tokens)"
    )]
    PromptTooLong {
        param: &'static str,
        tokens: usize,
        limit: usize,
    },
    #[error("{param} is {requested}; this server allows at most {limit} (serve --max-tokens)")]
    MaxTokens {
        param: &'static str,
        requested: usize,
        limit: usize,
    },
    #[error("n must be at most {limit}, got {requested} (serve --max-n)")]
    TooManyChoices { requested: usize, limit: usize },
    #[error(
        "too many requests in flight from {ip}: at most {limit} at once \
         (serve --max-concurrent-per-ip); retry when one has finished"
    )]
    TooManyInFlight { ip: IpAddr, limit: usize },
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        let message = e.to_string();
        match e {
            LimitError::BodyTooLarge { .. } => ApiError::too_large(message),
            LimitError::PromptTooLong { param, .. } => ApiError {
                code: Some("prompt_too_long"),
                ..ApiError::bad_param(param, message)
            },
            LimitError::MaxTokens { param, .. } => ApiError {
                code: Some("max_tokens_too_large"),
                ..ApiError::bad_param(param, message)
            },
            LimitError::TooManyChoices { .. } => ApiError::bad_param("n", message),
            LimitError::TooManyInFlight { .. } => ApiError::rate_limited(message),
        }
    }
}

/// In-flight requests per client address. Addresses with none are removed, so the map is
/// as large as the number of clients with a request in flight.
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    /// Takes one of `ip`'s `limit` slots (`limit == 0`: no limit, nothing counted).
    pub(crate) fn acquire(&self, ip: IpAddr, limit: usize) -> Result<Option<IpSlot>, LimitError> {
        if limit == 0 {
            return Ok(None);
        }
        // An IPv4 client reaching an IPv6 socket is still the same client.
        let ip = ip.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= limit {
            return Err(LimitError::TooManyInFlight { ip, limit });
        }
        *n += 1;
        Ok(Some(IpSlot {
            counts: self.counts.clone(),
            ip,
        }))
    }

    /// Requests in flight from `ip`.
    #[cfg(test)]
    pub(crate) fn in_flight(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(&ip.to_canonical()).copied().unwrap_or(0)
    }
}

/// One in-flight request of one address; gives its slot back when dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A response body that holds its request's [`IpSlot`] until the body is finished or dropped
/// (size hints and end-of-stream pass through, so a JSON answer keeps its Content-Length).
pub(crate) struct Held {
    inner: Body,
    _slot: IpSlot,
}

impl Held {
    pub(crate) fn wrap(inner: Body, slot: IpSlot) -> Body {
        Body::new(Self { inner, _slot: slot })
    }
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_counts_and_frees() {
        let p = PerIp::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a6: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = p.acquire(a, 2).unwrap().unwrap();
        let s2 = p.acquire(a6, 2).unwrap().unwrap();
        assert_eq!(
            p.acquire(a, 2).unwrap_err(),
            LimitError::TooManyInFlight { ip: a, limit: 2 }
        );
        assert!(p.acquire(b, 2).unwrap().is_some());
        assert_eq!(p.in_flight(b), 0, "b's slot was dropped at once");
        drop(s1);
        assert_eq!(p.in_flight(a), 1);
        let s3 = p.acquire(a, 2).unwrap();
        drop((s2, s3));
        assert_eq!(p.in_flight(a), 0);
        assert!(p.counts.lock().unwrap().is_empty());
        assert!(p.acquire(a, 0).unwrap().is_none(), "0 = no limit");
    }

    #[test]
    fn refusals_have_their_status_and_param() {
        let e: ApiError = LimitError::PromptTooLong {
            param: "messages",
            tokens: 9,
            limit: 8,
        }
        .into();
        assert_eq!(e.status.as_u16(), 400);
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e: ApiError = LimitError::BodyTooLarge { limit: 1 }.into();
        assert_eq!(e.status.as_u16(), 413);
        let e: ApiError = LimitError::TooManyInFlight {
            ip: "127.0.0.1".parse().unwrap(),
            limit: 1,
        }
        .into();
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(1)));
    }
}
