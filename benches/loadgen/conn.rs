//! One MQTT client connection over a raw `TcpStream`, using kadmq's codec.
//!
//! The handshake (CONNECT/CONNACK, SUBSCRIBE/SUBACK) is written with plain
//! async reads and writes. The hot loops of publishers and subscribers use
//! readiness (`readable`/`writable`) plus `try_read`/`try_write` so a single
//! task can read and write without cancelling a half-done write.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use kadmq::protocol::{
    self, Connect, ConnectProperties, ConnectReason, Disconnect, DisconnectReason, Packet, QoS, Subscribe,
    SubscribeFilter, SubscriptionOptions, Version,
};
use std::io::ErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Packets larger than this from the broker are refused (the loadgen never
/// asks for anything big).
const MAX_PACKET: usize = 16 * 1024 * 1024;

pub struct Conn {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub version: Version,
    pub client_id: String,
}

impl Conn {
    /// Connects, sends CONNECT (clean start, `keep_alive` seconds, 0 for
    /// none) and waits for a successful CONNACK. `buffers`: the read and
    /// write buffers' starting capacity.
    pub async fn connect(
        addr: &str,
        client_id: String,
        version: Version,
        keep_alive: u16,
        buffers: usize,
    ) -> Result<Conn> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(buffers),
            wbuf: BytesMut::with_capacity(buffers),
            version,
            client_id,
        };
        let properties = ConnectProperties {
            // Let the broker keep as many QoS 1/2 deliveries in flight to us as
            // it wants: we acknowledge everything at once.
            receive_maximum: Some(u16::MAX),
            ..ConnectProperties::default()
        };
        conn.queue(&Packet::Connect(Connect {
            version,
            client_id: conn.client_id.clone(),
            clean_start: true,
            keep_alive,
            username: None,
            password: None,
            will: None,
            properties,
        }))?;
        conn.flush().await?;
        match conn.read_packet().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReason::Success => Ok(conn),
            Packet::ConnAck(ack) => bail!("{addr}: CONNECT of {} refused: {:?}", conn.client_id, ack.code),
            other => bail!("{addr}: expected CONNACK, got {}", other.name()),
        }
    }

    /// Subscribes to one filter and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<()> {
        self.queue(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter { filter: filter.to_string(), options: SubscriptionOptions::qos(qos) }],
            subscription_identifier: None,
            user_properties: Vec::new(),
        }))?;
        self.flush().await?;
        loop {
            match self.read_packet().await? {
                Packet::SubAck(ack) if ack.packet_id == 1 => {
                    let granted = ack.reasons.first().copied().unwrap_or(0x80);
                    if granted >= 0x80 {
                        bail!("subscription to {filter} refused: reason {granted:#x}");
                    }
                    if granted != qos as u8 {
                        eprintln!("kadmq-loadgen: warning: {filter} granted QoS {granted}, asked {}", qos as u8);
                    }
                    return Ok(());
                }
                // Nothing else is expected before the SUBACK; ignore it.
                _ => {}
            }
        }
    }

    /// Appends a packet to the write buffer.
    pub fn queue(&mut self, packet: &Packet) -> Result<()> {
        protocol::encode(packet, self.version, &mut self.wbuf).map_err(|e| anyhow!("encode {}: {e}", packet.name()))
    }

    /// Writes the whole write buffer (handshake and goodbye only).
    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Reads until one whole packet is decoded (handshake only).
    pub async fn read_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(packet) = self.next_packet()? {
                return Ok(packet);
            }
            self.rbuf.reserve(16 * 1024);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("{}: connection closed by the broker", self.client_id);
            }
        }
    }

    /// Decodes the next whole packet in the read buffer, if any.
    pub fn next_packet(&mut self) -> Result<Option<Packet>> {
        protocol::decode(&mut self.rbuf, self.version, MAX_PACKET)
            .map_err(|e| anyhow!("{}: undecodable packet from the broker: {e}", self.client_id))
    }

    /// Reads what the socket has without blocking. `Ok(false)`: nothing was
    /// ready (readiness was spurious). End of stream is an error.
    pub fn try_read(&mut self) -> Result<bool> {
        let mut any = false;
        loop {
            self.rbuf.reserve(64 * 1024);
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => bail!("{}: connection closed by the broker", self.client_id),
                Ok(n) => {
                    any = true;
                    // A short read means the socket is drained for now.
                    if n < 32 * 1024 {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(any),
                Err(e) => return Err(e).with_context(|| format!("{}: read", self.client_id)),
            }
        }
    }

    /// Writes as much of the write buffer as the socket takes.
    pub fn try_write(&mut self) -> Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e).with_context(|| format!("{}: write", self.client_id)),
            }
        }
        // Empty again: `clear` lets the next `reserve` reuse the allocation.
        self.wbuf.clear();
        Ok(())
    }

    /// Sends DISCONNECT (best effort) and closes.
    pub async fn goodbye(mut self) {
        if self.queue(&Packet::Disconnect(Disconnect::new(DisconnectReason::NormalDisconnection))).is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.flush()).await;
        }
        let _ = self.stream.shutdown().await;
    }
}
