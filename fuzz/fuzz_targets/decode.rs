//! Decodes arbitrary bytes as a stream of MQTT packets in both protocol
//! versions and with a small and a large maximum packet size. Every packet
//! that decodes must re-encode, re-decode to the same packet, and report its
//! encoded length exactly.
#![no_main]

use bytes::BytesMut;
use kadmq::protocol::{decode, encode, encoded_len, Version, MAX_PACKET_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for version in [Version::V311, Version::V5] {
        for max in [64, MAX_PACKET_SIZE] {
            let mut buf = BytesMut::from(data);
            // Bound the loop: each successful decode consumes at least 2 bytes.
            while let Ok(Some(packet)) = decode(&mut buf, version, max) {
                let mut out = BytesMut::new();
                encode(&packet, version, &mut out).expect("a decoded packet re-encodes");
                assert_eq!(out.len(), encoded_len(&packet, version));
                assert!(out.len() <= MAX_PACKET_SIZE);
                let again = decode(&mut out, version, MAX_PACKET_SIZE)
                    .expect("re-encoded packet decodes")
                    .expect("re-encoded packet is complete");
                assert!(out.is_empty(), "re-encoded packet fully consumed");
                assert_eq!(again, packet);
            }
        }
    }
});
