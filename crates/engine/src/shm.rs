//! Shared-memory M2N for a replica and an expert worker on one host (issue #19).
//!
//! A connection always starts over TCP with the authenticated handshake. When both ends are
//! on one host (the socket's two addresses are the same IP) and neither side uses TLS, the
//! replica creates a sealed `memfd` holding two single-producer single-consumer byte rings
//! (replica to worker, worker to replica) and offers it in its hello as
//! `/proc/<pid>/fd/<fd>` with a random token; the worker opens it, checks that it is a
//! regular file of its own user, sealed against shrinking, holding the magic, the token and
//! a size it accepts, and says yes in its ack. From then on frames go through the rings and
//! nothing else goes over the socket, which stays open as the link's liveness: a process
//! that dies closes its socket, and both halves look at the socket at least every
//! [`LIVENESS`] (busy or waiting), so a killed peer, or a connection cut on the way, ends
//! the link as quickly as over TCP. Anything that arrives on the socket after the switch is
//! a protocol violation.
//!
//! Framing, threads and the protocol above are the TCP path's: [`ShmReader`] and
//! [`ShmWriter`] are the third variant of [`crate::tls::ReadHalf`] and
//! [`crate::tls::WriteHalf`].
//!
//! A ring is a control page and a data area of `cap` bytes. The writer owns `head` (bytes
//! written, ever), the reader `tail` (bytes read, ever); each keeps its own copy and only
//! publishes it, so a peer that scribbles on the control page can corrupt the bytes (which
//! the frame decoder bounds like any other input) but never make this side read or write
//! outside the mapping: a position that is more than `cap` ahead is an error. The memfd is
//! sealed against shrinking before it is offered, so the peer cannot truncate it under our
//! mapping (which would fault on access).
//!
//! Waiting: the reader (or a writer facing a full ring) announces that it waits, re-checks,
//! and sleeps on a futex word that the other side bumps after publishing a position (a
//! cross-process futex: the mapping is shared, not private). The other side calls the
//! kernel only when a waiter is announced, so a busy pipeline makes no system calls.

use crate::tls::{ReadHalf, WriteHalf};
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of each ring's data area (the default): a link maps twice this, populated at
/// connection (1 MiB measured as fast as 4 MiB at 4x4 and 8x8 with 256 KiB messages, and
/// stays in cache).
pub const DEFAULT_RING_BYTES: usize = 1 << 20;
/// Polls of an empty (or full) ring before sleeping on the futex: a short spin only, since
/// replicas and workers usually share few cores (yielding instead measured no better).
const SPINS: u32 = 64;
/// The largest and smallest ring a worker accepts from a peer.
const MAX_RING_BYTES: usize = 256 << 20;
const MIN_RING_BYTES: usize = 64 << 10;
/// How often a wait looks at the socket (and the closed flag) at the latest.
pub const LIVENESS: Duration = Duration::from_millis(50);

const PAGE: usize = 4096;
/// Page 0: magic, token, ring size; page 1: the replica-to-worker ring's control; page 2:
/// the other's. The data areas follow.
const HEADER: usize = 3 * PAGE;
const MAGIC: u64 = u64::from_le_bytes(*b"TDMSHM01");
const TOKEN_LEN: usize = 16;

// Offsets in a control page. The writer's words and the reader's sit on different cache
// lines.
const HEAD: usize = 0;
const DATA_SEQ: usize = 8;
const WRITER_WAITING: usize = 12;
const TAIL: usize = 128;
const SPACE_SEQ: usize = 136;
const READER_WAITING: usize = 140;
const CLOSED: usize = 256;

/// A shared mapping, unmapped when the last half is dropped.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

// The mapping is only touched through atomics (control pages) and raw copies (data areas),
// each data byte by one side at a time as the positions say.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no half outlives the Arc.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

impl Region {
    fn map(fd: &OwnedFd, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of a file at least `len` long (sealed against
        // shrinking), checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                // Populated now: a page first touched in the middle of a round costs a fault.
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            cap: (len - HEADER) / 2,
        })
    }
    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= HEADER);
        // SAFETY: in the header, aligned (the mapping is page aligned), and the mapping lives
        // as long as &self.
        unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }
    }
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= HEADER);
        // SAFETY: as for u64_at.
        unsafe { &*self.ptr.add(off).cast::<AtomicU32>() }
    }
    fn token(&self) -> [u8; TOKEN_LEN] {
        let mut t = [0u8; TOKEN_LEN];
        for (i, b) in t.iter_mut().enumerate() {
            // Byte loads through atomics: the peer may write the page at any time.
            *b = (self.u64_at(8 + (i / 8) * 8).load(Ordering::Relaxed) >> ((i % 8) * 8)) as u8;
        }
        t
    }
}

/// Which end of the mapping this side is: the replica created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Replica,
    Worker,
}

/// One direction: its control page and data area.
#[derive(Clone, Copy)]
struct Ring {
    ctl: usize,
    data: usize,
}

impl Ring {
    fn of(replica_to_worker: bool, cap: usize) -> Self {
        if replica_to_worker {
            Ring {
                ctl: PAGE,
                data: HEADER,
            }
        } else {
            Ring {
                ctl: 2 * PAGE,
                data: HEADER + cap,
            }
        }
    }
}

/// A mapping offered to a worker and not yet answered: the replica keeps the file open until
/// the worker had its chance to open it.
pub(crate) struct Offer {
    path: String,
    token: String,
    region: Arc<Region>,
    _fd: OwnedFd,
}

impl Offer {
    /// Where the worker finds the mapping: `/proc/<pid>/fd/<fd>`.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }
    /// The random token the mapping's header holds.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The mapping, once the worker accepted (the file can be closed: the mapping keeps it).
    pub(crate) fn accepted(self) -> Arc<Region> {
        self.region
    }

    /// The replica's halves once the worker accepted the offer.
    pub(crate) fn into_halves(self, sock: &TcpStream) -> io::Result<(ReadHalf, WriteHalf)> {
        let (r, w) = halves(self.accepted(), Side::Replica, sock)?;
        Ok((ReadHalf::Shm(r), WriteHalf::Shm(w)))
    }
}

/// Whether the two ends of `sock` are on this host (the same IP address on both ends: the
/// loopback, or one of this host's addresses to itself).
pub(crate) fn same_host(sock: &TcpStream) -> bool {
    matches!((sock.local_addr(), sock.peer_addr()), (Ok(a), Ok(b)) if a.ip() == b.ip())
}

/// A replica's offer for the connection `sock`, when the worker is on this host; `None` (the
/// link stays on TCP) otherwise or when the mapping cannot be made (logged).
pub(crate) fn offer(sock: &TcpStream, ring_bytes: usize) -> Option<Offer> {
    if !same_host(sock) {
        return None;
    }
    create(ring_bytes)
        .map_err(|e| tracing::warn!("no shared-memory M2N ({e}): staying on TCP"))
        .ok()
}

/// A worker's answer to an offer on `sock`: its halves, or why the link stays on TCP.
pub(crate) fn accept(
    path: &str,
    token: &str,
    sock: &TcpStream,
) -> Result<(ReadHalf, WriteHalf), String> {
    if !same_host(sock) {
        return Err("the peer is on another host".into());
    }
    let region = open(path, token)?;
    let (r, w) = halves(region, Side::Worker, sock).map_err(|e| e.to_string())?;
    Ok((ReadHalf::Shm(r), WriteHalf::Shm(w)))
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Creates a sealed memfd with two rings of `ring_bytes` each and its offer.
pub(crate) fn create(ring_bytes: usize) -> io::Result<Offer> {
    let cap = ring_bytes.clamp(MIN_RING_BYTES, MAX_RING_BYTES);
    let len = HEADER + 2 * cap;
    // SAFETY: a NUL-terminated name; the result is checked.
    let raw = unsafe {
        libc::memfd_create(
            c"tandem-m2n".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(os_err("memfd_create"));
    }
    // SAFETY: a descriptor we just got and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain calls on our descriptor, checked.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
            return Err(os_err("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) != 0 {
            return Err(os_err("sealing the memfd"));
        }
    }
    let region = Region::map(&fd, len)?;
    let mut token = [0u8; TOKEN_LEN];
    getrandom::fill(&mut token).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    region.u64_at(0).store(MAGIC, Ordering::Relaxed);
    for (i, w) in token.chunks(8).enumerate() {
        let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        region.u64_at(8 + 8 * i).store(v, Ordering::Relaxed);
    }
    region.u64_at(24).store(cap as u64, Ordering::Release);
    Ok(Offer {
        path: format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()),
        token: crate::auth::to_hex(&token),
        region: Arc::new(region),
        _fd: fd,
    })
}

/// `/proc/<digits>/fd/<digits>`, nothing else (a peer names the path).
fn valid_path(p: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    p.strip_prefix("/proc/")
        .and_then(|r| r.split_once("/fd/"))
        .is_some_and(|(pid, fd)| digits(pid) && digits(fd))
}

/// Opens the mapping a replica offered. `Err`: why not (the link then stays on TCP).
pub(crate) fn open(path: &str, token: &str) -> Result<Arc<Region>, String> {
    if !valid_path(path) {
        return Err(format!(
            "the offered path {path:?} is not /proc/<pid>/fd/<fd>"
        ));
    }
    let want = crate::auth::from_hex(token)
        .filter(|t| t.len() == TOKEN_LEN)
        .ok_or("the offered token is not 16 bytes of hex")?;
    // Look before opening: opening a device or a FIFO could block or have effects.
    let md = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: no arguments, cannot fail.
    let uid = unsafe { libc::geteuid() };
    let len = md.len() as usize;
    let size_ok = len > HEADER
        && (len - HEADER).is_multiple_of(2)
        && ((len - HEADER) / 2) >= MIN_RING_BYTES
        && ((len - HEADER) / 2) <= MAX_RING_BYTES;
    if !md.is_file() || md.uid() != uid || !size_ok {
        return Err(format!(
            "{path} is not a ring mapping of this user (file: {}, uid {} vs {uid}, {len} bytes)",
            md.is_file(),
            md.uid()
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    let fmd = file.metadata().map_err(|e| e.to_string())?;
    if fmd.dev() != md.dev() || fmd.ino() != md.ino() || fmd.len() as usize != len {
        return Err(format!("{path} changed while it was opened"));
    }
    // SAFETY: a query on our own descriptor.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(format!(
            "{path} is not sealed against shrinking: refusing to map it"
        ));
    }
    let fd = OwnedFd::from(file);
    let region = Region::map(&fd, len).map_err(|e| format!("mapping {path}: {e}"))?;
    if region.u64_at(0).load(Ordering::Acquire) != MAGIC
        || region.token()[..] != want[..]
        || region.u64_at(24).load(Ordering::Acquire) != region.cap as u64
    {
        return Err(format!(
            "{path} is not the mapping this peer offered (magic, token or size differ)"
        ));
    }
    Ok(Arc::new(region))
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a wait on a word of a live shared mapping (not FUTEX_PRIVATE: the waker is
    // another process); spurious returns are handled by the callers' loops.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as for futex_wait.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// What both halves of one side share: the mapping and the socket kept for liveness.
struct Link {
    region: Arc<Region>,
    sock: TcpStream,
    rx: Ring,
    tx: Ring,
}

impl Link {
    fn closed(&self, r: Ring) -> bool {
        self.region.u32_at(r.ctl + CLOSED).load(Ordering::Acquire) != 0
    }

    /// `Err` once the peer is gone: its socket closed, reset, or carrying bytes it must not.
    fn peer_alive(&self) -> io::Result<()> {
        let mut b = [0u8; 1];
        match self.sock.peek(&mut b) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            )),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bytes on the socket of a shared-memory link",
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Announces a waiter in the word at `waiting` and sleeps on the word at `seq` (for at
    /// most [`LIVENESS`]) unless `blocked`, checked after the announcement, says the wait is
    /// over: the other side either sees the announcement or bumped `seq` first.
    fn park(&self, waiting: usize, seq: usize, blocked: impl Fn() -> bool) {
        let w = self.region.u32_at(waiting);
        w.store(1, Ordering::SeqCst);
        let seen = self.region.u32_at(seq).load(Ordering::SeqCst);
        if blocked() {
            futex_wait(self.region.u32_at(seq), seen, LIVENESS);
        }
        w.store(0, Ordering::SeqCst);
    }

    /// Bumps the word at `seq` after a position was published, and wakes the other side if it
    /// announced that it waits (the only system call of a busy link).
    fn notify(&self, seq: usize, waiting: usize) {
        self.region.u32_at(seq).fetch_add(1, Ordering::SeqCst);
        if self.region.u32_at(waiting).load(Ordering::SeqCst) != 0 {
            futex_wake(self.region.u32_at(seq));
        }
    }

    fn shutdown(&self) {
        for r in [self.rx, self.tx] {
            self.region
                .u32_at(r.ctl + CLOSED)
                .store(1, Ordering::SeqCst);
            for w in [DATA_SEQ, SPACE_SEQ] {
                self.region.u32_at(r.ctl + w).fetch_add(1, Ordering::SeqCst);
                futex_wake(self.region.u32_at(r.ctl + w));
            }
        }
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

fn out_of_bounds() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the peer's ring position is out of bounds",
    )
}

/// The reading half of a shared-memory link.
pub(crate) struct ShmReader {
    link: Arc<Link>,
    tail: u64,
    /// When the socket was last looked at.
    checked: Instant,
}

/// The writing half of a shared-memory link (frames are written whole under the
/// connection's lock, so one writer at a time).
pub(crate) struct ShmWriter {
    link: Arc<Link>,
    head: u64,
    /// When the socket was last looked at.
    checked: Instant,
    /// Bytes published since the last wake-up check.
    unsignalled: bool,
}

/// The halves of `side`'s end of `region`; `sock` is the connection's socket (a clone is
/// kept, made non-blocking: it is only peeked from now on).
pub(crate) fn halves(
    region: Arc<Region>,
    side: Side,
    sock: &TcpStream,
) -> io::Result<(ShmReader, ShmWriter)> {
    let sock = sock.try_clone()?;
    sock.set_nonblocking(true)?;
    let cap = region.cap;
    let to_worker = Ring::of(true, cap);
    let to_replica = Ring::of(false, cap);
    let (rx, tx) = match side {
        Side::Replica => (to_replica, to_worker),
        Side::Worker => (to_worker, to_replica),
    };
    let link = Arc::new(Link {
        region,
        sock,
        rx,
        tx,
    });
    // Both positions start at zero: nothing went through the rings before the switch.
    Ok((
        ShmReader {
            link: link.clone(),
            tail: 0,
            checked: Instant::now(),
        },
        ShmWriter {
            link,
            head: 0,
            checked: Instant::now(),
            unsignalled: false,
        },
    ))
}

impl Read for ShmReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let l = &*self.link;
        let r = l.rx;
        let reg = &*l.region;
        let cap = reg.cap as u64;
        let head_w = reg.u64_at(r.ctl + HEAD);
        let mut spins = 0u32;
        loop {
            // The socket is the link: once it is gone, so is the link, even while the rings
            // still move (a relay or a firewall cut it, or the peer closed it on purpose).
            if self.checked.elapsed() >= LIVENESS {
                match l.peer_alive() {
                    Ok(()) => self.checked = Instant::now(),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
            }
            let head = head_w.load(Ordering::Acquire);
            let avail = head.wrapping_sub(self.tail);
            if avail > cap {
                return Err(out_of_bounds());
            }
            if avail > 0 {
                let n = (avail as usize).min(buf.len());
                let at = (self.tail % cap) as usize;
                let first = n.min(reg.cap - at);
                // SAFETY: [at, at+first) and [0, n-first) lie in this ring's data area; the
                // writer does not touch bytes between tail and head until tail moves.
                unsafe {
                    let base = reg.ptr.add(r.data);
                    std::ptr::copy_nonoverlapping(base.add(at), buf.as_mut_ptr(), first);
                    std::ptr::copy_nonoverlapping(base, buf.as_mut_ptr().add(first), n - first);
                }
                self.tail = self.tail.wrapping_add(n as u64);
                reg.u64_at(r.ctl + TAIL).store(self.tail, Ordering::SeqCst);
                l.notify(r.ctl + SPACE_SEQ, r.ctl + WRITER_WAITING);
                return Ok(n);
            }
            if l.closed(r) {
                return Ok(0);
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let tail = self.tail;
            l.park(r.ctl + READER_WAITING, r.ctl + DATA_SEQ, || {
                head_w.load(Ordering::SeqCst) == tail && !l.closed(r)
            });
        }
    }
}

impl ShmWriter {
    /// Wakes the reader if it announced that it waits for bytes published since the last call.
    fn signal(&mut self) {
        if !self.unsignalled {
            return;
        }
        self.unsignalled = false;
        let t = self.link.tx;
        self.link.notify(t.ctl + DATA_SEQ, t.ctl + READER_WAITING);
    }

    /// Free bytes in the ring, waiting until there are some.
    fn space(&mut self) -> io::Result<usize> {
        let l = self.link.clone();
        let t = l.tx;
        let reg = &*l.region;
        let cap = reg.cap as u64;
        let tail_w = reg.u64_at(t.ctl + TAIL);
        let mut spins = 0u32;
        loop {
            if self.checked.elapsed() >= LIVENESS {
                l.peer_alive()?;
                self.checked = Instant::now();
            }
            if l.closed(t) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the shared-memory link is closed",
                ));
            }
            let used = self.head.wrapping_sub(tail_w.load(Ordering::Acquire));
            if used > cap {
                return Err(out_of_bounds());
            }
            if used < cap {
                return Ok((cap - used) as usize);
            }
            // Full: the reader must know about what is there before this side sleeps.
            self.signal();
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let head = self.head;
            l.park(t.ctl + WRITER_WAITING, t.ctl + SPACE_SEQ, || {
                head.wrapping_sub(tail_w.load(Ordering::SeqCst)) >= cap && !l.closed(t)
            });
        }
    }

    /// Copies what fits of `bufs` (at least one byte if any is given) and publishes it.
    fn put(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut free = self.space()?;
        let l = self.link.clone();
        let t = l.tx;
        let reg = &*l.region;
        let mut done = 0;
        for b in bufs {
            if free == 0 {
                break;
            }
            let n = b.len().min(free);
            let at = (self.head % reg.cap as u64) as usize;
            let first = n.min(reg.cap - at);
            // SAFETY: [at, at+first) and [0, n-first) lie in this ring's data area, in the
            // free part the reader does not read until head moves.
            unsafe {
                let base = reg.ptr.add(t.data);
                std::ptr::copy_nonoverlapping(b.as_ptr(), base.add(at), first);
                std::ptr::copy_nonoverlapping(b.as_ptr().add(first), base, n - first);
            }
            self.head = self.head.wrapping_add(n as u64);
            free -= n;
            done += n;
            if n < b.len() {
                break;
            }
        }
        fence(Ordering::Release);
        reg.u64_at(t.ctl + HEAD).store(self.head, Ordering::SeqCst);
        self.unsignalled = true;
        Ok(done)
    }

    /// Closes the link both ways: the peer's reader and writer see it, so does this side's
    /// reader.
    pub(crate) fn shutdown(&self) {
        self.link.shutdown();
    }
}

impl Write for ShmWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.put(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.put(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.signal();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected pair of sockets and a replica/worker pair of halves over one mapping.
    fn pair(
        ring: usize,
    ) -> (
        (ShmReader, ShmWriter),
        (ShmReader, ShmWriter),
        TcpStream,
        TcpStream,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let offer = create(ring).unwrap();
        let opened = open(offer.path(), offer.token()).unwrap();
        let rep = halves(offer.accepted(), Side::Replica, &a).unwrap();
        let wrk = halves(opened, Side::Worker, &b).unwrap();
        (rep, wrk, a, b)
    }

    fn pattern(n: usize, seed: u32) -> Vec<u8> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as u8)
            .collect()
    }

    #[test]
    fn bytes_cross_both_ways_and_wrap_around() {
        let ((mut rr, mut rw), (mut wr, mut ww), _a, _b) = pair(MIN_RING_BYTES);
        // 40 messages of 5 KiB + 3 bytes: the ring (64 KiB) wraps several times, at odd
        // offsets, and the writer waits for space while the reader is slower.
        let msgs: Vec<Vec<u8>> = (0..40).map(|i| pattern(5 * 1024 + 3, i)).collect();
        let sent = msgs.clone();
        let t = std::thread::spawn(move || {
            for m in &sent {
                rw.write_all(m).unwrap();
                rw.flush().unwrap();
            }
            rw
        });
        for m in &msgs {
            let mut got = vec![0u8; m.len()];
            wr.read_exact(&mut got).unwrap();
            assert_eq!(&got, m);
        }
        let _rw = t.join().unwrap();
        // And back, one large vectored write bigger than the ring.
        let big = pattern(3 * MIN_RING_BYTES + 17, 99);
        let (h, rest) = big.split_at(10);
        let (h2, h3) = (h.to_vec(), rest.to_vec());
        let t = std::thread::spawn(move || {
            let mut off = 0;
            let total = h2.len() + h3.len();
            while off < total {
                let n = if off < h2.len() {
                    ww.write_vectored(&[IoSlice::new(&h2[off..]), IoSlice::new(&h3)])
                        .unwrap()
                } else {
                    ww.write(&h3[off - h2.len()..]).unwrap()
                };
                assert!(n > 0);
                off += n;
            }
            ww.flush().unwrap();
        });
        let mut got = vec![0u8; big.len()];
        rr.read_exact(&mut got).unwrap();
        assert_eq!(got, big);
        t.join().unwrap();
    }

    #[test]
    fn a_shutdown_ends_both_readers_and_fails_writers() {
        let ((mut rr, mut rw), (mut wr, mut ww), _a, _b) = pair(MIN_RING_BYTES);
        rw.write_all(b"last words").unwrap();
        rw.flush().unwrap();
        rw.shutdown();
        // The peer still gets what was sent before the end, then the end.
        let mut got = Vec::new();
        wr.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        // This side's own reader ends too, and neither side can write.
        let mut none = Vec::new();
        rr.read_to_end(&mut none).unwrap();
        assert!(none.is_empty());
        let e = ww.write(b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_peer_whose_socket_closes_is_seen_within_the_liveness_period() {
        let ((_rr, _rw), (mut wr, _ww), a, _b) = pair(MIN_RING_BYTES);
        let t0 = Instant::now();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            wr.read(&mut buf).map(|n| (n, t0.elapsed()))
        });
        std::thread::sleep(Duration::from_millis(30));
        // The replica "dies": its socket closes (the mapping stays, as after a kill -9).
        drop(a);
        drop(_rr);
        drop(_rw);
        let (n, took) = h.join().unwrap().unwrap();
        assert_eq!(n, 0, "end of stream");
        assert!(took < Duration::from_secs(1), "seen after {took:?}");
    }

    #[test]
    fn a_writer_facing_a_full_ring_of_a_dead_peer_fails() {
        let ((_rr, mut rw), (_wr, _ww), a, b) = pair(MIN_RING_BYTES);
        rw.write_all(&pattern(MIN_RING_BYTES, 1)).unwrap();
        drop(b);
        drop(_wr);
        drop(_ww);
        let e = rw.write(b"more").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        drop(a);
    }

    #[test]
    fn hostile_positions_and_offers_are_refused() {
        let ((mut rr, mut rw), (_wr, _ww), _a, _b) = pair(MIN_RING_BYTES);
        let reg = rr.link.region.clone();
        // The worker claims more bytes than the ring holds.
        let rx = rr.link.rx;
        reg.u64_at(rx.ctl + HEAD)
            .store(MIN_RING_BYTES as u64 + 1, Ordering::SeqCst);
        let e = rr.read(&mut [0u8; 4]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Or claims to have read bytes never written.
        let tx = rw.link.tx;
        reg.u64_at(tx.ctl + TAIL).store(5, Ordering::SeqCst);
        let e = rw.write(b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        // Offers a worker must not follow.
        for p in [
            "/etc/passwd",
            "/proc/1/fd/../../etc",
            "/proc/self/fd/0",
            "/dev/zero",
        ] {
            assert!(open(p, &"00".repeat(16)).is_err(), "{p}");
        }
        let offer = create(MIN_RING_BYTES).unwrap();
        let e = open(offer.path(), &"ab".repeat(16)).unwrap_err();
        assert!(e.contains("token"), "{e}");
        assert!(open(offer.path(), "abc").is_err());
        // An unsealed file of the right size is refused.
        let f = tempfile_of(HEADER + 2 * MIN_RING_BYTES);
        let p = format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
        let e = open(&p, &"00".repeat(16)).unwrap_err();
        assert!(e.contains("sealed"), "{e}");
    }

    fn tempfile_of(len: usize) -> OwnedFd {
        // SAFETY: as in create, without the seals.
        unsafe {
            let fd = libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            OwnedFd::from_raw_fd(fd)
        }
    }

    #[test]
    fn paths_a_peer_may_name() {
        assert!(valid_path("/proc/123/fd/7"));
        for p in [
            "/proc/self/fd/7",
            "/proc/1/fd/",
            "/proc//fd/1",
            "/tmp/x",
            "/proc/1/fd/1/x",
        ] {
            assert!(!valid_path(p), "{p}");
        }
    }
}
