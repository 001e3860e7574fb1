//! The shared clock and what every payload starts with.
//!
//! Layout of the first [`HEADER`] bytes (little endian): send time in
//! nanoseconds since the process epoch (u64), sequence number within its
//! publisher (u64), publisher index (u32). The rest is filler. Publishers
//! and subscribers live in one process, so one `Instant` is their clock.

use std::sync::OnceLock;
use std::time::Instant;

pub const HEADER: usize = 20;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the first call in this process (monotonic).
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn write(out: &mut [u8], sent_ns: u64, seq: u64, publisher: u32) {
    out[0..8].copy_from_slice(&sent_ns.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..20].copy_from_slice(&publisher.to_le_bytes());
}

/// (send time, sequence, publisher), or `None` for a payload too short to
/// be ours.
pub fn read(payload: &[u8]) -> Option<(u64, u64, u32)> {
    if payload.len() < HEADER {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().expect("8 bytes"));
    let publisher = u32::from_le_bytes(payload[16..20].try_into().expect("4 bytes"));
    Some((u64_at(0), u64_at(8), publisher))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let mut buf = [0u8; 32];
        super::write(&mut buf, 1 << 40, 77, 3);
        assert_eq!(super::read(&buf), Some((1 << 40, 77, 3)));
        assert_eq!(super::read(&buf[..19]), None);
    }
}
