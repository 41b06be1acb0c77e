//! This process's memory, from `/proc/self/status`, for the tests that bound it (each its own
//! test binary: the peak is per process).

/// The value of a `/proc/self/status` field in bytes, e.g. `kib("VmHWM:")` (the peak RSS).
pub(crate) fn kib(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<usize>()
                .ok()
        })
        .expect("an RSS field")
        * 1024
}
