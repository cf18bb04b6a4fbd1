//! What the reports record about the machine and the time: CPU name, load average (both from
//! `tandem_core::machine`, which the serving path uses too), the machine object of the JSON
//! reports, memory read bandwidth, and UTC dates (no timezone database here).

use serde_json::json;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use tandem_core::machine::{cpu_name, load_average, machine_line};

/// The `machine` object of the JSON reports: CPU name (empty if unknown), cores, OS.
pub fn machine_info() -> serde_json::Value {
    json!({
        "cpu": cpu_name().unwrap_or_default(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "os": std::env::consts::OS,
    })
}

/// Best-of-5 read bandwidth over a 1 GiB buffer in the current rayon pool, bytes/s.
pub fn measure_bandwidth() -> f64 {
    read_bandwidth(1 << 30, 5)
}

/// Best-of-`passes` read bandwidth of `kernels::sum` over a buffer of `bytes`, in the current
/// rayon pool, bytes/s.
pub fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    use rayon::prelude::*;
    let n = (bytes / 4).max(1);
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i & 7) as f32).collect();
    let mut best = 0f64;
    for _ in 0..passes {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(tandem_kernels::simd::sum).sum();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `(year, month 1..=12, day 1..=31)` of the day `days` after 1970-01-01 (negative: before),
/// in the proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// UTC "YYYY-MM-DD" of `secs` since the Unix epoch.
pub fn utc_date(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// UTC "YYYYmmdd-HHMMSS" of `secs` since the Unix epoch (vLLM's result file names).
pub fn utc_stamp(secs: u64) -> String {
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        // 2000 is a leap year (divisible by 400), 2100 is not.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14");
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_700_000_000), "20231114-221320");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
        assert_eq!(utc_stamp(951_868_799), "20000229-235959");
    }

    #[test]
    fn machine_info_has_its_fields() {
        let m = machine_info();
        assert!(m["cores"].as_u64().is_some_and(|c| c >= 1));
        assert!(m["cpu"].is_string() && m["os"].is_string());
    }
}
