//! Zero-initialised buffers for the big arrays of a model (packed weights, the KV cache), on
//! transparent huge pages where the OS offers them. Decode streams these arrays: with 4 KiB
//! pages every page is a TLB miss and a point where the hardware prefetcher stops.

use std::ops::{Deref, DerefMut};

/// Buffers from this size on are mapped on their own and advised to use huge pages.
pub const HUGE_PAGE_MIN_BYTES: usize = 2 << 20;

/// Plain data for which all-zero bytes are a valid value.
///
/// # Safety
/// Implementors must have no padding-sensitive invariants: every all-zero bit pattern, and any
/// bytes written through the type itself, must be a valid value.
pub unsafe trait Zeroable: Copy {}

// SAFETY: zero bits are 0.0.
unsafe impl Zeroable for f32 {}

// SAFETY: zero bits are 0.
unsafe impl Zeroable for u8 {}

/// A fixed-length, zero-initialised `[T]`.
pub struct HugeBuf<T: Zeroable> {
    repr: Repr<T>,
}

enum Repr<T> {
    Heap(Vec<T>),
    Mapped { map: memmap2::MmapMut, len: usize },
}

impl<T: Zeroable> HugeBuf<T> {
    /// `len` zeros: an anonymous map (zero-filled by the OS, page-aligned) advised to use huge
    /// pages before its first write when it is at least [`HUGE_PAGE_MIN_BYTES`]; otherwise,
    /// or if mapping fails, the heap.
    pub fn zeroed(len: usize) -> Self {
        // An overflowing size goes to the heap path, where `vec!` fails as it always did.
        let bytes = len.checked_mul(std::mem::size_of::<T>()).unwrap_or(0);
        if bytes >= HUGE_PAGE_MIN_BYTES && std::mem::align_of::<T>() <= 4096 {
            if let Ok(map) = memmap2::MmapMut::map_anon(bytes) {
                // Advice, not a requirement: without it (another OS, THP off) the map is
                // just small pages.
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage);
                return Self {
                    repr: Repr::Mapped { map, len },
                };
            }
        }
        // SAFETY: `T: Zeroable`.
        let zero: T = unsafe { std::mem::zeroed() };
        Self {
            repr: Repr::Heap(vec![zero; len]),
        }
    }
}

impl<T: Zeroable> From<Vec<T>> for HugeBuf<T> {
    fn from(v: Vec<T>) -> Self {
        Self {
            repr: Repr::Heap(v),
        }
    }
}

/// Collects into a buffer placed as [`HugeBuf::zeroed`] places it.
impl<T: Zeroable> FromIterator<T> for HugeBuf<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let v: Vec<T> = iter.into_iter().collect();
        if std::mem::size_of_val(v.as_slice()) < HUGE_PAGE_MIN_BYTES {
            return v.into();
        }
        let mut b = Self::zeroed(v.len());
        b.copy_from_slice(&v);
        b
    }
}

impl<T: Zeroable> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.repr {
            Repr::Heap(v) => v,
            // SAFETY: the map is page-aligned (enough for T, checked at creation), holds
            // `len` values of T, and was zero-filled (valid for T: Zeroable).
            Repr::Mapped { map, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr() as *const T, *len)
            },
        }
    }
}

impl<T: Zeroable> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.repr {
            Repr::Heap(v) => v,
            // SAFETY: as in `deref`, and the map is uniquely borrowed.
            Repr::Mapped { map, len } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr() as *mut T, *len)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_mapped_buffers_are_zeroed_and_writable() {
        for len in [0, 3, HUGE_PAGE_MIN_BYTES / 4 + 5] {
            let mut b = HugeBuf::<f32>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|v| *v == 0.0));
            if len > 0 {
                b[len - 1] = 2.5;
                assert_eq!(b[len - 1], 2.5);
            }
        }
        let b: HugeBuf<f32> = vec![1.0, 2.0].into();
        assert_eq!(&b[..], &[1.0, 2.0]);
        let n = HUGE_PAGE_MIN_BYTES / 4 + 1;
        let c: HugeBuf<f32> = (0..n).map(|i| i as f32).collect();
        assert_eq!((c.len(), c[0], c[n - 1]), (n, 0.0, (n - 1) as f32));
    }
}
