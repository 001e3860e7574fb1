//! The `/kadmq/frames/1` stream protocol: opaque frames between two nodes.
//!
//! Job: carry length-delimited opaque frames (4-byte big-endian length, then
//! the bytes) on ONE long-lived yamux stream per peer pair and direction.
//! The writer side batches: it takes every frame queued for the peer (up to
//! [`MAX_BATCH_FRAMES`]) and sends them in one write and one flush. It
//! re-opens the stream (re-dialling through libp2p-stream) with backoff when
//! the link drops.
//!
//! A new stream is used only once the receiver has accepted it: the
//! receiver's first byte on the stream is [`ACCEPTED`], and the writer sends
//! nothing before it has read that byte. libp2p-stream hands inbound streams
//! over through a channel that holds one stream and resets any other that
//! arrives while it is full (two peers opening streams to a node at the same
//! moment, every member right after a join); without the acceptance byte the
//! first batches written on such a stream vanish without an error.
//!
//! Boundary: frames are opaque here (the routing core fills them with
//! rmp-serde encoded messages); once a stream is accepted, delivery is at
//! most once: a batch whose write failed because the connection broke is
//! dropped and logged, because only the core knows which frames need
//! acknowledging and resending.

use std::time::Duration;

use bytes::Bytes;
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;
use tracing::{debug, trace, warn};

use super::{
    budget::{Charged, SendBudget},
    Event,
};

/// The frame protocol's name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/kadmq/frames/2");
/// The first byte a receiver writes on a frame stream it has accepted.
pub const ACCEPTED: u8 = 0xA5;
/// Largest frame accepted (16 MiB); a larger length prefix kills the stream.
pub const MAX_FRAME: usize = 16 << 20;
/// Most frames written in one batch.
pub const MAX_BATCH_FRAMES: usize = 1024;

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const READ_BUFFER: usize = 64 << 10;
/// Most bytes of a frame's body read (and allocated ahead) at once.
const READ_CHUNK: usize = 64 << 10;
/// How long a writer waits for [`ACCEPTED`] before trying a new stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted inbound streams waiting for the event loop.
pub(crate) const ACCEPT_QUEUE: usize = 256;

/// Appends `frame` with its length prefix to `buf`.
pub fn encode_frame(frame: &[u8], buf: &mut Vec<u8>) {
    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    buf.extend_from_slice(frame);
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R>(reader: &mut R) -> std::io::Result<Option<Bytes>>
where
    R: futures::AsyncRead + Unpin,
{
    let Some(len) = read_len(reader).await? else { return Ok(None) };
    read_body(reader, len).await.map(Some)
}

/// Reads a frame's length prefix; `Ok(None)` at a clean end of stream.
async fn read_len<R>(reader: &mut R) -> std::io::Result<Option<usize>>
where
    R: futures::AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    Ok(Some(len))
}

/// Reads the `len` bytes of a frame's body.
async fn read_body<R>(reader: &mut R, len: usize) -> std::io::Result<Bytes>
where
    R: futures::AsyncRead + Unpin,
{
    let mut frame = Vec::new();
    read_body_into(reader, len, &mut frame).await?;
    Ok(Bytes::from(frame))
}

/// Reads the `len` bytes of a frame's body into `frame`, at most
/// [`READ_CHUNK`] per read. The buffer grows with the bytes that actually
/// arrived (at most doubling, never past `len`), so a length prefix alone
/// cannot make the node allocate [`MAX_FRAME`]. A stream that ends early is
/// an `UnexpectedEof` error.
async fn read_body_into<R>(reader: &mut R, len: usize, frame: &mut Vec<u8>) -> std::io::Result<()>
where
    R: futures::AsyncRead + Unpin,
{
    frame.clear();
    // `frame[..filled]` has arrived; the rest of `frame` is zeroed room for
    // the next reads (zeroed once, however small the reads).
    let mut filled = 0;
    while filled < len {
        if filled == frame.len() {
            let want = (len - filled).min(READ_CHUNK);
            if frame.capacity() < filled + want {
                let target = (filled + want).max(frame.capacity() * 2).min(len);
                frame.reserve_exact(target - filled);
            }
            frame.resize(filled + want, 0);
        }
        match reader.read(&mut frame[filled..]).await {
            Ok(0) => {
                frame.truncate(filled);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("stream ended {filled} bytes into a frame of {len}"),
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                frame.truncate(filled);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Waits for the receiver's [`ACCEPTED`] byte on a stream just opened.
async fn await_acceptance<S>(stream: &mut S) -> std::io::Result<()>
where
    S: futures::AsyncRead + Unpin,
{
    let mut byte = [0u8; 1];
    match tokio::time::timeout(ACCEPT_TIMEOUT, stream.read_exact(&mut byte)).await {
        Ok(Ok(())) if byte[0] == ACCEPTED => Ok(()),
        Ok(Ok(())) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected first byte {:#04x} from the receiver", byte[0]),
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the receiver did not accept the stream")),
    }
}

/// Takes inbound frame streams from libp2p-stream as fast as they come (its
/// channel holds one and resets the others) and queues them for the event
/// loop, which decides whether to read them.
pub(crate) async fn accept_loop(
    mut incoming: libp2p_stream::IncomingStreams,
    accepted: mpsc::Sender<(PeerId, Stream)>,
) {
    while let Some(stream) = incoming.next().await {
        if accepted.send(stream).await.is_err() {
            return;
        }
    }
}

/// The sending half of one peer's link: owns the outbound stream to `peer`
/// and drains `queue` onto it, re-opening the stream after failures. Ends
/// when every sender of `queue` is gone, or when the event loop aborts it
/// (peer blocked or dead, or the event loop itself dropped). Each frame's
/// share of the send budget comes back when it is written or dropped; a
/// dropped batch is reported as [`Event::FramesLost`] on `events`.
pub(crate) async fn write_loop(
    peer: PeerId,
    mut control: libp2p_stream::Control,
    mut queue: mpsc::UnboundedReceiver<(Bytes, Charged)>,
    events: mpsc::Sender<Event>,
) {
    let mut batch: Vec<(Bytes, Charged)> = Vec::with_capacity(MAX_BATCH_FRAMES);
    let mut buf: Vec<u8> = Vec::new();
    let mut backoff = BACKOFF_MIN;
    'link: loop {
        // Open a stream only once there is something to send.
        if batch.is_empty() && queue.recv_many(&mut batch, MAX_BATCH_FRAMES).await == 0 {
            return;
        }
        let opened = match control.open_stream(peer, PROTOCOL).await {
            Ok(mut stream) => await_acceptance(&mut stream).await.map(|()| stream).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut stream = match opened {
            Ok(stream) => {
                debug!(%peer, "frame stream accepted");
                backoff = BACKOFF_MIN;
                stream
            }
            Err(cause) => {
                // Keep the batch: nothing of it was written yet.
                debug!(%peer, %cause, retry_in = ?backoff, "opening frame stream failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue 'link;
            }
        };
        loop {
            if batch.is_empty() && queue.recv_many(&mut batch, MAX_BATCH_FRAMES).await == 0 {
                let _ = stream.close().await;
                return;
            }
            buf.clear();
            for (frame, _) in &batch {
                encode_frame(frame, &mut buf);
            }
            trace!(%peer, frames = batch.len(), bytes = buf.len(), "writing batch");
            let written = async {
                stream.write_all(&buf).await?;
                stream.flush().await
            }
            .await;
            if let Err(e) = written {
                warn!(%peer, cause = %e, lost_frames = batch.len(), "frame stream broke; re-opening");
                batch.clear();
                let _ = events.send(Event::FramesLost { peer }).await;
                continue 'link;
            }
            batch.clear();
            // Large batches leave a large buffer behind; do not hold it
            // forever for one burst.
            if buf.capacity() > 4 * MAX_FRAME {
                buf = Vec::new();
            }
        }
    }
}

/// The receiving half: accepts one inbound stream of `peer` (writes
/// [`ACCEPTED`]), then reads frames from it and hands them to the driver's
/// user as [`Event::Frame`]. Frames go straight to the event channel, not
/// through the event loop, so a slow consumer pushes back on this stream
/// (yamux flow control) without stalling the swarm. Each frame is charged
/// to the node's receive budget before its bytes are allocated, so what
/// all peers together have in flight to the user stays within it.
pub(crate) async fn read_loop(peer: PeerId, mut stream: Stream, events: mpsc::Sender<Event>, budget: SendBudget) {
    let accepted = async {
        stream.write_all(&[ACCEPTED]).await?;
        stream.flush().await
    }
    .await;
    if let Err(e) = accepted {
        debug!(%peer, cause = %e, "could not accept frame stream");
        return;
    }
    let mut reader = futures::io::BufReader::with_capacity(READ_BUFFER, stream);
    loop {
        let frame = match read_len(&mut reader).await {
            Ok(Some(len)) => {
                let held = budget.charge(len).await;
                read_body(&mut reader, len).await.map(|bytes| Some((bytes, held)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match frame {
            Ok(Some((bytes, held))) => {
                if events.send(Event::Frame { from: peer, bytes, held: std::sync::Arc::new(held) }).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                debug!(%peer, "frame stream closed by peer");
                return;
            }
            Err(e) => {
                debug!(%peer, cause = %e, "frame stream ended");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_through_the_codec() {
        let mut buf = Vec::new();
        encode_frame(b"hello", &mut buf);
        encode_frame(b"", &mut buf);
        encode_frame(&[7u8; 1000], &mut buf);
        let mut reader = futures::io::Cursor::new(buf);
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), &b"hello"[..]);
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap().len(), 0);
        assert_eq!(read_frame(&mut reader).await.unwrap().unwrap().len(), 1000);
        assert!(read_frame(&mut reader).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_stream_is_used_only_after_the_receiver_accepted_it() {
        let mut accepted = futures::io::Cursor::new(vec![ACCEPTED, 1, 2]);
        assert!(await_acceptance(&mut accepted).await.is_ok());
        // A stream reset before acceptance (libp2p-stream dropped it) reads
        // as end of stream: refused, so the writer keeps its batch.
        let mut reset = futures::io::Cursor::new(Vec::new());
        assert!(await_acceptance(&mut reset).await.is_err());
        let mut stranger = futures::io::Cursor::new(vec![0u8]);
        assert!(await_acceptance(&mut stranger).await.is_err());
    }

    /// Hands out `data` at most `step` bytes per read.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
    }

    impl futures::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[tokio::test]
    async fn a_length_prefix_alone_does_not_allocate_the_claimed_frame() {
        let mut stream = (MAX_FRAME as u32).to_be_bytes().to_vec();
        stream.extend_from_slice(&[1; 10]);
        let mut reader = futures::io::Cursor::new(stream.clone());
        let e = read_frame(&mut reader).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        // The body's buffer stays at one read chunk.
        let mut reader = futures::io::Cursor::new(stream[4..].to_vec());
        let mut frame = Vec::new();
        let e = read_body_into(&mut reader, MAX_FRAME, &mut frame).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(frame, [1; 10]);
        assert!(frame.capacity() <= READ_CHUNK, "capacity {}", frame.capacity());
        // It grows with what arrives: 300 KiB of a claimed 16 MiB, in small
        // reads, holds well under a megabyte.
        let mut reader = Trickle { data: vec![2; 300 << 10], at: 0, step: 1000 };
        assert!(read_body_into(&mut reader, MAX_FRAME, &mut frame).await.is_err());
        assert_eq!(frame.len(), 300 << 10);
        assert!(frame.capacity() <= 1 << 20, "capacity {}", frame.capacity());
    }

    #[tokio::test]
    async fn a_frame_split_across_many_reads_is_reassembled() {
        let big: Vec<u8> = (0..(200u32 << 10)).map(|i| i as u8).collect();
        let mut buf = Vec::new();
        encode_frame(b"hello", &mut buf);
        encode_frame(&big, &mut buf);
        encode_frame(b"", &mut buf);
        encode_frame(b"end", &mut buf);
        for step in [1, 3, 4096, READ_CHUNK + 1] {
            let mut reader = Trickle { data: buf.clone(), at: 0, step };
            assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), &b"hello"[..]);
            let frame = read_frame(&mut reader).await.unwrap().unwrap();
            assert!(frame == big, "step {step}");
            assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), &b""[..]);
            assert_eq!(read_frame(&mut reader).await.unwrap().unwrap(), &b"end"[..]);
            assert!(read_frame(&mut reader).await.unwrap().is_none());
        }
        // A whole frame at its exact size needs no more than its length.
        let mut frame = Vec::new();
        let mut reader = futures::io::Cursor::new(big.clone());
        read_body_into(&mut reader, big.len(), &mut frame).await.unwrap();
        assert_eq!(frame.capacity(), big.len());
    }

    #[tokio::test]
    async fn oversized_length_prefix_is_refused() {
        let buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        let mut reader = futures::io::Cursor::new(buf);
        assert!(read_frame(&mut reader).await.is_err());
    }
}
