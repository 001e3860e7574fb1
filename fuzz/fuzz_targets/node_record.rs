//! Gossiped node records (`NodeRecord::decode`, dht/src/driver/membership.rs):
//! whatever decodes must re-encode and decode to the same record, and
//! applying it to a membership table (peer id and address parsing, the
//! failure detector) must not panic.
#![no_main]

use kadmq_dht::driver::membership::{FailureDetector, NodeRecord};
use kadmq_dht::driver::PeerId;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let Some(record) = NodeRecord::decode(data) else { return };
    let bytes = record.encode();
    assert_eq!(NodeRecord::decode(&bytes).as_ref(), Some(&record), "a record round-trips");
    static LOCAL: OnceLock<PeerId> = OnceLock::new();
    let local = *LOCAL.get_or_init(PeerId::random);
    let mut table = FailureDetector::new(local, Duration::from_secs(5), Duration::from_secs(15));
    let t0 = Instant::now();
    let _ = table.observe(&record, t0);
    let mut next = record.clone();
    next.seq = next.seq.wrapping_add(1);
    next.leaving = !next.leaving;
    let _ = table.observe(&next, t0 + Duration::from_secs(1));
    let _ = table.tick(t0 + Duration::from_secs(20));
    let _ = table.observe(&record, t0 + Duration::from_secs(21));
    let _ = table.tick(t0 + Duration::from_secs(1000));
});
