//! Facts about this machine that the serving path and the reports both need: the CPU's
//! name, the line a profile names its machine by, the load average. Read from /proc; empty or
//! "unknown" where there is none.

/// The CPU's model name from /proc/cpuinfo (`None` where there is none).
pub fn cpu_name() -> Option<String> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    s.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
}

/// The machine as a profile names it ("CPU name, N cores"): `serve` and `generate` use a cached
/// profile only if its machine is this one.
pub fn machine_line(cores: usize) -> String {
    let cpu = cpu_name().unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {cores} cores")
}

/// The 1, 5 and 15 minute load averages from /proc/loadavg, space-separated ("" where there
/// are none).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_line_names_the_cores() {
        let l = machine_line(7);
        assert!(l.ends_with(", 7 cores"), "{l}");
        assert_eq!(
            l.trim_end_matches(", 7 cores"),
            cpu_name().unwrap_or_else(|| "unknown CPU".into())
        );
    }
}
