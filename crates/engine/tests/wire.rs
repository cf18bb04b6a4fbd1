//! The M2N wire format: every message round-trips exactly, and the decoder survives anything
//! (arbitrary bytes, flipped bits, truncation, lying length fields) with an error, never a
//! panic or an allocation a length field asked for.

use proptest::prelude::*;
use std::io::Cursor;
use tandem_core::{Members, Slot};
use tandem_engine::transport::{CombineMsg, DispatchMsg, SlotHeader, ToReplica, ToWorker};
use tandem_engine::wire::{
    read_frame, read_frame_from, write_frame, write_frame_as, Frame, FrameSource, Header,
    WireDtype, WireError, HEADER_LEN, MAGIC,
};
use tandem_model::layers::{from_vec, with_slice};
use tandem_model::Assignment;

const LIMIT: u64 = 1 << 20;

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    with_slice(t, |s| s.to_vec()).unwrap()
}

fn encode(f: &Frame, hidden: usize) -> Vec<u8> {
    let mut b = Vec::new();
    write_frame(&mut b, f, hidden).unwrap();
    b
}

/// The bytes of a dispatch of `x` (rows of `hidden`) with `asg`.
fn encode_dispatch(
    hidden: usize,
    header: SlotHeader,
    members: Members,
    more: bool,
    x: &[f32],
    asg: &[Assignment],
) -> Vec<u8> {
    let msg = DispatchMsg {
        header,
        members,
        more,
        x: from_vec(x.to_vec(), x.len() / hidden, hidden).unwrap(),
        assignments: asg.to_vec(),
    };
    encode(&Frame::ToWorker(ToWorker::Dispatch(msg)), hidden)
}

fn decode(b: &[u8], hidden: usize) -> Result<Frame, WireError> {
    read_frame(&mut Cursor::new(b), hidden, LIMIT)
}

fn slot() -> impl Strategy<Value = SlotHeader> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(epoch, iteration, layer, micro_batch, sender)| SlotHeader {
                epoch,
                slot: Slot::new(iteration, layer, micro_batch),
                sender,
            },
        )
}

/// Any set of replicas, as the wire's 64 bits.
fn members() -> impl Strategy<Value = Members> {
    any::<u64>().prop_map(Members::from_bits)
}

/// A dispatch with `rows` rows of `hidden` values and assignments pointing at them.
fn dispatch() -> impl Strategy<Value = (usize, SlotHeader, Members, bool, Vec<f32>, Vec<Assignment>)>
{
    (1usize..9, 0usize..6).prop_flat_map(|(hidden, rows)| {
        let n = hidden * rows;
        let asg = if rows == 0 {
            Just(Vec::new()).boxed()
        } else {
            prop::collection::vec(
                (0..rows as u32, any::<u32>(), -4.0f32..4.0).prop_map(|(row, expert, weight)| {
                    Assignment {
                        row,
                        expert,
                        weight,
                    }
                }),
                0..12,
            )
            .boxed()
        };
        (
            Just(hidden),
            slot(),
            members(),
            any::<bool>(),
            prop::collection::vec(any::<f32>(), n..=n),
            asg,
        )
    })
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A source that hands out at most `step` bytes per call, writing them into uninitialised
/// memory itself (as the socket and the rings do).
struct Trickle<'a> {
    b: &'a [u8],
    step: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.b.len());
        buf[..n].copy_from_slice(&self.b[..n]);
        self.b = &self.b[n..];
        Ok(n)
    }
}

// SAFETY: returns exactly the bytes it wrote at the start of `dst`.
unsafe impl FrameSource for Trickle<'_> {
    fn read_uninit(&mut self, dst: &mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<usize> {
        let n = dst.len().min(self.step).min(self.b.len());
        for (d, s) in dst.iter_mut().zip(&self.b[..n]) {
            d.write(*s);
        }
        self.b = &self.b[n..];
        Ok(n)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Decoding into fresh (not zero-filled) matrices, through a buffer of any size and a
    /// source that trickles, gives the same frame bit for bit; a truncated frame is an
    /// error, not a matrix with uninitialised values.
    #[test]
    fn uninitialised_reads_decode_the_same((hidden, header, members, more, x, asg) in dispatch(), step in 1usize..40, cap in 1usize..64, cut in any::<prop::sample::Index>()) {
        let bytes = encode_dispatch(hidden, header, members, more, &x, &asg);
        let mut src = std::io::BufReader::with_capacity(cap, Trickle { b: &bytes, step });
        let Ok(Frame::ToWorker(ToWorker::Dispatch(d))) = read_frame_from(&mut src, hidden, LIMIT) else {
            return Err(TestCaseError::fail("not a dispatch"));
        };
        prop_assert_eq!(d.header, header);
        prop_assert!(same_bits(&values(&d.x), &x));
        prop_assert_eq!(d.assignments.len(), asg.len());
        let short = &bytes[..cut.index(bytes.len())];
        let mut src = std::io::BufReader::with_capacity(cap, Trickle { b: short, step });
        prop_assert!(read_frame_from(&mut src, hidden, LIMIT).is_err());
    }

    #[test]
    fn dispatch_round_trips((hidden, header, members, more, x, asg) in dispatch()) {
        let bytes = encode_dispatch(hidden, header, members, more, &x, &asg);
        prop_assert_eq!(bytes.len(), HEADER_LEN + x.len() * 4 + asg.len() * 12);
        let Ok(Frame::ToWorker(ToWorker::Dispatch(d))) = decode(&bytes, hidden) else {
            return Err(TestCaseError::fail("not a dispatch"));
        };
        prop_assert_eq!(d.header, header);
        prop_assert_eq!(d.members, members);
        prop_assert_eq!(d.more, more);
        // NaNs included: the bits travel unchanged.
        prop_assert!(same_bits(&values(&d.x), &x));
        prop_assert_eq!(d.assignments.len(), asg.len());
        for (a, b) in d.assignments.iter().zip(&asg) {
            prop_assert_eq!((a.row, a.expert, a.weight.to_bits()), (b.row, b.expert, b.weight.to_bits()));
        }
    }

    /// bf16 on the wire: half the matrix bytes, each value rounded to nearest even bf16
    /// (NaN stays NaN), everything else exact; the reader needs no option to tell.
    #[test]
    fn bf16_matrices_round_trip((hidden, header, members, more, x, asg) in dispatch(), next in proptest::option::of(members())) {
        let rows = x.len() / hidden;
        let rounded: Vec<f32> = x.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
        let same = |got: &[f32]| got.len() == rounded.len() && got.iter().zip(&rounded).all(|(a, b)| {
            a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
        });
        let msg = DispatchMsg {
            header,
            members,
            more,
            x: from_vec(x.clone(), rows, hidden).unwrap(),
            assignments: asg.clone(),
        };
        let mut bytes = Vec::new();
        write_frame_as(&mut bytes, &Frame::ToWorker(ToWorker::Dispatch(msg)), hidden, WireDtype::Bf16).unwrap();
        prop_assert_eq!(bytes.len(), HEADER_LEN + x.len() * 2 + asg.len() * 12);
        let Ok(Frame::ToWorker(ToWorker::Dispatch(d))) = decode(&bytes, hidden) else {
            return Err(TestCaseError::fail("not a dispatch"));
        };
        prop_assert_eq!((d.header, d.members, d.more), (header, members, more));
        prop_assert!(same(&values(&d.x)));
        prop_assert_eq!(d.assignments.len(), asg.len());
        let c = CombineMsg { header, y: from_vec(x.clone(), rows, hidden).unwrap(), next_members: next };
        let mut bytes = Vec::new();
        write_frame_as(&mut bytes, &Frame::ToReplica(ToReplica::Combine(c)), hidden, WireDtype::Bf16).unwrap();
        prop_assert_eq!(bytes.len(), HEADER_LEN + x.len() * 2);
        let Ok(Frame::ToReplica(ToReplica::Combine(d))) = decode(&bytes, hidden) else {
            return Err(TestCaseError::fail("not a combine"));
        };
        prop_assert_eq!((d.header, d.next_members), (header, next));
        prop_assert!(same(&values(&d.y)));
    }

    #[test]
    fn combine_and_control_round_trip(
        header in slot(),
        hidden in 1usize..9,
        rows in 0usize..5,
        next in proptest::option::of(members()),
        epoch in any::<u64>(),
        iteration in any::<u64>(),
        members in members(),
        replica in any::<u32>(),
        why in ".{0,40}",
    ) {
        let y: Vec<f32> = (0..rows * hidden).map(|i| i as f32 * 0.5 - 3.0).collect();
        let c = CombineMsg { header, y: from_vec(y.clone(), rows, hidden).unwrap(), next_members: next };
        match decode(&encode(&Frame::ToReplica(ToReplica::Combine(c)), hidden), hidden) {
            Ok(Frame::ToReplica(ToReplica::Combine(d))) => {
                prop_assert_eq!(d.header, header);
                prop_assert_eq!(d.next_members, next);
                prop_assert!(same_bits(&values(&d.y), &y));
            }
            _ => return Err(TestCaseError::fail("not a combine")),
        }
        let w = ToReplica::Welcome { epoch, iteration, members };
        match decode(&encode(&Frame::ToReplica(w), hidden), hidden) {
            Ok(Frame::ToReplica(ToReplica::Welcome { epoch: e, iteration: i, members: m })) => {
                prop_assert_eq!((e, i, m), (epoch, iteration, members));
            }
            _ => return Err(TestCaseError::fail("not a welcome")),
        }
        let r = ToReplica::Reset { epoch, why: why.clone() };
        match decode(&encode(&Frame::ToReplica(r), hidden), hidden) {
            Ok(Frame::ToReplica(ToReplica::Reset { epoch: e, why: w })) => {
                prop_assert_eq!(e, epoch);
                prop_assert_eq!(w, why.clone());
            }
            _ => return Err(TestCaseError::fail("not a reset")),
        }
        match decode(&encode(&Frame::ToWorker(ToWorker::Join { replica }), hidden), hidden) {
            Ok(Frame::ToWorker(ToWorker::Join { replica: r })) => prop_assert_eq!(r, replica),
            _ => return Err(TestCaseError::fail("not a join")),
        }
        let t = ToWorker::Trouble { replica, epoch, why: why.clone() };
        match decode(&encode(&Frame::ToWorker(t), hidden), hidden) {
            Ok(Frame::ToWorker(ToWorker::Trouble { replica: r, epoch: e, why: w })) => {
                prop_assert_eq!((r, e), (replica, epoch));
                prop_assert_eq!(w, why);
            }
            _ => return Err(TestCaseError::fail("not a trouble report")),
        }
    }

    /// Arbitrary bytes: an error or a frame, never a panic.
    #[test]
    fn decoder_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300), hidden in 0usize..9) {
        let _ = decode(&bytes, hidden);
    }

    /// A valid header followed by garbage, with every field random: the decoder checks the
    /// length against the shape before reading and never allocates past the limit.
    #[test]
    fn decoder_survives_lying_headers(
        kind in 0u16..12,
        rows in any::<u32>(),
        n_assign in any::<u32>(),
        payload_len in any::<u64>(),
        flags in any::<u32>(),
        tail in prop::collection::vec(any::<u8>(), 0..200),
        hidden in 0usize..9,
    ) {
        let h = Header { kind, rows, n_assign, payload_len, flags, ..Header::default() };
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(&tail);
        if let Ok(f) = decode(&bytes, hidden) {
            // Only a frame whose announced size fits in what was sent can decode.
            prop_assert!(payload_len as usize <= tail.len());
            if let Frame::ToWorker(ToWorker::Dispatch(d)) = f {
                prop_assert!(d.assignments.iter().all(|a| a.row < rows));
            }
        }
    }

    /// Any real frame with one flipped bit or cut short: no panic; truncation is an error.
    #[test]
    fn decoder_survives_corruption((hidden, header, members, more, x, asg) in dispatch(), flip in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let rows = x.len() / hidden;
        let msg = DispatchMsg { header, members, more, x: from_vec(x, rows, hidden).unwrap(), assignments: asg };
        let bytes = encode(&Frame::ToWorker(ToWorker::Dispatch(msg)), hidden);
        let mut flipped = bytes.clone();
        let i = flip.index(flipped.len());
        flipped[i] ^= 1 << (i % 8);
        let _ = decode(&flipped, hidden);
        let n = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..n], hidden).is_err());
    }
}

#[test]
fn a_huge_length_field_is_refused_before_allocating() {
    let h = Header {
        kind: 4, // dispatch
        rows: u32::MAX,
        n_assign: 0,
        payload_len: u32::MAX as u64 * 4096 * 4,
        ..Header::default()
    };
    let err = decode(&h.encode(), 4096).err().expect("must fail");
    assert!(
        matches!(err, WireError::TooLarge { .. }),
        "expected TooLarge, got {err}"
    );
    let text = Header {
        kind: 8, // reset: text payload
        payload_len: u64::MAX,
        ..Header::default()
    };
    let err = decode(&text.encode(), 4).err().expect("must fail");
    assert!(matches!(err, WireError::TooLarge { .. }), "got {err}");
}

#[test]
fn wrong_magic_version_and_kind_are_named() {
    let mut b = Header {
        kind: 6,
        ..Header::default()
    }
    .encode();
    b[4] = 9; // version 9
    let e = decode(&b, 4).err().unwrap().to_string();
    assert!(e.contains("version 9"), "{e}");
    let mut b = Header::default().encode();
    b[0] ^= 0xff;
    assert!(matches!(decode(&b, 4), Err(WireError::BadMagic(m)) if m != MAGIC));
    let b = Header {
        kind: 999,
        ..Header::default()
    }
    .encode();
    assert!(matches!(decode(&b, 4), Err(WireError::UnknownKind(999))));
    assert!(matches!(decode(&[], 4), Err(WireError::Closed)));
}

#[test]
fn data_before_the_handshake_and_bad_assignments_are_refused() {
    let x = from_vec(vec![1.0; 8], 2, 4).unwrap();
    let msg = DispatchMsg {
        header: SlotHeader {
            epoch: 1,
            slot: Slot::new(0, 0, 0),
            sender: 0,
        },
        members: Members::one(0),
        more: false,
        x,
        assignments: vec![Assignment {
            row: 5, // only 2 rows
            expert: 0,
            weight: 1.0,
        }],
    };
    let bytes = encode(&Frame::ToWorker(ToWorker::Dispatch(msg)), 4);
    // hidden 0 = before the handshake
    assert!(decode(&bytes, 0).is_err());
    let e = decode(&bytes, 4).err().unwrap().to_string();
    assert!(e.contains("assignment row 5"), "{e}");
    // The same bytes read with another hidden size do not add up.
    let e = decode(&bytes, 3).err().unwrap().to_string();
    assert!(e.contains("malformed"), "{e}");
}
