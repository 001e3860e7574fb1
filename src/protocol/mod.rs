//! The MQTT wire protocol: packet types, the 3.1.1/5.0 codec and topic rules.
//!
//! Boundary: bytes in, [`Packet`] out and back. No I/O, no broker state.
//!
//! We started from `mqttbytes` (chosen crate) and replaced its packet codec:
//! it splits 3.1.1 and 5.0 into two unrelated type families, has no AUTH
//! packet, and rejects valid short 5.0 packets (a DISCONNECT or PUBACK with
//! remaining length 0 or 2). `codec.rs` says what each fix is; the
//! differential tests in `codec.rs` check our bytes against mqttbytes
//! wherever mqttbytes is right.

mod codec;
mod packet;
pub mod topic;

pub use codec::{decode, encode, encoded_len, DecodeError, EncodeError, MAX_PACKET_SIZE};
pub use packet::*;
