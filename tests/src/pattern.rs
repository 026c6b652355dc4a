//! Large bodies that are never held in memory: a sender streams a known
//! byte pattern chunk by chunk, and a receiver checks each chunk against
//! the pattern as it arrives. A lost, duplicated, reordered or corrupted
//! chunk anywhere in gigabytes is found, and neither side needs more than a
//! chunk of memory, so a test can tell the proxy's memory use from its own.
//!
//! The pattern is a pseudo-random block whose length (65,521, a prime) is
//! not a divisor of any chunk size a transport uses, so a chunk that is
//! lost or repeated shifts every later byte against the block.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use anyhow::{Result, bail};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Length of the repeating block.
const BLOCK_LEN: usize = 65_521;

fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        // xorshift64*: any fixed sequence will do.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..BLOCK_LEN)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    })
}

/// The pattern's bytes from `offset`, `len` of them.
pub fn bytes_at(offset: u64, len: usize) -> Vec<u8> {
    let block = block();
    let mut out = Vec::with_capacity(len);
    let mut pos = (offset % BLOCK_LEN as u64) as usize;
    while out.len() < len {
        let n = (len - out.len()).min(BLOCK_LEN - pos);
        out.extend_from_slice(&block[pos..pos + n]);
        pos = 0;
    }
    out
}

/// A body of `len` pattern bytes, produced `chunk` bytes at a time, with no
/// length announced (so HTTP/1.1 sends it chunked).
#[derive(Debug)]
pub struct PatternBody {
    sent: u64,
    len: u64,
    chunk: usize,
}

impl PatternBody {
    /// `len` bytes in chunks of `chunk` bytes.
    pub fn new(len: u64, chunk: usize) -> PatternBody {
        PatternBody {
            sent: 0,
            len,
            chunk: chunk.max(1),
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.sent >= this.len {
            return Poll::Ready(None);
        }
        let n = (this.len - this.sent).min(this.chunk as u64) as usize;
        let data = bytes_at(this.sent, n);
        this.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        // Unknown length on purpose: the upload is a stream.
        SizeHint::default()
    }
}

/// Checks received bytes against the pattern, chunk by chunk.
#[derive(Debug, Default, Clone)]
pub struct PatternCheck {
    offset: u64,
    first_mismatch: Option<u64>,
}

impl PatternCheck {
    /// A check from offset 0.
    pub fn new() -> PatternCheck {
        PatternCheck::default()
    }

    /// Checks the next received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        if self.first_mismatch.is_none() {
            let block = block();
            let mut pos = (self.offset % BLOCK_LEN as u64) as usize;
            let mut rest = data;
            let mut at = self.offset;
            while !rest.is_empty() {
                let n = rest.len().min(BLOCK_LEN - pos);
                if rest[..n] != block[pos..pos + n] {
                    let i = rest[..n]
                        .iter()
                        .zip(&block[pos..pos + n])
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    self.first_mismatch = Some(at + i as u64);
                    break;
                }
                rest = &rest[n..];
                at += n as u64;
                pos = 0;
            }
        }
        self.offset += data.len() as u64;
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.offset
    }

    /// True when nothing was received.
    pub fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// True when every byte so far matched.
    pub fn ok(&self) -> bool {
        self.first_mismatch.is_none()
    }

    /// Fails unless exactly `expected` bytes arrived, all matching.
    pub fn expect(&self, expected: u64) -> Result<()> {
        if let Some(at) = self.first_mismatch {
            bail!(
                "the body differs from the pattern from byte {at} on ({} bytes received)",
                self.offset
            );
        }
        if self.offset != expected {
            bail!("received {} bytes, expected {expected}", self.offset);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_streamed_pattern_checks_out_and_a_lost_chunk_does_not() {
        let mut body = PatternBody::new(300_000, 16_384);
        let mut check = PatternCheck::new();
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("no error").into_data().expect("data");
            check.feed(&data);
            chunks.push(data);
        }
        check.expect(300_000).expect("intact");

        let mut lossy = PatternCheck::new();
        for (i, c) in chunks.iter().enumerate() {
            if i != 3 {
                lossy.feed(c);
            }
        }
        assert!(!lossy.ok(), "a lost chunk is found");
        assert_eq!(
            bytes_at(65_520, 3)[1..],
            bytes_at(0, 2)[..],
            "the block wraps"
        );
    }
}
