//! Shared-memory M2N is Linux-only (memfd, futex): elsewhere no offer is ever made and every
//! link stays on TCP.

pub use crate::net::Lending;
use crate::tls::{ReadHalf, WriteHalf};
use std::io;
use std::net::TcpStream;

pub const DEFAULT_RING_BYTES: usize = 1 << 20;

/// No loans on this platform.
pub fn loans() -> (u64, u64) {
    (0, 0)
}

/// Never made on this platform.
pub(crate) enum Offer {}

impl Offer {
    pub(crate) fn path(&self) -> &str {
        match *self {}
    }
    pub(crate) fn token(&self) -> &str {
        match *self {}
    }
    pub(crate) fn into_halves(
        self,
        _: &TcpStream,
        _: Lending,
    ) -> io::Result<(ReadHalf, WriteHalf)> {
        match self {}
    }
}

pub(crate) fn offer(_: &TcpStream, _: usize) -> Option<Offer> {
    None
}

pub(crate) fn accept(
    _: &str,
    _: &str,
    _: &TcpStream,
    _: Lending,
) -> Result<(ReadHalf, WriteHalf), String> {
    Err("shared memory is not supported on this platform".into())
}
