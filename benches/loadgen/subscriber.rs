//! A subscriber: reads PUBLISHes, acknowledges them (PUBACK, or PUBREC then
//! PUBCOMP), and records latency, loss, duplicates and reordering per
//! publisher. It stops when it has every message it expects, when nothing
//! came for `drain` after the publishers finished, or at the deadline.

use crate::conn::Conn;
use crate::payload::{self, now_ns};
use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use kadmq::protocol::{Packet, PubAck, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};

pub struct SubConfig {
    /// Messages it should receive (each exactly once).
    pub expected: u64,
    /// Publisher indexes run over 0..publishers, sequences over 0..messages.
    pub publishers: u32,
    pub messages: u64,
    pub deadline: Instant,
    /// How long to wait for stragglers once the publishers are done.
    pub drain: Duration,
    /// When the last publisher finished (ns on the shared clock), 0 before.
    pub publishers_done_ns: Arc<AtomicU64>,
}

pub struct SubResult {
    /// Every PUBLISH of ours that arrived, duplicates included.
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    /// Arrived after a later message of the same publisher.
    pub reordered: u64,
    /// PUBLISHes whose payload is not ours or whose publisher/sequence is out of range.
    pub foreign: u64,
    /// Latency in nanoseconds.
    pub latency: Histogram<u64>,
    pub last_receive_ns: Option<u64>,
    pub error: Option<String>,
}

/// What one subscriber has seen of one publisher.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    highest: Option<u64>,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 1 hour, 3 significant figures.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

pub async fn run(mut conn: Conn, cfg: SubConfig) -> (SubResult, Conn) {
    let mut result = SubResult {
        received: 0,
        unique: 0,
        duplicates: 0,
        reordered: 0,
        foreign: 0,
        latency: new_histogram(),
        last_receive_ns: None,
        error: None,
    };
    if let Err(err) = receive_all(&mut conn, &cfg, &mut result).await {
        result.error = Some(format!("{err:#}"));
    }
    (result, conn)
}

async fn receive_all(conn: &mut Conn, cfg: &SubConfig, result: &mut SubResult) -> Result<()> {
    let words = cfg.messages.div_ceil(64) as usize;
    let mut seen: Vec<Seen> = (0..cfg.publishers).map(|_| Seen::default()).collect();
    // QoS 2 packet ids that got PUBREC and wait for PUBREL.
    let mut awaiting_release = vec![false; 65536];
    let mut awaiting = 0usize;
    let deadline = tokio::time::sleep_until(cfg.deadline);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        if result.unique >= cfg.expected && awaiting == 0 && conn.wbuf.is_empty() {
            return Ok(());
        }
        let want_write = !conn.wbuf.is_empty();
        tokio::select! {
            biased;
            _ = &mut deadline => bail!("duration limit reached with {} of {} messages", result.unique, cfg.expected),
            ready = conn.stream.readable() => {
                ready?;
                if !conn.try_read()? {
                    continue;
                }
                while let Some(packet) = conn.next_packet()? {
                    match packet {
                        Packet::Publish(p) => {
                            let now = now_ns();
                            match p.qos {
                                QoS::AtMostOnce => {}
                                QoS::AtLeastOnce => conn.queue(&Packet::PubAck(PubAck::new(p.packet_id.unwrap_or(0))))?,
                                QoS::ExactlyOnce => {
                                    let id = p.packet_id.unwrap_or(0);
                                    if !std::mem::replace(&mut awaiting_release[id as usize], true) {
                                        awaiting += 1;
                                    }
                                    conn.queue(&Packet::PubRec(PubAck::new(id)))?;
                                }
                            }
                            let Some((sent_ns, seq, publisher)) = payload::read(&p.payload) else {
                                result.foreign += 1;
                                continue;
                            };
                            let Some(track) = seen.get_mut(publisher as usize).filter(|_| seq < cfg.messages) else {
                                result.foreign += 1;
                                continue;
                            };
                            result.received += 1;
                            result.last_receive_ns = Some(now);
                            result.latency.saturating_record(now.saturating_sub(sent_ns).max(1));
                            if track.bits.is_empty() {
                                track.bits = vec![0u64; words];
                            }
                            let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                            if track.bits[word] & bit != 0 {
                                result.duplicates += 1;
                                continue;
                            }
                            track.bits[word] |= bit;
                            result.unique += 1;
                            match track.highest {
                                Some(h) if seq < h => result.reordered += 1,
                                _ => track.highest = Some(seq),
                            }
                        }
                        Packet::PubRel(rel) => {
                            if std::mem::replace(&mut awaiting_release[rel.packet_id as usize], false) {
                                awaiting -= 1;
                            }
                            conn.queue(&Packet::PubComp(PubAck::new(rel.packet_id)))?;
                        }
                        Packet::Disconnect(d) => bail!("{}: broker sent DISCONNECT {:?}", conn.client_id, d.reason),
                        _ => {}
                    }
                }
                if !conn.wbuf.is_empty() {
                    conn.try_write()?;
                }
            }
            ready = conn.stream.writable(), if want_write => {
                ready?;
                conn.try_write()?;
            }
            _ = tick.tick() => {
                let done = cfg.publishers_done_ns.load(Ordering::Acquire);
                if done > 0 {
                    let quiet_since = done.max(result.last_receive_ns.unwrap_or(0));
                    if now_ns().saturating_sub(quiet_since) > cfg.drain.as_nanos() as u64 {
                        // Incomplete: the report shows what is missing.
                        return Ok(());
                    }
                }
            }
        }
    }
}
