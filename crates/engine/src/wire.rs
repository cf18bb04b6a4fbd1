//! The M2N wire format: a fixed 64-byte little-endian header, then a payload.
//!
//! ```text
//! off size field
//!   0    4 magic        "TNDM" (0x4D444E54 little-endian)
//!   4    2 version      WIRE_VERSION
//!   6    2 kind         Kind
//!   8    8 epoch
//!  16    8 iteration
//!  24    4 layer
//!  28    4 micro_batch
//!  32    4 sender       replica id (to a worker) or worker id (to a replica)
//!  36    4 flags        bit 0: more (dispatch); bit 1: next_members present (combine);
//!                       bit 2: the matrix is bf16 (2 bytes a value) instead of f32
//!  40    8 members      member mask (dispatch, welcome) or next members (combine)
//!  48    4 rows         rows of the [rows, hidden] matrix in the payload
//!  52    4 n_assign     assignments after the matrix (dispatch)
//!  56    8 payload_len  bytes after the header
//! ```
//!
//! Data payloads are the matrix, f32 (written straight from tensor memory, read straight into
//! the vector that becomes the tensor) or bf16 (rounded to nearest even when written, widened
//! when read: half the bytes, [`WireDtype`]), followed, for a dispatch, by `n_assign` records of
//! (row u32, expert u32, weight f32). Control payloads (hello, challenge, proof, hello ack,
//! reject, reset, trouble, status) are UTF-8 text (JSON for the handshake's), at most
//! [`MAX_CONTROL_PAYLOAD`] bytes.
//!
//! The decoder never trusts a length: the payload length must equal what `rows`, `n_assign`
//! and the hidden size imply, and it must be under the connection's limit, before anything
//! is allocated.

use crate::transport::{CombineMsg, DispatchMsg, SlotHeader, ToReplica, ToWorker};
use candle_core::Tensor;
use std::io::{Read, Write};
use tandem_core::{Members, Slot};
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::Assignment;

pub const MAGIC: u32 = 0x4D44_4E54;
/// 2: the handshake has a challenge and a proof (nonces, optional cluster-secret HMACs);
/// a version-1 peer is refused by the header check, which names both versions.
pub const WIRE_VERSION: u16 = 2;
pub const HEADER_LEN: usize = 64;
pub const MAX_CONTROL_PAYLOAD: u64 = 64 * 1024;
const ASSIGNMENT_LEN: u64 = 12;

const _: () = assert!(
    cfg!(target_endian = "little"),
    "the wire format writes f32 tensors as their in-memory bytes: little-endian hosts only"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Reject = 3,
    Dispatch = 4,
    Combine = 5,
    Join = 6,
    Welcome = 7,
    Reset = 8,
    Trouble = 9,
    Status = 10,
    Challenge = 11,
    Proof = 12,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Self> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Reject,
            4 => Dispatch,
            5 => Combine,
            6 => Join,
            7 => Welcome,
            8 => Reset,
            9 => Trouble,
            10 => Status,
            11 => Challenge,
            12 => Proof,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {0:#010x}: not a tandem M2N peer")]
    BadMagic(u32),
    #[error("peer speaks wire version {0}, this build speaks {WIRE_VERSION}")]
    Version(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("malformed {kind:?} message: {why}")]
    Malformed { kind: Kind, why: String },
    #[error("{kind:?} payload of {len} bytes exceeds the limit of {limit}")]
    TooLarge { kind: Kind, len: u64, limit: u64 },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] tandem_model::ModelError),
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub kind: u16,
    pub epoch: u64,
    pub iteration: u64,
    pub layer: u32,
    pub micro_batch: u32,
    pub sender: u32,
    pub flags: u32,
    pub members: u64,
    pub rows: u32,
    pub n_assign: u32,
    pub payload_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.iteration.to_le_bytes());
        b[24..28].copy_from_slice(&self.layer.to_le_bytes());
        b[28..32].copy_from_slice(&self.micro_batch.to_le_bytes());
        b[32..36].copy_from_slice(&self.sender.to_le_bytes());
        b[36..40].copy_from_slice(&self.flags.to_le_bytes());
        b[40..48].copy_from_slice(&self.members.to_le_bytes());
        b[48..52].copy_from_slice(&self.rows.to_le_bytes());
        b[52..56].copy_from_slice(&self.n_assign.to_le_bytes());
        b[56..64].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Checks magic and version; the kind is checked by [`read_frame`].
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16_at(4);
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        Ok(Self {
            kind: u16_at(6),
            epoch: u64_at(8),
            iteration: u64_at(16),
            layer: u32_at(24),
            micro_batch: u32_at(28),
            sender: u32_at(32),
            flags: u32_at(36),
            members: u64_at(40),
            rows: u32_at(48),
            n_assign: u32_at(52),
            payload_len: u64_at(56),
        })
    }
}

const FLAG_MORE: u32 = 1;
const FLAG_NEXT: u32 = 2;
const FLAG_BF16: u32 = 4;

/// How the hidden states of dispatches and combines travel. Each frame says which it
/// carries, so a reader takes either; a writer uses its connection's choice (the replica's
/// option, announced in its hello, which the worker answers in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDtype {
    /// Exact: the engine's own values.
    #[default]
    F32,
    /// Half the bytes; each value rounded to bf16 (8 bits of mantissa) on the way.
    Bf16,
}

impl WireDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(WireDtype::F32),
            "bf16" => Some(WireDtype::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDtype::F32 => "f32",
            WireDtype::Bf16 => "bf16",
        }
    }

    /// Bytes of one value.
    pub fn bytes(self) -> u64 {
        match self {
            WireDtype::F32 => 4,
            WireDtype::Bf16 => 2,
        }
    }

    fn flag(self) -> u32 {
        match self {
            WireDtype::F32 => 0,
            WireDtype::Bf16 => FLAG_BF16,
        }
    }
}

/// Writes a matrix payload (`head`, the values in `dtype`, then `tail`).
fn write_matrix(
    w: &mut impl Write,
    head: &[u8],
    values: &[f32],
    tail: &[u8],
    dtype: WireDtype,
) -> Result<(), WireError> {
    match dtype {
        WireDtype::F32 => write_parts(w, &[head, f32_bytes(values), tail]),
        WireDtype::Bf16 => {
            let mut b = vec![0u8; values.len() * 2];
            for (o, v) in b.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&bf16_bits(*v).to_le_bytes());
            }
            write_parts(w, &[head, &b, tail])
        }
    }
}

/// The bf16 bits of `v`, rounded to nearest even (a NaN stays a quiet NaN): the value
/// `half::bf16::from_f32` gives, without its branches, so the loops over a matrix vectorize.
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
    let nan = ((x >> 16) | 0x40) as u16;
    if x & 0x7FFF_FFFF > 0x7F80_0000 {
        nan
    } else {
        rounded
    }
}

/// What frames are decoded from: a reader that can also fill memory holding no value yet,
/// so that a matrix's fresh buffer is not zero-filled before the bytes land in it (a
/// quarter of the cycles of a same-host exchange went to that `memset`).
///
/// # Safety
/// `read_uninit` must return how many bytes at the start of `dst` it initialised (at most
/// `dst.len()`), as `Read::read` does: the caller treats exactly those as initialised.
pub unsafe trait FrameSource: Read {
    /// Like `read`, into uninitialised memory. The default zero-fills `dst` first.
    fn read_uninit(&mut self, dst: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<usize> {
        dst.fill(std::mem::MaybeUninit::new(0));
        // SAFETY: every byte was just initialised.
        let b = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), dst.len()) };
        self.read(b)
    }
}

// SAFETY: forwards to the referent's implementation.
unsafe impl<R: FrameSource + ?Sized> FrameSource for &mut R {
    fn read_uninit(&mut self, dst: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<usize> {
        (**self).read_uninit(dst)
    }
}

// SAFETY: the bytes come from the buffer (copied) or from the inner source's `read_uninit`.
unsafe impl<R: FrameSource> FrameSource for std::io::BufReader<R> {
    fn read_uninit(&mut self, dst: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<usize> {
        use std::io::BufRead;
        // A read at least as long as the buffer, with nothing buffered, goes straight to the
        // source (as `BufReader::read` does).
        if self.buffer().is_empty() && dst.len() >= self.capacity() {
            return self.get_mut().read_uninit(dst);
        }
        let avail = self.fill_buf()?;
        let n = avail.len().min(dst.len());
        // SAFETY: n bytes from an initialised buffer into `dst`, which holds at least n.
        unsafe {
            std::ptr::copy_nonoverlapping(avail.as_ptr(), dst.as_mut_ptr().cast::<u8>(), n);
        }
        self.consume(n);
        Ok(n)
    }
}

/// Any reader, through the zero-filling default.
struct Zeroing<'a, R>(&'a mut R);

impl<R: Read> Read for Zeroing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

// SAFETY: the default `read_uninit`.
unsafe impl<R: Read> FrameSource for Zeroing<'_, R> {}

/// Reads `n` matrix values sent in `dtype`.
fn read_matrix(
    r: &mut impl FrameSource,
    n: usize,
    dtype: WireDtype,
) -> Result<Vec<f32>, WireError> {
    match dtype {
        WireDtype::F32 => {
            let mut x = Vec::<f32>::with_capacity(n);
            let spare = x.spare_capacity_mut();
            // SAFETY: the spare capacity holds n f32s, 4n bytes, viewed as uninitialised bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    spare.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                    n * 4,
                )
            };
            let len = bytes.len();
            read_steps(len, false, |got| {
                r.read_uninit(&mut bytes[got..]).map(|k| k.min(len - got))
            })?;
            // SAFETY: FrameSource's contract: all 4n bytes were initialised, and every bit
            // pattern is an f32.
            unsafe { x.set_len(n) };
            Ok(x)
        }
        WireDtype::Bf16 => {
            let mut x = vec![0f32; n];
            let mut b = vec![0u8; n * 2];
            read_full(r, &mut b, false)?;
            for (v, c) in x.iter_mut().zip(b.chunks_exact(2)) {
                *v = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
            Ok(x)
        }
    }
}

/// Everything that travels on an M2N connection.
pub enum Frame {
    /// First message of a connection, from the connecting side (JSON).
    Hello(String),
    /// The listener accepts (JSON with its view, e.g. its epoch).
    HelloAck(String),
    /// The listener refuses, saying why; it closes the connection next.
    Reject(String),
    ToWorker(ToWorker),
    ToReplica(ToReplica),
    /// A status report (JSON), answer to a status hello.
    Status(String),
    /// The listener's answer to a hello: its fresh nonce and whether it authenticates (JSON).
    Challenge(String),
    /// The connecting side's answer to the challenge: its proof of the secret, if any (JSON).
    Proof(String),
}

pub(crate) fn f32_bytes(s: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}

fn text_frame(w: &mut impl Write, kind: Kind, h: Header, text: &str) -> Result<(), WireError> {
    let bytes = text.as_bytes();
    let bytes = &bytes[..bytes.len().min(MAX_CONTROL_PAYLOAD as usize)];
    let h = Header {
        kind: kind as u16,
        payload_len: bytes.len() as u64,
        ..h
    };
    write_parts(w, &[&h.encode(), bytes])
}

/// Writes every part, in order, with vectored writes: a frame leaves in as few system calls
/// (and TCP segments) as the OS allows, and the tensor bytes are not copied into a buffer.
pub fn write_parts(w: &mut impl Write, parts: &[&[u8]]) -> Result<(), WireError> {
    let mut i = 0; // current part
    let mut off = 0; // bytes of it already written
    while i < parts.len() {
        if off == parts[i].len() {
            i += 1;
            off = 0;
            continue;
        }
        let slices: Vec<std::io::IoSlice> = std::iter::once(&parts[i][off..])
            .chain(parts[i + 1..].iter().copied())
            .map(std::io::IoSlice::new)
            .collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(WireError::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        while n > 0 && i < parts.len() {
            let left = parts[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn slot_header(kind: Kind, s: &SlotHeader) -> Header {
    Header {
        kind: kind as u16,
        epoch: s.epoch,
        iteration: s.slot.iteration,
        layer: s.slot.layer,
        micro_batch: s.slot.micro_batch,
        sender: s.sender,
        ..Default::default()
    }
}

fn matrix_rows(t: &Tensor, hidden: usize) -> Result<u32, WireError> {
    let n = t.elem_count();
    if hidden == 0 || !n.is_multiple_of(hidden) {
        return Err(WireError::Malformed {
            kind: Kind::Dispatch,
            why: format!("{n} values is not a multiple of the hidden size {hidden}"),
        });
    }
    Ok((n / hidden) as u32)
}

/// Lays out a dispatch or a combine: calls `emit` with the encoded header, the matrix (the
/// tensor's own memory when it is contiguous) and the bytes after it (a dispatch's
/// assignments). `None` for every other frame.
pub fn with_matrix_frame<R>(
    f: &Frame,
    hidden: usize,
    dtype: WireDtype,
    emit: impl FnOnce(&[u8], &[f32], &[u8]) -> Result<R, WireError>,
) -> Option<Result<R, WireError>> {
    let laid_out = |t: &Tensor, h: Header, tail: &[u8]| -> Result<R, WireError> {
        let head = h.encode();
        with_slice(t, |x| emit(&head, x, tail))?
    };
    match f {
        Frame::ToWorker(ToWorker::Dispatch(m)) => Some((|| {
            let rows = matrix_rows(&m.x, hidden)?;
            let mut h = slot_header(Kind::Dispatch, &m.header);
            h.flags = if m.more { FLAG_MORE } else { 0 } | dtype.flag();
            h.members = m.members.bits();
            h.rows = rows;
            h.n_assign = m.assignments.len() as u32;
            h.payload_len = rows as u64 * hidden as u64 * dtype.bytes()
                + m.assignments.len() as u64 * ASSIGNMENT_LEN;
            let mut a = Vec::with_capacity(m.assignments.len() * ASSIGNMENT_LEN as usize);
            for x in &m.assignments {
                a.extend_from_slice(&x.row.to_le_bytes());
                a.extend_from_slice(&x.expert.to_le_bytes());
                a.extend_from_slice(&x.weight.to_le_bytes());
            }
            laid_out(&m.x, h, &a)
        })()),
        Frame::ToReplica(ToReplica::Combine(m)) => Some((|| {
            let rows = matrix_rows(&m.y, hidden)?;
            let mut h = slot_header(Kind::Combine, &m.header);
            if let Some(k) = m.next_members {
                h.flags = FLAG_NEXT;
                h.members = k.bits();
            }
            h.flags |= dtype.flag();
            h.rows = rows;
            h.payload_len = rows as u64 * hidden as u64 * dtype.bytes();
            laid_out(&m.y, h, &[])
        })()),
        _ => None,
    }
}

/// The matrix of a dispatch or a combine, if the frame is one.
pub fn matrix_of(f: &Frame) -> Option<&Tensor> {
    match f {
        Frame::ToWorker(ToWorker::Dispatch(m)) => Some(&m.x),
        Frame::ToReplica(ToReplica::Combine(m)) => Some(&m.y),
        _ => None,
    }
}

/// Writes one frame, matrices in f32. The caller flushes (and should buffer small writes).
pub fn write_frame(w: &mut impl Write, f: &Frame, hidden: usize) -> Result<(), WireError> {
    write_frame_as(w, f, hidden, WireDtype::F32)
}

/// [`write_frame`] with the matrices of dispatches and combines in `dtype`.
pub fn write_frame_as(
    w: &mut impl Write,
    f: &Frame,
    hidden: usize,
    dtype: WireDtype,
) -> Result<(), WireError> {
    match f {
        Frame::Hello(t) => text_frame(w, Kind::Hello, Header::default(), t),
        Frame::HelloAck(t) => text_frame(w, Kind::HelloAck, Header::default(), t),
        Frame::Reject(t) => text_frame(w, Kind::Reject, Header::default(), t),
        Frame::Status(t) => text_frame(w, Kind::Status, Header::default(), t),
        Frame::Challenge(t) => text_frame(w, Kind::Challenge, Header::default(), t),
        Frame::Proof(t) => text_frame(w, Kind::Proof, Header::default(), t),
        Frame::ToWorker(ToWorker::Dispatch(_)) | Frame::ToReplica(ToReplica::Combine(_)) => {
            with_matrix_frame(f, hidden, dtype, |head, x, tail| {
                write_matrix(w, head, x, tail, dtype)
            })
            .unwrap_or(Ok(()))
        }
        Frame::ToWorker(ToWorker::Join { replica }) => {
            let h = Header {
                kind: Kind::Join as u16,
                sender: *replica,
                ..Default::default()
            };
            w.write_all(&h.encode())?;
            Ok(())
        }
        Frame::ToWorker(ToWorker::Trouble {
            replica,
            epoch,
            why,
        }) => {
            let h = Header {
                sender: *replica,
                epoch: *epoch,
                ..Default::default()
            };
            text_frame(w, Kind::Trouble, h, why)
        }
        Frame::ToWorker(ToWorker::Gone { .. }) | Frame::ToReplica(ToReplica::Lost { .. }) => {
            // Local notices, never sent.
            Ok(())
        }
        Frame::ToReplica(ToReplica::Welcome {
            epoch,
            iteration,
            members,
        }) => {
            let h = Header {
                kind: Kind::Welcome as u16,
                epoch: *epoch,
                iteration: *iteration,
                members: members.bits(),
                ..Default::default()
            };
            w.write_all(&h.encode())?;
            Ok(())
        }
        Frame::ToReplica(ToReplica::Reset { epoch, why }) => {
            let h = Header {
                epoch: *epoch,
                ..Default::default()
            };
            text_frame(w, Kind::Reset, h, why)
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8], at_start: bool) -> Result<(), WireError> {
    read_steps(buf.len(), at_start, |got| r.read(&mut buf[got..]))
}

/// Reads `len` bytes with `step(got)`, which reads some of what follows the first `got`:
/// `Closed` when the stream ends before the first byte of a frame (`at_start`), an error
/// naming the shortfall when it ends later.
fn read_steps(
    len: usize,
    at_start: bool,
    mut step: impl FnMut(usize) -> std::io::Result<usize>,
) -> Result<(), WireError> {
    let mut got = 0;
    while got < len {
        match step(got) {
            Ok(0) if got == 0 && at_start => return Err(WireError::Closed),
            Ok(0) => {
                return Err(WireError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("truncated message: {got} of {len} bytes"),
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn read_text(r: &mut impl Read, kind: Kind, len: u64) -> Result<String, WireError> {
    if len > MAX_CONTROL_PAYLOAD {
        return Err(WireError::TooLarge {
            kind,
            len,
            limit: MAX_CONTROL_PAYLOAD,
        });
    }
    let mut b = vec![0u8; len as usize];
    read_full(r, &mut b, false)?;
    String::from_utf8(b).map_err(|_| WireError::Malformed {
        kind,
        why: "text payload is not UTF-8".into(),
    })
}

fn expect_empty(kind: Kind, h: &Header) -> Result<(), WireError> {
    if h.payload_len != 0 {
        return Err(WireError::Malformed {
            kind,
            why: format!("{} payload bytes where none belong", h.payload_len),
        });
    }
    Ok(())
}

/// Reads one frame. `hidden` is the model's hidden size (0 before the handshake: data frames
/// are then refused); `max_payload` bounds what a length field can make us allocate.
pub fn read_frame(r: &mut impl Read, hidden: usize, max_payload: u64) -> Result<Frame, WireError> {
    read_frame_from(&mut Zeroing(r), hidden, max_payload)
}

/// [`read_frame`] from a source that fills matrices without zero-filling them first.
pub fn read_frame_from(
    r: &mut impl FrameSource,
    hidden: usize,
    max_payload: u64,
) -> Result<Frame, WireError> {
    read_frame_meta(r, hidden, max_payload).map(|(f, _)| f)
}

/// What the header of a dispatch or a combine said about its matrix, as it crossed the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixMeta {
    /// The type the values crossed in.
    pub dtype: WireDtype,
    pub rows: u32,
    /// The payload's bytes (the values, and a dispatch's assignments).
    pub payload_len: u64,
}

/// [`read_frame_from`], also returning what the frame's header said about its matrix (for
/// dispatches and combines): the receiving side counts what really arrived.
pub fn read_frame_meta(
    r: &mut impl FrameSource,
    hidden: usize,
    max_payload: u64,
) -> Result<(Frame, Option<MatrixMeta>), WireError> {
    let mut hb = [0u8; HEADER_LEN];
    read_full(r, &mut hb, true)?;
    let h = Header::decode(&hb)?;
    let kind = Kind::from_u16(h.kind).ok_or(WireError::UnknownKind(h.kind))?;
    let slot = SlotHeader {
        epoch: h.epoch,
        slot: Slot::new(h.iteration, h.layer, h.micro_batch),
        sender: h.sender,
    };
    let dtype = if h.flags & FLAG_BF16 != 0 {
        WireDtype::Bf16
    } else {
        WireDtype::F32
    };
    let matrix = |kind: Kind, extra: u64| -> Result<usize, WireError> {
        if hidden == 0 {
            return Err(WireError::Malformed {
                kind,
                why: "data before the handshake".into(),
            });
        }
        let want = (h.rows as u64)
            .checked_mul(hidden as u64 * dtype.bytes())
            .and_then(|m| m.checked_add(extra))
            .ok_or_else(|| WireError::Malformed {
                kind,
                why: "sizes overflow".into(),
            })?;
        if want != h.payload_len {
            return Err(WireError::Malformed {
                kind,
                why: format!(
                    "payload is {} bytes but {} rows of {hidden} and {} assignments need {want}",
                    h.payload_len, h.rows, h.n_assign
                ),
            });
        }
        if h.payload_len > max_payload {
            return Err(WireError::TooLarge {
                kind,
                len: h.payload_len,
                limit: max_payload,
            });
        }
        Ok(h.rows as usize * hidden)
    };
    let frame = match kind {
        Kind::Hello => Frame::Hello(read_text(r, kind, h.payload_len)?),
        Kind::HelloAck => Frame::HelloAck(read_text(r, kind, h.payload_len)?),
        Kind::Reject => Frame::Reject(read_text(r, kind, h.payload_len)?),
        Kind::Status => Frame::Status(read_text(r, kind, h.payload_len)?),
        Kind::Challenge => Frame::Challenge(read_text(r, kind, h.payload_len)?),
        Kind::Proof => Frame::Proof(read_text(r, kind, h.payload_len)?),
        Kind::Dispatch => {
            let n = matrix(kind, h.n_assign as u64 * ASSIGNMENT_LEN)?;
            let x = read_matrix(r, n, dtype)?;
            let mut ab = vec![0u8; h.n_assign as usize * ASSIGNMENT_LEN as usize];
            read_full(r, &mut ab, false)?;
            let mut assignments = Vec::with_capacity(h.n_assign as usize);
            for c in ab.chunks_exact(ASSIGNMENT_LEN as usize) {
                let a = Assignment {
                    row: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    expert: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                    weight: f32::from_le_bytes([c[8], c[9], c[10], c[11]]),
                };
                if a.row >= h.rows || !a.weight.is_finite() {
                    return Err(WireError::Malformed {
                        kind,
                        why: format!(
                            "assignment row {} of {} rows, weight {}",
                            a.row, h.rows, a.weight
                        ),
                    });
                }
                assignments.push(a);
            }
            Frame::ToWorker(ToWorker::Dispatch(DispatchMsg {
                header: slot,
                members: Members::from_bits(h.members),
                more: h.flags & FLAG_MORE != 0,
                x: from_vec(x, h.rows as usize, hidden)?,
                assignments,
            }))
        }
        Kind::Combine => {
            if h.n_assign != 0 {
                return Err(WireError::Malformed {
                    kind,
                    why: "assignments in a combine".into(),
                });
            }
            let n = matrix(kind, 0)?;
            let y = read_matrix(r, n, dtype)?;
            Frame::ToReplica(ToReplica::Combine(CombineMsg {
                header: slot,
                y: from_vec(y, h.rows as usize, hidden)?,
                next_members: (h.flags & FLAG_NEXT != 0).then_some(Members::from_bits(h.members)),
            }))
        }
        Kind::Join => {
            expect_empty(kind, &h)?;
            Frame::ToWorker(ToWorker::Join { replica: h.sender })
        }
        Kind::Welcome => {
            expect_empty(kind, &h)?;
            Frame::ToReplica(ToReplica::Welcome {
                epoch: h.epoch,
                iteration: h.iteration,
                members: Members::from_bits(h.members),
            })
        }
        Kind::Reset => Frame::ToReplica(ToReplica::Reset {
            epoch: h.epoch,
            why: read_text(r, kind, h.payload_len)?,
        }),
        Kind::Trouble => Frame::ToWorker(ToWorker::Trouble {
            replica: h.sender,
            epoch: h.epoch,
            why: read_text(r, kind, h.payload_len)?,
        }),
    };
    let meta = matches!(kind, Kind::Dispatch | Kind::Combine).then_some(MatrixMeta {
        dtype,
        rows: h.rows,
        payload_len: h.payload_len,
    });
    Ok((frame, meta))
}

/// FNV-1a, 64 bits: a stable hash for handshakes (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::bf16_bits;

    #[test]
    fn bf16_rounding_is_half_crates() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001), // signalling NaN
            f32::from_bits(0x0000_0001), // smallest subnormal
            f32::from_bits(0x3F80_8000), // a tie: rounds to even (down)
            f32::from_bits(0x3F81_8000), // a tie: rounds to even (up)
            f32::from_bits(0x7F7F_FFFF), // rounds up to infinity
        ];
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            specials.push(f32::from_bits(x));
        }
        for v in specials {
            let want = half::bf16::from_f32(v).to_bits();
            assert_eq!(bf16_bits(v), want, "{v} ({:#x})", v.to_bits());
        }
    }
}
