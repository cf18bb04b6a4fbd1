//! Optional TLS for the M2N data plane (issue #17), with rustls on ring.
//!
//! An expert worker given a certificate chain and key ([`TlsServer`]: `--tls-cert`,
//! `--tls-key`) speaks only TLS; a replica or `tandem status` given a CA bundle
//! ([`TlsClient`]: `--tls-ca`) speaks only TLS and accepts a worker whose certificate chains
//! to that bundle and names the host part of the worker's address (an IP address SAN for an
//! IP, a DNS name otherwise). A worker given a CA bundle too requires client certificates
//! signed by it (mutual TLS). tandem's own handshake (hello, challenge, HMAC proofs with the
//! cluster secret) then runs inside TLS unchanged: the secret still decides who may join,
//! TLS adds confidentiality, integrity and the worker's certificate.
//!
//! A connection has one reader thread and many writers. rustls is sans-IO, so both halves
//! share one [`rustls::Connection`] behind a mutex and each owns a clone of the socket:
//!
//! - the reader reads ciphertext from the socket *without* the lock, then takes it to feed
//!   the bytes in, decrypt, and copy plaintext out; it never waits for the socket while
//!   holding the lock, so a writer blocked on a full peer never stalls the reader (which is
//!   what drains the peer, and so what lets the peer's writers make progress);
//! - a writer encrypts a chunk under the lock into its own buffer, releases the lock and
//!   writes the records to the socket while holding only the `order` lock, which keeps the
//!   records of different writers in the order their sequence numbers were given.
//!
//! The plaintext path is the socket itself, and the shared-memory path ([`crate::shm`]) a
//! pair of rings: [`ReadHalf`] and [`WriteHalf`] are enums chosen once per connection.

use crate::wire::{read_frame, Frame, MAGIC};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The environment variables that stand in for the flags.
pub const CERT_ENV: &str = "TANDEM_TLS_CERT";
pub const KEY_ENV: &str = "TANDEM_TLS_KEY";
pub const CA_ENV: &str = "TANDEM_TLS_CA";

/// Where a worker's certificate goes (for messages).
pub(crate) const SERVER_HOWTO: &str =
    "--tls-cert/--tls-key, TANDEM_TLS_CERT/TANDEM_TLS_KEY or [security] tls_cert/tls_key";
/// Where a replica's CA bundle goes (for messages).
pub(crate) const CLIENT_HOWTO: &str = "--tls-ca, TANDEM_TLS_CA or [security] tls_ca";

/// Encrypted bytes a writer queues before it writes them out (rustls' send buffer limit).
const SEND_CHUNK: usize = 256 << 10;
/// Ciphertext the reader takes from the socket at a time.
const RECV_CHUNK: usize = 64 << 10;

/// Why TLS could not be set up (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot use the {what} file {}: {why}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("TLS: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of the PEM file at `path` (at least one); `what` names it in errors.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |why: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("it holds no PEM CERTIFICATE".into()));
    }
    Ok(certs)
}

/// The private key of the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.to_path_buf(),
        why: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "it holds no PEM private key".into(),
            e => e.to_string(),
        },
    })
}

fn roots(certs: Vec<CertificateDer<'static>>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| TlsError::Config(format!("a CA certificate is unusable: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// An expert worker's TLS set-up: its certificate chain and key, and optionally the CA
/// bundle that client certificates must chain to (mutual TLS).
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    mutual: bool,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TlsServer {{ client certificates required: {} }}",
            self.mutual
        )
    }
}

impl TlsServer {
    /// From certificates and a key in memory. `client_roots`: require client certificates
    /// that chain to these.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        client_roots: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Self, TlsError> {
        let p = provider();
        let builder = ServerConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mutual = client_roots.is_some();
        let builder = match client_roots {
            Some(r) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(roots(r)?, p)
                    .build()
                    .map_err(|e| TlsError::Config(format!("client certificate checks: {e}")))?,
            ),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError::Config(format!(
                "the certificate and key do not make a server identity: {e}"
            ))
        })?;
        // Connections are long-lived: no session resumption.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            config: Arc::new(config),
            mutual,
        })
    }

    /// From PEM files: `cert` (the chain, leaf first), `key`, and optionally `client_ca`.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let chain = load_certs(cert, "certificate")?;
        let k = load_key(key)?;
        let client_roots = client_ca.map(|p| load_certs(p, "CA bundle")).transpose()?;
        Self::new(chain, k, client_roots).map_err(|e| match e {
            TlsError::Config(why) => {
                TlsError::Config(format!("{} and {}: {why}", cert.display(), key.display()))
            }
            e => e,
        })
    }

    /// Whether peers must present a client certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.mutual
    }
}

/// A replica's (or a status query's) TLS set-up: the CA bundle the workers' certificates
/// must chain to, and optionally a client certificate and key (for workers that require one).
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TlsClient {{ client certificate: {} }}",
            self.config.client_auth_cert_resolver.has_certs()
        )
    }
}

impl TlsClient {
    /// From certificates in memory.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?);
        let mut config = match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsError::Config(format!(
                    "the client certificate and key do not make an identity: {e}"
                ))
            })?,
            None => builder.with_no_client_auth(),
        };
        config.resumption = Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// From PEM files: the CA bundle `ca`, and optionally a client certificate chain and key.
    pub fn from_pem_files(ca: &Path, client: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let ca_certs = load_certs(ca, "CA bundle")?;
        let client = match client {
            Some((c, k)) => Some((load_certs(c, "certificate")?, load_key(k)?)),
            None => None,
        };
        Self::new(ca_certs, client)
    }
}

/// The host part of `addr` ("host:port", "[v6]:port", or a bare host).
pub(crate) fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((h, _)) = rest.split_once(']') {
            return h;
        }
    }
    match addr.rsplit_once(':') {
        Some((h, _)) if !h.contains(':') => h,
        _ => addr,
    }
}

// ---------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------

fn timed_out(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the handshake did not complete within {:.1}s",
            limit.as_secs_f64()
        ),
    )
}

/// Reads from a socket; until [`SockReader::end_handshake`], within the handshake's
/// deadline whatever the number of reads, so a peer trickling bytes cannot stretch it.
pub(crate) struct SockReader {
    s: TcpStream,
    deadline: Option<(Instant, Duration)>,
}

impl SockReader {
    /// A reader of `s` whose reads must all be done within `limit` from now.
    pub(crate) fn new(s: &TcpStream, limit: Duration) -> io::Result<Self> {
        Ok(Self {
            s: s.try_clone()?,
            deadline: Some((Instant::now() + limit, limit)),
        })
    }

    fn arm(&self) -> io::Result<()> {
        if let Some((until, limit)) = self.deadline {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(limit));
            }
            self.s.set_read_timeout(Some(left))?;
        }
        Ok(())
    }

    fn map_timeout(&self, e: io::Error) -> io::Error {
        match (self.deadline, e.kind()) {
            (Some((_, limit)), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                timed_out(limit)
            }
            _ => e,
        }
    }

    /// The first byte the peer sent, without taking it (`None`: it closed).
    fn peek_byte(&self) -> io::Result<Option<u8>> {
        self.arm()?;
        let mut b = [0u8; 1];
        match self.s.peek(&mut b) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(b[0])),
            Err(e) => Err(self.map_timeout(e)),
        }
    }

    fn end_handshake(&mut self) -> io::Result<()> {
        self.deadline = None;
        self.s.set_read_timeout(None)
    }
}

impl Read for SockReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        (&self.s).read(buf).map_err(|e| self.map_timeout(e))
    }
}

impl SockReader {
    /// [`Read::read`] into uninitialised memory: `read(2)` straight into `dst`.
    fn read_uninit(&mut self, dst: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
        self.arm()?;
        // SAFETY: `dst` is writable for its length; the kernel writes what it returns.
        let n = unsafe {
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&self.s),
                dst.as_mut_ptr().cast(),
                dst.len(),
            )
        };
        if n < 0 {
            return Err(self.map_timeout(io::Error::last_os_error()));
        }
        Ok((n as usize).min(dst.len()))
    }
}

/// The TLS handshake's view of the socket: reads under the deadline, remembering the first
/// bytes (to recognise a worker that answered in plaintext M2N).
struct HandshakeIo<'a> {
    r: &'a mut SockReader,
    w: &'a TcpStream,
    seen: Vec<u8>,
}

impl Read for HandshakeIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        let keep = n.min((4 << 10) - self.seen.len().min(4 << 10));
        self.seen.extend_from_slice(&buf[..keep]);
        Ok(n)
    }
}

impl Write for HandshakeIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut w = self.w;
        w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs the TLS handshake to completion (within the reader's deadline).
fn handshake(
    conn: &mut Connection,
    rd: &mut SockReader,
    w: &TcpStream,
) -> Result<(), (io::Error, Vec<u8>)> {
    let mut io = HandshakeIo {
        r: rd,
        w,
        seen: Vec::new(),
    };
    while conn.is_handshaking() {
        match conn.complete_io(&mut io) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err((
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed"),
                    io.seen,
                ))
            }
            Ok(_) => {}
            Err(e) => return Err((e, io.seen)),
        }
    }
    // Whatever rustls still holds for the peer (the client's last flight).
    while conn.wants_write() {
        conn.write_tls(&mut io).map_err(|e| (e, Vec::new()))?;
    }
    Ok(())
}

/// What both halves of a TLS connection share.
struct Shared {
    conn: Mutex<Connection>,
    /// Held from encrypting records until they are on the socket.
    order: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> io::Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| io::Error::other("a TLS connection's lock is poisoned"))
}

/// The read half of a connection.
pub(crate) enum ReadHalf {
    Plain(SockReader),
    Tls(TlsReader),
    #[cfg(target_os = "linux")]
    Shm(crate::shm::ShmReader),
}

/// The write half of a connection (unbuffered: frames go out with vectored writes).
pub(crate) enum WriteHalf {
    Plain(TcpStream),
    Tls(TlsWriter),
    #[cfg(target_os = "linux")]
    Shm(crate::shm::ShmWriter),
}

impl ReadHalf {
    /// The handshake is over: reads wait for as long as it takes from now on.
    pub(crate) fn end_handshake(&mut self) -> io::Result<()> {
        match self {
            ReadHalf::Plain(r) => r.end_handshake(),
            ReadHalf::Tls(r) => r.raw.end_handshake(),
            #[cfg(target_os = "linux")]
            ReadHalf::Shm(_) => Ok(()),
        }
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(r) => r.read(buf),
            ReadHalf::Tls(r) => r.read(buf),
            #[cfg(target_os = "linux")]
            ReadHalf::Shm(r) => r.read(buf),
        }
    }
}

// SAFETY: each variant reports the bytes it wrote at the start of `dst`: the ring reader
// through `read_to`, the socket through `read(2)`, TLS through the zero-filling default.
unsafe impl crate::wire::FrameSource for ReadHalf {
    fn read_uninit(&mut self, dst: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
        match self {
            ReadHalf::Plain(r) => r.read_uninit(dst),
            ReadHalf::Tls(r) => {
                dst.fill(std::mem::MaybeUninit::new(0));
                // SAFETY: initialised just now.
                let b = unsafe {
                    std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), dst.len())
                };
                r.read(b)
            }
            #[cfg(target_os = "linux")]
            // SAFETY: `dst` is valid for writes of its length.
            ReadHalf::Shm(r) => unsafe { r.read_to(dst.as_mut_ptr().cast(), dst.len()) },
        }
    }
}

impl WriteHalf {
    /// Closes the connection both ways (the reader sees the end).
    pub(crate) fn shutdown(&self) {
        let s = match self {
            WriteHalf::Plain(s) => s,
            WriteHalf::Tls(t) => &t.sock,
            #[cfg(target_os = "linux")]
            WriteHalf::Shm(w) => return w.shutdown(),
        };
        let _ = s.shutdown(Shutdown::Both);
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(s) => s.write(buf),
            WriteHalf::Tls(t) => t.write(buf),
            #[cfg(target_os = "linux")]
            WriteHalf::Shm(w) => w.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(s) => s.write_vectored(bufs),
            WriteHalf::Tls(t) => t.write_vectored(bufs),
            #[cfg(target_os = "linux")]
            WriteHalf::Shm(w) => w.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Plain(s) => s.flush(),
            WriteHalf::Tls(_) => Ok(()),
            #[cfg(target_os = "linux")]
            WriteHalf::Shm(w) => w.flush(),
        }
    }
}

/// The halves of a plaintext connection; reads keep the handshake deadline until
/// [`ReadHalf::end_handshake`].
pub(crate) fn plain(stream: &TcpStream, limit: Duration) -> io::Result<(ReadHalf, WriteHalf)> {
    Ok((
        ReadHalf::Plain(SockReader::new(stream, limit)?),
        WriteHalf::Plain(stream.try_clone()?),
    ))
}

fn split(
    conn: Connection,
    rd: SockReader,
    stream: &TcpStream,
) -> io::Result<(ReadHalf, WriteHalf)> {
    let sh = Arc::new(Shared {
        conn: Mutex::new(conn),
        order: Mutex::new(()),
    });
    Ok((
        ReadHalf::Tls(TlsReader {
            raw: rd,
            sock: stream.try_clone()?,
            sh: sh.clone(),
            buf: vec![0; RECV_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
        }),
        WriteHalf::Tls(TlsWriter {
            sock: stream.try_clone()?,
            sh,
            out: Vec::new(),
        }),
    ))
}

/// The connecting side: a TLS handshake with the worker at `addr`, checking its
/// certificate for the host part of `addr`. `Err`: why, for the log.
pub(crate) fn connect(
    stream: &TcpStream,
    tls: &TlsClient,
    addr: &str,
    limit: Duration,
) -> Result<(ReadHalf, WriteHalf), String> {
    let host = host_of(addr);
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        format!("TLS: {host:?} is not a name a certificate can be checked for: {e}")
    })?;
    let conn = ClientConnection::new(tls.config.clone(), name)
        .map_err(|e| format!("TLS: cannot start a connection: {e}"))?;
    let mut conn = Connection::Client(conn);
    conn.set_buffer_limit(Some(SEND_CHUNK));
    let mut rd = SockReader::new(stream, limit).map_err(|e| e.to_string())?;
    if let Err((e, seen)) = handshake(&mut conn, &mut rd, stream) {
        if seen.starts_with(&MAGIC.to_le_bytes()) {
            let said = match read_frame(&mut &seen[..], 0, 0) {
                Ok(Frame::Reject(why)) => format!(" (it says: {why})"),
                _ => String::new(),
            };
            return Err(format!(
                "TLS handshake failed: the worker answered in plaintext M2N, so it has no TLS \
                 certificate ({SERVER_HOWTO}) while this side expects TLS ({CLIENT_HOWTO}){said}"
            ));
        }
        return Err(format!("TLS handshake failed: {e}"));
    }
    split(conn, rd, stream).map_err(|e| e.to_string())
}

/// The accepting side: a TLS handshake with a new peer. A peer that starts with a plaintext
/// M2N hello is answered with a plaintext rejection saying that this worker expects TLS.
pub(crate) fn accept(
    stream: &TcpStream,
    tls: &TlsServer,
    limit: Duration,
) -> Result<(ReadHalf, WriteHalf), String> {
    let mut rd = SockReader::new(stream, limit).map_err(|e| e.to_string())?;
    match rd.peek_byte() {
        // A TLS record of type handshake: a client hello.
        Ok(Some(0x16)) => {}
        Ok(Some(b)) if b == MAGIC.to_le_bytes()[0] => {
            let why = format!(
                "this expert worker expects TLS and the peer speaks plaintext M2N: give the \
                 peer the CA bundle that signed the worker's certificate ({CLIENT_HOWTO})"
            );
            let mut w = stream;
            let _ = crate::wire::write_frame(&mut w, &Frame::Reject(why.clone()), 0);
            return Err(why);
        }
        Ok(Some(_)) => {
            return Err("TLS handshake failed: the peer's first bytes are not a TLS hello".into())
        }
        Ok(None) => return Err("TLS handshake failed: the peer closed before its hello".into()),
        Err(e) => return Err(format!("TLS handshake failed: {e}")),
    }
    let conn = ServerConnection::new(tls.config.clone())
        .map_err(|e| format!("TLS: cannot start a connection: {e}"))?;
    let mut conn = Connection::Server(conn);
    conn.set_buffer_limit(Some(SEND_CHUNK));
    handshake(&mut conn, &mut rd, stream).map_err(|(e, _)| format!("TLS handshake failed: {e}"))?;
    split(conn, rd, stream).map_err(|e| e.to_string())
}

/// Reads plaintext from a TLS connection (the connection's one reader).
pub(crate) struct TlsReader {
    raw: SockReader,
    /// For the last alert after an error.
    sock: TcpStream,
    sh: Arc<Shared>,
    /// Ciphertext read from the socket and not yet given to rustls: `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

impl TlsReader {
    /// After a TLS error: sends the alert rustls queued, if no writer is busy, without
    /// blocking (the connection is being dropped anyway).
    fn last_gasp(&self) {
        let Ok(_order) = self.sh.order.try_lock() else {
            return;
        };
        let mut out = Vec::new();
        if let Ok(mut c) = self.sh.conn.lock() {
            while c.wants_write() {
                if c.write_tls(&mut out).is_err() {
                    break;
                }
            }
        }
        if self.sock.set_nonblocking(true).is_ok() {
            let _ = (&self.sock).write(&out);
        }
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut c = lock(&self.sh.conn)?;
                loop {
                    match c.reader().read(out) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // The peer closed its socket without a close_notify: to the frame
                        // reader that is a close (a frame cut short is still an error there).
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                    if self.start < self.end {
                        let n = c.read_tls(&mut &self.buf[self.start..self.end])?;
                        self.start += n;
                        if let Err(e) = c.process_new_packets() {
                            drop(c);
                            self.last_gasp();
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("TLS: {e}"),
                            ));
                        }
                        continue;
                    }
                    if self.eof {
                        // Tells rustls the transport ended; the plaintext read then says how.
                        c.read_tls(&mut &[][..])?;
                        match c.reader().read(out) {
                            Ok(n) => return Ok(n),
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                            Err(e) => return Err(e),
                        }
                    }
                    break;
                }
            }
            // Nothing left to decrypt: wait for the socket without holding the lock.
            self.start = 0;
            self.end = self.raw.read(&mut self.buf)?;
            self.eof = self.end == 0;
        }
    }
}

/// Writes plaintext to a TLS connection; one frame at a time per connection is the caller's
/// business (tandem's writers hold the connection's slot).
pub(crate) struct TlsWriter {
    sock: TcpStream,
    sh: Arc<Shared>,
    /// Encrypted records on their way to the socket.
    out: Vec<u8>,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let _order = lock(&self.sh.order)?;
        let n = {
            let mut c = lock(&self.sh.conn)?;
            let n = c.writer().write_vectored(bufs)?;
            while c.wants_write() {
                c.write_tls(&mut self.out)?;
            }
            n
        };
        let sent = (&self.sock).write_all(&self.out);
        self.out.clear();
        sent?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_of_an_address() {
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("worker-0.tandem:7000"), "worker-0.tandem");
        assert_eq!(host_of("worker-0"), "worker-0");
        assert_eq!(host_of("::1"), "::1");
    }
}
