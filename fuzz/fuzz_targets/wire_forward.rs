//! The broker's inter-node envelope (`src/cluster/wire.rs`): arbitrary bytes
//! are unbatched and every frame decoded, as a node does with what a peer
//! sends. The input is also decoded whole (a single frame). Whatever decodes
//! must re-encode with the broker's own encoders and decode to the same
//! value, and the frames of a batch must re-batch to the same frames.
#![no_main]

use bytes::Bytes;
use kadmq::cluster::wire::{self, Wire};
use libfuzzer_sys::fuzz_target;

fn reencode(wire: &Wire) -> Bytes {
    match wire {
        Wire::Route(frame) => wire::encode_route(frame),
        Wire::Forward(f) => {
            let mut out = Vec::new();
            wire::write_forward(&mut out, f.id, f.sequence, &f.message, &f.route);
            Bytes::from(out)
        }
        Wire::Ack { epoch, upto } => wire::encode_ack(*epoch, *upto),
        Wire::Retained(frame) => wire::encode_retained(frame),
        Wire::Rejoined => wire::encode_rejoined(),
        Wire::Session(frame) => wire::encode_session(frame),
        Wire::SentOn { dead, messages } => wire::encode_sent_on(*dead, &messages.iter().collect::<Vec<_>>()),
    }
}

fn check(frame: &Bytes) {
    if let Ok(decoded) = wire::decode(frame) {
        let bytes = reencode(&decoded);
        let again = wire::decode(&bytes).expect("a re-encoded frame decodes");
        assert_eq!(again, decoded);
        // Canonical: the re-encoding re-encodes to itself.
        assert_eq!(reencode(&again), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    check(&bytes);
    if let Ok(frames) = wire::unbatch(bytes.clone()) {
        for frame in &frames {
            check(frame);
        }
        if data.get(..2) == Some(&[wire::VERSION, 6][..]) {
            let mut batch = wire::new_batch(data.len());
            for frame in &frames {
                wire::append_to_batch(&mut batch, |out| out.extend_from_slice(frame));
            }
            assert_eq!(batch, data, "a batch re-batches to itself");
            assert_eq!(wire::unbatch(Bytes::from(batch)).expect("re-batched"), frames);
        }
    }
});
