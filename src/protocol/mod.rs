//! The MQTT wire protocol: packet types and the 3.1.1/5.0 codec.
//!
//! Boundary: bytes in, [`Packet`] out and back. No I/O, no broker state.
//! The topic rules the codec applies live in [`kadmq_dht::topic`], shared
//! with the broker and the routing core.
//!
//! We started from `mqttbytes` (chosen crate) and replaced its packet codec:
//! it splits 3.1.1 and 5.0 into two unrelated type families, has no AUTH
//! packet, rejects valid short 5.0 DISCONNECTs (remaining length 0 or 1),
//! writes 5.0 CONNACKs without their property length, and accepts many
//! malformed packets. `codec.rs` lists each demonstrated bug; the
//! differential tests in `codec/mqttbytes_diff.rs` check our bytes against
//! mqttbytes wherever mqttbytes is right.

pub mod alias;
mod codec;
mod packet;

pub use codec::{decode, encode, encoded_len, DecodeError, EncodeError, MAX_PACKET_SIZE};
pub use packet::*;
