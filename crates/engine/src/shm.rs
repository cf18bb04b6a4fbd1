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
//! The rings carry records, each at a position aligned to 8: bytes (a length word, the
//! bytes, padding), or a loan (a length word and an address in the writer's memory). A loan
//! is how a large matrix crosses with one copy, as MPI's shared-memory path moves it with
//! CMA: the writer publishes where the tensor lies and keeps the tensor alive; the reader
//! copies it with `process_vm_readv` straight into the frame's buffer and counts the loan
//! as repaid, and the writer drops what was repaid at its next write. Nobody waits for a
//! loan but a writer owing more than [`MAX_LENT_BYTES`] or closing the link (for at most
//! [`LEND_GRACE`]). A writer lends only after its reader proved that it can read this
//! process (it read a known word at an address the writer published, see [`ShmReader`]);
//! otherwise, as between users or under a seccomp policy that forbids the call, matrices
//! are copied through the ring. A loan is read only into a frame being decoded, bounded
//! like any other input; a writer that closes with loans unread sets the closed flag before
//! it frees them, and a reader checks the flag after every copy, so a copy that raced with
//! the free is dropped, never delivered.
//!
//! Waiting: the reader (or a writer facing a full ring) announces that it waits, re-checks,
//! and sleeps on a futex word that the other side bumps after publishing a position (a
//! cross-process futex: the mapping is shared, not private). The other side calls the
//! kernel only when a waiter is announced, so a busy pipeline makes no system calls.

pub use crate::net::Lending;
use crate::tls::{ReadHalf, WriteHalf};
use crate::wire::{
    f32_bytes, matrix_of, with_matrix_frame, write_frame_as, Frame, WireDtype, WireError,
};
use std::collections::VecDeque;
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
// The socket is looked at every 16th spin: past the spin (a multiple of 16), at every wait.
const _: () = assert!(SPINS.is_multiple_of(16));
/// The largest and smallest ring a worker accepts from a peer.
const MAX_RING_BYTES: usize = 256 << 20;
const MIN_RING_BYTES: usize = 64 << 10;
/// How often a wait looks at the socket (and the closed flag) at the latest.
pub const LIVENESS: Duration = Duration::from_millis(50);

/// Bytes lent and not yet repaid after which a writer waits for its reader.
const MAX_LENT_BYTES: usize = 64 << 20;
/// How long a writer that closes (or is dropped) waits for its loans to be repaid.
const LEND_GRACE: Duration = Duration::from_millis(500);
/// The longest loan a reader accepts (the length is the peer's word).
const MAX_LOAN: u64 = 1 << 40;
/// A record's length word: the kind in the top byte, the length below.
const WORD: u64 = 8;
const REC_BYTES: u64 = 1;
const REC_LOAN: u64 = 2;
const LEN_BITS: u64 = (1 << 48) - 1;
/// What a writer's reader must read at the writer's published probe address before the
/// writer lends anything.
static PROBE: u64 = u64::from_le_bytes(*b"TDMLEND1");

/// Loans this process published and loans it read whole, over every link (for tests and
/// diagnostics: whether matrices cross with one copy).
static LOANS_MADE: AtomicU64 = AtomicU64::new(0);
static LOANS_READ: AtomicU64 = AtomicU64::new(0);

/// (loans published, loans read whole) by this process so far.
pub fn loans() -> (u64, u64) {
    (
        LOANS_MADE.load(Ordering::Relaxed),
        LOANS_READ.load(Ordering::Relaxed),
    )
}

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
/// The writer's process id and the address of its [`PROBE`] word.
const WRITER_PID: usize = 16;
const PROBE_ADDR: usize = 24;
const TAIL: usize = 128;
const SPACE_SEQ: usize = 136;
const READER_WAITING: usize = 140;
/// Loans repaid (read whole), ever.
const REPAID: usize = 144;
/// Set by the reader once it read the writer's probe: the writer may lend.
const CAN_LEND: usize = 152;
const CLOSED: usize = 256;

/// A shared mapping, unmapped when the last half is dropped.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
    cap: usize,
    /// The memfd's inode (how a process's mappings name it in `/proc/<pid>/maps`).
    ino: u64,
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
        let ino = std::fs::File::from(fd.try_clone()?).metadata()?.ino();
        Ok(Self {
            ptr: ptr.cast(),
            len,
            cap: (len - HEADER) / 2,
            ino,
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
    pub(crate) fn into_halves(
        self,
        sock: &TcpStream,
        lending: Lending,
    ) -> io::Result<(ReadHalf, WriteHalf)> {
        let (r, w) = halves(self.accepted(), Side::Replica, sock, lending)?;
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
    lending: Lending,
) -> Result<(ReadHalf, WriteHalf), String> {
    if !same_host(sock) {
        return Err("the peer is on another host".into());
    }
    let region = open(path, token)?;
    let (r, w) = halves(region, Side::Worker, sock, lending).map_err(|e| e.to_string())?;
    Ok((ReadHalf::Shm(r), WriteHalf::Shm(w)))
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Creates a sealed memfd with two rings of `ring_bytes` each and its offer.
pub(crate) fn create(ring_bytes: usize) -> io::Result<Offer> {
    let cap = ring_bytes.clamp(MIN_RING_BYTES, MAX_RING_BYTES) & !(PAGE - 1);
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
        && (len - HEADER).is_multiple_of(2 * WORD as usize)
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

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// `n` rounded up to a record boundary.
fn aligned(n: u64) -> u64 {
    n.div_ceil(WORD) * WORD
}

impl Link {
    /// Copies `n` bytes of ring `r` from stream position `pos` (wrapping) to `dst`.
    fn copy_out(&self, r: Ring, pos: u64, dst: *mut u8, n: usize) {
        let reg = &*self.region;
        assert!(
            n <= reg.cap,
            "a {n}-byte copy out of a {}-byte ring",
            reg.cap
        );
        let at = (pos % reg.cap as u64) as usize;
        let first = n.min(reg.cap - at);
        // SAFETY: [at, at+first) and [0, n-first) lie in the ring's data area (n <= cap, as
        // every caller bounds it by a distance between positions); the writer does not touch
        // published bytes until the tail passes them; `dst` holds `n` bytes.
        unsafe {
            let base = reg.ptr.add(r.data);
            std::ptr::copy_nonoverlapping(base.add(at), dst, first);
            std::ptr::copy_nonoverlapping(base, dst.add(first), n - first);
        }
    }

    /// Copies `src` into ring `r` at stream position `pos` (wrapping).
    fn copy_in(&self, r: Ring, pos: u64, src: &[u8]) {
        let reg = &*self.region;
        let n = src.len();
        assert!(n <= reg.cap, "a {n}-byte copy into a {}-byte ring", reg.cap);
        let at = (pos % reg.cap as u64) as usize;
        let first = n.min(reg.cap - at);
        // SAFETY: as in copy_out, in the free part the reader does not read until the head
        // moves.
        unsafe {
            let base = reg.ptr.add(r.data);
            std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), base, n - first);
        }
    }

    /// Loans of this side's writer that its peer's reader has repaid (the peer's word).
    fn repaid(&self) -> u64 {
        self.region
            .u64_at(self.tx.ctl + REPAID)
            .load(Ordering::SeqCst)
    }

    fn word(&self, r: Ring, pos: u64) -> u64 {
        let mut b = [0u8; 8];
        self.copy_out(r, pos, b.as_mut_ptr(), 8);
        u64::from_le_bytes(b)
    }
}

/// Copies `len` bytes at `addr` in process `pid` to `dst` (at least one byte, or an error).
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
unsafe fn copy_from(pid: libc::pid_t, addr: u64, dst: *mut u8, len: usize) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: dst.cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: the local vector is writable for its length (the caller's promise); the remote
    // one is only read by the kernel, which checks it against the other process's mappings.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n <= 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("reading {len} lent bytes of process {pid}: {e}"),
        ));
    }
    Ok((n as usize).min(len))
}

/// Whether loans from `pid` may be read: another process (not a thread of this one) that
/// maps the ring with inode `ino`, or this process when `same_process` allows it.
fn may_read(pid: libc::pid_t, ino: u64, same_process: bool) -> bool {
    if pid as u32 == std::process::id() {
        return same_process;
    }
    // A thread id of this process names its own maps too: only a process's own id passes.
    let tgid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Tgid:").map(|v| v.trim().parse::<i64>()))
        })
        .and_then(|v| v.ok());
    tgid == Some(pid as i64) && maps_ring(pid, ino)
}

/// Whether process `pid` has the memfd with inode `ino` mapped.
fn maps_ring(pid: libc::pid_t, ino: u64) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let ino = ino.to_string();
    maps.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 6 && f[4] == ino && f[5].starts_with("/memfd:tandem-m2n")
    })
}

/// Where the reader stands in the record stream.
#[derive(Clone, Copy)]
enum Cur {
    /// At a record boundary.
    Idle,
    /// In a bytes record: `left` bytes then `pad`.
    Bytes { left: u64, pad: u64 },
    /// In a loan: `left` bytes at `addr` in the writer's memory.
    Loan { addr: u64, left: u64 },
}

/// Whether this reader can copy from the writer's process.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lender {
    /// The writer has not published its process id yet.
    Unknown,
    Pid(libc::pid_t),
    /// The probe failed: the writer is never told it may lend.
    Never,
}

/// The reading half of a shared-memory link.
pub(crate) struct ShmReader {
    link: Arc<Link>,
    tail: u64,
    /// When the socket was last looked at.
    checked: Instant,
    cur: Cur,
    lender: Lender,
    /// Loans read whole, ever.
    repaid: u64,
    /// Whether a loan from this very process is read (both ends in one process: tests).
    same_process: bool,
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
    /// Matrices at least this long are lent ([`usize::MAX`]: never).
    lend_min: usize,
    /// Loans published, ever.
    lent: u64,
    /// What keeps lent memory alive: (the loan count that repays it, bytes, owner), oldest
    /// first.
    owed: VecDeque<(u64, usize, Box<dyn Send>)>,
    owed_bytes: usize,
    /// How long a close waits for loans to be repaid ([`LEND_GRACE`]; tests lengthen it).
    grace: Duration,
}

/// The halves of `side`'s end of `region`; `sock` is the connection's socket (a clone is
/// kept, made non-blocking: it is only peeked from now on). The writer lends as `lending`
/// says once its reader can read it.
pub(crate) fn halves(
    region: Arc<Region>,
    side: Side,
    sock: &TcpStream,
    lending: Lending,
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
    // Where the peer's reader finds the probe (the id last: it says the address is there).
    region
        .u64_at(tx.ctl + PROBE_ADDR)
        .store(&PROBE as *const u64 as usize as u64, Ordering::Release);
    region
        .u64_at(tx.ctl + WRITER_PID)
        .store(std::process::id() as u64, Ordering::Release);
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
            cur: Cur::Idle,
            lender: Lender::Unknown,
            repaid: 0,
            same_process: lending.same_process,
        },
        ShmWriter {
            link,
            head: 0,
            checked: Instant::now(),
            unsignalled: false,
            lend_min: lending.min,
            lent: 0,
            owed: VecDeque::new(),
            owed_bytes: 0,
            grace: LEND_GRACE,
        },
    ))
}

impl ShmReader {
    /// Reads the writer's probe word once the writer published where it is; says the writer
    /// may lend if it reads back right.
    fn probe(&mut self) {
        let l = &*self.link;
        let r = l.rx;
        let pid = l.region.u64_at(r.ctl + WRITER_PID).load(Ordering::Acquire);
        if pid == 0 {
            return;
        }
        let addr = l.region.u64_at(r.ctl + PROBE_ADDR).load(Ordering::Acquire);
        let mut got = [0u8; 8];
        let read = match libc::pid_t::try_from(pid) {
            // The id is the peer's word: only another process that maps this very ring (the
            // peer, or one it handed the memfd to) is ever read, never another of this
            // user's, nor this one.
            Ok(p) if !may_read(p, l.region.ino, self.same_process) => Err(invalid(format!(
                "process {p} is not another process mapping this link's ring"
            ))),
            // SAFETY: `got` holds 8 bytes.
            Ok(p) => unsafe { copy_from(p, addr, got.as_mut_ptr(), 8) }.map(|n| (p, n)),
            Err(_) => Err(invalid(format!("process id {pid}"))),
        };
        match read {
            Ok((p, 8)) if u64::from_le_bytes(got) == PROBE => {
                self.lender = Lender::Pid(p);
                l.region
                    .u32_at(r.ctl + CAN_LEND)
                    .store(1, Ordering::Release);
            }
            Ok(_) => {
                self.lender = Lender::Never;
                tracing::debug!("the peer's probe word differs: matrices go through the ring");
            }
            Err(e) => {
                self.lender = Lender::Never;
                tracing::debug!(
                    "cannot read the peer's memory ({e}): matrices go through the ring"
                );
            }
        }
    }

    /// Publishes the tail and wakes a writer waiting for space or repayment.
    fn publish(&self) {
        let r = self.link.rx;
        self.link
            .region
            .u64_at(r.ctl + TAIL)
            .store(self.tail, Ordering::SeqCst);
        self.link.notify(r.ctl + SPACE_SEQ, r.ctl + WRITER_WAITING);
    }

    /// At a record boundary with `avail` bytes published: takes the record's header.
    fn start_record(&mut self, avail: u64) -> io::Result<()> {
        let l = self.link.clone();
        let r = l.rx;
        let w = l.word(r, self.tail);
        let (kind, len) = (w >> 56, w & LEN_BITS);
        match kind {
            REC_BYTES => {
                let pad = aligned(len) - len;
                if len == 0 || WORD + len + pad > avail {
                    return Err(invalid(format!(
                        "a {len}-byte record where {avail} bytes are published"
                    )));
                }
                self.tail += WORD;
                self.cur = Cur::Bytes { left: len, pad };
            }
            REC_LOAN => {
                let addr = l.word(r, self.tail + WORD);
                if avail < 2 * WORD || len == 0 || len > MAX_LOAN || addr.checked_add(len).is_none()
                {
                    return Err(invalid(format!(
                        "a malformed loan ({len} bytes at {addr:#x})"
                    )));
                }
                if !matches!(self.lender, Lender::Pid(_)) {
                    return Err(invalid(
                        "the peer lent memory this side never said it can read".into(),
                    ));
                }
                self.tail += 2 * WORD;
                self.cur = Cur::Loan { addr, left: len };
                // The record's space is free now; the loan itself is repaid once read.
                self.publish();
            }
            k => return Err(invalid(format!("a record of unknown kind {k}"))),
        }
        Ok(())
    }
}

impl Read for ShmReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        unsafe { self.read_to(buf.as_mut_ptr(), buf.len()) }
    }
}

impl ShmReader {
    /// [`Read::read`] into `len` bytes at `buf`, which may be uninitialised: returns how
    /// many it wrote.
    ///
    /// # Safety
    /// `buf` must be valid for writes of `len` bytes.
    pub(crate) unsafe fn read_to(&mut self, buf: *mut u8, len: usize) -> io::Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        if self.lender == Lender::Unknown {
            self.probe();
        }
        let l = self.link.clone();
        let r = l.rx;
        let reg = &*l.region;
        let cap = reg.cap as u64;
        let head_w = reg.u64_at(r.ctl + HEAD);
        let mut spins = 0u32;
        loop {
            // The socket is the link: once it is gone, so is the link, even while the rings
            // still move (a relay or a firewall cut it, or the peer closed it on purpose).
            // (Every 16th spin only: the clock read showed in profiles.)
            if spins.is_multiple_of(16) && self.checked.elapsed() >= LIVENESS {
                match l.peer_alive() {
                    Ok(()) => self.checked = Instant::now(),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
            }
            match self.cur {
                Cur::Bytes { left, pad } => {
                    let n = (left as usize).min(len);
                    l.copy_out(r, self.tail, buf, n);
                    let left = left - n as u64;
                    self.tail += n as u64;
                    if left == 0 {
                        self.tail += pad;
                        self.cur = Cur::Idle;
                    } else {
                        self.cur = Cur::Bytes { left, pad };
                    }
                    self.publish();
                    return Ok(n);
                }
                Cur::Loan { addr, left } => {
                    let Lender::Pid(pid) = self.lender else {
                        return Err(invalid("a loan without a lender".into()));
                    };
                    let want = (left as usize).min(len);
                    // SAFETY: want <= len, the caller's promise.
                    let n = unsafe { copy_from(pid, addr, buf, want) }?;
                    // A writer frees a loan only after setting the closed flag: seen here
                    // after the copy, it means the copy may have raced with the free.
                    fence(Ordering::SeqCst);
                    if l.closed(r) {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the peer closed the link with a loan unread",
                        ));
                    }
                    let left = left - n as u64;
                    if left == 0 {
                        self.repaid += 1;
                        LOANS_READ.fetch_add(1, Ordering::Relaxed);
                        reg.u64_at(r.ctl + REPAID)
                            .store(self.repaid, Ordering::SeqCst);
                        l.notify(r.ctl + SPACE_SEQ, r.ctl + WRITER_WAITING);
                        self.cur = Cur::Idle;
                    } else {
                        self.cur = Cur::Loan {
                            addr: addr + n as u64,
                            left,
                        };
                    }
                    return Ok(n);
                }
                Cur::Idle => {}
            }
            let head = head_w.load(Ordering::Acquire);
            let avail = head.wrapping_sub(self.tail);
            if avail > cap {
                return Err(out_of_bounds());
            }
            if avail >= WORD {
                self.start_record(avail)?;
                continue;
            }
            if avail > 0 {
                return Err(invalid(format!("{avail} bytes of a record published")));
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

    /// Waits until `ready` says so, looking at the peer and the closed flag like every wait
    /// (`Err` when either ends the link), spinning briefly, then sleeping on the reader's
    /// space-and-repayment word.
    fn wait_for(&mut self, ready: impl Fn(&Link) -> io::Result<bool>) -> io::Result<()> {
        let l = self.link.clone();
        let t = l.tx;
        let mut spins = 0u32;
        loop {
            // (Every 16th spin only: the clock read showed in profiles.)
            if spins.is_multiple_of(16) && self.checked.elapsed() >= LIVENESS {
                l.peer_alive()?;
                self.checked = Instant::now();
            }
            if l.closed(t) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the shared-memory link is closed",
                ));
            }
            if ready(&l)? {
                return Ok(());
            }
            // The reader must know about what is there before this side sleeps.
            self.signal();
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            l.park(t.ctl + WRITER_WAITING, t.ctl + SPACE_SEQ, || {
                !ready(&l).unwrap_or(true) && !l.closed(t)
            });
        }
    }

    /// Free bytes in the ring, waiting until there are at least `need`.
    fn space(&mut self, need: u64) -> io::Result<u64> {
        let cap = self.link.region.cap as u64;
        let head = self.head;
        let free = |l: &Link| -> io::Result<u64> {
            let used = head.wrapping_sub(l.region.u64_at(l.tx.ctl + TAIL).load(Ordering::SeqCst));
            if used > cap {
                return Err(out_of_bounds());
            }
            Ok(cap - used)
        };
        // The value returned is one that was checked: the peer may move its tail meanwhile.
        loop {
            self.wait_for(|l| Ok(free(l)? >= need))?;
            let f = free(&self.link)?;
            if f >= need {
                return Ok(f);
            }
        }
    }

    /// Publishes the head (after the bytes it covers).
    fn publish(&mut self) {
        fence(Ordering::Release);
        self.link
            .region
            .u64_at(self.link.tx.ctl + HEAD)
            .store(self.head, Ordering::SeqCst);
        self.unsignalled = true;
    }

    /// Copies what fits of `bufs` (at least one byte if any is given) as one bytes record and
    /// publishes it.
    fn put(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let free = self.space(2 * WORD)?;
        let len = (total as u64).min(free.saturating_sub(WORD) & !(WORD - 1));
        let l = self.link.clone();
        let t = l.tx;
        l.copy_in(t, self.head, &(REC_BYTES << 56 | len).to_le_bytes());
        let mut pos = self.head + WORD;
        let mut left = len as usize;
        for b in bufs {
            if left == 0 {
                break;
            }
            let n = b.len().min(left);
            l.copy_in(t, pos, &b[..n]);
            pos += n as u64;
            left -= n;
        }
        self.head += WORD + aligned(len);
        self.publish();
        Ok(len as usize)
    }

    /// Drops what the reader repaid.
    fn collect(&mut self) {
        let repaid = self.link.repaid().min(self.lent);
        while let Some(&(n, b, _)) = self.owed.front() {
            if n > repaid {
                break;
            }
            self.owed.pop_front();
            self.owed_bytes -= b;
        }
    }

    /// Whether the reader said it can read this process's memory and loans are on.
    fn can_lend(&self) -> bool {
        self.lend_min != usize::MAX
            && self
                .link
                .region
                .u32_at(self.link.tx.ctl + CAN_LEND)
                .load(Ordering::Acquire)
                != 0
    }

    /// Publishes a loan of `s` (which the caller keeps alive until it is repaid).
    fn put_loan(&mut self, s: &[u8]) -> io::Result<()> {
        // Not more than MAX_LENT_BYTES owed (one loan larger than that alone).
        let room = MAX_LENT_BYTES.saturating_sub(s.len());
        let lent = self.lent;
        if self.owed_bytes > room {
            // The oldest loans whose repayment brings what is owed under `room`.
            let mut left = self.owed_bytes;
            let need = self
                .owed
                .iter()
                .find(|o| {
                    left -= o.1;
                    left <= room
                })
                .map_or(lent, |o| o.0);
            self.wait_for(|l| Ok(l.repaid() >= need))?;
            self.collect();
        }
        self.space(2 * WORD)?;
        let l = self.link.clone();
        let t = l.tx;
        l.copy_in(
            t,
            self.head,
            &(REC_LOAN << 56 | s.len() as u64).to_le_bytes(),
        );
        l.copy_in(
            t,
            self.head + WORD,
            &(s.as_ptr() as usize as u64).to_le_bytes(),
        );
        self.head += 2 * WORD;
        self.lent += 1;
        LOANS_MADE.fetch_add(1, Ordering::Relaxed);
        self.publish();
        Ok(())
    }

    /// Writes `parts` whole, in order; each part marked as lendable and at least the writer's
    /// loan size goes as a loan when the reader can take one, and `owner` (what keeps those
    /// parts' memory alive) is kept until they are repaid. The caller flushes.
    pub(crate) fn write_lending(
        &mut self,
        parts: &[(&[u8], bool)],
        owner: Box<dyn Send>,
    ) -> io::Result<()> {
        self.collect();
        let lend = self.can_lend();
        let before = self.lent;
        let mut lent_bytes = 0;
        let mut result = Ok(());
        for &(p, lendable) in parts {
            result = if lend && lendable && p.len() >= self.lend_min.max(1) {
                lent_bytes += p.len();
                self.put_loan(p)
            } else {
                self.write_all(p)
            };
            if result.is_err() {
                break;
            }
        }
        // Even after an error: a loan published may be being read.
        if self.lent > before {
            self.owed.push_back((self.lent, lent_bytes, owner));
            self.owed_bytes += lent_bytes;
        }
        result
    }

    /// Waits (at most the grace, [`LEND_GRACE`], less if the peer goes) until every loan is
    /// repaid; `true` when none is left owed.
    fn settle(&self) -> bool {
        let Some(&(need, _, _)) = self.owed.back() else {
            return true;
        };
        let l = &*self.link;
        let t = l.tx;
        let repaid = || l.repaid() >= need;
        let t0 = Instant::now();
        while !repaid() && t0.elapsed() < self.grace && !l.closed(t) && l.peer_alive().is_ok() {
            l.park(t.ctl + WRITER_WAITING, t.ctl + SPACE_SEQ, || !repaid());
        }
        repaid()
    }

    /// Closes the link both ways: the peer's reader and writer see it, so does this side's
    /// reader. Loans still owed get [`LEND_GRACE`] to be read first.
    pub(crate) fn shutdown(&self) {
        self.settle();
        self.link.shutdown();
    }
}

impl Drop for ShmWriter {
    fn drop(&mut self) {
        // The owners are freed after this: the peer must not read them after that, so a loan
        // not repaid by now closes the link first (its reader then drops what it copied).
        if !self.settle() {
            self.link.shutdown();
        }
    }
}

/// Sends `f` on `w`: the f32 matrix of a dispatch or a combine goes as a loan when it is long
/// enough and the reader can take one (a handle on the tensor is kept until it is read),
/// everything else as bytes. The caller flushes.
pub(crate) fn send(
    w: &mut ShmWriter,
    f: &Frame,
    hidden: usize,
    dtype: WireDtype,
) -> Result<(), WireError> {
    let owner = matrix_of(f).filter(|t| {
        dtype == WireDtype::F32
            && w.can_lend()
            && t.is_contiguous()
            && t.elem_count().saturating_mul(4) >= w.lend_min.max(1)
    });
    let Some(owner) = owner.cloned() else {
        return write_frame_as(w, f, hidden, dtype);
    };
    with_matrix_frame(f, hidden, dtype, |head, x, tail| {
        let parts = [(head, false), (f32_bytes(x), true), (tail, false)];
        Ok(w.write_lending(&parts, Box::new(owner))?)
    })
    .unwrap_or(Ok(()))
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
        self.collect();
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
        pair_lending(ring, usize::MAX)
    }

    /// [`pair`] with writers that lend slices of at least `lend_min` bytes.
    fn pair_lending(
        ring: usize,
        lend_min: usize,
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
        let lending = Lending {
            min: lend_min,
            same_process: true,
        };
        let rep = halves(offer.accepted(), Side::Replica, &a, lending).unwrap();
        let wrk = halves(opened, Side::Worker, &b, lending).unwrap();
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
        // One record filling the ring whole (its length word included).
        rw.write_all(&pattern(MIN_RING_BYTES - WORD as usize, 1))
            .unwrap();
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

    /// One round trip of a few bytes: the reader probes the writer on its first read, so
    /// the writer may lend after it.
    fn introduce(w: &mut ShmWriter, r: &mut ShmReader) {
        w.write_all(b"hi").unwrap();
        w.flush().unwrap();
        let mut b = [0u8; 2];
        r.read_exact(&mut b).unwrap();
        assert!(w.can_lend(), "the reader could not read this process");
    }

    #[test]
    fn lent_slices_arrive_whole_and_are_released_once_read() {
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        wr.probe();
        introduce(&mut rw, &mut wr);
        // Larger than the ring, read in odd pieces, between two small parts, 5 times: the
        // ring itself carries only the small parts and the loans' 16-byte records.
        for i in 0..5u32 {
            let big = Arc::new(pattern(2 * MIN_RING_BYTES + 13 + i as usize, i));
            let alive = Arc::downgrade(&big);
            let parts = [
                (&b"head"[..], true),
                (&big[..], true),
                (&b"tail!"[..], false),
            ];
            rw.write_lending(&parts, Box::new(big.clone())).unwrap();
            rw.flush().unwrap();
            drop(big);
            assert_eq!(rw.lent, i as u64 + 1, "one loan per message");
            assert!(
                rw.head < (MIN_RING_BYTES as u64) * 8,
                "ring used: {}",
                rw.head
            );
            let mut got = vec![0u8; 4 + 2 * MIN_RING_BYTES + 13 + i as usize + 5];
            let mut off = 0;
            while off < got.len() {
                let end = (off + 7777).min(got.len());
                off += wr.read(&mut got[off..end]).unwrap();
            }
            assert_eq!(&got[..4], b"head");
            assert_eq!(
                &got[4..got.len() - 5],
                &pattern(2 * MIN_RING_BYTES + 13 + i as usize, i)[..]
            );
            assert_eq!(&got[got.len() - 5..], b"tail!");
            // Still held until the writer looks again, then freed.
            assert!(alive.upgrade().is_some());
            rw.collect();
            assert!(
                alive.upgrade().is_none(),
                "message {i} kept after its loan was repaid"
            );
        }
    }

    #[test]
    fn an_empty_part_is_never_lent_even_with_no_minimum() {
        // An idle lane's dispatch has an empty matrix: a zero-length loan would be refused by
        // the reader as malformed and end the link.
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 0);
        wr.probe();
        introduce(&mut rw, &mut wr);
        rw.write_lending(&[(&[], true), (b"after", false)], Box::new(()))
            .unwrap();
        rw.flush().unwrap();
        let mut got = [0u8; 5];
        wr.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"after");
        assert_eq!(rw.lent, 0);
    }

    #[test]
    fn nothing_is_lent_to_a_reader_that_cannot_read_this_process() {
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        // The probe address points at a word that is not the probe.
        let other = 0u64;
        let reg = rw.link.region.clone();
        reg.u64_at(rw.link.tx.ctl + PROBE_ADDR)
            .store(&other as *const u64 as usize as u64, Ordering::SeqCst);
        rw.write_all(b"hi").unwrap();
        rw.flush().unwrap();
        let mut b = [0u8; 2];
        wr.read_exact(&mut b).unwrap();
        assert_eq!(wr.lender, Lender::Never);
        assert!(!rw.can_lend());
        let t = std::thread::spawn(move || {
            let big = pattern(3000, 5);
            rw.write_lending(&[(&big[..], true)], Box::new(())).unwrap();
            rw.flush().unwrap();
            rw
        });
        let mut got = vec![0u8; 3000];
        wr.read_exact(&mut got).unwrap();
        let rw = t.join().unwrap();
        assert_eq!(got, pattern(3000, 5));
        assert_eq!(rw.lent, 0, "copied through the ring");
    }

    #[test]
    fn a_peer_naming_a_process_that_does_not_map_the_ring_is_not_read() {
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        let mut other = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        rw.link
            .region
            .u64_at(rw.link.tx.ctl + WRITER_PID)
            .store(other.id() as u64, Ordering::SeqCst);
        rw.write_all(b"hi").unwrap();
        rw.flush().unwrap();
        wr.read_exact(&mut [0u8; 2]).unwrap();
        let _ = other.kill();
        let _ = other.wait();
        assert_eq!(wr.lender, Lender::Never);
        assert!(!rw.can_lend());
        // This process maps it, and is read only where both ends live in it.
        let me = std::process::id() as libc::pid_t;
        assert!(maps_ring(me, wr.link.region.ino));
        assert!(may_read(me, wr.link.region.ino, true));
        assert!(!may_read(me, wr.link.region.ino, false));
    }

    #[test]
    fn a_peer_naming_this_process_or_one_of_its_threads_is_not_read() {
        // Ends that do not expect to share the process: a loan from it would make the reader
        // read itself for the peer.
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        wr.same_process = false;
        rw.write_all(b"hi").unwrap();
        rw.flush().unwrap();
        wr.read_exact(&mut [0u8; 2]).unwrap();
        assert_eq!(wr.lender, Lender::Never);
        assert!(!rw.can_lend());
        // A thread of this process shows the process's maps, ring included: refused.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: no arguments, cannot fail.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let thread = rx.recv().unwrap();
        assert_ne!(thread, std::process::id() as libc::pid_t);
        assert!(maps_ring(thread, wr.link.region.ino));
        assert!(!may_read(thread, wr.link.region.ino, false));
        assert!(!may_read(thread, wr.link.region.ino, true));
        done_tx.send(()).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn a_writer_closing_with_a_loan_unread_waits_then_its_reader_fails() {
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        wr.probe();
        introduce(&mut rw, &mut wr);
        // Read in time: the close waits for it, and the bytes then the end arrive. The grace
        // is made long, so a close that waited for the grace rather than for the repayment
        // shows as a wait of minutes, not as a few hundred milliseconds a busy machine can
        // also take.
        rw.grace = Duration::from_secs(120);
        let big = Arc::new(pattern(5000, 1));
        rw.write_lending(&[(&big[..], true)], Box::new(big.clone()))
            .unwrap();
        rw.flush().unwrap();
        let h = std::thread::spawn(move || {
            let t0 = Instant::now();
            rw.shutdown();
            (rw, t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut got = vec![0u8; 5000];
        wr.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &big[..]);
        let (rw, took) = h.join().unwrap();
        assert!(
            took < Duration::from_secs(60),
            "the close waited for the grace, not the repayment: {took:?}"
        );
        drop(rw);

        // Not read in time: the writer closes the link before it frees the memory, and the
        // reader refuses the loan rather than deliver what it copied.
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        wr.probe();
        introduce(&mut rw, &mut wr);
        let big = Arc::new(pattern(5000, 2));
        rw.write_lending(&[(&big[..], true)], Box::new(big.clone()))
            .unwrap();
        rw.flush().unwrap();
        let t0 = Instant::now();
        drop(rw);
        assert!(t0.elapsed() >= LEND_GRACE);
        // (Past the socket check, which would end the stream first: the loan's own check.)
        wr.checked = Instant::now();
        let e = wr.read(&mut [0u8; 5000]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    #[test]
    fn hostile_loans_are_refused() {
        // A loan of memory that does not exist in the writer: an error, not a crash.
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        wr.probe();
        introduce(&mut rw, &mut wr);
        let bogus = unsafe { std::slice::from_raw_parts(16 as *const u8, 4096) };
        rw.put_loan(bogus).unwrap();
        rw.flush().unwrap();
        assert!(wr.read(&mut [0u8; 4096]).is_err());
        // A loan to a reader that never said it can read: refused before any copy.
        let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair_lending(MIN_RING_BYTES, 1000);
        let x = [7u8; 4096];
        rw.put_loan(&x).unwrap();
        rw.flush().unwrap();
        wr.lender = Lender::Never;
        let e = wr.read(&mut [0u8; 4096]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Unknown record kinds and records longer than what is published.
        for w in [9u64 << 56 | 8, REC_BYTES << 56 | 1_000_000] {
            let ((_rr, mut rw), (mut wr, _ww), _a, _b) = pair(MIN_RING_BYTES);
            let t = rw.link.tx;
            rw.link.copy_in(t, 0, &w.to_le_bytes());
            rw.head = 16;
            rw.publish();
            let e = wr.read(&mut [0u8; 8]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{w:#x}: {e}");
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
