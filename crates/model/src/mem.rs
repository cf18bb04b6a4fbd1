//! The memory facts model loading checks against (`MemAvailable`) and how sizes are shown.
//! The zero-filled huge-page buffers themselves are the kernels' ([`tandem_kernels::mem`]).

pub use tandem_kernels::mem::{HugeBuf, Zeroable, HUGE_PAGE_MIN_BYTES};

/// `MemAvailable` of `/proc/meminfo` in bytes: the memory the kernel says can be allocated
/// without swapping (free memory plus reclaimable page cache). `None` where it is not known.
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The `MemAvailable:  N kB` line of a `/proc/meminfo` text, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut parts = line.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

/// `bytes` for a message: "3.2 GiB", "512.0 MiB".
pub fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_from_meminfo() {
        let text = "MemTotal:       16318412 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(8_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
        assert_eq!(gib(3 << 30), "3.0 GiB");
        assert_eq!(gib(512 << 20), "512.0 MiB");
    }
}
