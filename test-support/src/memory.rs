//! What the memory-bounding tests need: this process's memory from `/proc/self/status` (each
//! such test is its own test binary, since the peak is per process), and the large frames they
//! send.

/// The value of a `/proc/self/status` field in bytes, e.g. `kib("VmHWM:")` (the peak RSS).
///
/// # Panics
///
/// If the file or the field cannot be read.
pub fn kib(field: &str) -> usize {
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

/// One framed HL7 message of `payload_len` bytes (an MSH segment with control id `CID`, then
/// an NTE segment padded with `x`), ready to write to a server.
pub fn large_frame(payload_len: usize) -> Vec<u8> {
    let mut wire = Vec::with_capacity(payload_len + 3);
    wire.push(0x0b);
    wire.extend_from_slice(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|CID|P|2.5.1\rNTE|");
    wire.resize(payload_len + 1, b'x');
    wire.extend_from_slice(&[0x0d, 0x1c, 0x0d]);
    wire
}
