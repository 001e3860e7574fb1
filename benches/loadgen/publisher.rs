//! A publisher: `messages` PUBLISHes on one topic, flat out or paced, with
//! at most `inflight` QoS 1/2 messages unacknowledged.
//!
//! PUBLISH packets are encoded once by kadmq's codec into a template; each
//! message copies the template into the write buffer and patches the packet
//! identifier and the payload header (time, sequence, publisher), so the
//! generator spends its time in the socket, not in encoding. Everything due
//! is batched into one write (up to [`BATCH_BYTES`]).

use crate::conn::Conn;
use crate::payload::{self, now_ns};
use anyhow::{bail, ensure, Result};
use bytes::{Bytes, BytesMut};
use kadmq::protocol::{self, Packet, PubAck, Publish, PublishProperties, QoS, Version};
use std::time::Duration;
use tokio::time::Instant;

/// Encoded messages gathered before a write.
const BATCH_BYTES: usize = 64 * 1024;

pub struct PubConfig {
    pub index: u32,
    pub qos: QoS,
    pub messages: u64,
    /// Most QoS 1/2 messages unacknowledged at once.
    pub inflight: usize,
    /// Messages per second; 0 = as fast as possible.
    pub rate: f64,
    pub deadline: Instant,
}

#[derive(Debug, Default)]
pub struct PubResult {
    pub sent: u64,
    /// QoS 1: PUBACKs; QoS 2: PUBCOMPs; QoS 0: equals `sent`.
    pub completed: u64,
    /// Acknowledgements with an error reason code (MQTT 5).
    pub rejected: u64,
    pub first_send_ns: Option<u64>,
    pub last_send_ns: Option<u64>,
    pub error: Option<String>,
}

/// A PUBLISH encoded once, to be copied and patched.
pub struct Template {
    bytes: Vec<u8>,
    packet_id_at: Option<usize>,
    payload_at: usize,
}

impl Template {
    pub fn new(topic: &str, qos: QoS, payload_len: usize, version: Version) -> Result<Template> {
        ensure!(payload_len >= payload::HEADER, "payload must be at least {} bytes", payload::HEADER);
        let publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.to_string(),
            packet_id: (qos != QoS::AtMostOnce).then_some(0x0101),
            payload: Bytes::from(vec![0u8; payload_len]),
            properties: PublishProperties::default(),
        };
        let mut out = BytesMut::new();
        protocol::encode(&Packet::Publish(publish), version, &mut out)?;
        let bytes = out.to_vec();
        // Fixed header: one byte, then the remaining length (1..=4 bytes).
        let mut header_len = 1;
        while bytes[header_len] & 0x80 != 0 {
            header_len += 1;
        }
        header_len += 1;
        // Variable header: topic (2-byte length + bytes), then the packet id.
        let packet_id_at = (qos != QoS::AtMostOnce).then_some(header_len + 2 + topic.len());
        let template = Template { payload_at: bytes.len() - payload_len, packet_id_at, bytes };
        template.check(topic, qos, version)?;
        Ok(template)
    }

    /// Patches a copy and decodes it with kadmq's codec: the offsets are right.
    fn check(&self, topic: &str, qos: QoS, version: Version) -> Result<()> {
        let mut buf = BytesMut::new();
        self.push(&mut buf, 0xBEEF, 123_456_789, 42, 7);
        match protocol::decode(&mut buf, version, usize::MAX)? {
            Some(Packet::Publish(p))
                if p.topic == topic
                    && p.qos == qos
                    && p.packet_id == (qos != QoS::AtMostOnce).then_some(0xBEEF)
                    && payload::read(&p.payload) == Some((123_456_789, 42, 7))
                    && buf.is_empty() =>
            {
                Ok(())
            }
            other => bail!("PUBLISH template does not decode as expected: {other:?}"),
        }
    }

    pub fn push(&self, out: &mut BytesMut, packet_id: u16, sent_ns: u64, seq: u64, publisher: u32) {
        let base = out.len();
        out.extend_from_slice(&self.bytes);
        let packet = &mut out[base..];
        if let Some(at) = self.packet_id_at {
            packet[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
        }
        payload::write(&mut packet[self.payload_at..], sent_ns, seq, publisher);
    }
}

/// Packet identifiers 1..=65535 handed out in turn, skipping those in use.
struct PacketIds {
    in_use: Vec<bool>,
    next: u16,
}

impl PacketIds {
    fn new() -> PacketIds {
        PacketIds { in_use: vec![false; 65536], next: 1 }
    }

    fn take(&mut self) -> u16 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if !self.in_use[id as usize] {
                self.in_use[id as usize] = true;
                return id;
            }
        }
    }

    /// Frees `id`; false if it was not in use (a stray or repeated ack).
    fn release(&mut self, id: u16) -> bool {
        std::mem::replace(&mut self.in_use[id as usize], false)
    }
}

pub async fn run(mut conn: Conn, cfg: PubConfig, template: Template) -> (PubResult, Conn) {
    let mut result = PubResult::default();
    if let Err(err) = publish_all(&mut conn, &cfg, &template, &mut result).await {
        result.error = Some(format!("{err:#}"));
    }
    if cfg.qos == QoS::AtMostOnce {
        result.completed = result.sent;
    }
    (result, conn)
}

async fn publish_all(conn: &mut Conn, cfg: &PubConfig, template: &Template, result: &mut PubResult) -> Result<()> {
    let qos = cfg.qos;
    let window = if qos == QoS::AtMostOnce { usize::MAX } else { cfg.inflight.clamp(1, 65535) };
    let period = (cfg.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.rate));
    let mut ids = PacketIds::new();
    let mut outstanding = 0usize;
    let mut seq = 0u64;
    let started = Instant::now();
    let deadline = tokio::time::sleep_until(cfg.deadline);
    tokio::pin!(deadline);
    loop {
        // Encode everything that is due and fits the window and the batch.
        let mut wait_until = None;
        while seq < cfg.messages && outstanding < window && conn.wbuf.len() < BATCH_BYTES {
            if let Some(period) = period {
                let due = started + period.mul_f64(seq as f64);
                if due > Instant::now() {
                    wait_until = Some(due);
                    break;
                }
            }
            let packet_id = if qos == QoS::AtMostOnce { 0 } else { ids.take() };
            let now = now_ns();
            template.push(&mut conn.wbuf, packet_id, now, seq, cfg.index);
            result.first_send_ns.get_or_insert(now);
            result.last_send_ns = Some(now);
            seq += 1;
            if qos != QoS::AtMostOnce {
                outstanding += 1;
            }
        }
        if !conn.wbuf.is_empty() {
            conn.try_write()?;
        }
        result.sent = seq;
        if seq == cfg.messages && outstanding == 0 && conn.wbuf.is_empty() {
            return Ok(());
        }
        let want_write = !conn.wbuf.is_empty();
        let fill_now = !want_write && seq < cfg.messages && outstanding < window && wait_until.is_none();
        let pace = wait_until.unwrap_or(cfg.deadline);
        tokio::select! {
            biased;
            _ = &mut deadline => bail!("duration limit reached after {seq} of {} messages", cfg.messages),
            ready = conn.stream.readable() => {
                ready?;
                if conn.try_read()? {
                    while let Some(packet) = conn.next_packet()? {
                        // An acknowledgement ends the exchange: QoS 1 PUBACK, QoS 2
                        // PUBCOMP, or a QoS 2 PUBREC with an error reason.
                        let done = match packet {
                            Packet::PubAck(ack) if qos == QoS::AtLeastOnce => Some(ack),
                            Packet::PubComp(ack) if qos == QoS::ExactlyOnce => Some(ack),
                            Packet::PubRec(ack) if qos == QoS::ExactlyOnce && ack.reason >= 0x80 => Some(ack),
                            Packet::PubRec(ack) if qos == QoS::ExactlyOnce => {
                                conn.queue(&Packet::PubRel(PubAck::new(ack.packet_id)))?;
                                None
                            }
                            Packet::Disconnect(d) => bail!("{}: broker sent DISCONNECT {:?}", conn.client_id, d.reason),
                            _ => None,
                        };
                        if let Some(ack) = done.filter(|ack| ids.release(ack.packet_id)) {
                            outstanding -= 1;
                            result.completed += 1;
                            result.rejected += (ack.reason >= 0x80) as u64;
                        }
                    }
                }
            }
            ready = conn.stream.writable(), if want_write => {
                ready?;
                conn.try_write()?;
            }
            _ = tokio::time::sleep_until(pace), if wait_until.is_some() => {}
            // More can be encoded right away; give other tasks a turn now and then.
            _ = tokio::task::consume_budget(), if fill_now => {}
        }
    }
}
