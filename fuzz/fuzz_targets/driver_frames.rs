//! The driver's frame stream reader (`read_frame`, dht/src/driver/frames.rs)
//! fed from an in-memory stream that hands its bytes out in pieces of
//! fuzzer-chosen sizes (and says "not ready yet" now and then). The frames
//! it returns, and how the stream ends, must match a plain reference parse
//! of the same bytes, however the stream was split.
//!
//! Input: byte 0 = n, then n split sizes (one byte each; 0 = Pending once),
//! then the stream.
#![no_main]

use futures::task::{Context, Poll};
use kadmq_dht::driver::frames::{read_frame, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use std::pin::Pin;

struct Pieces<'a> {
    data: &'a [u8],
    at: usize,
    splits: &'a [u8],
    next: usize,
}

impl futures::AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let split =
            if self.splits.is_empty() { usize::MAX } else { self.splits[self.next % self.splits.len()] as usize };
        self.next += 1;
        if split == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = buf.len().min(split).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Poll::Ready(Ok(n))
    }
}

#[derive(Debug, PartialEq)]
enum End {
    Clean,
    TooLarge,
    Truncated,
}

fn reference(mut data: &[u8]) -> (Vec<&[u8]>, End) {
    let mut frames = Vec::new();
    loop {
        let Some((len, rest)) = data.split_first_chunk::<4>() else { return (frames, End::Clean) };
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_FRAME {
            return (frames, End::TooLarge);
        }
        if rest.len() < len {
            return (frames, End::Truncated);
        }
        frames.push(&rest[..len]);
        data = &rest[len..];
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&n, rest)) = input.split_first() else { return };
    let n = (n as usize).min(rest.len());
    let (splits, data) = rest.split_at(n);
    // A stream of only "pending" would never end.
    let splits = if splits.iter().all(|s| *s == 0) { &[][..] } else { splits };
    let (expected, expected_end) = reference(data);
    let mut reader = Pieces { data, at: 0, splits, next: 0 };
    let mut frames = Vec::new();
    let end = futures::executor::block_on(async {
        loop {
            match read_frame(&mut reader).await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return End::Clean,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return End::TooLarge,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return End::Truncated,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    });
    assert_eq!(end, expected_end);
    assert_eq!(frames.len(), expected.len());
    for (got, want) in frames.iter().zip(&expected) {
        assert_eq!(&got[..], *want);
    }
});
